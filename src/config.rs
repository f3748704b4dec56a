//! The configuration of one holdfast node process, built from CLI flags.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What one process runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Node name, unique in the cluster.
    pub node_id: String,
    /// Root data directory (`manager/` and `worker/` live under it).
    pub data_dir: PathBuf,
    /// Run the control plane.
    pub manager: Option<ManagerRole>,
    /// Run the data plane.
    pub worker: Option<WorkerRole>,
    /// Join token and certificate lifetimes of the cluster port (mutual TLS).
    pub trust: TrustSettings,
}

/// Cluster-port trust settings (README "A cluster").
#[derive(Clone)]
pub struct TrustSettings {
    /// Join token (`--token`, `--token-file`, `HOLDFAST_TOKEN`) for a node without a
    /// certificate.
    pub token: Option<String>,
    /// Life of the leaf certificates a manager signs (`--cert-lifetime`).
    pub cert_lifetime: std::time::Duration,
    /// How long after expiry a cut-off node may still renew by itself (`--cert-grace`).
    pub cert_grace: std::time::Duration,
}

impl Default for TrustSettings {
    fn default() -> Self {
        TrustSettings {
            token: None,
            cert_lifetime: crate::net::pki::DEFAULT_LEAF_LIFETIME,
            cert_grace: crate::net::pki::DEFAULT_GRACE,
        }
    }
}

impl std::fmt::Debug for TrustSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: never in a log line.
        f.debug_struct("TrustSettings")
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("cert_lifetime", &self.cert_lifetime)
            .field("cert_grace", &self.cert_grace)
            .finish()
    }
}

/// Default `--min-free-mb`: room for SQLite to finish what it started.
pub const DEFAULT_MIN_FREE_MB: u64 = 64;

/// Manager settings.
#[derive(Clone, Debug)]
pub struct ManagerRole {
    /// Public API listen address.
    pub api: String,
    /// Cluster (Raft + worker sync) listen address.
    pub cluster: String,
    /// Cluster address advertised to peers (defaults to `cluster`).
    pub advertise_cluster: String,
    /// API address advertised to clients (defaults to `api`).
    pub advertise_api: String,
    /// Initialize a new single-member cluster when the data dir is fresh.
    pub bootstrap: bool,
    /// Cluster addresses of existing managers to join.
    pub join: Vec<String>,
    /// Placement strategy.
    pub strategy: crate::manager::scheduler::Strategy,
    /// Lease granted to workers on each sync.
    pub lease: std::time::Duration,
    /// Silence after which a node is `disconnected`.
    pub heartbeat_ttl: std::time::Duration,
    /// Where to forward domain events while this manager leads (`--event-sink`).
    pub event_sink: Option<crate::manager::sink::SinkConfig>,
    /// Restart as the only member of a new cluster keeping all state
    /// (`--force-new-cluster`, quorum-loss recovery).
    pub force_new_cluster: bool,
    /// Writes are refused (507) while the data dir's disk has less free space (MiB).
    pub min_free_mb: u64,
    /// Entries between two snapshots, after each of which the Raft log shrinks
    /// (`--snapshot-every`).
    pub snapshot_every: u64,
    /// An unused catalogued image is removed after this long (`--image-retain`).
    pub image_retain: std::time::Duration,
    /// API certificate and key (`--api-cert`, `--api-key`); without them an API bound
    /// off loopback serves a certificate it issues from the cluster CA.
    pub api_tls_files: Option<(PathBuf, PathBuf)>,
    /// What the leader garbage-collects, and when (`--retain`, `--node-gc`, ...).
    pub retention: Retention,
}

/// Retention of finished work and history (README "Retention").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Finished tasks (stopped, completed, failed) are removed this long after their
    /// last change, with their placements and history.
    pub retain: std::time::Duration,
    /// Nodes `down` for longer than this are removed (zero: never).
    pub node_gc: std::time::Duration,
    /// Audit rows older than this are removed.
    pub audit_retain: std::time::Duration,
    /// At most this many audit rows are kept (the newest).
    pub audit_max_rows: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            retain: std::time::Duration::from_secs(24 * 3_600),
            node_gc: std::time::Duration::from_secs(7 * 24 * 3_600),
            audit_retain: std::time::Duration::from_secs(90 * 24 * 3_600),
            audit_max_rows: 1_000_000,
        }
    }
}

impl ManagerRole {
    /// A single manager that starts its own cluster, listening and advertising on the
    /// given addresses, with default timers and no event sink.
    pub fn bootstrap(api: &str, cluster: &str) -> ManagerRole {
        ManagerRole {
            api: api.to_string(),
            cluster: cluster.to_string(),
            advertise_cluster: cluster.to_string(),
            advertise_api: api.to_string(),
            bootstrap: true,
            join: Vec::new(),
            strategy: Default::default(),
            lease: std::time::Duration::from_secs(30),
            heartbeat_ttl: std::time::Duration::from_secs(5),
            event_sink: None,
            force_new_cluster: false,
            min_free_mb: DEFAULT_MIN_FREE_MB,
            snapshot_every: holdfast_raft::DEFAULT_SNAPSHOT_EVERY,
            image_retain: std::time::Duration::from_secs(24 * 3600),
            api_tls_files: None,
            retention: Retention::default(),
        }
    }
}

/// Worker settings.
#[derive(Clone, Debug)]
pub struct WorkerRole {
    /// Cluster addresses of managers to sync with.
    pub managers: Vec<String>,
    /// Host part of task endpoints.
    pub advertise_host: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Fixed resources to report instead of measuring (simulated nodes in tests).
    pub resources_override: Option<crate::model::sync::NodeResources>,
    /// Cap on image fetch bytes per second (`--image-bandwidth`); none = no cap.
    pub image_bandwidth: Option<u64>,
}
