//! The worker agent: syncs with managers (long-poll; the sync is also the heartbeat),
//! keeps the ledger, and drives the runtime toward the ledger through `reconcile`.
//!
//! Engine work runs in bounded pools: creates (image pulls and builds included, and
//! local restarts) apart from stops, so a slow pull never holds up a stop. Health
//! probers run one per running placement with a health spec, their probes bounded too;
//! they hand `reconcile` verdicts, never actions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{broadcast, Notify, Semaphore};
use tokio::task::AbortHandle;

use super::fence::{guard_deadline, start_permit, FenceTiming, NoStart};
use super::ledger::{Change, Held, Ledger, LedgerError};
use super::reconcile::{reconcile, Action, Facts, Unhealthy};
use super::runtime::{labels, ContainerInfo, ContainerSpec, ContainerState, GuardSpec, PortMap, Runtime, RuntimeError};
use crate::guard::Deadline;
use crate::lock;
use crate::model::now_ms;
use crate::model::sync::{Assignment, LogReply, NodeResources, NotLeader, SyncRequest, SyncResponse};
use crate::model::{Desired, Observed, Story};
use crate::net::identity::{spawn_renewal, IdentityError, IdentitySettings, NodeTls};
use crate::net::pki::Role;
use crate::resilience::retry::RetryPolicy;

/// Settings of a worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Node name (`--node-id`).
    pub node: String,
    /// Directory of the worker ledger.
    pub data_dir: PathBuf,
    /// Cluster addresses of managers to sync with (`--join`).
    pub managers: Vec<String>,
    /// Host part of task endpoints and the address reported to managers.
    pub advertise_host: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// How long a sync may be held by the manager.
    pub sync_wait: Duration,
    /// Grace between SIGTERM and SIGKILL when stopping a task.
    pub stop_grace: Duration,
    /// Safety margin subtracted from every lease (clock drift, delivery delay).
    pub lease_margin: Duration,
    /// Fixed resources reported in every sync and used by admission instead of
    /// measuring this machine, so tests can run several simulated workers of different
    /// sizes on one host. Live placements are subtracted from its free values as if
    /// each used its reservation.
    pub resources_override: Option<NodeResources>,
    /// Placements being created at once (image pull or build, create, start; local
    /// restarts too).
    pub create_concurrency: usize,
    /// Containers being stopped or removed at once; a pool apart from creates so a
    /// slow pull never delays a stop.
    pub stop_concurrency: usize,
    /// Health probes in flight at once across all placements.
    pub probe_concurrency: usize,
    /// Vital signs for the watchdog, status line and `/metrics` (see `service.rs`).
    pub vitals: Arc<crate::service::WorkerVitals>,
    /// The node's cluster identity (mutual TLS), when the process already has one
    /// (a manager+worker process shares its manager's).
    pub tls: Option<Arc<NodeTls>>,
    /// Join token used to get an identity when `tls` is none and `<data_dir>/tls` holds
    /// no certificate yet.
    pub token: Option<String>,
    /// How long after expiry this worker's certificate may still renew.
    pub cert_grace: Duration,
    /// Cap on image fetch bytes per second (`--image-bandwidth`).
    pub image_bandwidth: Option<u64>,
}

impl WorkerConfig {
    /// Defaults for a worker named `node` syncing with `managers`.
    pub fn new(node: &str, data_dir: PathBuf, managers: Vec<String>) -> Self {
        WorkerConfig {
            node: node.to_string(),
            data_dir,
            managers,
            advertise_host: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            sync_wait: Duration::from_secs(2),
            stop_grace: Duration::from_secs(10),
            lease_margin: Duration::from_secs(1),
            resources_override: None,
            create_concurrency: 4,
            stop_concurrency: 8,
            probe_concurrency: 32,
            vitals: Default::default(),
            tls: None,
            token: None,
            cert_grace: crate::net::pki::DEFAULT_GRACE,
            image_bandwidth: None,
        }
    }
}

/// Log requests answered at once; each reads a container's log and posts it back.
const LOG_CONCURRENCY: usize = 4;

/// Worker failures that stop it from starting.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// No manager address to sync with.
    #[error("a worker needs at least one manager cluster address (--join)")]
    NoManagers,
    /// No cluster certificate and no way to get one.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

struct Worker {
    cfg: WorkerConfig,
    ledger: Arc<Ledger>,
    runtime: Arc<dyn Runtime>,
    /// Mutual-TLS identity; its HTTP client is used for every manager call.
    tls: Arc<NodeTls>,
    /// Health probes: no connection reuse, so every probe tests a fresh connect.
    probe_http: reqwest::Client,
    wake_reconcile: Notify,
    wake_sync: Notify,
    /// Placement ids (and `container:<id>` for orphans) with a job queued or running;
    /// reconcile leaves them alone until it ends, so no job is ever doubled.
    in_flight: Mutex<HashSet<String>>,
    /// Pool for creates, pulls and restarts.
    creates: Arc<Semaphore>,
    /// Pool for stops and removals.
    stops: Arc<Semaphore>,
    /// Bound on health probes in flight.
    probes: Arc<Semaphore>,
    /// Bound on log requests being answered.
    log_jobs: Arc<Semaphore>,
    /// Running probers by placement id.
    probers: Mutex<HashMap<String, Prober>>,
    /// Verdicts of probers, consumed by reconcile.
    unhealthy: Mutex<HashMap<String, Unhealthy>>,
    engine_ok: AtomicBool,
    /// The lease a manager granted, published after the desired set it came with.
    lease: Lease,
    /// Lease validity seen by the last reconcile round, to record changes once.
    lease_was_valid: AtomicBool,
    /// Woken on every lease renewal: the fence keeper moves the guards' deadlines.
    renewed: Notify,
    /// When the last reconcile round ran (ms since the epoch; 0 = none yet in this
    /// process): a long gap means the worker was not running (dead or stopped).
    last_round_ms: AtomicU64,
    /// Image ids the engine holds, sent in every sync (`worker::images`).
    held_images: super::images::HeldImages,
}

/// The worker's lease in memory. A sync's answer is taken desired set first, lease
/// second: the lease is published (`Release`) only once the assignments it came with
/// are in the ledger, and every decision reads it (`Acquire`) *before* reading the
/// ledger. Whoever sees a renewed lease therefore sees the desired set granted with it,
/// so a lease is never paired with a desired set it superseded: a placement replaced
/// while this node was cut off can never look "suspended, still listed, lease valid"
/// (ARCHITECTURE.md, "Invariants": a suspended placement resumes only after a manager
/// renews the lease and still lists it).
struct Lease {
    /// Lease end, ms since the epoch (0 = never held one).
    until_ms: AtomicU64,
    /// Length of the last lease granted, ms: scales the guards' stop budget.
    len_ms: AtomicU64,
}

