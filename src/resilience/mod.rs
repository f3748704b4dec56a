//! Resilience primitives for every call holdfast makes to something it does not
//! control (Docker, other managers, the network): a circuit [`breaker`], [`retry`] with
//! full-jitter backoff, [`bulkhead`]s and a named [`timeout`], plus a [`Registry`]
//! that health and metrics read.
//!
//! The pieces compose in one order, in [`Guard::run`]: bulkhead (outermost, so a call
//! turned away for lack of a slot never uses up a half-open probe), then breaker, then
//! timeout (innermost, so a hung call counts as a breaker failure).
//!
//! This module knows nothing of tasks, HTTP or JSON: it hands out plain snapshots and
//! Prometheus text; `manager::api` decides the public JSON shape.

pub mod breaker;
pub mod bulkhead;
pub mod retry;
pub mod timeout;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use breaker::{Breaker, BreakerConfig, BreakerError, BreakerSnapshot, BreakerState, Transition, TransitionHook};
pub use bulkhead::{Bulkhead, BulkheadConfig, BulkheadFull, BulkheadPermit, BulkheadSnapshot};
pub use retry::{retry, retry_with_rng, RetryError, RetryPolicy};
pub use timeout::{with_timeout, TimedOut};

/// Every breaker and bulkhead of one process, by name. Clone it freely (shared
/// inside); create one in `node::run` and hand it to each role, so `/v1/health` and
/// `/metrics` see every dependency without globals.
#[derive(Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Entries>>,
    hook: Option<TransitionHook>,
}

#[derive(Default)]
struct Entries {
    breakers: BTreeMap<String, Arc<Breaker>>,
    bulkheads: BTreeMap<String, Arc<Bulkhead>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("snapshot", &self.snapshot()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// An empty registry whose breakers all call `hook` on every state change (e.g.
    /// to wake the worker's sync loop so the node reports `degraded` at once).
    pub fn with_hook(hook: TransitionHook) -> Self {
        Registry { inner: Arc::default(), hook: Some(hook) }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Critical sections here only insert into maps and cannot panic halfway.
        crate::lock(&self.inner)
    }

    /// The breaker called `name`, created with `config` on first use (later calls get
    /// the same breaker and ignore `config`).
    pub fn breaker(&self, name: &str, config: BreakerConfig) -> Arc<Breaker> {
        let mut e = self.lock();
        e.breakers
            .entry(name.to_string())
            .or_insert_with(|| {
                let b = Breaker::new(name, config);
                Arc::new(match &self.hook {
                    Some(h) => b.with_hook(h.clone()),
                    None => b,
                })
            })
            .clone()
    }

    /// The bulkhead called `name`, created with `config` on first use.
    pub fn bulkhead(&self, name: &str, config: BulkheadConfig) -> Arc<Bulkhead> {
        let mut e = self.lock();
        e.bulkheads.entry(name.to_string()).or_insert_with(|| Arc::new(Bulkhead::new(name, config))).clone()
    }

    /// Every breaker's state and every bulkhead's use, sorted by name.
    pub fn snapshot(&self) -> Snapshot {
        let (breakers, bulkheads): (Vec<_>, Vec<_>) = {
            let e = self.lock();
            (e.breakers.values().cloned().collect(), e.bulkheads.values().cloned().collect())
        };
        Snapshot {
            breakers: breakers.iter().map(|b| b.snapshot()).collect(),
            bulkheads: bulkheads.iter().map(|b| b.snapshot()).collect(),
        }
    }
}

/// All dependencies at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Breakers, by name.
    pub breakers: Vec<BreakerSnapshot>,
    /// Bulkheads, by name.
    pub bulkheads: Vec<BulkheadSnapshot>,
}

impl Snapshot {
    /// True when any breaker is not closed: some dependency is failing or on probation.
    pub fn degraded(&self) -> bool {
        self.breakers.iter().any(|b| b.state != BreakerState::Closed)
    }

