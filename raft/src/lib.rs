//! `holdfast-raft`: a replicated SQLite database on openraft.
//!
//! The crate replicates **opaque commands** and applies each committed command to a
//! SQLite state database through the [`Apply`] trait, inside one transaction that also
//! records the last-applied log id and the membership. It knows nothing about tasks,
//! nodes or the public HTTP API of the application that uses it.
//!
//! Files in the data directory: `raft-log.db` (log, vote, committed, last purged) and
//! `state.db` (application tables + `_raft_sm` metadata), both in WAL mode. The log
//! commits with `synchronous=FULL`, so anything openraft is told is durable is on disk;
//! the state database commits with `synchronous=NORMAL` (atomic, survives a process
//! crash) because the log can always re-apply what a power cut took, and it is
//! checkpointed with fsync before the log behind a snapshot is purged.
//!
//! Transport: Raft RPCs, write forwarding, read-index and join requests travel as JSON
//! over HTTPS (mutual TLS, configuration handed in by the application) on the cluster port; [`ReplicatedDb::cluster_router`] returns the axum
//! routes (all under `/raft/`) and the `network` module holds the only client.
//!
//! Elections: openraft's own election timer is off; the `election` module campaigns
//! only after a pre-vote round that a majority grants, so a member with a stale log or
//! one that was cut off does not take a term it cannot win.

#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod datadir;
mod election;
mod log_store;
mod network;
mod node;
mod read_pool;
mod recover;
mod server;
mod state_machine;
mod status;
mod types;
mod wire;

/// The storage layer on its own, for openraft's storage test suite and for tools that
/// inspect a data directory. Applications use [`ReplicatedDb`] instead.
pub mod store {
    pub use crate::log_store::LogStore;
    pub use crate::state_machine::StateMachine;
    pub use crate::types::{Payload, TypeConfig};
}

pub use network::cluster_http_builder;
pub use recover::{force_new_cluster, restore_snapshot, Forced, Restored};

/// Default of [`Config::snapshot_every`]: etcd's is 100,000; each build copies the whole
/// state database on every member (ARCHITECTURE.md, "Decisions").
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 50_000;

/// Raft node id. Derived from the human node name by [`node_id_for`].
pub type NodeId = u64;

/// What every member advertises about itself; stored in the Raft membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Human node name given with `--node-id` (e.g. `m1`).
    pub name: String,
    /// `host:port` where peers reach this member's Raft endpoints.
    pub cluster_addr: String,
    /// `host:port` of this member's public HTTP API (shown to clients as the leader).
    pub api_addr: String,
    /// The application's version string as of this member's last bootstrap or join
    /// (opaque here; empty when the application gives none or in records written
    /// before the field existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// The highest feature level the application's build supports (opaque here; `0` in
    /// records written by builds that did not report one). The application decides
    /// what a level means; the crate only carries it, like `version`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub feature_level: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (cluster {}, api {})", self.name, self.cluster_addr, self.api_addr)
    }
}

/// Maps a node name to its stable Raft id (64-bit FNV-1a of the UTF-8 name).
pub fn node_id_for(name: &str) -> NodeId {
    fnv1a(name.as_bytes())
}