impl Lease {
    fn new(until_ms: u64, len_ms: u64) -> Lease {
        Lease { until_ms: AtomicU64::new(until_ms), len_ms: AtomicU64::new(len_ms) }
    }

    /// Publishes a renewal; call only after its desired set is in the ledger.
    fn publish(&self, until_ms: u64, len_ms: u64) {
        self.len_ms.store(len_ms, Ordering::Relaxed);
        self.until_ms.store(until_ms, Ordering::Release);
    }

    /// (end, length) in ms; read it before the ledger (see [`Lease`]).
    fn read(&self) -> (u64, u64) {
        let until = self.until_ms.load(Ordering::Acquire);
        (until, self.len_ms.load(Ordering::Relaxed))
    }
}

/// A gap between reconcile rounds (normally ≤ 500 ms) longer than this means the
/// worker process was not running meanwhile.
const AWAY_AFTER_MS: u64 = 3_000;

/// Deadline writes in flight at once when a renewal moves every guard's deadline.
const DEADLINE_CONCURRENCY: usize = 8;

/// A health prober task and what it watches.
struct Prober {
    /// Container and restart count it probes; a restart starts a fresh prober.
    key: (String, u32),
    /// Cancels it.
    handle: AbortHandle,
}

/// What is free here now, net of what other placements hold but a measurement cannot
/// show yet (see [`super::resources::committed`]); `except` leaves one placement out
/// (the one being admitted).
async fn current_resources(w: &Worker, except: Option<&str>) -> NodeResources {
    let engine_ok = w.engine_ok.load(Ordering::Relaxed);
    let mut r = match &w.cfg.resources_override {
        Some(fixed) => NodeResources { engine_ok, ..fixed.clone() },
        None => {
            let disk_path = PathBuf::from("/var/lib/docker");
            let data_dir = w.cfg.data_dir.clone();
            tokio::task::spawn_blocking(move || {
                let p = if disk_path.exists() { disk_path } else { data_dir };
                super::resources::measure(&p, engine_ok)
            })
            .await
            .unwrap_or_default()
        }
    };
    let held = super::ledger::or_logged(w.ledger.all(), "placements for the resource report");
    let (memory, disk) = super::resources::committed(&held, except, w.cfg.resources_override.is_some());
    r.memory_free_mb = r.memory_free_mb.saturating_sub(memory);
    r.disk_free_mb = r.disk_free_mb.saturating_sub(disk);
    r
}

/// The node's cluster identity: the one the process already has, else one established
/// from `<data_dir>/tls` or with the join token. `None` when shutdown came first.
async fn identity(
    cfg: &WorkerConfig,
    shutdown: &mut broadcast::Receiver<()>,
) -> Result<Option<Arc<NodeTls>>, WorkerError> {
    if let Some(t) = &cfg.tls {
        return Ok(Some(t.clone()));
    }
    let settings = IdentitySettings {
        node: cfg.node.clone(),
        role: Role::Worker,
        data_dir: cfg.data_dir.clone(),
        bootstrap: false,
        token: cfg.token.clone(),
        seeds: cfg.managers.clone(),
        lifetime: crate::net::pki::DEFAULT_LEAF_LIFETIME,
        grace: cfg.cert_grace,
    };
    tokio::select! {
        r = NodeTls::establish(&settings) => Ok(Some(r?.0)),
        _ = shutdown.recv() => Ok(None),
    }
}

impl Worker {
    /// A worker with its pools and the lease its ledger recorded (`lease` ends at,
    /// `lease_ms` long); nothing running yet.
    fn new(
        cfg: WorkerConfig,
        tls: Arc<NodeTls>,
        runtime: Arc<dyn Runtime>,
        ledger: Arc<Ledger>,
        lease: u64,
        lease_ms: u64,
    ) -> Worker {
        // A pool of 0 would never run anything; treat it as 1.
        let pool = |n: usize| Arc::new(Semaphore::new(n.max(1)));
        Worker {
            tls,
            probe_http: reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap_or_default(),
            creates: pool(cfg.create_concurrency),
            stops: pool(cfg.stop_concurrency),
            probes: pool(cfg.probe_concurrency),
            log_jobs: pool(LOG_CONCURRENCY),
            probers: Mutex::new(HashMap::new()),
            unhealthy: Mutex::new(HashMap::new()),
            cfg,
            ledger,
            runtime,
            wake_reconcile: Notify::new(),
            wake_sync: Notify::new(),
            in_flight: Mutex::new(HashSet::new()),
            engine_ok: AtomicBool::new(false),
            lease: Lease::new(lease, lease_ms),
            lease_was_valid: AtomicBool::new(lease > now_ms()),
            renewed: Notify::new(),
            last_round_ms: AtomicU64::new(0),
            held_images: Default::default(),
        }
    }
}

/// Runs a worker until `shutdown` fires. Running containers are left running on
/// shutdown: a restarted worker adopts them.
pub async fn run(
    cfg: WorkerConfig,
    runtime: Arc<dyn Runtime>,
    mut shutdown: broadcast::Receiver<()>,
) -> Result<(), WorkerError> {
    if cfg.managers.is_empty() {
        return Err(WorkerError::NoManagers);
    }
    let Some(tls) = identity(&cfg, &mut shutdown).await? else { return Ok(()) };
    // A worker certificate is renewed through a manager; a manager's by its manager.
    let renewal = (tls.role() == Role::Worker).then(|| {
        let (t, managers) = (tls.clone(), cfg.managers.clone());
        let renew = move || {
            let (t, managers) = (t.clone(), managers.clone());
            async move { t.renew_remote(&managers).await }
        };
        spawn_renewal(tls.clone(), cfg.data_dir.clone(), renew, shutdown.resubscribe())
    });
    // A CA rotation reaches a worker through this (ARCHITECTURE.md "Trust").
    let ca_watch = (tls.role() == Role::Worker).then(|| {
        let info = tls.info();
        let life = info.not_after_ms.saturating_sub(info.issued_ms.max(info.not_before_ms));
        let every = Duration::from_millis(life / 20).clamp(Duration::from_secs(1), Duration::from_secs(30));
        crate::net::identity::watch_cas(tls.clone(), cfg.managers.clone(), every, shutdown.resubscribe())
    });
    let ledger = Arc::new(Ledger::open(&cfg.data_dir, &cfg.node)?);
    let lease = ledger.meta_u64("lease_until_ms")?;
    let lease_ms = ledger.meta_u64("lease_ms")?;
    cfg.vitals.set_lease(lease);
    let w = Arc::new(Worker::new(cfg, tls, runtime, ledger, lease, lease_ms));
    tracing::info!(node = %w.cfg.node, managers = ?w.cfg.managers, "worker starting");
    let sync = tokio::spawn(sync_loop(w.clone(), shutdown.resubscribe()));
    let rec = tokio::spawn(reconcile_loop(w.clone(), shutdown.resubscribe()));
    let fences = tokio::spawn(fence_loop(w.clone(), shutdown.resubscribe()));
    let _ = shutdown.recv().await;
    let _ = tokio::join!(sync, rec, fences);
    if let Some(r) = renewal {
        let _ = r.await;
    }
    if let Some(c) = ca_watch {
        let _ = c.await;
    }
    for (_, p) in lock(&w.probers).drain() {
        p.handle.abort();
    }
    tracing::info!(node = %w.cfg.node, "worker stopped; containers keep running for adoption");
    Ok(())
}