    /// Appends the Prometheus text exposition of these figures to `out`.
    pub fn write_prometheus(&self, out: &mut String) {
        let b = &self.breakers;
        let h = &self.bulkheads;
        family(out, "holdfast_breaker_state", "gauge", "Breaker state: 0 closed, 1 half-open, 2 open.", b, |s| {
            (
                s.name.as_str(),
                match s.state {
                    BreakerState::Closed => 0,
                    BreakerState::HalfOpen => 1,
                    BreakerState::Open => 2,
                },
            )
        });
        family(out, "holdfast_breaker_consecutive_failures", "gauge", "Failures in a row while closed.", b, |s| {
            (s.name.as_str(), u64::from(s.consecutive_failures))
        });
        family(out, "holdfast_breaker_rejected_total", "counter", "Calls failed fast by the breaker.", b, |s| {
            (s.name.as_str(), s.rejected_total)
        });
        family(out, "holdfast_breaker_failures_total", "counter", "Calls counted as failures.", b, |s| {
            (s.name.as_str(), s.failures_total)
        });
        family(out, "holdfast_breaker_transitions_total", "counter", "Breaker state changes.", b, |s| {
            (s.name.as_str(), s.transitions_total)
        });
        family(out, "holdfast_bulkhead_in_use", "gauge", "Calls running in the bulkhead.", h, |s| {
            (s.name.as_str(), s.in_use as u64)
        });
        family(out, "holdfast_bulkhead_limit", "gauge", "Bulkhead concurrency limit.", h, |s| {
            (s.name.as_str(), s.limit as u64)
        });
        family(out, "holdfast_bulkhead_waiting", "gauge", "Callers waiting for a bulkhead slot.", h, |s| {
            (s.name.as_str(), s.waiting as u64)
        });
        family(out, "holdfast_bulkhead_rejected_total", "counter", "Calls turned away by a full bulkhead.", h, |s| {
            (s.name.as_str(), s.rejected_total)
        });
    }
}

