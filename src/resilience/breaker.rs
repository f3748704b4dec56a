//! A three-state circuit breaker: closed → open → half-open → closed.
//!
//! Written here rather than taken from a crate: the maintained tower-adjacent options
//! (`failsafe`, `tower`'s absent breaker) either admit many calls in half-open or have
//! no state-change hook, and holdfast needs both exactly one probe and a hook that the
//! worker turns into a `degraded` node report.
//!
//! Rules:
//! - **Closed**: every call runs. `failure_threshold` *consecutive* failures open it; a
//!   success resets the count.
//! - **Open**: calls fail fast with [`BreakerError::Open`] until `open_for` has passed.
//! - **Half-open**: the first call after `open_for` becomes the one probe; every other
//!   call fails fast while it runs. A failed probe reopens for `open_for`; a successful
//!   one counts toward `success_threshold`, after which the breaker closes. With a
//!   threshold above one, the next probe is again a single call.
//! - A probe whose future is dropped (caller cancelled) frees the probe slot without
//!   judging the dependency.
//! - Results of calls admitted before the latest state change are ignored, so a slow
//!   call from a closed period cannot close or reopen a breaker that has moved on.
//! - A panicking call counts as a failure and comes back as [`BreakerError::Panicked`]
//!   (the panic is *mapped*, not resumed): a worker loop should mark the dependency
//!   failed and carry on, not unwind through its own tasks. The panic is logged at
//!   error level so the bug is not hidden.

use std::any::Any;
use std::future::Future;
use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;

/// The breaker's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls pass; failures are being counted.
    Closed,
    /// Calls fail fast until the open period ends.
    Open,
    /// One probe call decides whether to close or reopen.
    HalfOpen,
}

impl BreakerState {
    /// Lower-case name for health JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tuning of one breaker.
#[derive(Clone, Debug)]
pub struct BreakerConfig {
    /// Consecutive failures (while closed) that open the breaker.
    pub failure_threshold: NonZeroU32,
    /// Successful probes (in half-open) needed to close it again.
    pub success_threshold: NonZeroU32,
    /// How long it stays open before admitting a probe.
    pub open_for: Duration,
}

const FIVE: NonZeroU32 = NonZeroU32::new(5).unwrap();

impl Default for BreakerConfig {
    /// Five failures in a row, one good probe, five seconds open: a Docker engine that
    /// restarts is probed a few times a minute, not hammered.
    fn default() -> Self {
        BreakerConfig { failure_threshold: FIVE, success_threshold: NonZeroU32::MIN, open_for: Duration::from_secs(5) }
    }
}

/// One state change, as given to the hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Breaker name.
    pub name: String,
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
}

/// Callback run after every state change (outside the breaker's lock, so it may read
/// the breaker).
pub type TransitionHook = Arc<dyn Fn(&Transition) + Send + Sync>;

/// Why a guarded call did not give a value.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// Rejected without running: the breaker is open, or half-open with its probe out.
    #[error("circuit breaker {name} is open; retry in {retry_in:?}")]
    Open {
        /// Breaker name (the dependency).
        name: String,
        /// When a probe may be admitted (a hint; zero means "now, if nobody else probes").
        retry_in: Duration,
    },
    /// The call ran and failed.
    #[error(transparent)]
    Inner(E),
    /// The call panicked; counted as a failure.
    #[error("call through breaker {name} panicked: {message}")]
    Panicked {
        /// Breaker name.
        name: String,
        /// The panic payload, when it was a string.
        message: String,
    },
}

impl<E> BreakerError<E> {
    /// True when the call was rejected without running.
    pub fn is_open(&self) -> bool {
        matches!(self, BreakerError::Open { .. })
    }
}

/// A point-in-time view of one breaker, for health and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerSnapshot {
    /// Breaker name.
    pub name: String,
    /// Current state.
    pub state: BreakerState,
    /// Consecutive failures counted while closed.
    pub consecutive_failures: u32,
    /// Time left in the open period (zero unless open).
    pub retry_in: Duration,
    /// Calls rejected without running, since start.
    pub rejected_total: u64,
    /// Calls that counted as failures, since start.
    pub failures_total: u64,
    /// State changes since start.
    pub transitions_total: u64,
}

#[derive(Debug)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool, successes: u32 },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Bumped on every state change; a call's result counts only in its own generation.
    generation: u64,
}

/// A circuit breaker guarding one dependency. Cheap to share behind an `Arc`.
pub struct Breaker {
    name: String,
    config: BreakerConfig,
    inner: Mutex<Inner>,
    hook: Option<TransitionHook>,
    rejected: AtomicU64,
    failures: AtomicU64,
    transitions: AtomicU64,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker").field("name", &self.name).field("state", &self.state()).finish()
    }
}