/// 64-bit FNV-1a: the one stable hash of the workspace (Raft ids, the scheduler's scan
/// offsets). Written by hand because it is six lines and must never change between
/// versions, which `std`'s hasher does not promise.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The application's deterministic state machine.
///
/// Implemented by the manager on a `rusqlite::Transaction`. A command the application
/// rejects (bad state, conflict) must still return `Ok` with the rejection encoded in
/// the response bytes, after rolling back its own partial writes (use a savepoint):
/// the command is consumed either way. `Err` means the database itself failed and is
/// treated as a fatal storage error.
pub trait Apply: Send + Sync + 'static {
    /// Creates the application's tables (and adds columns) when absent; called on a
    /// fresh state database and again on every open, so it must be idempotent.
    fn init_schema(&self, conn: &rusqlite::Connection) -> rusqlite::Result<()>;
    /// Applies one committed command; `index` is its Raft log index, unique and growing
    /// across the cluster (usable as a fence).
    fn apply(&self, tx: &rusqlite::Transaction<'_>, index: u64, command: &[u8]) -> rusqlite::Result<Vec<u8>>;
    /// Called once the transaction holding every entry up to `index` has committed, so
    /// what they wrote is visible to every connection. Wake waiters and publish events
    /// here, not in `apply`: a reader woken inside `apply` reads on another connection,
    /// may miss the write, and then waits for the next one. Default: nothing.
    fn committed(&self, index: u64) {
        let _ = index;
    }
}

/// Settings of one replicated database member.
#[derive(Clone, Debug)]
pub struct Config {
    /// Human node name; the Raft id is [`node_id_for`] of it.
    pub node_name: String,
    /// Directory holding `raft-log.db` and `state.db`; created when absent.
    pub data_dir: PathBuf,
    /// Advertised `host:port` of this member's cluster (Raft) endpoint.
    pub cluster_addr: String,
    /// Advertised `host:port` of this member's public API.
    pub api_addr: String,
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Lower bound of the randomized election timeout (upper bound is 1.5 times this;
    /// openraft's leader lease is that upper bound).
    pub election_timeout: Duration,
    /// Build a snapshot (and purge the log behind it) every this many applied entries.
    /// Each build copies the whole state database on every member, so the default is
    /// large (ARCHITECTURE.md, "Decisions"): the log holds up to this many entries.
    pub snapshot_every: u64,
    /// Timeout of each Raft RPC and forwarded request.
    pub rpc_timeout: Duration,
    /// Upper bound for a write or linearizable read, including forwarding; past it the
    /// caller gets [`DbError::Timeout`] instead of waiting on a minority.
    pub op_timeout: Duration,
    /// Opaque version string advertised in this member's [`Member`] record.
    pub version: String,
    /// Feature level advertised in this member's [`Member`] record (see
    /// [`Member::feature_level`]).
    pub feature_level: u32,
    /// Before starting, make this member the only voter of a new one-member cluster
    /// that keeps all its state (quorum-loss recovery; see [`force_new_cluster`]).
    pub force_new_cluster: bool,
    /// A write is refused with [`DbError::StorageFull`] while the file system of
    /// `data_dir` has less free space than this: a full disk answers a clear error
    /// instead of failing inside SQLite (fatal), and writes resume by themselves when
    /// space returns. `0` turns the check off.
    pub min_free_bytes: u64,
    /// TLS for every call to a peer (client certificate and server verification). The
    /// crate is handed it and checks no roles itself; there is no plain-HTTP mode.
    pub tls: Arc<rustls::ClientConfig>,
}

impl Config {
    /// Defaults tuned for a LAN: 100 ms heartbeat, 300–450 ms election timeout; peers
    /// are dialed over `tls`.
    pub fn new(
        node_name: &str,
        data_dir: PathBuf,
        cluster_addr: &str,
        api_addr: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Config {
            node_name: node_name.to_string(),
            data_dir,
            cluster_addr: cluster_addr.to_string(),
            api_addr: api_addr.to_string(),
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(300),
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            rpc_timeout: Duration::from_secs(2),
            op_timeout: Duration::from_secs(5),
            version: String::new(),
            feature_level: 0,
            force_new_cluster: false,
            min_free_bytes: 64 << 20,
            tls,
        }
    }