/// Backoff between failed syncs: windows of 200 ms doubling to 2 s, full jitter.
const SYNC_RETRY: RetryPolicy =
    RetryPolicy { base: Duration::from_millis(200), cap: Duration::from_secs(2), max_attempts: None, deadline: None };

async fn sync_loop(w: Arc<Worker>, mut shutdown: broadcast::Receiver<()>) {
    let mut have_version = 0u64;
    let mut target = 0usize;
    let mut managers = w.cfg.managers.clone();
    let mut failures = 0u32;
    loop {
        let req = sync_request(&w, have_version).await;
        let addr = managers[target % managers.len()].clone();
        let url = format!("https://{addr}/cluster/v1/sync");
        let sent_at_ms = now_ms();
        let sent_at = std::time::Instant::now();
        let timeout = w.cfg.sync_wait + Duration::from_secs(10);
        // The client of the current certificate (a new pool after each renewal).
        let call = w.tls.http().post(&url).json(&req).timeout(timeout).send();
        let result = tokio::select! {
            _ = shutdown.recv() => return,
            // New local reports interrupt the long-poll so they reach the manager now.
            _ = w.wake_sync.notified() => continue,
            r = call => r,
        };
        match sync_answer(&addr, result).await {
            SyncAnswer::Leader(leader) => {
                if !managers.contains(&leader) {
                    managers.push(leader.clone());
                }
                target = managers.iter().position(|m| *m == leader).unwrap_or(0);
            }
            SyncAnswer::Synced(resp) => {
                failures = 0;
                have_version = resp.version;
                take_sync(&w, &addr, resp, sent_at_ms, sent_at);
            }
            SyncAnswer::Failed(e) => {
                failures += 1;
                target += 1;
                if failures == 1 || failures % 30 == 0 {
                    tracing::warn!(error = %e, failures, "sync failed; trying the next manager");
                }
                // Exponential backoff with full jitter, capped at 2 s: quick to find a
                // new leader, no storm against a dead one.
                let wait = SYNC_RETRY.delay(failures - 1, &mut rand::thread_rng()).max(Duration::from_millis(50));
                tokio::select! {
                    _ = shutdown.recv() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// The next sync: measured resources, held images and the unacknowledged reports.
async fn sync_request(w: &Worker, have_version: u64) -> SyncRequest {
    let resources = current_resources(w, None).await;
    super::images::refresh_held(&w.held_images, w.runtime.as_ref(), Duration::from_secs(30), false).await;
    let reports = super::ledger::or_logged(w.ledger.outbox(1_000), "the outbox");
    w.cfg.vitals.sync_turn(reports.len());
    SyncRequest {
        node: w.cfg.node.clone(),
        address: w.cfg.advertise_host.clone(),
        labels: w.cfg.labels.clone(),
        resources,
        // A pending report must go out now, so ask for no wait.
        wait_ms: if reports.is_empty() { w.cfg.sync_wait.as_millis() as u64 } else { 0 },
        reports,
        have_version,
        images: super::images::held_ids(&w.held_images),
    }
}

/// How a sync call ended.
enum SyncAnswer {
    /// The manager answered.
    Synced(SyncResponse),
    /// The manager is not the leader and named it: ask that one at once.
    Leader(String),
    /// No answer to use; why, to log.
    Failed(String),
}

/// Reads the answer of a sync call to `addr`.
async fn sync_answer(addr: &str, result: Result<reqwest::Response, reqwest::Error>) -> SyncAnswer {
    let resp = match result {
        Err(e) => return SyncAnswer::Failed(format!("{addr}: {}", crate::net::identity::chain(&e))),
        Ok(resp) => resp,
    };
    if resp.status() == reqwest::StatusCode::MISDIRECTED_REQUEST {
        let hint = resp.json::<NotLeader>().await.ok().and_then(|n| n.leader_cluster_addr);
        return match hint {
            Some(leader) => SyncAnswer::Leader(leader),
            None => SyncAnswer::Failed(format!("{addr} knows no leader yet")),
        };
    }
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return SyncAnswer::Failed(format!("{addr}: {status} {text}"));
    }
    match resp.json::<SyncResponse>().await {
        Ok(resp) => SyncAnswer::Synced(resp),
        Err(e) => SyncAnswer::Failed(format!("{addr}: bad sync answer: {e}")),
    }
}

/// Takes a manager's answer: the desired set, then the lease (counted from
/// `sent_at_ms`) granted with it, the acknowledged reports and the log requests; then
/// wakes reconcile.
fn take_sync(w: &Arc<Worker>, addr: &str, resp: SyncResponse, sent_at_ms: u64, sent_at: Instant) {
    // The lease counts from when the request was sent, so it can never
    // outlive the one the manager granted.
    let until = sent_at_ms + resp.lease_ms.saturating_sub(w.cfg.lease_margin.as_millis() as u64);
    if take_authority(&w.ledger, &w.lease, &resp.assignments, until, resp.lease_ms) {
        w.cfg.vitals.synced(sent_at.elapsed(), until);
        w.renewed.notify_one();
    }
    if let Err(e) = w.ledger.ack(resp.acked_seq) {
        tracing::error!(error = %e, "could not trim outbox");
    }
    for lr in resp.log_requests {
        let w = w.clone();
        let addr = addr.to_string();
        tokio::spawn(async move {
            // Bounded: a burst of log requests waits instead of piling
            // engine calls onto a busy engine.
            if let Ok(_permit) = w.log_jobs.clone().acquire_owned().await {
                answer_logs(&w, &addr, &lr).await
            }
        });
    }
    w.wake_reconcile.notify_one();
}

/// What decisions are made on: the lease (end, length) and the held placements, read in
/// that order, so the placements are at least as new as the desired set granted with the
/// lease (see [`Lease`]).
fn authority_view(ledger: &Ledger, lease: &Lease) -> Result<((u64, u64), Vec<Held>), LedgerError> {
    let lease = lease.read();
    Ok((lease, ledger.all()?))
}

/// Records the desired set of a sync answer, then persists and publishes the lease
/// granted with it (ending at `until`, `lease_ms` long), in that order (see [`Lease`]);
/// `false` when the desired set could not be recorded: the lease is then not renewed,
/// since nothing may act on it paired with the desired set it superseded.
fn take_authority(ledger: &Ledger, lease: &Lease, assignments: &[Assignment], until: u64, lease_ms: u64) -> bool {
    match ledger.accept(assignments) {
        Ok(refused) if !refused.is_empty() => {
            tracing::warn!(?refused, "refused placements with a fence below one already seen")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "could not record assignments; the lease is not renewed until they are");
            return false;
        }
    }
    // After the desired set here too: a restart reads both back, and must not find a
    // lease newer than the assignments it came with.
    for (key, value) in [("lease_ms", lease_ms), ("lease_until_ms", until)] {
        // The lease in memory still holds; only a restart would miss it.
        if let Err(error) = ledger.set_meta_u64(key, value) {
            tracing::warn!(key, %error, "cannot record the lease in the ledger");
            metrics::counter!("holdfast_worker_ledger_write_failures_total").increment(1);
        }
    }
    lease.publish(until, lease_ms);
    true
}

async fn answer_logs(w: &Worker, addr: &str, lr: &crate::model::sync::LogRequest) {
    let (id, placement_id, tail) = (lr.id, lr.placement_id.as_str(), lr.tail);
    let held = super::ledger::or_logged(w.ledger.all(), "placements for a log request");
    let result = match held.iter().find(|h| h.id == placement_id).and_then(|h| h.status.container_id.clone()) {
        None => Err(format!("placement {placement_id} has no container on node {}", w.cfg.node)),
        Some(cid) => match &lr.after {
            Some(after) => w.runtime.logs_after(&cid, tail, after).await.map_err(|e| e.to_string()),
            None => w.runtime.logs(&cid, tail).await.map_err(|e| e.to_string()),
        },
    };
    let url = format!("https://{addr}/cluster/v1/logs");
    if let Err(e) = w.tls.http().post(url).json(&LogReply { id, result }).timeout(Duration::from_secs(10)).send().await
    {
        tracing::warn!(error = %e, "could not deliver logs");
    }
}

/// The guard deadline `lease` (end, length) allows now, `None` when too little is left
/// (see `worker::fence`). The boot clock is read first, so a pause between the reads
/// only makes the deadline earlier.
fn deadline_now(lease: (u64, u64)) -> Option<Deadline> {
    let boot = crate::guard::boottime_ms();
    let now = now_ms();
    guard_deadline(lease.0, now, boot, FenceTiming::for_lease(lease.1))
}

/// Whether `h` may be (re)started now, re-checked just before the engine is asked (the
/// job may have waited long after reconcile decided): the lease, then the ledger's row,
/// read in that order (see [`Lease`]). The guard's deadline for a guarded placement;
/// `Err` (logged) when it must not start.
fn start_check(w: &Worker, h: &Held) -> Result<Option<Deadline>, NoStart> {
    let lease = w.lease.read();
    let desired = match w.ledger.desired(&h.id) {
        Ok(d) => d,
        Err(error) => {
            tracing::warn!(placement = %h.id, %error, "cannot read the placement before starting it; will retry");
            return Err(NoStart::NotWanted);
        }
    };
    let boot = crate::guard::boottime_ms();
    let needs_lease = h.spec.offline_mode() != crate::model::OfflineMode::Keep;
    let permit = start_permit(desired, needs_lease, h.spec.guarded(), lease, now_ms(), boot);
    match permit {
        Err(NoStart::TooLittleLease) => {
            tracing::info!(placement = %h.id, "too little lease left to start a guarded task; waiting for a renewal")
        }
        Err(why) => {
            tracing::info!(placement = %h.id, ?why, "not (re)starting it or moving its deadline: the view this was decided on is out of date")
        }
        Ok(_) => {}
    }
    permit
}

/// Moves every running guard's deadline after each lease renewal. Writes are bounded
/// (engine timeouts, a few at once); one that fails leaves the older, earlier deadline
/// in place, which is the safe direction.
async fn fence_loop(w: Arc<Worker>, mut shutdown: broadcast::Receiver<()>) {
    use futures::StreamExt;
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = w.renewed.notified() => {}
        }
        // A deadline only for a placement the desired set granted with this lease still
        // wants running.
        let (lease, held) = match authority_view(&w.ledger, &w.lease) {
            Ok(view) => view,
            Err(error) => {
                tracing::error!(%error, "cannot read placements for the guard deadlines");
                continue;
            }
        };
        let targets: Vec<String> = held
            .into_iter()
            .filter(|h| h.spec.guarded() && h.desired == Desired::Run && !h.suspended)
            .filter(|h| matches!(h.status.observed, Observed::Running | Observed::Starting | Observed::Restarting))
            .filter_map(|h| h.status.container_id)
            .collect();
        futures::stream::iter(targets)
            .for_each_concurrent(DEADLINE_CONCURRENCY, |cid| {
                let w = w.clone();
                async move {
                    // Computed per write, just before it, from the lease read before the
                    // ledger: the deadline is absolute, so a late write only makes it earlier.
                    let Some(deadline) = deadline_now(lease) else { return };
                    match w.runtime.set_deadline(&cid, deadline).await {
                        Ok(()) | Err(RuntimeError::NotFound(_)) => {}
                        Err(e) => tracing::warn!(container = %cid, error = %e, "could not move the guard's deadline"),
                    }
                }
            })
            .await;
    }
}

async fn reconcile_loop(w: Arc<Worker>, mut shutdown: broadcast::Receiver<()>) {
    loop {
        reconcile_once(&w).await;
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = w.wake_reconcile.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn reconcile_once(w: &Arc<Worker>) {
    // Jobs in flight are snapshotted before the engine is listed: a job that finishes
    // between the listing and the snapshot would otherwise look idle while the listing
    // predates its container, and the placement would be created twice.
    let busy_before = lock(&w.in_flight).clone();
    let filter = vec![(labels::NODE.to_string(), w.cfg.node.clone())];
    let containers = match w.runtime.list(&filter).await {
        Ok(c) => {
            w.engine_ok.store(true, Ordering::Relaxed);
            w.cfg.vitals.engine(true);
            w.cfg.vitals.containers(c.iter().map(|c| &c.state));
            c
        }
        Err(e) => {
            w.cfg.vitals.engine(false);
            // An engine we cannot ask is not a dead task: report nothing, retry.
            if w.engine_ok.swap(false, Ordering::Relaxed) {
                tracing::warn!(error = %e, "container engine unavailable; tasks left as they are");
            }
            return;
        }
    };
    let (lease, held) = match authority_view(&w.ledger, &w.lease) {
        Ok(view) => view,
        Err(e) => {
            tracing::error!(error = %e, "cannot read ledger");
            return;
        }
    };
    supervise_health(w, &held, &containers);
    let mut busy = busy_before;
    busy.extend(lock(&w.in_flight).iter().cloned());
    let held: Vec<Held> = held.into_iter().filter(|h| !busy.contains(&h.id)).collect();
    let containers: Vec<_> = containers
        .into_iter()
        .filter(|c| !c.labels.get(labels::PLACEMENT).is_some_and(|p| busy.contains(p)))
        .filter(|c| !busy.contains(&orphan_key(&c.id)))
        .collect();
    let unhealthy = lock(&w.unhealthy).clone();
    let now = now_ms();
    let lease_valid = now < lease.0;
    // The start check of the jobs (`start_check`) refuses a guarded start without room
    // to run; reconcile must not decide one, or it would be decided again at once.
    let guard_can_start = deadline_now(lease).is_some();
    let last_round = w.last_round_ms.swap(now, Ordering::Relaxed);
    let worker_was_away = last_round == 0 || now.saturating_sub(last_round) > AWAY_AFTER_MS;
    note_authority(w, &held, lease_valid, now);
    let actions = {
        let mut rng = rand::thread_rng();
        let mut jitter = |max: u64| rng.gen_range(0..=max);
        reconcile(
            &held,
            &containers,
            &mut Facts {
                now_ms: now,
                advertise_host: &w.cfg.advertise_host,
                jitter: &mut jitter,
                unhealthy: &unhealthy,
                lease_valid,
                worker_was_away,
                guard_can_start,
            },
        )
    };
    for action in actions {
        execute(w, &held, action).await;
    }
}

/// Records, once per change, that running placements now run under cached authority
/// (the lease ran out) or that a manager renewed it: the cluster can tell the story of an
/// outage afterwards.
fn note_authority(w: &Worker, held: &[Held], lease_valid: bool, now: u64) {
    let was = w.lease_was_valid.swap(lease_valid, Ordering::Relaxed);
    if was == lease_valid {
        return;
    }
    let story = if lease_valid { Story::AuthorityRenewed } else { Story::CachedAuthority };
    if lease_valid {
        tracing::info!(node = %w.cfg.node, "lease renewed by a manager");
    } else {
        tracing::warn!(node = %w.cfg.node, "lease expired; running placements continue under cached authority per their offline mode");
    }
    for h in held.iter().filter(|h| h.desired == Desired::Run && h.status.observed == Observed::Running) {
        let mut ch = Change::carrying(h, Observed::Running);
        ch.story = Some(story.clone());
        ch.status.reason = Some(if lease_valid {
            format!("lease renewed at {now}")
        } else {
            format!("lease expired at {now}; offline mode {}", h.spec.offline_mode().as_str())
        });
        record(w, h, ch);
    }
}

fn orphan_key(container_id: &str) -> String {
    format!("container:{container_id}")
}

/// Starts a prober for every running placement with a health spec that lacks one
/// (or whose container or restart count changed), and cancels probers of placements
/// that no longer run. Probers live as long as their placement runs, one each.
fn supervise_health(w: &Arc<Worker>, held: &[Held], containers: &[ContainerInfo]) {
    let judged: HashSet<String> = lock(&w.unhealthy).keys().cloned().collect();
    let mut wanted: HashMap<&str, (&Held, &ContainerInfo)> = HashMap::new();
    for h in held {
        if h.desired != Desired::Run || h.status.observed != Observed::Running || h.spec.health.is_none() {
            continue;
        }
        if judged.contains(&h.id) {
            continue;
        }
        let running = containers
            .iter()
            .find(|c| Some(&c.id) == h.status.container_id.as_ref() && c.state == ContainerState::Running);
        if let Some(c) = running {
            wanted.insert(h.id.as_str(), (h, c));
        }
    }
    let mut probers = lock(&w.probers);
    probers.retain(|id, p| {
        let keep = wanted
            .get(id.as_str())
            .is_some_and(|(h, c)| p.key == (c.id.clone(), h.status.restarts) && !p.handle.is_finished());
        if !keep {
            p.handle.abort();
        }
        keep
    });
    for (id, (h, c)) in wanted {
        if probers.contains_key(id) {
            continue;
        }
        let Some(spec) = h.spec.health.clone() else { continue };
        let addr = match super::health::target(&spec, c) {
            Ok(addr) => addr,
            Err(reason) => {
                // Nothing to probe is a verdict too: the operator asked for a check
                // that cannot run, and a silent pass would hide it.
                let reason = format!("health check failed: {reason}");
                lock(&w.unhealthy).insert(id.to_string(), Unhealthy { container_id: c.id.clone(), reason });
                w.wake_reconcile.notify_one();
                continue;
            }
        };
        let (worker, pid, cid) = (w.clone(), id.to_string(), c.id.clone());
        let watch = super::health::watch(w.probe_http.clone(), spec, addr, w.probes.clone());
        let task = tokio::spawn(async move {
            let reason = watch.await;
            tracing::warn!(placement = %pid, container = %cid, %reason, "unhealthy; stopping it");
            lock(&worker.unhealthy).insert(pid, Unhealthy { container_id: cid, reason });
            worker.wake_reconcile.notify_one();
        });
        probers.insert(id.to_string(), Prober { key: (c.id.clone(), h.status.restarts), handle: task.abort_handle() });
    }
}

fn record(w: &Worker, h: &Held, change: Change) {
    match w.ledger.record(h, &change, now_ms()) {
        Ok(_) => w.wake_sync.notify_one(),
        Err(e) => tracing::error!(placement = %h.id, error = %e, "could not record status"),
    }
}

fn container_spec(node: &str, h: &Held, guard: Option<GuardSpec>) -> ContainerSpec {
    let mut l = BTreeMap::new();
    l.insert(labels::NODE.to_string(), node.to_string());
    l.insert(labels::TASK.to_string(), h.task_id.clone());
    l.insert(labels::PLACEMENT.to_string(), h.id.clone());
    l.insert(labels::FENCE.to_string(), h.fence.to_string());
    ContainerSpec {
        name: format!("hf-{}-{}", node, h.id),
        image: h.spec.image.clone(),
        command: h.spec.command.clone(),
        env: h.spec.env.clone(),
        ports: h.spec.ports.iter().map(|p| PortMap { container: p.container, host: p.host }).collect(),
        cpu_millis: h.spec.resources.cpu_millis,
        memory_mb: h.spec.resources.memory_mb,
        labels: l,
        guard,
    }
}

/// Before (re)starting a placement's container: re-checks that it may start
/// ([`start_check`]) and, for a guarded one, writes the deadline the lease allows.
/// `false` when it must not start now.
async fn arm_guard(w: &Worker, h: &Held, container_id: &str) -> bool {
    let deadline = match start_check(w, h) {
        Err(_) => return false,
        Ok(None) => return true,
        Ok(Some(deadline)) => deadline,
    };
    match w.runtime.set_deadline(container_id, deadline).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(placement = %h.id, error = %e, "could not write the guard's deadline; will retry");
            false
        }
    }
}

/// Runs `job` as a task in `pool`. `key` stays in `in_flight` until the job ends, so a
/// placement never has two jobs; a duplicate request is dropped. Jobs wait for a pool
/// slot, and there is at most one per key, so the waiting is bounded by the ledger.
fn spawn_job(w: &Arc<Worker>, pool: &Arc<Semaphore>, key: String, job: impl Future<Output = ()> + Send + 'static) {
    if !lock(&w.in_flight).insert(key.clone()) {
        return;
    }
    let (w, pool) = (w.clone(), pool.clone());
    tokio::spawn(async move {
        // The pools are never closed; a failed acquire would just skip this round.
        if let Ok(_permit) = pool.acquire_owned().await {
            job.await;
        }
        lock(&w.in_flight).remove(&key);
        w.wake_reconcile.notify_one();
    });
}

async fn execute(w: &Arc<Worker>, held: &[Held], action: Action) {
    match action {
        Action::Report { placement_id, change } => {
            if let Some(h) = held.iter().find(|h| h.id == placement_id) {
                report(w, h, change);
            }
        }
        Action::Forget { placement_id } => {
            if let Err(error) = w.ledger.forget(&placement_id) {
                // The row stays; the next reconcile forgets it again.
                tracing::warn!(placement = %placement_id, %error, "cannot forget a placement in the ledger");
                metrics::counter!("holdfast_worker_ledger_write_failures_total").increment(1);
            }
            lock(&w.unhealthy).remove(&placement_id);
        }
        Action::RemoveOrphan { container_id } => {
            let w2 = w.clone();
            let key = orphan_key(&container_id);
            spawn_job(w, &w.stops, key, async move { remove_orphan(&w2, &container_id).await });
        }
        Action::Create { placement_id } => {
            placement_job(w, held, &w.creates, placement_id, |w, h| async move { create(&w, &h).await })
        }
        Action::Start { placement_id, container_id } => {
            placement_job(w, held, &w.creates, placement_id, |w, h| async move { restart(&w, &h, container_id).await })
        }
        Action::Suspend { placement_id, container_id } => {
            placement_job(w, held, &w.stops, placement_id, |w, h| async move { suspend(&w, &h, &container_id).await })
        }
        Action::Resume { placement_id, container_id } => {
            placement_job(w, held, &w.creates, placement_id, |w, h| async move { resume(&w, &h, container_id).await })
        }
        Action::StopUnhealthy { placement_id, container_id } => placement_job(
            w,
            held,
            &w.stops,
            placement_id,
            |w, h| async move { stop_unhealthy(&w, &h, &container_id).await },
        ),
        Action::StopRemove { placement_id, container_id } => placement_job(
            w,
            held,
            &w.stops,
            placement_id,
            |w, h| async move { stop_remove(&w, &h, &container_id).await },
        ),
    }
}

/// Runs `job` on the held placement `placement_id` in `pool`, keyed by the placement
/// (see [`spawn_job`]); nothing when it is not held.
fn placement_job<F, J>(w: &Arc<Worker>, held: &[Held], pool: &Arc<Semaphore>, placement_id: String, job: F)
where
    F: FnOnce(Arc<Worker>, Held) -> J,
    J: Future<Output = ()> + Send + 'static,
{
    let Some(h) = held.iter().find(|h| h.id == placement_id).cloned() else { return };
    spawn_job(w, pool, placement_id, job(w.clone(), h));
}

/// Records a change reconcile decided on.
fn report(w: &Worker, h: &Held, change: Change) {
    if change.story == Some(Story::Fenced) {
        tracing::warn!(placement = %h.id, reason = ?change.status.reason, "the guard stopped this task at its deadline");
    }
    // Once the exit of an unhealthy container is recorded, its verdict is spent.
    let spent = change.status.observed != Observed::Running;
    record(w, h, change);
    if spent {
        lock(&w.unhealthy).remove(&h.id);
    }
}

/// Stops and removes a container no held placement owns.
async fn remove_orphan(w: &Worker, container_id: &str) {
    tracing::info!(container = %container_id, "removing container no placement owns");
    // A stop that fails leaves the remove to force it; a failed remove is tried again
    // by the next reconcile, which still finds the container.
    let _ = w.runtime.stop(container_id, w.cfg.stop_grace).await;
    if let Err(error) = w.runtime.remove(container_id).await {
        tracing::warn!(container = %container_id, %error, "could not remove an unowned container; will retry");
    }
}

/// Lease expired on an `exclusive` placement: stops its container, recorded as suspended.
async fn suspend(w: &Worker, h: &Held, container_id: &str) {
    // Stopped, not removed: the same container resumes if the lease returns
    // before a manager has replaced the placement.
    match w.runtime.stop(container_id, w.cfg.stop_grace).await {
        Ok(()) => {
            let mut ch = Change::carrying(h, Observed::Restarting);
            ch.suspended = true;
            ch.status.endpoints.clear();
            ch.story = Some(Story::StoppedOnExpiry);
            ch.status.reason = Some(format!(
                "lease expired at {}: stopped (offline mode exclusive) until a manager confirms",
                now_ms()
            ));
            record(w, h, ch);
        }
        Err(e) => tracing::warn!(placement = %h.id, error = %e, "could not stop on lease expiry; will retry"),
    }
}

/// Lease renewed: starts a suspended placement's container again.
async fn resume(w: &Worker, h: &Held, container_id: String) {
    if !arm_guard(w, h, &container_id).await {
        return;
    }
    match w.runtime.start(&container_id).await {
        Ok(info) => {
            let mut ch = Change::carrying(h, Observed::Running);
            ch.status.container_id = Some(container_id);
            ch.status.endpoints = super::reconcile::endpoints(&w.cfg.advertise_host, &info);
            ch.story = Some(Story::Resumed);
            ch.status.reason = Some("lease renewed: started again".into());
            record(w, h, ch);
        }
        Err(e) => tracing::warn!(placement = %h.id, error = %e, "could not resume; will retry"),
    }
}

/// Stops a container its probes judged unhealthy; its exit then goes through the
/// restart policy.
async fn stop_unhealthy(w: &Worker, h: &Held, container_id: &str) {
    // Stopped, not removed: the restart policy reuses the container.
    if let Err(e) = w.runtime.stop(container_id, w.cfg.stop_grace).await {
        tracing::warn!(placement = %h.id, error = %e, "could not stop unhealthy container; will retry");
    }
}

/// Stops and removes a placement's container, recorded as stopped.
async fn stop_remove(w: &Worker, h: &Held, container_id: &str) {
    let stopped = w.runtime.stop(container_id, w.cfg.stop_grace).await;
    let removed = w.runtime.remove(container_id).await;
    match stopped.and(removed) {
        Ok(()) => {
            let mut ch = Change::carrying(h, Observed::Stopped);
            ch.status.endpoints.clear();
            record(w, h, ch);
            lock(&w.unhealthy).remove(&h.id);
        }
        Err(e) => tracing::warn!(placement = %h.id, error = %e, "stop failed; will retry"),
    }
}

/// A local restart of an exited container.
async fn restart(w: &Worker, h: &Held, container_id: String) {
    if !arm_guard(w, h, &container_id).await {
        return;
    }
    match w.runtime.start(&container_id).await {
        Ok(_) => {
            let mut ch = Change::carrying(h, Observed::Running);
            ch.status.restarts = h.status.restarts + 1;
            ch.status.container_id = Some(container_id);
            record(w, h, ch);
        }
        Err(RuntimeError::Unavailable(e)) => tracing::warn!(error = %e, "engine unavailable; restart later"),
        Err(e) => {
            let mut ch = Change::carrying(h, Observed::Failed);
            ch.status.reason = Some(format!("restart failed: {e}"));
            record(w, h, ch);
        }
    }
}

/// Re-checks that the placement fits what is free here now; `Ok(Err(reason))` is a
/// refusal, `Err` means the engine could not say whether the image is present.
async fn admission(w: &Worker, h: &Held) -> Result<Result<(), String>, RuntimeError> {
    // A present image takes no new disk (it is already out of the measured free space).
    // An absent one will, but its size is unknown until fetched (no registry manifest is
    // asked for), so it counts as 0; the call still proves the engine answers before
    // anything is recorded.
    let image_bytes = match w.runtime.image_size(&h.spec.image).await? {
        Some(_on_disk) => 0,
        None => 0,
    };
    let free = current_resources(w, Some(&h.id)).await;
    Ok(super::resources::admit(&w.cfg.node, &h.spec.resources, image_bytes, &free))
}

/// Fetches the placement's image from the managers when the engine lacks it and the
/// catalogue has it (`worker::images`), reporting `pulling` with bytes done and total.
/// `None` when the placement failed (reason recorded) or must wait for the engine.
async fn fetch_image(w: &Worker, h: &Held) -> Option<Held> {
    let image = &h.spec.image;
    if image.starts_with(crate::worker::runtime::docker::ECHO_REPOSITORY) {
        return Some(h.clone());
    }
    match w.runtime.image_size(image).await {
        Ok(Some(_)) => return Some(h.clone()),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(placement = %h.id, error = %e, "cannot inspect the image; will retry");
            return None;
        }
    }
    let fetcher = super::images::Fetcher {
        http: w.tls.http(),
        managers: w.cfg.managers.clone(),
        dir: w.cfg.data_dir.join("images"),
        bandwidth: w.cfg.image_bandwidth,
    };
    let entry = match fetcher.lookup(image).await {
        Ok(Some(e)) => e,
        Ok(None) => return Some(h.clone()),
        Err(e) => {
            tracing::warn!(placement = %h.id, %image, error = %e, "cannot ask the managers' catalogue; pulling instead");
            return Some(h.clone());
        }
    };
    let pulling = h.in_state(Observed::Pulling);
    let say = |done: u64, total: u64| {
        let mut ch = Change::carrying(&pulling, Observed::Pulling);
        ch.status.reason = Some(format!("fetching {image} from the managers: {done} of {total} bytes"));
        record(w, &pulling, ch);
    };
    say(0, entry.size());
    let (tx, mut rx) = tokio::sync::watch::channel((0u64, entry.size()));
    let progress: super::images::Progress = Arc::new(move |d, t| {
        tx.send_replace((d, t));
    });
    let fetch = fetcher.fetch(w.runtime.as_ref(), &entry, progress);
    tokio::pin!(fetch);
    let result = loop {
        tokio::select! {
            r = &mut fetch => break r,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if rx.has_changed().unwrap_or(false) {
                    let (d, t) = *rx.borrow_and_update();
                    say(d, t);
                }
            }
        }
    };
    match result {
        Ok(f) => {
            tracing::info!(placement = %h.id, %image, bytes = f.bytes, skipped_layers = f.skipped_layers,
                fetched_layers = f.fetched_layers, "image fetched from the managers");
            super::images::refresh_held(&w.held_images, w.runtime.as_ref(), Duration::ZERO, true).await;
            Some(pulling)
        }
        Err(e) => {
            tracing::warn!(placement = %h.id, %image, error = %e, "image fetch failed");
            let mut ch = Change::carrying(&pulling, Observed::Failed);
            ch.status.reason = Some(format!("image {image}: fetch from the managers failed: {e}"));
            record(w, &pulling, ch);
            None
        }
    }
}