/// The right to run one call; records nothing if dropped unjudged, except freeing a
/// half-open probe slot.
struct Permit<'a> {
    breaker: &'a Breaker,
    generation: u64,
    probe: bool,
    judged: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.judged || !self.probe {
            return;
        }
        // The probe was cancelled: let the next caller probe instead of wedging half-open.
        let mut inner = self.breaker.lock();
        if inner.generation == self.generation {
            if let Phase::HalfOpen { probing, .. } = &mut inner.phase {
                *probing = false;
            }
        }
    }
}

impl Breaker {
    /// A closed breaker named after the dependency it guards.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        Breaker {
            name: name.into(),
            config,
            inner: Mutex::new(Inner { phase: Phase::Closed { failures: 0 }, generation: 0 }),
            hook: None,
            rejected: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            transitions: AtomicU64::new(0),
        }
    }

    /// Sets the callback run after each state change.
    pub fn with_hook(mut self, hook: TransitionHook) -> Self {
        self.hook = Some(hook);
        self
    }

    /// The dependency's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its tuning.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Current state. An open breaker whose period has passed still reads `Open` until
    /// a call arrives to probe: nothing has been learnt about the dependency yet.
    pub fn state(&self) -> BreakerState {
        match self.lock().phase {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// A consistent view for health and metrics.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let inner = self.lock();
        let (state, consecutive_failures, retry_in) = match inner.phase {
            Phase::Closed { failures } => (BreakerState::Closed, failures, Duration::ZERO),
            Phase::Open { until } => (BreakerState::Open, 0, until.saturating_duration_since(Instant::now())),
            Phase::HalfOpen { .. } => (BreakerState::HalfOpen, 0, Duration::ZERO),
        };
        BreakerSnapshot {
            name: self.name.clone(),
            state,
            consecutive_failures,
            retry_in,
            rejected_total: self.rejected.load(Ordering::Relaxed),
            failures_total: self.failures.load(Ordering::Relaxed),
            transitions_total: self.transitions.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` through the breaker; every `Err` counts as a failure.
    pub async fn call<T, E, F, Fut>(&self, f: F) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(|_| true, f).await
    }

    /// Runs `f` through the breaker; an `Err` counts as a failure only when
    /// `is_failure` says so (e.g. "engine unreachable" yes, "no such container" no).
    /// Errors that do not count leave the breaker as a success would.
    pub async fn call_classified<T, E, F, Fut>(
        &self,
        is_failure: impl FnOnce(&E) -> bool,
        f: F,
    ) -> Result<T, BreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut permit = self.admit::<E>()?;
        let outcome = AssertUnwindSafe(f()).catch_unwind().await;
        permit.judged = true;
        match outcome {
            Ok(Ok(v)) => {
                self.record(&permit, true);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.record(&permit, !is_failure(&e));
                Err(BreakerError::Inner(e))
            }
            Err(payload) => {
                self.record(&permit, false);
                let message = panic_message(payload.as_ref());
                tracing::error!(breaker = %self.name, %message, "guarded call panicked; counted as a failure");
                Err(BreakerError::Panicked { name: self.name.clone(), message })
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means a hook-free critical section panicked, which none
        // of ours can; the state inside is still whole.
        crate::lock(&self.inner)
    }

    fn admit<E>(&self) -> Result<Permit<'_>, BreakerError<E>> {
        let mut change = None;
        let admitted = {
            let mut inner = self.lock();
            let generation = inner.generation;
            match &mut inner.phase {
                Phase::Closed { .. } => Ok((generation, false)),
                Phase::HalfOpen { probing: true, .. } => Err(self.config.open_for),
                Phase::HalfOpen { probing, .. } => {
                    *probing = true;
                    Ok((generation, true))
                }
                // The clock is read only here: a closed breaker's fast path stays
                // free of it (the benchmark showed it as a good share of the cost).
                Phase::Open { until } if Instant::now() < *until => {
                    Err(until.saturating_duration_since(Instant::now()))
                }
                Phase::Open { .. } => {
                    change = Some(self.move_to(&mut inner, Phase::HalfOpen { probing: true, successes: 0 }));
                    Ok((inner.generation, true))
                }
            }
        };
        self.notify(change);
        match admitted {
            Ok((generation, probe)) => Ok(Permit { breaker: self, generation, probe, judged: false }),
            Err(retry_in) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(BreakerError::Open { name: self.name.clone(), retry_in })
            }
        }
    }

    fn record(&self, permit: &Permit<'_>, success: bool) {
        if !success {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut change = None;
        {
            let mut inner = self.lock();
            if inner.generation != permit.generation {
                return;
            }
            let cfg = &self.config;
            let next = match &mut inner.phase {
                Phase::Closed { failures } if success => {
                    *failures = 0;
                    None
                }
                Phase::Closed { failures } => {
                    *failures += 1;
                    (*failures >= cfg.failure_threshold.get())
                        .then(|| Phase::Open { until: Instant::now() + cfg.open_for })
                }
                // Only the probe's result judges a half-open breaker; a call admitted
                // in the same generation is always the probe.
                Phase::HalfOpen { probing, successes } if success && permit.probe => {
                    *successes += 1;
                    *probing = false;
                    (*successes >= cfg.success_threshold.get()).then_some(Phase::Closed { failures: 0 })
                }
                Phase::HalfOpen { .. } if permit.probe => Some(Phase::Open { until: Instant::now() + cfg.open_for }),
                Phase::HalfOpen { .. } | Phase::Open { .. } => None,
            };
            if let Some(next) = next {
                change = Some(self.move_to(&mut inner, next));
            }
        }
        self.notify(change);
    }

    fn move_to(&self, inner: &mut Inner, next: Phase) -> Transition {
        let from = phase_state(&inner.phase);
        let to = phase_state(&next);
        inner.phase = next;
        inner.generation += 1;
        self.transitions.fetch_add(1, Ordering::Relaxed);
        Transition { name: self.name.clone(), from, to }
    }

    fn notify(&self, change: Option<Transition>) {
        let Some(t) = change else { return };
        match t.to {
            BreakerState::Open => tracing::warn!(breaker = %t.name, from = %t.from, "circuit breaker opened"),
            _ => tracing::info!(breaker = %t.name, from = %t.from, to = %t.to, "circuit breaker changed state"),
        }
        if let Some(hook) = &self.hook {
            hook(&t);
        }
    }
}

fn phase_state(p: &Phase) -> BreakerState {
    match p {
        Phase::Closed { .. } => BreakerState::Closed,
        Phase::Open { .. } => BreakerState::Open,
        Phase::HalfOpen { .. } => BreakerState::HalfOpen,
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn cfg(failures: u32, successes: u32, open_for: Duration) -> BreakerConfig {
        BreakerConfig {
            failure_threshold: NonZeroU32::new(failures).expect("nonzero"),
            success_threshold: NonZeroU32::new(successes).expect("nonzero"),
            open_for,
        }
    }

    async fn ok(b: &Breaker) -> Result<(), BreakerError<&'static str>> {
        b.call(|| async { Ok::<(), &'static str>(()) }).await
    }

    async fn fail(b: &Breaker) -> Result<(), BreakerError<&'static str>> {
        b.call(|| async { Err::<(), _>("boom") }).await
    }

    type Seen = Arc<Mutex<Vec<(BreakerState, BreakerState)>>>;

    fn recorder() -> (TransitionHook, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hook: TransitionHook = Arc::new(move |t: &Transition| s.lock().expect("lock").push((t.from, t.to)));
        (hook, seen)
    }

    #[tokio::test(start_paused = true)]
    async fn closed_counts_consecutive_failures_and_a_success_resets_them() {
        let b = Breaker::new("dep", cfg(3, 1, Duration::from_secs(5)));
        assert!(matches!(fail(&b).await, Err(BreakerError::Inner("boom"))));
        assert!(fail(&b).await.is_err());
        assert_eq!(b.snapshot().consecutive_failures, 2);
        assert!(ok(&b).await.is_ok());
        assert_eq!(b.snapshot().consecutive_failures, 0);
        assert!(fail(&b).await.is_err());
        assert!(fail(&b).await.is_err());
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(fail(&b).await.is_err());
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn every_transition_and_the_hook_sees_each() {
        let (hook, seen) = recorder();
        let b = Breaker::new("dep", cfg(1, 2, Duration::from_secs(5))).with_hook(hook);
        // closed -> open
        assert!(fail(&b).await.is_err());
        assert_eq!(b.state(), BreakerState::Open);
        // open: fail fast without running, with the time left as the hint
        let ran = AtomicUsize::new(0);
        let r = b
            .call(|| async {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<(), &str>(())
            })
            .await;
        match r {
            Err(BreakerError::Open { name, retry_in }) => {
                assert_eq!(name, "dep");
                assert!(retry_in > Duration::from_secs(4) && retry_in <= Duration::from_secs(5), "{retry_in:?}");
            }
            other => panic!("expected Open, got {other:?}"),
        }
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        tokio::time::advance(Duration::from_secs(5)).await;
        // open -> half-open (probe admitted), failed probe: half-open -> open
        assert!(matches!(fail(&b).await, Err(BreakerError::Inner(_))));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(ok(&b).await.unwrap_err().is_open());
        tokio::time::advance(Duration::from_secs(5)).await;
        // open -> half-open, first good probe: still half-open (needs two)
        assert!(ok(&b).await.is_ok());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // second good probe: half-open -> closed
        assert!(ok(&b).await.is_ok());
        assert_eq!(b.state(), BreakerState::Closed);
        use BreakerState::*;
        let expected = vec![(Closed, Open), (Open, HalfOpen), (HalfOpen, Open), (Open, HalfOpen), (HalfOpen, Closed)];
        assert_eq!(*seen.lock().expect("lock"), expected);
        let snap = b.snapshot();
        assert_eq!(snap.transitions_total, 5);
        assert_eq!(snap.rejected_total, 2);
        assert_eq!(snap.failures_total, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn exactly_one_probe_among_fifty_concurrent_calls() {
        // open_for = 0: opened, then eligible for a probe at once, so no waiting.
        let b = Arc::new(Breaker::new("dep", cfg(1, 1, Duration::ZERO)));
        assert!(fail(&b).await.is_err());
        assert_eq!(b.state(), BreakerState::Open);
        let admitted = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let start = Arc::new(tokio::sync::Barrier::new(50));
        let calls: Vec<_> = (0..50)
            .map(|_| {
                let (b, admitted, start, mut release) =
                    (b.clone(), admitted.clone(), start.clone(), release_rx.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    b.call(|| async move {
                        admitted.fetch_add(1, Ordering::SeqCst);
                        // The probe stays in flight until the test has seen every rejection.
                        let _ = release.wait_for(|r| *r).await;
                        Ok::<(), &str>(())
                    })
                    .await
                })
            })
            .collect();
        // The admitted call counts itself only once its closure runs, which may be after
        // the 49 others were refused: wait for both (CI once saw the refusals first).
        let deadline = Instant::now() + Duration::from_secs(10);
        while b.snapshot().rejected_total < 49 || admitted.load(Ordering::SeqCst) == 0 {
            let seen = admitted.load(Ordering::SeqCst);
            assert!(Instant::now() < deadline, "admitted {seen}, rejections: {:?}", b.snapshot());
            tokio::task::yield_now().await;
        }
        assert_eq!(admitted.load(Ordering::SeqCst), 1);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        release_tx.send_replace(true);
        let mut ok_count = 0;
        let mut open_count = 0;
        for c in calls {
            match c.await.expect("task") {
                Ok(()) => ok_count += 1,
                Err(e) if e.is_open() => open_count += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!((ok_count, open_count), (1, 49));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_counts_as_a_failure_and_is_mapped() {
        let b = Breaker::new("dep", cfg(1, 1, Duration::from_secs(1)));
        let r: Result<(), BreakerError<&str>> = b.call(|| async { panic!("engine exploded") }).await;
        match r {
            Err(BreakerError::Panicked { name, message }) => {
                assert_eq!(name, "dep");
                assert_eq!(message, "engine exploded");
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.snapshot().failures_total, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_the_slot() {
        let b = Breaker::new("dep", cfg(1, 1, Duration::from_secs(1)));
        assert!(fail(&b).await.is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        let never = b.call(std::future::pending::<Result<(), &str>>);
        // One poll admits the probe; dropping it cancels the call.
        assert!(never.now_or_never().is_none());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(ok(&b).await.is_ok(), "the next caller must become the probe");
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_result_from_an_older_state_is_ignored() {
        let b = Breaker::new("dep", cfg(1, 1, Duration::from_secs(1)));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let slow = b.call(|| async {
            let _ = rx.await;
            Ok::<(), &str>(())
        });
        tokio::pin!(slow);
        assert!(futures::poll!(&mut slow).is_pending());
        assert!(fail(&b).await.is_err());
        assert_eq!(b.state(), BreakerState::Open);
        let _ = tx.send(());
        assert!(slow.await.is_ok());
        assert_eq!(b.state(), BreakerState::Open, "a success admitted while closed must not close an open breaker");
    }

    #[tokio::test(start_paused = true)]
    async fn errors_classified_as_harmless_do_not_open() {
        let b = Breaker::new("dep", cfg(1, 1, Duration::from_secs(1)));
        let r = b.call_classified(|e: &&str| *e != "not found", || async { Err::<(), _>("not found") }).await;
        assert!(matches!(r, Err(BreakerError::Inner("not found"))));
        assert_eq!(b.state(), BreakerState::Closed);
        let r = b.call_classified(|e: &&str| *e != "not found", || async { Err::<(), _>("unreachable") }).await;
        assert!(r.is_err());
        assert_eq!(b.state(), BreakerState::Open);
    }
}
