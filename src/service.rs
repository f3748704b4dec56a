//! Running as a system service (ARCHITECTURE.md "Running as a service"): systemd
//! readiness, status lines and watchdog through `sd_notify`, the worker's vital signs,
//! and the `--metrics ADDR` endpoint any process can serve.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every notification is a no-op.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::sync::{broadcast, watch};

/// Options of the service layer that are not part of a node's [`Config`](crate::config::Config).
#[derive(Clone, Debug, Default)]
pub struct ServiceOptions {
    /// `--metrics ADDR`: serve `/metrics`, `/health/live` and `/health/ready` there.
    pub metrics: Option<String>,
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a first status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`: the node is draining.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// How often to send `WATCHDOG=1`: half of systemd's `WatchdogSec=` (from
/// `WATCHDOG_USEC`), or `None` when no watchdog is asked for.
pub fn watchdog_period() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 2))
    } else {
        None
    }
}

/// Status lines refresh at least this often when there is no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Decides, tick by tick, whether the manager's Raft core is alive *inside*: running,
/// and applying what it committed. A core that stopped (`Role::Shutdown`) or whose
/// applied index has not moved for `stall_ticks` ticks while entries wait is dead.
#[derive(Debug, Default)]
pub struct RaftLiveness {
    last_applied: Option<u64>,
    stalled_ticks: u32,
}

impl RaftLiveness {
    /// Ticks without apply progress, with entries waiting, that count as a stall.
    pub const STALL_TICKS: u32 = 6;

    /// Judges one status sample; `true` while alive.
    pub fn alive(&mut self, s: &holdfast_raft::ClusterStatus) -> bool {
        if s.role == holdfast_raft::Role::Shutdown {
            return false;
        }
        let waiting = s.last_log_index.unwrap_or(0) > s.last_applied.unwrap_or(0);
        if waiting && s.last_applied == self.last_applied {
            self.stalled_ticks += 1;
        } else {
            self.stalled_ticks = 0;
        }
        self.last_applied = s.last_applied;
        self.stalled_ticks < Self::STALL_TICKS
    }
}

/// `leader m1, 3 voters, applied 42` (or why there is none).
pub fn manager_status_line(s: &holdfast_raft::ClusterStatus) -> String {
    let voters = s.members.iter().filter(|m| m.voter).count();
    let applied = s.last_applied.unwrap_or(0);
    match (&s.role, &s.leader) {
        (holdfast_raft::Role::Shutdown, _) => "raft stopped".to_string(),
        (_, Some(l)) => format!("leader {}, {voters} voters, applied {applied}", l.name),
        (_, None) => format!("no leader, {voters} voters, applied {applied}"),
    }
}

/// A worker's vital signs: written by the agent's loops, read by the watchdog, the
/// status line and `/metrics`.
#[derive(Debug)]
pub struct WorkerVitals {
    started: Instant,
    /// Milliseconds after `started` at which the sync loop last began a round.
    last_turn_ms: AtomicU64,
    /// Rounds of the sync loop so far.
    turns: AtomicU64,
    /// Lease end, ms since the epoch (0 = none).
    lease_until_ms: AtomicU64,
    /// Reports waiting in the ledger's outbox.
    outbox: AtomicU64,
    /// Duration of the last successful sync, in microseconds.
    last_sync_us: AtomicU64,
    engine_ok: AtomicBool,
    engine_ready: watch::Sender<bool>,
    containers: Mutex<BTreeMap<String, u64>>,
}

impl Default for WorkerVitals {
    fn default() -> Self {
        WorkerVitals {
            started: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            turns: AtomicU64::new(0),
            lease_until_ms: AtomicU64::new(0),
            outbox: AtomicU64::new(0),
            last_sync_us: AtomicU64::new(0),
            engine_ok: AtomicBool::new(false),
            engine_ready: watch::channel(false).0,
            containers: Mutex::new(BTreeMap::new()),
        }
    }
}

impl WorkerVitals {
    /// The sync loop began a round; `outbox` reports wait to go out.
    pub fn sync_turn(&self, outbox: usize) {
        self.turns.fetch_add(1, Ordering::Relaxed);
        self.last_turn_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.outbox.store(outbox as u64, Ordering::Relaxed);
    }

    /// A sync succeeded after `took`, granting a lease until `lease_until_ms`.
    pub fn synced(&self, took: Duration, lease_until_ms: u64) {
        self.last_sync_us.store(took.as_micros() as u64, Ordering::Relaxed);
        self.lease_until_ms.store(lease_until_ms, Ordering::Relaxed);
        metrics::histogram!("holdfast_worker_sync_seconds").record(took.as_secs_f64());
    }

    /// The lease as loaded from the ledger at start.
    pub fn set_lease(&self, lease_until_ms: u64) {
        self.lease_until_ms.store(lease_until_ms, Ordering::Relaxed);
    }

    /// The result of an engine call; the first success makes the worker ready.
    pub fn engine(&self, ok: bool) {
        self.engine_ok.store(ok, Ordering::Relaxed);
        if ok {
            self.engine_ready.send_if_modified(|r| !std::mem::replace(r, true));
        }
    }

    /// The agent's containers, counted by state, from the last engine listing.
    pub fn containers<'a>(&self, states: impl IntoIterator<Item = &'a crate::worker::runtime::ContainerState>) {
        let mut counts = BTreeMap::new();
        for s in states {
            let name = match s {
                crate::worker::runtime::ContainerState::Created => "created",
                crate::worker::runtime::ContainerState::Running => "running",
                crate::worker::runtime::ContainerState::Exited { .. } => "exited",
                crate::worker::runtime::ContainerState::Other(_) => "other",
            };
            *counts.entry(name.to_string()).or_insert(0u64) += 1;
        }
        *crate::lock(&self.containers) = counts;
    }

    /// Resolves once an engine call has succeeded.
    pub async fn engine_ready(&self) {
        let mut rx = self.engine_ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Whether the last engine call succeeded.
    pub fn engine_ok(&self) -> bool {
        self.engine_ok.load(Ordering::Relaxed)
    }

    /// Time since the sync loop last began a round.
    pub fn since_last_turn(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_turn_ms.load(Ordering::Relaxed)))
    }

    /// Lease time left (zero when expired or never held).
    pub fn lease_remaining(&self) -> Duration {
        Duration::from_millis(self.lease_until_ms.load(Ordering::Relaxed).saturating_sub(crate::model::now_ms()))
    }

    /// `lease valid 24 s, engine ok, 3 running` and the like.
    pub fn status_line(&self) -> String {
        let lease = self.lease_remaining();
        let lease =
            if lease.is_zero() { "no valid lease".to_string() } else { format!("lease valid {} s", lease.as_secs()) };
        let engine = if self.engine_ok() { "engine ok" } else { "engine unavailable" };
        let running = crate::lock(&self.containers).get("running").copied().unwrap_or(0);
        format!("{lease}, {engine}, {running} running")
    }

    /// Prometheus text for the worker's own figures (with `# HELP`). Every container
    /// state is always written, so a state that empties reads 0, not its last value.
    pub fn write_prometheus(&self, out: &mut String) {
        use std::fmt::Write;
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            out,
            "holdfast_worker_lease_remaining_seconds",
            "Time left on the lease from the managers.",
            self.lease_remaining().as_secs_f64(),
        );
        gauge(
            out,
            "holdfast_worker_outbox_reports",
            "Status reports waiting to reach a manager (counted up to 1000).",
            self.outbox.load(Ordering::Relaxed) as f64,
        );
        gauge(
            out,
            "holdfast_worker_last_sync_seconds",
            "Duration of the last successful sync with a manager.",
            self.last_sync_us.load(Ordering::Relaxed) as f64 / 1e6,
        );
        gauge(
            out,
            "holdfast_worker_sync_loop_idle_seconds",
            "Time since the sync loop last began a round.",
            self.since_last_turn().as_secs_f64(),
        );
        gauge(
            out,
            "holdfast_worker_engine_ok",
            "1 when the last container engine call succeeded.",
            if self.engine_ok() { 1.0 } else { 0.0 },
        );
        let counts = crate::lock(&self.containers).clone();
        let _ = writeln!(out, "# HELP holdfast_worker_containers Containers of this worker by engine state.");
        let _ = writeln!(out, "# TYPE holdfast_worker_containers gauge");
        for state in ["created", "running", "exited", "other"] {
            let _ = writeln!(
                out,
                "holdfast_worker_containers{{state=\"{state}\"}} {}",
                counts.get(state).copied().unwrap_or(0)
            );
        }
    }
}