async fn create(w: &Worker, h: &Held) {
    let started = Instant::now();
    if !admitted(w, h).await {
        return;
    }
    let Some(h) = &fetch_image(w, h).await else { return };
    if matches!(h.status.observed, Observed::Pending | Observed::Pulling) {
        record(w, h, Change::carrying(h, Observed::Starting));
    }
    let h = &h.in_state(Observed::Starting);
    let admitted_ms = started.elapsed().as_millis() as u64;
    if !images_ready(w, h).await {
        return;
    }
    let image_ms = started.elapsed().as_millis() as u64;
    tracing::debug!(placement = %h.id, admitted_ms, image_ms, "creating");
    let guard = match start_check(w, h) {
        Err(_) => return,
        Ok(deadline) => deadline.map(|deadline| GuardSpec { deadline }),
    };
    match w.runtime.create_and_start(&container_spec(&w.cfg.node, h, guard)).await {
        Ok(info) => {
            if h.spec.guarded() {
                // The deadline was taken before a create that may have been slow; the
                // lease was renewed meanwhile, but the fence keeper only knows this
                // container once it is recorded. Move it now, not at the next renewal,
                // if the renewal still wants it here.
                if let Ok(Some(deadline)) = start_check(w, h) {
                    if let Err(e) = w.runtime.set_deadline(&info.id, deadline).await {
                        tracing::warn!(placement = %h.id, error = %e, "could not move the guard's deadline");
                    }
                }
            }
            let mut ch = Change::carrying(h, Observed::Running);
            ch.status.container_id = Some(info.id.clone());
            ch.status.endpoints = super::reconcile::endpoints(&w.cfg.advertise_host, &info);
            ch.status.reason = None;
            record(w, h, ch);
            tracing::info!(placement = %h.id, container = %info.id, ms = started.elapsed().as_millis() as u64, "started");
        }
        Err(RuntimeError::Unavailable(msg)) => tracing::warn!(error = %msg, "engine unavailable; will retry"),
        Err(e) => {
            let mut ch = Change::carrying(h, Observed::Failed);
            ch.status.reason = Some(e.to_string());
            record(w, h, ch);
        }
    }
}

