//! One running member: Raft, its stores, the read pool and the request logic shared by
//! the public API (caller side) and the `/raft/` endpoints (receiver side).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::metrics::WaitError;
use openraft::{ChangeMembers, SnapshotPolicy};
use rusqlite::Connection;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::datadir::{self, Role as FileRole};
use crate::election::Timing;
use crate::log_store::LogStore;
use crate::network::{CallError, ClusterClient, NetworkFactory};
use crate::read_pool::ReadPool;
use crate::state_machine::StateMachine;
use crate::status::{feed_status, leader_of, status_from};
use crate::types::{Payload, Raft};
use crate::wire::{JoinRequest, ReadIndexRequest, RemoveRequest, WireError, WireResult, WriteRequest};
use crate::{node_id_for, Apply, ClusterStatus, Config, DbError, Member, NodeId, Role};

/// Attempts of one write or read-index (first try, plus a retry after a leader change
/// or a refused forward, plus one more after a failover seen mid-way).
const MAX_ATTEMPTS: usize = 3;
/// Snapshot chunk size; one chunk is one HTTP request.
const SNAPSHOT_CHUNK: u64 = 1024 * 1024;
/// Body limit of the `/raft/` endpoints: a full append batch or a base64 snapshot chunk.
pub(crate) const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// Shared state of a running member.
pub(crate) struct Inner {
    pub(crate) id: NodeId,
    pub(crate) me: Member,
    pub(crate) config: Config,
    pub(crate) raft: Raft,
    /// A handle on the log openraft owns, for the pre-vote's "how far does my log go".
    pub(crate) log: LogStore,
    pub(crate) client: ClusterClient,
    reads: Arc<ReadPool>,
    status_tx: watch::Sender<ClusterStatus>,
    /// Last leader this member heard of, kept after the leader is gone for error reports.
    last_leader: Arc<Mutex<Option<Member>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stopped: AtomicBool,
    /// Snapshot being received: its id and the end of the bytes received so far. A chunk
    /// may only start at or before that end, so a huge offset never allocates.
    pub(crate) receiving: Mutex<Option<(String, u64)>>,
}

/// Opens (or creates) both databases, refusing any inconsistent or foreign content
/// before a single file is created.
pub(crate) fn open_stores(
    dir: &Path,
    node_name: &str,
    app: Arc<dyn Apply>,
) -> Result<(LogStore, StateMachine), DbError> {
    datadir::ensure_dir(dir)?;
    let log_path = dir.join(datadir::LOG_FILE);
    let state_path = dir.join(datadir::STATE_FILE);
    let log_exists = log_path.exists();
    let state_exists = state_path.exists();
    if log_exists {
        datadir::validate_existing(&log_path, FileRole::Log, node_name)?;
    }
    if state_exists {
        datadir::validate_existing(&state_path, FileRole::State, node_name)?;
    }
    crate::state_machine::validate_snapshot_file(&dir.join(datadir::SNAPSHOT_FILE))?;
    datadir::remove_stale_tmp(dir)?;
    let storage = |e: crate::types::StorageError| DbError::Storage(e.to_string());
    match (log_exists, state_exists) {
        (true, false) => {
            let log = LogStore::open(dir, node_name)?;
            if log.last_purged().is_some() {
                return Err(datadir::data_dir_error(
                    &state_path,
                    "is missing while raft-log.db has been compacted, so the applied state \
                     cannot be rebuilt; restore state.db or wipe the directory and rejoin",
                ));
            }
            let sm = StateMachine::open(dir, node_name, app)?;
            Ok((log, sm))
        }
        (false, true) => {
            let sm = StateMachine::open(dir, node_name, app)?;
            if sm.last_applied_blocking().map_err(storage)?.is_some() {
                return Err(datadir::data_dir_error(
                    &log_path,
                    "is missing while state.db holds applied entries, so this member's vote \
                     and log are lost; restore raft-log.db or wipe the directory and rejoin",
                ));
            }
            let log = LogStore::open(dir, node_name)?;
            Ok((log, sm))
        }
        _ => {
            let log = LogStore::open(dir, node_name)?;
            let sm = StateMachine::open(dir, node_name, app)?;
            Ok((log, sm))
        }
    }
}

