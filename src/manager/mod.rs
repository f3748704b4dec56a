//! The control plane: replicated state, public API, worker gateway, leader loops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast_raft::ReplicatedDb;
use tokio::sync::{oneshot, watch};

use crate::model::sync::{LogRequest, NodeResources};

pub mod api;
pub mod gateway;
pub mod images;
pub mod leader;
pub mod scheduler;
pub mod sink;
pub mod state;
pub mod trust;
pub mod write;

/// Settings of the control plane: timers and the placement strategy.
#[derive(Clone, Debug)]
pub struct ManagerSettings {
    /// Lease granted to workers on every sync.
    pub lease: Duration,
    /// A node silent for this long is not offered new placements.
    pub heartbeat_ttl: Duration,
    /// Longest a worker's sync may be held waiting for a change; below `heartbeat_ttl`
    /// because the sync is also the heartbeat.
    pub max_long_poll: Duration,
    /// How long a log request waits for the worker to answer.
    pub log_timeout: Duration,
    /// A disconnected node is marked down after this long.
    pub down_after: Duration,
    /// Placement strategy (a cluster-wide setting: give every manager the same).
    pub strategy: scheduler::Strategy,
    /// Where snapshot copies are made before they are streamed (same file system as
    /// the data when set by `node`; the system temp dir by default).
    pub scratch_dir: std::path::PathBuf,
    /// Where image blobs are stored (`<data-dir>/blobs` when set by `node`).
    pub blob_dir: std::path::PathBuf,
    /// Free bytes the blob store leaves on its file system (`--min-free-mb`).
    pub blob_min_free_bytes: u64,
    /// What the leader garbage-collects (`leader::housekeeping`).
    pub retention: crate::config::Retention,
}

impl Default for ManagerSettings {
    fn default() -> Self {
        ManagerSettings {
            lease: Duration::from_secs(30),
            heartbeat_ttl: Duration::from_secs(5),
            max_long_poll: Duration::from_millis(2_500),
            log_timeout: Duration::from_secs(10),
            down_after: Duration::from_secs(60),
            strategy: scheduler::Strategy::Binpack,
            scratch_dir: std::env::temp_dir(),
            blob_dir: std::env::temp_dir().join("holdfast-blobs"),
            blob_min_free_bytes: 64 << 20,
            retention: Default::default(),
        }
    }
}

/// What the leader knows about a worker from its syncs; kept in memory only
/// (heartbeats are not Raft writes).
#[derive(Clone, Debug)]
pub struct Liveness {
    /// When the last sync arrived.
    pub last_seen: Instant,
    /// Resources it measured.
    pub resources: NodeResources,
}

/// Where a worker's log answer goes.
type LogWaiter = oneshot::Sender<Result<String, String>>;

/// Log requests relayed to workers through their long-poll.
#[derive(Default)]
pub struct LogRelay {
    next_id: AtomicU64,
    queued: Mutex<HashMap<String, Vec<LogRequest>>>,
    /// Request id → the node asked and the caller waiting.
    waiters: Mutex<HashMap<u64, (String, LogWaiter)>>,
}

impl LogRelay {
    /// Queues a request for `node`; the receiver gets the worker's answer.
    pub fn request(
        &self,
        node: &str,
        placement_id: &str,
        tail: usize,
        after: Option<String>,
    ) -> (u64, oneshot::Receiver<Result<String, String>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id, (node.to_string(), tx));
        lock(&self.queued).entry(node.to_string()).or_default().push(LogRequest {
            id,
            placement_id: placement_id.to_string(),
            tail,
            after,
        });
        (id, rx)
    }

    /// Takes the requests queued for `node`.
    pub fn take(&self, node: &str) -> Vec<LogRequest> {
        lock(&self.queued).remove(node).unwrap_or_default()
    }

    /// Whether any request waits for `node`.
    pub fn has(&self, node: &str) -> bool {
        lock(&self.queued).get(node).is_some_and(|v| !v.is_empty())
    }

    /// Delivers the answer of worker `from`; false (and nothing delivered) when the
    /// request was not for that node: a node answers only for itself.
    pub fn answer(&self, id: u64, from: &str, result: Result<String, String>) -> bool {
        let mut waiters = lock(&self.waiters);
        match waiters.get(&id) {
            Some((node, _)) if node == from => {
                if let Some((_, tx)) = waiters.remove(&id) {
                    let _ = tx.send(result);
                }
                true
            }
            _ => false,
        }
    }

    /// Forgets a request whose caller gave up.
    pub fn forget(&self, id: u64) {
        lock(&self.waiters).remove(&id);
        for reqs in lock(&self.queued).values_mut() {
            reqs.retain(|r| r.id != id);
        }
    }
}

pub(crate) use crate::lock;

/// Shared state of one manager process.
pub struct Manager {
    /// The replicated database.
    pub db: ReplicatedDb,
    /// Index of the last applied command; changes wake long-polls and the planner.
    pub applied: watch::Receiver<u64>,
    /// Leader-side, in-memory view of workers.
    pub liveness: Mutex<HashMap<String, Liveness>>,
    /// Log requests in flight.
    pub logs: LogRelay,
    /// Bumped when a log request is queued, to wake long-polls.
    pub log_signal: watch::Sender<u64>,
    /// Timers and strategy.
    pub settings: ManagerSettings,
    /// When this process started.
    pub started: Instant,
    /// Batches workers' status reports into few Raft commands.
    pub reports: gateway::ReportBatcher,
    /// What the planner saw last, to skip re-planning tasks nothing could change.
    pub planner_memo: Mutex<leader::PlannerMemo>,
    /// Breakers and bulkheads of this process, for health and metrics.
    pub resilience: crate::resilience::Registry,
    /// Domain events as this manager applies commands (for `/v1/events` and sinks).
    pub events: tokio::sync::broadcast::Sender<state::DomainEvent>,
    /// The state machine `db` applies with (what it knows beyond the database, such as
    /// an entry this build could not apply).
    pub domain: Arc<state::DomainState>,
    /// Tokens the API's auth layer checked recently (see `api::auth`).
    pub tokens: api::auth::TokenCache,
    /// This node's cluster identity, set once at startup: a follower reads the
    /// leader's liveness over the cluster port with it (mutual TLS).
    pub cluster_tls: std::sync::OnceLock<Arc<crate::net::identity::NodeTls>>,
    /// Image blobs on this manager's disk (outside the Raft log).
    pub blobs: images::BlobStore,
    /// Image ids each worker's engine holds, from its syncs (leader memory only).
    pub held_images: Mutex<HashMap<String, Arc<std::collections::HashSet<String>>>>,
}

impl Manager {
    /// Wraps an opened database.
    pub fn new(
        db: ReplicatedDb,
        applied: watch::Receiver<u64>,
        settings: ManagerSettings,
        resilience: crate::resilience::Registry,
        domain: Arc<state::DomainState>,
    ) -> Arc<Self> {
        Arc::new(Manager {
            applied,
            liveness: Mutex::new(HashMap::new()),
            logs: LogRelay::default(),
            log_signal: watch::channel(0).0,
            reports: gateway::ReportBatcher::spawn(db.clone()),
            blobs: images::BlobStore::new(settings.blob_dir.clone(), settings.blob_min_free_bytes),
            held_images: Mutex::new(HashMap::new()),
            db,
            settings,
            started: Instant::now(),
            planner_memo: Mutex::new(leader::PlannerMemo::default()),
            resilience,
            events: domain.events(),
            domain,
            tokens: Default::default(),
            cluster_tls: std::sync::OnceLock::new(),
        })
    }
}

pub use crate::model::now_ms;