    /// This member's record in the membership, as its own settings describe it.
    pub(crate) fn member(&self) -> Member {
        Member {
            name: self.node_name.clone(),
            cluster_addr: self.cluster_addr.clone(),
            api_addr: self.api_addr.clone(),
            version: self.version.clone(),
            feature_level: self.feature_level,
        }
    }
}

/// Everything that can go wrong talking to the replicated database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The data directory is not ours, is corrupt, or belongs to another node name.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The offending path.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// No leader is known (election in progress, or this member is cut off).
    #[error("no leader is known; this member may be on the minority side of a partition")]
    NoLeader {
        /// Last leader this member heard of, if any.
        last_known: Option<Member>,
    },
    /// The operation did not finish within `op_timeout` (e.g. leader lost its quorum).
    #[error("operation timed out after {after:?}; leader {leader:?}")]
    Timeout {
        /// How long we waited.
        after: Duration,
        /// Leader as known at the time, if any.
        leader: Option<Member>,
    },
    /// Cluster membership request refused or failed (message says why).
    #[error("membership change failed: {0}")]
    Membership(String),
    /// Network failure talking to another member.
    #[error("request to {addr} failed: {reason}")]
    Network {
        /// Peer cluster address.
        addr: String,
        /// Underlying failure.
        reason: String,
    },
    /// SQLite or openraft failed in a way that is not the caller's fault.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The leader's disk is below its free-space reserve; nothing was written. The
    /// message names the directory, the free bytes and the reserve.
    #[error("{0}")]
    StorageFull(String),
}

/// Role of this member as openraft reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Leader of the current term.
    Leader,
    /// Voter following a leader.
    Follower,
    /// Campaigning for leadership.
    Candidate,
    /// Non-voting member catching up.
    Learner,
    /// Stopped or failed.
    Shutdown,
}

/// One member as seen in the membership configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Raft id.
    pub id: NodeId,
    /// Advertised addresses and name.
    pub member: Member,
    /// `true` for a voter, `false` for a learner.
    pub voter: bool,
    /// Highest log index known to be replicated to it (leader only; `None` elsewhere).
    pub matched: Option<u64>,
}

/// A point-in-time view of this member and the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This member's Raft id.
    pub id: NodeId,
    /// This member's name.
    pub name: String,
    /// This member's role.
    pub role: Role,
    /// Current term.
    pub term: u64,
    /// Leader id and addresses, when known.
    pub leader: Option<Member>,
    /// Index of the last log entry on this member.
    pub last_log_index: Option<u64>,
    /// Highest index this member knows to be committed (== applied here).
    pub commit_index: Option<u64>,
    /// Index of the last entry applied to this member's state database.
    pub last_applied: Option<u64>,
    /// Index covered by the latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Milliseconds since the leader last heard from a quorum (leader only).
    pub millis_since_quorum_ack: Option<u64>,
    /// Every member of the current membership.
    pub members: Vec<MemberStatus>,
    /// Why Raft stopped on its own (a fatal storage error), naming the file and the
    /// cause; `None` while running or after a requested shutdown.
    pub fatal: Option<String>,
}

/// A handle to this member's replicated database; cheap to clone.
#[derive(Clone)]
pub struct ReplicatedDb {
    inner: Arc<node::Inner>,
}

impl ReplicatedDb {
    /// Opens (or creates) the member's data directory and starts Raft.
    ///
    /// Refuses a directory holding files that are not a `holdfast-raft` store, or one
    /// written by a member with another node name; never overwrites it.
    pub async fn open(config: Config, app: Arc<dyn Apply>) -> Result<Self, DbError> {
        let inner = node::Inner::open(config, app).await?;
        Ok(ReplicatedDb { inner })
    }

    /// Axum routes of this member's cluster endpoint (all under `/raft/`): Raft RPCs,
    /// forwarded writes, read-index and join. Merge them into the cluster-port server.
    pub fn cluster_router(&self) -> axum::Router {
        server::router(self.inner.clone())
    }

    /// Initializes a single-member cluster with this member as voter. Harmless when
    /// the member is already initialized (e.g. after a restart).
    pub async fn bootstrap(&self) -> Result<(), DbError> {
        self.inner.bootstrap().await
    }