/// This member's snapshot interval: `every` scaled into [0.75, 1.25) by its id. Members
/// hold the same log, so with one interval all of them would build a snapshot (a full
/// copy of the state database) at the same entry, and while both followers build, the
/// leader's commits wait for one of them. Spread, a member usually builds alone and the
/// other two keep a quorum; the mean interval stays `every` (ARCHITECTURE.md,
/// "Decisions").
pub(crate) fn snapshot_interval(every: u64, id: NodeId) -> u64 {
    const SLOTS: u128 = 1024;
    let every = u128::from(every.max(1));
    let scaled = every * 3 / 4 + every * u128::from(id % SLOTS as u64) / (2 * SLOTS);
    u64::try_from(scaled).unwrap_or(u64::MAX).max(1)
}

fn raft_config(config: &Config) -> Result<openraft::Config, DbError> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
    let timing = Timing::new(config.election_timeout);
    let snapshot_every = snapshot_interval(config.snapshot_every, node_id_for(&config.node_name));
    openraft::Config {
        cluster_name: "holdfast".to_string(),
        heartbeat_interval: ms(config.heartbeat),
        // openraft's leader lease is `election_timeout_max`, and a follower whose leader
        // vanished waits lease + a random timeout before campaigning: a narrow range
        // (1–1.5x) keeps failover near one second without making split votes likely
        // among three voters (ARCHITECTURE.md, "Decisions").
        election_timeout_min: ms(timing.min),
        election_timeout_max: ms(timing.max),
        // Campaigns start from the pre-vote loop (`election.rs`), not openraft's timer.
        enable_elect: false,
        // The last chunk also installs the snapshot on the receiver.
        install_snapshot_timeout: ms(config.rpc_timeout).max(ms(config.op_timeout)),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every),
        // Keep a short tail behind the snapshot so a follower that is only slightly
        // behind gets entries rather than a whole snapshot, yet the log really shrinks.
        max_in_snapshot_log_to_keep: (snapshot_every / 2).min(1000),
        snapshot_max_chunk_size: SNAPSHOT_CHUNK,
        // Only used by a blocking add_learner: "caught up" means within one append
        // batch, so a joining member is promoted once it can keep up, not while it is
        // still thousands of entries (or a snapshot) behind.
        replication_lag_threshold: 300,
        ..Default::default()
    }
    .validate()
    .map_err(|e| DbError::Storage(format!("invalid Raft timing configuration: {e}")))
}