/// What the watchdog watches in one process: the Raft core of a manager, the sync
/// loop of a worker, or both.
#[derive(Clone, Default)]
pub struct Watched {
    /// The manager's replicated database.
    pub db: Option<holdfast_raft::ReplicatedDb>,
    /// The worker's vital signs.
    pub worker: Option<Arc<WorkerVitals>>,
    /// A worker whose sync loop has not begun a round for this long is stalled.
    pub max_idle: Duration,
}

impl Watched {
    /// Whether every role of the process can serve: a manager from the start (Raft is
    /// open and the API bound before this is built), a worker after its first
    /// successful engine call.
    pub fn ready(&self) -> bool {
        self.worker.as_ref().is_none_or(|w| *w.engine_ready.borrow())
    }

    fn status_line(&self) -> String {
        let m = self.db.as_ref().map(|db| manager_status_line(&db.status()));
        let w = self.worker.as_ref().map(|w| w.status_line());
        m.into_iter().chain(w).collect::<Vec<_>>().join("; ")
    }
}

/// The process's systemd conversation: `READY=1` once [`Watched::ready`], then every
/// `every` a `STATUS=` line and `WATCHDOG=1` only while the process is alive inside
/// (Raft running and applying, sync loop turning). When Raft is gone the pings stop,
/// so systemd's `WatchdogSec=` restarts the process.
pub async fn supervise(watched: Watched, every: Duration, mut stop: broadcast::Receiver<()>) {
    if let Some(w) = &watched.worker {
        tokio::select! {
            _ = stop.recv() => return,
            _ = w.engine_ready() => {}
        }
    }
    ready(&watched.status_line());
    let mut raft = RaftLiveness::default();
    let mut was_alive = true;
    loop {
        let raft_ok = watched.db.as_ref().is_none_or(|db| raft.alive(&db.status()));
        let sync_ok = watched.worker.as_ref().is_none_or(|w| w.since_last_turn() <= watched.max_idle);
        let line = watched.status_line();
        if raft_ok && sync_ok {
            notify(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
        } else {
            if was_alive {
                tracing::error!(status = %line, raft_ok, sync_ok, "not alive inside; watchdog pings stop");
            }
            notify(&[NotifyState::Status(&line)]);
        }
        was_alive = raft_ok && sync_ok;
        tokio::select! {
            _ = stop.recv() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// `GET /metrics`, `/health/live` and `/health/ready` for `--metrics ADDR`, whatever
/// roles the process runs: the manager's figures, the worker's and the breakers.
pub fn metrics_router(
    manager: Option<Arc<crate::manager::Manager>>,
    watched: Watched,
    resilience: crate::resilience::Registry,
) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    crate::manager::api::metrics::handle();
    let ready_w = watched.clone();
    let scrape = move || {
        let manager = manager.clone();
        let worker = watched.worker.clone();
        let resilience = resilience.clone();
        async move {
            let mut body = match &manager {
                Some(m) => match crate::manager::api::metrics::render(m).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                },
                None => crate::manager::api::metrics::handle().render(),
            };
            if let Some(w) = &worker {
                w.write_prometheus(&mut body);
            }
            resilience.snapshot().write_prometheus(&mut body);
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
        }
    };
    let ready = move || {
        let w = ready_w.clone();
        async move {
            let leader = w.db.as_ref().is_none_or(|db| db.status().leader.is_some());
            if leader && w.ready() {
                (StatusCode::OK, "ready\n")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
    };
    axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/health/live", get(|| async { "alive\n" }))
        .route("/health/ready", get(ready))
}

/// How often watchdog loops run: the systemd period, or a slower status refresh.
pub fn tick() -> Duration {
    watchdog_period().unwrap_or(STATUS_EVERY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(role: holdfast_raft::Role, last_log: u64, applied: u64) -> holdfast_raft::ClusterStatus {
        holdfast_raft::ClusterStatus {
            id: 1,
            name: "m1".into(),
            role,
            term: 1,
            leader: None,
            last_log_index: Some(last_log),
            commit_index: Some(applied),
            last_applied: Some(applied),
            snapshot_index: None,
            millis_since_quorum_ack: None,
            members: Vec::new(),
            fatal: None,
        }
    }

    #[test]
    fn raft_is_dead_when_shut_down_or_when_applying_stalls_with_entries_waiting() {
        use holdfast_raft::Role::{Follower, Leader, Shutdown};
        let mut j = RaftLiveness::default();
        assert!(j.alive(&status(Leader, 5, 5)));
        // Idle (nothing waiting) is alive for ever.
        for _ in 0..20 {
            assert!(j.alive(&status(Leader, 5, 5)));
        }
        // Entries waiting, applied index stuck: dead after STALL_TICKS ticks.
        let mut verdicts = Vec::new();
        for _ in 0..RaftLiveness::STALL_TICKS + 1 {
            verdicts.push(j.alive(&status(Follower, 9, 5)));
        }
        assert!(verdicts[..RaftLiveness::STALL_TICKS as usize - 1].iter().all(|v| *v), "{verdicts:?}");
        assert!(!verdicts.last().unwrap());
        // Progress revives it; a stopped core is dead at once.
        assert!(j.alive(&status(Follower, 9, 6)));
        assert!(!j.alive(&status(Shutdown, 9, 9)));
    }

    #[test]
    fn worker_metrics_write_every_container_state_so_emptied_states_read_zero() {
        use crate::worker::runtime::ContainerState;
        let v = WorkerVitals::default();
        v.containers([&ContainerState::Running, &ContainerState::Running, &ContainerState::Exited { code: 1 }]);
        let mut out = String::new();
        v.write_prometheus(&mut out);
        assert!(out.contains("holdfast_worker_containers{state=\"running\"} 2"), "{out}");
        assert!(out.contains("holdfast_worker_containers{state=\"exited\"} 1"), "{out}");
        v.containers([]);
        let mut out = String::new();
        v.write_prometheus(&mut out);
        assert!(out.contains("holdfast_worker_containers{state=\"running\"} 0"), "{out}");
        assert!(out.contains("# HELP holdfast_worker_lease_remaining_seconds"), "{out}");
        assert!(v.status_line().starts_with("no valid lease"), "{}", v.status_line());
    }
}