/// Whether admission lets the placement start here now; a refusal is recorded (and
/// reported, so the manager places it elsewhere), an engine that cannot answer is
/// retried next round.
async fn admitted(w: &Worker, h: &Held) -> bool {
    match admission(w, h).await {
        Ok(Ok(())) => true,
        Ok(Err(refused)) => {
            tracing::warn!(placement = %h.id, reason = %refused, "not starting");
            let mut ch = Change::carrying(h, Observed::Failed);
            ch.status.reason = Some(refused);
            ch.refused = true;
            record(w, h, ch);
            false
        }
        Err(e) => {
            tracing::warn!(placement = %h.id, error = %e, "cannot check admission; will retry");
            false
        }
    }
}

/// Makes sure the engine holds the task's image and, for a guarded task, the guard's;
/// `false` when it cannot (a failure recorded, or the engine unavailable: retried).
async fn images_ready(w: &Worker, h: &Held) -> bool {
    if let Err(e) = w.runtime.ensure_image(&h.spec.image).await {
        fail_unless_unavailable(w, h, e, "");
        return false;
    }
    if h.spec.guarded() {
        // Before the deadline is taken: the first guarded start on an engine builds the
        // guard image, which could otherwise eat the run time the deadline allows.
        if let Err(e) = w.runtime.ensure_guard().await {
            fail_unless_unavailable(w, h, e, "cannot prepare the exclusive guard: ");
            return false;
        }
    }
    true
}