impl Inner {
    pub(crate) async fn open(config: Config, app: Arc<dyn Apply>) -> Result<Arc<Self>, DbError> {
        if config.node_name.is_empty() {
            return Err(datadir::data_dir_error(
                &config.data_dir,
                "node name is empty; every member needs a name (--node-id)",
            ));
        }
        let id = node_id_for(&config.node_name);
        let me = config.member();
        let raft_config = raft_config(&config)?;
        let forcing = config.clone();
        let forced = tokio::task::spawn_blocking(move || crate::recover::force_if_asked(&forcing))
            .await
            .map_err(|e| DbError::Storage(format!("forcing a new cluster panicked: {e}")))??;
        if let Some(f) = forced {
            tracing::warn!(
                node = %config.node_name, term = f.term, index = f.index, dropped = ?f.dropped,
                "forced a new one-member cluster from this member's state; wipe the dropped members' data \
                 directories before they join again"
            );
        }
        let (dir, name) = (config.data_dir.clone(), config.node_name.clone());
        let (log, sm) = tokio::task::spawn_blocking(move || open_stores(&dir, &name, app))
            .await
            .map_err(|e| DbError::Storage(format!("opening the stores panicked: {e}")))??;

        let client = ClusterClient::new(config.rpc_timeout, config.tls.clone())?;
        let network = NetworkFactory {
            id,
            client: client.clone(),
            rpc_timeout: config.rpc_timeout,
            backoff: config.election_timeout,
        };
        let log_handle = log.clone();
        let raft = Raft::new(id, Arc::new(raft_config), network, log, sm)
            .await
            .map_err(|e| DbError::Storage(format!("cannot start Raft: {e}")))?;
        // The core publishes the state it loaded from disk on its first turn; waiting
        // for it makes status() right after open() show the resumed term and indexes.
        let mut first = raft.metrics();
        if tokio::time::timeout(config.op_timeout, first.changed()).await.is_err() {
            tracing::warn!(node = %config.node_name, "Raft published no metrics after start");
        }

        let initial = status_from(&raft.metrics().borrow(), &config.node_name);
        let (status_tx, _) = watch::channel(initial);
        let last_leader = Arc::new(Mutex::new(None));
        let status_task =
            tokio::spawn(feed_status(raft.metrics(), status_tx.clone(), last_leader.clone(), config.node_name.clone()));
        let reads = Arc::new(ReadPool::new(config.data_dir.join(datadir::STATE_FILE), config.op_timeout));
        let timing = Timing::new(config.election_timeout);
        let inner = Arc::new(Inner {
            id,
            me,
            config,
            raft,
            log: log_handle,
            client,
            reads,
            status_tx,
            last_leader,
            tasks: Mutex::new(vec![status_task]),
            stopped: AtomicBool::new(false),
            receiving: Mutex::new(None),
        });
        // The loop holds only a weak handle, so dropping the member ends it too.
        let elections = tokio::spawn(crate::election::run(Arc::downgrade(&inner), timing));
        inner.tasks.lock().expect("task list mutex poisoned").push(elections);
        Ok(inner)
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn check_running(&self) -> Result<(), DbError> {
        if self.is_stopped() {
            return Err(DbError::Storage(format!("member {} is shut down; open it again to use it", self.me.name)));
        }
        Ok(())
    }

    pub(crate) async fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        // Bounded: a wedged storage call must not hang the caller's shutdown.
        let stop = self.raft.shutdown();
        if tokio::time::timeout(self.config.op_timeout, stop).await.is_err() {
            tracing::warn!(node = %self.me.name, "Raft did not stop within op_timeout");
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("task list mutex poisoned"));
        for t in tasks {
            t.abort();
        }
        self.status_tx.send_modify(|s| s.role = Role::Shutdown);
        self.reads.close();
    }

    // ---- status -------------------------------------------------------------------

    pub(crate) fn status(&self) -> ClusterStatus {
        let mut st = status_from(&self.raft.metrics().borrow(), &self.me.name);
        if self.is_stopped() {
            st.role = Role::Shutdown;
        }
        st
    }

    pub(crate) fn watch_status(&self) -> watch::Receiver<ClusterStatus> {
        self.status_tx.subscribe()
    }

    fn current_leader(&self) -> Option<(NodeId, Member)> {
        leader_of(&self.raft.metrics().borrow())
    }

    fn last_known_leader(&self) -> Option<Member> {
        self.current_leader()
            .map(|(_, m)| m)
            .or_else(|| self.last_leader.lock().expect("last leader mutex poisoned").clone())
    }

    fn timeout_error(&self) -> DbError {
        DbError::Timeout { after: self.config.op_timeout, leader: self.last_known_leader() }
    }

    /// How long an operation waits for an election before answering `NoLeader`: long
    /// enough for a normal election (timeout plus a vote round), short of `op_timeout`
    /// so a cut-off member answers promptly.
    fn leader_wait(&self) -> Duration {
        (self.config.election_timeout * 4).min(self.config.op_timeout)
    }