fn family<S>(out: &mut String, metric: &str, kind: &str, help: &str, items: &[S], value: impl Fn(&S) -> (&str, u64)) {
    if items.is_empty() {
        return;
    }
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} {kind}");
    for item in items {
        let (name, v) = value(item);
        let _ = writeln!(out, "{metric}{{name=\"{}\"}} {v}", escape_label(name));
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Why a call through a [`Guard`] gave no value.
#[derive(Debug, thiserror::Error)]
pub enum GuardError<E> {
    /// The bulkhead was full; the call did not run and the breaker was not consulted.
    #[error(transparent)]
    Full(BulkheadFull),
    /// The breaker is open; the call did not run.
    #[error("dependency {name} is failing; retry in {retry_in:?}")]
    Open {
        /// Breaker name.
        name: String,
        /// Hint for when a probe may be admitted.
        retry_in: Duration,
    },
    /// The call did not finish in time (counted as a breaker failure).
    #[error(transparent)]
    TimedOut(TimedOut),
    /// The call failed.
    #[error(transparent)]
    Inner(E),
    /// The call panicked (counted as a breaker failure).
    #[error("call through {name} panicked: {message}")]
    Panicked {
        /// Breaker name.
        name: String,
        /// Panic message.
        message: String,
    },
}

impl<E> GuardError<E> {
    /// True when the call never ran (bulkhead full or breaker open): safe to retry
    /// later without wondering whether it had an effect.
    pub fn rejected(&self) -> bool {
        matches!(self, GuardError::Full(_) | GuardError::Open { .. })
    }
}

/// Breaker + bulkhead + timeout around one kind of call to one dependency.
#[derive(Clone, Debug)]
pub struct Guard {
    /// Shared by every kind of call to the same dependency.
    pub breaker: Arc<Breaker>,
    /// Specific to this kind of call.
    pub bulkhead: Arc<Bulkhead>,
    /// Limit for one call.
    pub timeout: Duration,
}

enum Step<E> {
    TimedOut(TimedOut),
    Inner(E),
}

impl Guard {
    /// A guard from a registry's breaker `dependency` and bulkhead `kind`.
    pub fn new(breaker: Arc<Breaker>, bulkhead: Arc<Bulkhead>, timeout: Duration) -> Self {
        Guard { breaker, bulkhead, timeout }
    }

    /// Runs `fut` in a bulkhead slot, through the breaker, within the timeout. Every
    /// `Err` of `fut` counts as a breaker failure; see [`Guard::run_classified`].
    pub async fn run<T, E>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, GuardError<E>> {
        self.run_classified(what, |_| true, fut).await
    }

    /// Like [`Guard::run`]; `is_failure` says which of `fut`'s errors mean the
    /// dependency is unwell (engine unreachable) rather than the request being wrong
    /// (no such container). Timeouts and panics always count.
    pub async fn run_classified<T, E>(
        &self,
        what: &'static str,
        is_failure: impl FnOnce(&E) -> bool,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, GuardError<E>> {
        let _slot = self.bulkhead.acquire().await.map_err(GuardError::Full)?;
        let classify = |s: &Step<E>| match s {
            Step::TimedOut(_) => true,
            Step::Inner(e) => is_failure(e),
        };
        let out = self
            .breaker
            .call_classified(classify, || async {
                match with_timeout(self.timeout, what, fut).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(Step::Inner(e)),
                    Err(t) => Err(Step::TimedOut(t)),
                }
            })
            .await;
        out.map_err(|e| match e {
            BreakerError::Open { name, retry_in } => GuardError::Open { name, retry_in },
            BreakerError::Panicked { name, message } => GuardError::Panicked { name, message },
            BreakerError::Inner(Step::TimedOut(t)) => GuardError::TimedOut(t),
            BreakerError::Inner(Step::Inner(e)) => GuardError::Inner(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroUsize};

    use super::*;

    fn guard(reg: &Registry, timeout: Duration, slots: usize) -> Guard {
        let breaker = reg.breaker(
            "docker",
            BreakerConfig {
                failure_threshold: NonZeroU32::MIN,
                success_threshold: NonZeroU32::MIN,
                open_for: Duration::from_secs(1),
            },
        );
        let bulkhead =
            reg.bulkhead("docker.start", BulkheadConfig::fail_fast(NonZeroUsize::new(slots).expect("nonzero")));
        Guard::new(breaker, bulkhead, timeout)
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_counts_as_a_breaker_failure() {
        let reg = Registry::new();
        let g = guard(&reg, Duration::from_secs(2), 4);
        let r: Result<(), GuardError<()>> = g.run("docker.start", std::future::pending()).await;
        match r {
            Err(GuardError::TimedOut(t)) => {
                assert_eq!(t, TimedOut { what: "docker.start", after: Duration::from_secs(2) })
            }
            other => panic!("expected TimedOut, got {other:?}"),
        }
        assert_eq!(g.breaker.state(), BreakerState::Open);
        let r = g.run("docker.start", async { Ok::<_, ()>(()) }).await;
        assert!(matches!(r, Err(GuardError::Open { .. })), "{r:?}");
        assert!(r.is_err_and(|e| e.rejected()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bulkhead_does_not_use_up_the_half_open_probe() {
        let reg = Registry::new();
        let g = guard(&reg, Duration::from_secs(2), 1);
        assert!(g.run("docker.start", async { Err::<(), _>("down") }).await.is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        let _slot = g.bulkhead.acquire().await.expect("slot");
        let r = g.run("docker.start", async { Ok::<_, ()>(()) }).await;
        assert!(matches!(r, Err(GuardError::Full(_))), "{r:?}");
        assert_eq!(g.breaker.state(), BreakerState::Open, "no probe was spent");
    }

    #[tokio::test(start_paused = true)]
    async fn the_registry_lists_every_dependency_for_health_and_metrics() {
        let reg = Registry::new();
        let g = guard(&reg, Duration::from_secs(2), 3);
        let same = reg.breaker("docker", BreakerConfig::default());
        assert!(Arc::ptr_eq(&g.breaker, &same), "one breaker per name");
        reg.bulkhead("docker.pull", BulkheadConfig::fail_fast(NonZeroUsize::MIN));
        let _slot = g.bulkhead.acquire().await.expect("slot");
        let snap = reg.snapshot();
        assert!(!snap.degraded());
        assert_eq!(snap.breakers.len(), 1);
        let names: Vec<&str> = snap.bulkheads.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["docker.pull", "docker.start"]);
        assert_eq!((snap.bulkheads[1].in_use, snap.bulkheads[1].limit), (1, 3));
        let _ = g.breaker.call(|| async { Err::<(), _>(()) }).await;
        let snap = reg.snapshot();
        assert!(snap.degraded());
        let mut text = String::new();
        snap.write_prometheus(&mut text);
        assert!(
            text.contains("# TYPE holdfast_breaker_state gauge\nholdfast_breaker_state{name=\"docker\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("holdfast_bulkhead_in_use{name=\"docker.start\"} 1\n"), "{text}");
        assert!(text.contains("holdfast_bulkhead_limit{name=\"docker.pull\"} 1\n"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_registry_hook_reaches_every_breaker() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let reg = Registry::with_hook(Arc::new(move |t: &Transition| {
            s.lock().expect("lock").push(format!("{}:{}->{}", t.name, t.from, t.to))
        }));
        let cfg = BreakerConfig { failure_threshold: NonZeroU32::MIN, ..BreakerConfig::default() };
        let _ = reg.breaker("a", cfg.clone()).call(|| async { Err::<(), _>(()) }).await;
        let _ = reg.breaker("b", cfg).call(|| async { Err::<(), _>(()) }).await;
        assert_eq!(*seen.lock().expect("lock"), ["a:closed->open", "b:closed->open"]);
    }
}