/// Records the placement failed with `e` (after `prefix`), unless the engine was only
/// unavailable: that is retried.
fn fail_unless_unavailable(w: &Worker, h: &Held, e: RuntimeError, prefix: &str) {
    match e {
        RuntimeError::Unavailable(msg) => tracing::warn!(error = %msg, "engine unavailable; will retry"),
        other => {
            let mut ch = Change::carrying(h, Observed::Failed);
            ch.status.reason = Some(format!("{prefix}{other}"));
            record(w, h, ch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TaskSpec;

    /// The regression test of a replaced `exclusive` copy started again on reconnect:
    /// a sync's lease used to be published before its desired set was recorded, so a
    /// reconcile round could pair the renewed lease with the desired set that lease had
    /// superseded (the replaced placement still "run", suspended, lease valid) and
    /// resume it next to its replacement. However the two interleave, a view with the
    /// lease of sync `k` holds the desired set of sync `k` or later.
    #[test]
    fn a_view_never_pairs_a_renewed_lease_with_the_desired_set_it_superseded() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Arc::new(Ledger::open(tmp.path(), "w1").expect("ledger"));
        let lease = Arc::new(Lease::new(0, 0));
        let spec = TaskSpec::from_json(br#"{"image":"i","offline":{"mode":"exclusive"}}"#).expect("spec");
        let done = Arc::new(AtomicBool::new(false));
        // Sync k replaces the task's placement by p<k> (every other one is no longer
        // listed, so stopped) and grants a lease "ending" at k.
        let writer = {
            let (ledger, lease, done) = (ledger.clone(), lease.clone(), done.clone());
            std::thread::spawn(move || {
                for k in 1..=150u64 {
                    let a = Assignment {
                        placement_id: format!("p{k:04}"),
                        task_id: "t".into(),
                        fence: k,
                        desired: Desired::Run,
                        spec: spec.clone(),
                    };
                    assert!(take_authority(&ledger, &lease, &[a], k, 30_000));
                }
                done.store(true, Ordering::SeqCst);
            })
        };
        let mut views = 0;
        while !done.load(Ordering::SeqCst) {
            let ((until, _), held) = authority_view(&ledger, &lease).expect("view");
            let newest_wanted = held
                .iter()
                .filter(|h| h.desired == Desired::Run)
                .filter_map(|h| h.id.strip_prefix('p').and_then(|k| k.parse::<u64>().ok()))
                .max()
                .unwrap_or(0);
            assert!(
                newest_wanted >= until,
                "a view with the lease of sync {until} holds the desired set of sync {newest_wanted}: {held:?}"
            );
            views += 1;
        }
        writer.join().expect("writer");
        assert!(views > 20, "the reader must interleave with the writer, took {views} views");
    }
}