    /// Waits for a known leader other than `avoid`, up to the leader wait or `deadline`.
    async fn leader_for_op(&self, deadline: Instant, avoid: Option<NodeId>) -> Result<(NodeId, Member), DbError> {
        let until = deadline.min(Instant::now() + self.leader_wait());
        let mut rx = self.raft.metrics();
        loop {
            if let Some((id, m)) = leader_of(&rx.borrow_and_update()) {
                if Some(id) != avoid {
                    return Ok((id, m));
                }
            }
            match tokio::time::timeout_at(until, rx.changed()).await {
                Err(_) => return Err(DbError::NoLeader { last_known: self.last_known_leader() }),
                Ok(Err(_)) => return Err(self.check_running().err().unwrap_or_else(stopped)),
                Ok(Ok(())) => {}
            }
        }
    }

    fn map_wire(&self, e: WireError, addr: &str) -> DbError {
        match e {
            WireError::NotLeader { leader } => {
                DbError::NoLeader { last_known: leader.or_else(|| self.last_known_leader()) }
            }
            WireError::Timeout { leader } => DbError::Timeout { after: self.config.op_timeout, leader },
            WireError::Membership(m) => DbError::Membership(m),
            WireError::Storage(s) => DbError::Storage(s),
            WireError::BadRequest(s) => DbError::Membership(s),
            WireError::StorageFull { message } => DbError::StorageFull(message),
            WireError::ShuttingDown => {
                DbError::Network { addr: addr.to_string(), reason: "peer is shutting down".into() }
            }
        }
    }

    // ---- writes -------------------------------------------------------------------

    /// Refuses a write while the data directory's file system is below the reserve.
    fn check_space(&self) -> Result<(), DbError> {
        let min = self.config.min_free_bytes;
        if min == 0 {
            return Ok(());
        }
        // A failed statvfs says nothing about space; the write itself will tell.
        let Ok(st) = rustix::fs::statvfs(&self.config.data_dir) else { return Ok(()) };
        let free = st.f_bavail.saturating_mul(st.f_frsize);
        if free < min {
            return Err(DbError::StorageFull(format!(
                "the disk holding {} has {free} bytes free, below the {min}-byte reserve; nothing was written \
                 (free some space: writes resume by themselves)",
                self.config.data_dir.display()
            )));
        }
        Ok(())
    }