    /// Asks existing members (cluster addresses, tried in turn until `op_timeout`) to
    /// add this member as a learner, then promote it to voter. Harmless when it is
    /// already a voter. Returns once the membership change is committed.
    pub async fn join(&self, seeds: &[String]) -> Result<(), DbError> {
        self.inner.join(seeds).await
    }

    /// Replicates one command and returns what [`Apply::apply`] answered. On a follower
    /// the command is forwarded to the leader. Bounded by `op_timeout`.
    pub async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, DbError> {
        self.inner.write(command).await
    }

    /// Linearizable read: confirms leadership (asking the leader for a read index when
    /// this member follows), waits until the local state has applied it, then runs `f`
    /// on a read-only connection to the local state database.
    pub async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.inner.read(f).await
    }

    /// Reads the local state database without any consistency check (may be stale on a
    /// follower). For leader-only loops that already know they lead, and for status pages.
    pub async fn read_local<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.inner.read_local(f).await
    }

    /// Writes a consistent copy of the state database to `dest` (which must not exist)
    /// after a linearizable read barrier, so it holds every write acknowledged before
    /// the call. Returns the last log index the copy has applied. The copy is what
    /// [`restore_snapshot`] takes.
    pub async fn backup_to(&self, dest: &std::path::Path) -> Result<u64, DbError> {
        self.inner.backup_to(dest).await
    }

    /// Brings this member's record in the membership (addresses, version, feature
    /// level) up to date with its configuration, e.g. after a restart with a new build:
    /// the leader replaces the node record; the voter set stays as it is. `Ok(true)`
    /// once the record matches (already, or after the update), `Ok(false)` while this
    /// member is not a voter yet (it is still joining). Bounded by `op_timeout`.
    pub async fn refresh_record(&self) -> Result<bool, DbError> {
        self.inner.refresh_record().await
    }

    /// Removes a member (by node name) from the membership; forwarded to the leader.
    pub async fn remove_member(&self, name: &str) -> Result<(), DbError> {
        self.inner.remove_member(name).await
    }

    /// Current status of this member and the cluster, from openraft's metrics.
    pub fn status(&self) -> ClusterStatus {
        self.inner.status()
    }

    /// A receiver that changes whenever the status does (role, leader, term, indexes).
    pub fn watch_status(&self) -> tokio::sync::watch::Receiver<ClusterStatus> {
        self.inner.watch_status()
    }

    /// Stops Raft and closes the databases.
    pub async fn shutdown(&self) {
        self.inner.shutdown().await
    }
}

#[cfg(test)]
mod fnv_tests {
    /// Raft ids are stored: the hash must never change (FNV-1a reference vectors).
    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(super::node_id_for("foobar"), 0x8594_4171_f739_67e8);
    }
}

#[cfg(test)]
mod sqlite_build_tests {
    /// The bundled SQLite is built without what holdfast never uses (`.cargo/config.toml`,
    /// `LIBSQLITE3_FLAGS`): no loadable extensions, no full-text search, no R-trees, so
    /// no SQL can load code and the binary carries none of it; the JSON functions the
    /// manager's queries use are still there.
    #[test]
    fn bundled_sqlite_has_json_but_no_extensions_fts_or_rtree() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let options: Vec<String> = conn
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(options.iter().any(|o| o == "OMIT_LOAD_EXTENSION"), "{options:?}");
        for absent in ["ENABLE_FTS3", "ENABLE_FTS5", "ENABLE_RTREE", "ENABLE_DBSTAT_VTAB", "ENABLE_STAT4"] {
            assert!(!options.iter().any(|o| o == absent), "{absent} is compiled in: {options:?}");
        }
        let fts = conn.execute_batch("CREATE VIRTUAL TABLE f USING fts5(body)");
        assert!(fts.is_err_and(|e| e.to_string().contains("no such module")));
        let n: i64 = conn.query_row("SELECT count(*) FROM json_each('[1,2,3]')", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 3);
    }
}
