//! Wire types of the worker ↔ manager sync protocol on the cluster port. Internal:
//! versioned with the binary, not part of the public API.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Desired, PlacementStatus, Story, TaskSpec};

/// Resources a worker measured (sysinfo) at sync time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeResources {
    /// Logical CPUs.
    pub cpus: u32,
    /// CPU capacity in millicores (`cpus * 1000`).
    pub cpu_millis: u64,
    /// One-minute load average.
    pub load1: f64,
    /// Total memory, MiB.
    pub memory_total_mb: u64,
    /// Available memory, MiB.
    pub memory_free_mb: u64,
    /// Size of the filesystem holding Docker's data root, MiB.
    pub disk_total_mb: u64,
    /// Free space there, MiB.
    pub disk_free_mb: u64,
    /// Whether the container engine answered the last ping.
    pub engine_ok: bool,
}

/// One observed-state change of a placement, numbered per node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Per-node sequence number; the manager ignores any it has already applied.
    pub seq: u64,
    /// Placement reported on.
    pub placement_id: String,
    /// Its task.
    pub task_id: String,
    /// Its fence.
    pub fence: u64,
    /// What the worker now observes of it.
    #[serde(flatten)]
    pub status: PlacementStatus,
    /// Worker wall clock, ms since the epoch.
    pub at_ms: u64,
    /// The worker refused to start the placement (admission: not enough resources
    /// left); the manager places it elsewhere at once.
    #[serde(default)]
    pub refused: bool,
    /// A story event for the placement's history (authority cached, stopped on lease
    /// expiry, authority renewed), recorded even without a state change.
    #[serde(default)]
    pub story: Option<Story>,
}

/// Sent by a worker to any manager.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Worker node name.
    pub node: String,
    /// Address the worker advertises (informational: managers never dial workers).
    pub address: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Measured resources.
    pub resources: NodeResources,
    /// Buffered status changes not yet acknowledged, oldest first.
    pub reports: Vec<StatusReport>,
    /// Version of the desired set the worker already has; the manager long-polls
    /// while it is unchanged.
    pub have_version: u64,
    /// How long the manager may hold the request waiting for a change.
    pub wait_ms: u64,
    /// Ids (config digests, `sha256:<hex>`) of the images the worker's engine holds,
    /// so the scheduler can count an image's size on nodes that lack it.
    #[serde(default)]
    pub images: Vec<String>,
}

/// One placement the worker should hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// Placement id.
    pub placement_id: String,
    /// Task id.
    pub task_id: String,
    /// Fence: the Raft index that created the placement.
    pub fence: u64,
    /// Run or stop.
    pub desired: Desired,
    /// What to run.
    pub spec: TaskSpec,
}

/// A manager's request for a container's logs, relayed through the sync long-poll
/// because managers never dial workers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogRequest {
    /// Request id to answer with.
    pub id: u64,
    /// Placement whose container is wanted.
    pub placement_id: String,
    /// Lines from the end.
    pub tail: usize,
    /// Following (`task logs -f`): answer timestamped lines (`<RFC 3339 time> <line>`)
    /// written after this engine timestamp; `""` means the last `tail` lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

/// The worker's answer to a [`LogRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogReply {
    /// Request id.
    pub id: u64,
    /// Log text, or why it could not be read.
    pub result: Result<String, String>,
}

/// The manager's answer to a sync.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncResponse {
    /// Version of `assignments`.
    pub version: u64,
    /// Lease granted from the moment the worker sent the request.
    pub lease_ms: u64,
    /// Highest report sequence applied for this node.
    pub acked_seq: u64,
    /// The full desired set for this node.
    pub assignments: Vec<Assignment>,
    /// Log requests to answer via `POST /cluster/v1/logs`.
    pub log_requests: Vec<LogRequest>,
}

/// Answer of a manager that is not the leader: where to go instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NotLeader {
    /// Cluster address of the leader, when known.
    pub leader_cluster_addr: Option<String>,
}

/// One layer of a catalogued image: the SHA-256 of its uncompressed tar (Docker's
/// `diff_id`), which names its blob on the managers, and its size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// `sha256:<hex>` of the layer tar.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

/// An image in the managers' catalogue (ARCHITECTURE.md "Images without a registry").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogueEntry {
    /// Normalized reference, `name:tag` (see [`normalize_image_ref`]).
    pub reference: String,
    /// `sha256:<hex>` of the image config: the image id Docker shows.
    pub config_digest: String,
    /// Bytes of the config.
    pub config_size: u64,
    /// Layers, bottom first.
    pub layers: Vec<LayerRef>,
}

impl CatalogueEntry {
    /// Total bytes of config and layers.
    pub fn size(&self) -> u64 {
        self.layers.iter().fold(self.config_size, |acc, l| acc.saturating_add(l.size))
    }
}

/// An image reference as the catalogue keys it: a tag is added (`:latest`) when the
/// reference has none, and Docker Hub's implicit prefixes are dropped, so `app`,
/// `app:latest` and `docker.io/library/app:latest` are one key.
pub fn normalize_image_ref(reference: &str) -> String {
    let r = reference.trim();
    let r = r.strip_prefix("docker.io/").unwrap_or(r);
    let r = r.strip_prefix("library/").unwrap_or(r);
    if r.contains('@') {
        return r.to_string();
    }
    let last = r.rsplit('/').next().unwrap_or(r);
    if last.contains(':') {
        r.to_string()
    } else {
        format!("{r}:latest")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Observed;

    /// The report's JSON (the wire and the worker's outbox) keeps the status fields at
    /// the top level, in their old order.
    #[test]
    fn a_status_report_keeps_its_json() {
        let report = StatusReport {
            seq: 7,
            placement_id: "p1.12".into(),
            task_id: "t1".into(),
            fence: 12,
            status: PlacementStatus {
                observed: Observed::Restarting,
                exit_code: Some(-1),
                reason: Some("exited with code 1".into()),
                restarts: 2,
                endpoints: vec!["10.0.0.5:32768".into()],
                container_id: Some("c0ffee".into()),
            },
            at_ms: 1_700_000_000_000,
            refused: false,
            story: Some(Story::StoppedOnExpiry),
        };
        let json = concat!(
            r#"{"seq":7,"placement_id":"p1.12","task_id":"t1","fence":12,"observed":"restarting","#,
            r#""exit_code":-1,"reason":"exited with code 1","restarts":2,"endpoints":["10.0.0.5:32768"],"#,
            r#""container_id":"c0ffee","at_ms":1700000000000,"refused":false,"story":"stopped-on-expiry"}"#
        );
        assert_eq!(serde_json::to_string(&report).unwrap(), json);
        assert_eq!(serde_json::from_str::<StatusReport>(json).unwrap(), report);
        // Reports written before `refused` and `story` existed still read.
        let old = r#"{"seq":1,"placement_id":"p","task_id":"t","fence":1,"observed":"running","exit_code":null,"reason":null,"restarts":0,"endpoints":[],"container_id":null,"at_ms":5}"#;
        let read: StatusReport = serde_json::from_str(old).unwrap();
        assert_eq!((read.status, read.refused, read.story), (PlacementStatus::new(Observed::Running), false, None));
        // A missing status field is still an error, as it was before the status was one struct.
        assert!(serde_json::from_str::<StatusReport>(&old.replace(r#""restarts":0,"#, "")).is_err());
    }
}