    pub(crate) async fn write(&self, command: Vec<u8>) -> Result<Vec<u8>, DbError> {
        self.check_running()?;
        let deadline = Instant::now() + self.config.op_timeout;
        let mut avoid = None;
        let mut last_err = None;
        for _ in 0..MAX_ATTEMPTS {
            // After a failed attempt, "no leader" says more than the transport error.
            let (leader_id, leader) = self.leader_for_op(deadline, avoid).await?;
            if leader_id == self.id {
                self.check_space()?;
                let write = self.raft.client_write(Payload(command.clone()));
                match tokio::time::timeout_at(deadline, write).await {
                    Err(_) => return Err(self.timeout_error()),
                    Ok(Ok(resp)) => return Ok(resp.data.0),
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                        // Lost leadership mid-way; forward to whoever wins.
                        avoid = Some(self.id);
                    }
                    Ok(Err(e)) => return Err(DbError::Storage(e.to_string())),
                }
            } else {
                let req = WriteRequest { command: Payload(command.clone()), timeout_ms: remote_budget(deadline) };
                let addr = leader.cluster_addr.as_str();
                let res: Result<WireResult<Payload>, CallError> =
                    self.client.post(addr, "/write", &req, remaining(deadline)).await;
                match res {
                    Ok(Ok(p)) => return Ok(p.0),
                    Ok(Err(WireError::NotLeader { .. })) => {
                        last_err = Some(DbError::NoLeader { last_known: Some(leader) });
                        avoid = Some(leader_id);
                    }
                    Ok(Err(e)) => return Err(self.map_wire(e, addr)),
                    Err(CallError::Timeout(_)) => return Err(self.timeout_error()),
                    // Nothing was delivered, so trying the next leader cannot apply the
                    // command twice.
                    Err(e @ (CallError::Connect(_) | CallError::Unavailable)) => {
                        last_err = Some(e.into_db_error(addr));
                        avoid = Some(leader_id);
                    }
                    Err(e) => return Err(e.into_db_error(addr)),
                }
            }
        }
        Err(last_err.unwrap_or(DbError::NoLeader { last_known: self.last_known_leader() }))
    }

    /// Receiver side of `/raft/write`: only the leader writes; nobody forwards again.
    pub(crate) async fn serve_write(&self, req: WriteRequest) -> WireResult<Payload> {
        self.ensure_leader_here()?;
        self.check_space().map_err(|e| WireError::StorageFull { message: e.to_string() })?;
        let budget = Duration::from_millis(req.timeout_ms).min(self.config.op_timeout);
        match tokio::time::timeout(budget, self.raft.client_write(req.command)).await {
            Err(_) => Err(WireError::Timeout { leader: Some(self.me.clone()) }),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(WireError::NotLeader { leader: f.leader_node })
            }
            Ok(Err(e)) => Err(WireError::Storage(e.to_string())),
        }
    }

    fn ensure_leader_here(&self) -> WireResult<()> {
        if self.is_stopped() {
            return Err(WireError::ShuttingDown);
        }
        match self.current_leader() {
            Some((id, _)) if id == self.id => Ok(()),
            other => Err(WireError::NotLeader { leader: other.map(|(_, m)| m) }),
        }
    }

    // ---- reads --------------------------------------------------------------------

    pub(crate) async fn read<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.check_running()?;
        let deadline = Instant::now() + self.config.op_timeout;
        if let Some(index) = self.read_index(deadline).await? {
            let wait = self.raft.wait(Some(remaining(deadline)));
            wait.applied_index_at_least(Some(index), "linearizable read").await.map_err(|e| match e {
                WaitError::Timeout(..) => self.timeout_error(),
                WaitError::ShuttingDown => stopped(),
            })?;
        }
        self.read_local(f).await
    }

    pub(crate) async fn backup_to(&self, dest: &Path) -> Result<u64, DbError> {
        // Everything acknowledged before this call is applied here once the barrier passes.
        self.read(|_| Ok(())).await?;
        let dest = dest.to_path_buf();
        self.read_local(move |conn| {
            let path = dest.to_str().ok_or_else(|| rusqlite::Error::InvalidPath(dest.clone()))?;
            conn.execute("VACUUM INTO ?1", [path])?;
            let copy = Connection::open_with_flags(&dest, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
            let raw: String =
                copy.query_row("SELECT value FROM _raft_sm WHERE key = 'last_applied'", [], |r| r.get(0))?;
            let applied: Option<crate::types::LogId> = serde_json::from_str(&raw)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?;
            Ok(applied.map(|l| l.index).unwrap_or(0))
        })
        .await
    }

    pub(crate) async fn read_local<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.check_running()?;
        self.reads.run(f).await
    }

    /// The index this member must have applied before a read is linearizable.
    async fn read_index(&self, deadline: Instant) -> Result<Option<u64>, DbError> {
        let mut avoid = None;
        let mut last_err = None;
        for _ in 0..MAX_ATTEMPTS {
            // After a failed attempt, "no leader" says more than the transport error.
            let (leader_id, leader) = self.leader_for_op(deadline, avoid).await?;
            if leader_id == self.id {
                match self.local_read_index(deadline).await {
                    Err(WireError::NotLeader { .. }) => avoid = Some(self.id),
                    Err(e) => return Err(self.map_wire(e, &self.me.cluster_addr)),
                    Ok(i) => return Ok(i),
                }
            } else {
                let req = ReadIndexRequest { timeout_ms: remote_budget(deadline) };
                let addr = leader.cluster_addr.as_str();
                let res: Result<WireResult<Option<u64>>, CallError> =
                    self.client.post(addr, "/read-index", &req, remaining(deadline)).await;
                match res {
                    Ok(Ok(i)) => return Ok(i),
                    Ok(Err(WireError::NotLeader { .. })) => {
                        last_err = Some(DbError::NoLeader { last_known: Some(leader) });
                        avoid = Some(leader_id);
                    }
                    Ok(Err(e)) => return Err(self.map_wire(e, addr)),
                    Err(CallError::Timeout(_)) => return Err(self.timeout_error()),
                    // A read index request has no side effect, so any transport failure
                    // may be retried against the next leader.
                    Err(e) => {
                        last_err = Some(e.into_db_error(addr));
                        avoid = Some(leader_id);
                    }
                }
            }
        }
        Err(last_err.unwrap_or(DbError::NoLeader { last_known: self.last_known_leader() }))
    }

    /// Confirms leadership with a quorum and returns the read index.
    async fn local_read_index(&self, deadline: Instant) -> WireResult<Option<u64>> {
        match tokio::time::timeout_at(deadline, self.raft.get_read_log_id()).await {
            Err(_) => Err(WireError::Timeout { leader: Some(self.me.clone()) }),
            Ok(Ok((read, _applied))) => Ok(read.map(|l| l.index)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(WireError::NotLeader { leader: f.leader_node })
            }
            // The leader could not hear from a quorum: as good as a timeout for the
            // caller, who may retry once the partition heals.
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                Err(WireError::Timeout { leader: Some(self.me.clone()) })
            }
            Ok(Err(e)) => Err(WireError::Storage(e.to_string())),
        }
    }

    /// Receiver side of `/raft/read-index`.
    pub(crate) async fn serve_read_index(&self, req: ReadIndexRequest) -> WireResult<Option<u64>> {
        self.ensure_leader_here()?;
        let budget = Duration::from_millis(req.timeout_ms).min(self.config.op_timeout);
        self.local_read_index(Instant::now() + budget).await
    }

    // ---- membership ---------------------------------------------------------------

    pub(crate) async fn bootstrap(&self) -> Result<(), DbError> {
        self.check_running()?;
        let deadline = Instant::now() + self.config.op_timeout;
        let initialized = tokio::time::timeout_at(deadline, self.raft.is_initialized())
            .await
            .map_err(|_| self.timeout_error())?
            .map_err(|e| DbError::Storage(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        let members = std::collections::BTreeMap::from([(self.id, self.me.clone())]);
        match tokio::time::timeout_at(deadline, self.raft.initialize(members)).await {
            Err(_) => Err(self.timeout_error()),
            Ok(Ok(())) => Ok(()),
            // Initialized concurrently (or by a log received meanwhile): the goal holds.
            Ok(Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_)))) => Ok(()),
            Ok(Err(e)) => Err(DbError::Membership(format!("cannot bootstrap: {e}"))),
        }
    }

    pub(crate) async fn join(&self, seeds: &[String]) -> Result<(), DbError> {
        self.check_running()?;
        let seeds: Vec<&String> = seeds.iter().filter(|s| **s != self.me.cluster_addr).collect();
        if seeds.is_empty() {
            return Err(DbError::Membership(
                "no seed other than this member was given to join through; pass the cluster \
                 address of an existing manager"
                    .into(),
            ));
        }
        let deadline = Instant::now() + self.config.op_timeout;
        let mut backoff = Duration::from_millis(50);
        let mut last_err = None;
        loop {
            for seed in &seeds {
                if Instant::now() >= deadline {
                    break;
                }
                let req = JoinRequest {
                    id: self.id,
                    member: self.me.clone(),
                    forwarded: false,
                    timeout_ms: remote_budget(deadline),
                };
                let res: Result<WireResult<()>, CallError> =
                    self.client.post(seed, "/join", &req, remaining(deadline)).await;
                match res {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(WireError::BadRequest(m))) => return Err(DbError::Membership(m)),
                    Ok(Err(e)) => last_err = Some(self.map_wire(e, seed)),
                    Err(e) => last_err = Some(e.into_db_error(seed)),
                }
            }
            // Seeds may still be starting or electing: retry until the deadline.
            if Instant::now() + backoff >= deadline {
                return Err(last_err.unwrap_or_else(|| self.timeout_error()));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Receiver side of `/raft/join`: the leader adds the member; a follower forwards
    /// once to the leader it knows.
    pub(crate) async fn serve_join(&self, req: JoinRequest) -> WireResult<()> {
        if req.id != node_id_for(&req.member.name) {
            return Err(WireError::BadRequest(format!(
                "node id {} does not match node name {:?}",
                req.id, req.member.name
            )));
        }
        let deadline = Instant::now() + Duration::from_millis(req.timeout_ms).min(self.config.op_timeout);
        match self.ensure_leader_here() {
            Ok(()) => self.add_voter(req.id, req.member, deadline).await,
            Err(WireError::NotLeader { .. }) if !req.forwarded => {
                let (_, leader) =
                    self.leader_for_op(deadline, None).await.map_err(|_| WireError::NotLeader { leader: None })?;
                let fwd = JoinRequest { forwarded: true, timeout_ms: remote_budget(deadline), ..req };
                self.forward(&leader.cluster_addr, "/join", &fwd, deadline).await
            }
            Err(e) => Err(e),
        }
    }

    async fn add_voter(&self, id: NodeId, member: Member, deadline: Instant) -> WireResult<()> {
        let (is_voter, known) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voter = membership.voter_ids().any(|v| v == id);
            (voter, membership.get_node(&id).cloned())
        };
        if is_voter {
            if known.as_ref() == Some(&member) {
                return Ok(());
            }
            // A voter rejoining with new addresses (e.g. a changed --advertise): update
            // the node record only; the voter set stays as it is.
            let update = self
                .raft
                .change_membership(ChangeMembers::SetNodes(std::collections::BTreeMap::from([(id, member)])), false);
            tokio::time::timeout_at(deadline, update)
                .await
                .map_err(|_| WireError::Timeout { leader: Some(self.me.clone()) })?
                .map_err(write_error)?;
            return Ok(());
        }
        // Blocking: returns once the learner has caught up, so promoting it does not
        // stall commits on a voter that is still far behind.
        let add = self.raft.add_learner(id, member, true);
        tokio::time::timeout_at(deadline, add)
            .await
            .map_err(|_| WireError::Timeout { leader: Some(self.me.clone()) })?
            .map_err(write_error)?;
        let promote = self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false);
        tokio::time::timeout_at(deadline, promote)
            .await
            .map_err(|_| WireError::Timeout { leader: Some(self.me.clone()) })?
            .map_err(write_error)?;
        Ok(())
    }

    pub(crate) async fn refresh_record(&self) -> Result<bool, DbError> {
        self.check_running()?;
        let (voter, known) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (membership.voter_ids().any(|v| v == self.id), membership.get_node(&self.id).cloned())
        };
        if !voter {
            return Ok(false);
        }
        if known.as_ref() == Some(&self.me) {
            return Ok(true);
        }
        let deadline = Instant::now() + self.config.op_timeout;
        let (leader_id, leader) = self.leader_for_op(deadline, None).await?;
        let req =
            JoinRequest { id: self.id, member: self.me.clone(), forwarded: false, timeout_ms: remote_budget(deadline) };
        let res = if leader_id == self.id {
            self.serve_join(req).await
        } else {
            let fwd = JoinRequest { forwarded: true, ..req };
            self.forward(&leader.cluster_addr, "/join", &fwd, deadline).await
        };
        res.map_err(|e| self.map_wire(e, &leader.cluster_addr))?;
        Ok(true)
    }

    pub(crate) async fn remove_member(&self, name: &str) -> Result<(), DbError> {
        self.check_running()?;
        let deadline = Instant::now() + self.config.op_timeout;
        let req = RemoveRequest { name: name.to_string(), forwarded: false, timeout_ms: remote_budget(deadline) };
        let (leader_id, leader) = self.leader_for_op(deadline, None).await?;
        let res = if leader_id == self.id {
            self.serve_remove(req).await
        } else {
            let fwd = RemoveRequest { forwarded: true, ..req };
            self.forward(&leader.cluster_addr, "/remove", &fwd, deadline).await
        };
        res.map_err(|e| self.map_wire(e, &leader.cluster_addr))
    }

    /// Receiver side of `/raft/remove`.
    pub(crate) async fn serve_remove(&self, req: RemoveRequest) -> WireResult<()> {
        let deadline = Instant::now() + Duration::from_millis(req.timeout_ms).min(self.config.op_timeout);
        match self.ensure_leader_here() {
            Ok(()) => {}
            Err(WireError::NotLeader { .. }) if !req.forwarded => {
                let (_, leader) =
                    self.leader_for_op(deadline, None).await.map_err(|_| WireError::NotLeader { leader: None })?;
                let fwd = RemoveRequest { forwarded: true, timeout_ms: remote_budget(deadline), ..req };
                return self.forward(&leader.cluster_addr, "/remove", &fwd, deadline).await;
            }
            Err(e) => return Err(e),
        }
        let id = node_id_for(&req.name);
        let (voter, known) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voter = membership.voter_ids().any(|v| v == id);
            (voter, membership.get_node(&id).is_some())
        };
        let change = if voter {
            // retain = false drops the node entirely instead of keeping it a learner.
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if known {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Ok(());
        };
        tokio::time::timeout_at(deadline, self.raft.change_membership(change, false))
            .await
            .map_err(|_| WireError::Timeout { leader: Some(self.me.clone()) })?
            .map_err(write_error)?;
        Ok(())
    }

    async fn forward<Req: serde::Serialize>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        deadline: Instant,
    ) -> WireResult<()> {
        let res: Result<WireResult<()>, CallError> = self.client.post(addr, path, req, remaining(deadline)).await;
        match res {
            Ok(r) => r,
            Err(CallError::Timeout(_)) => Err(WireError::Timeout { leader: self.last_known_leader() }),
            // The leader we know cannot be reached; to the caller that is "no leader".
            Err(e) => {
                tracing::debug!(error = %e, addr, "forwarding to the leader failed");
                Err(WireError::NotLeader { leader: None })
            }
        }
    }
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> WireError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WireError::NotLeader { leader: f.leader_node },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => WireError::Membership(c.to_string()),
        RaftError::Fatal(f) => WireError::Storage(f.to_string()),
    }
}

fn stopped() -> DbError {
    DbError::Storage("Raft has stopped on this member".into())
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The budget handed to a remote member: a little less than ours, so its own timeout
/// answer reaches us before our HTTP call gives up.
fn remote_budget(deadline: Instant) -> u64 {
    let left = remaining(deadline);
    let budget = left.saturating_sub((left / 10).min(Duration::from_millis(200)));
    u64::try_from(budget.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::snapshot_interval;
    use crate::node_id_for;

    #[test]
    fn snapshot_intervals_stay_within_a_quarter_of_the_setting_and_spread_across_members() {
        for every in [1_000u64, 50_000, 1 << 40] {
            let intervals: Vec<u64> =
                (0..100).map(|i| snapshot_interval(every, node_id_for(&format!("manager-{i}")))).collect();
            for v in &intervals {
                assert!(*v >= every / 4 * 3 && *v < every / 4 * 5 + 1, "{v} is not within a quarter of {every}");
            }
            let (lo, hi) = (intervals.iter().min().unwrap(), intervals.iter().max().unwrap());
            assert!(hi - lo > every * 2 / 5, "100 members only spread over {lo}..{hi} around {every}");
            let mean = intervals.iter().map(|v| *v as f64).sum::<f64>() / 100.0;
            assert!((mean / every as f64 - 1.0).abs() < 0.1, "mean interval {mean} drifted from {every}");
        }
        // The extremes neither overflow nor reach zero.
        assert!(snapshot_interval(u64::MAX, u64::MAX) >= u64::MAX / 4 * 3);
        assert!(snapshot_interval(0, 7) >= 1);
    }
}
