//! [`GuardedRuntime`]: the worker's container [`Runtime`] behind one breaker for the
//! engine and one bulkhead per kind of call, so a Docker daemon that is down or hung
//! costs a fast `Unavailable` (the node reports `degraded`, tasks are left alone)
//! and a slow image pull cannot take the slots a container stop needs.
//!
//! It is a decorator over the trait, so `worker/runtime/docker.rs` (the only file that
//! imports bollard) keeps its own per-call timeouts unchanged; the guard's timeouts
//! here are backstops above those.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use super::{ContainerInfo, ContainerSpec, EngineInfo, EngineUnavailable, Runtime, RuntimeError};
use crate::resilience::{BreakerConfig, BreakerState, BulkheadConfig, Guard, GuardError, Registry};

/// Breaker name of the container engine, as health and metrics show it.
pub const ENGINE: &str = "docker";

/// Tuning of [`GuardedRuntime`].
#[derive(Clone, Debug)]
pub struct GuardedRuntimeConfig {
    /// The engine's breaker.
    pub breaker: BreakerConfig,
    /// Image pulls and echo builds (slow, few at once).
    pub pull: BulkheadConfig,
    /// Create, start, stop, remove.
    pub lifecycle: BulkheadConfig,
    /// Ping, inspect, list, image size (cheap reads).
    pub inspect: BulkheadConfig,
    /// Log fetches.
    pub logs: BulkheadConfig,
    /// Backstop for pulls and builds.
    pub pull_timeout: Duration,
    /// Backstop for everything else; a stop's own grace period is added to it.
    pub call_timeout: Duration,
}

const fn nz(n: usize) -> NonZeroUsize {
    match NonZeroUsize::new(n) {
        Some(n) => n,
        None => NonZeroUsize::MIN,
    }
}

const THREE: NonZeroU32 = NonZeroU32::new(3).unwrap();

impl Default for GuardedRuntimeConfig {
    /// Three engine failures in a row open the breaker for 5 s. Two pulls, 8 lifecycle
    /// calls, 16 reads and 4 log fetches at once; lifecycle and reads may wait up to
    /// 2 s for a slot (the reconcile loop would otherwise see a spurious failure).
    /// Backstops sit above `DockerTimeouts` (pull 300 s, build 120 s, others ≤ 30 s).
    fn default() -> Self {
        let waiting =
            |limit: usize| BulkheadConfig { limit: nz(limit), max_wait: Duration::from_secs(2), max_waiting: 64 };
        GuardedRuntimeConfig {
            breaker: BreakerConfig {
                failure_threshold: THREE,
                success_threshold: NonZeroU32::MIN,
                open_for: Duration::from_secs(5),
            },
            pull: BulkheadConfig::fail_fast(nz(2)),
            lifecycle: waiting(8),
            inspect: waiting(16),
            logs: BulkheadConfig::fail_fast(nz(4)),
            pull_timeout: Duration::from_secs(600),
            call_timeout: Duration::from_secs(60),
        }
    }
}

/// A [`Runtime`] whose every call goes through bulkhead, breaker and timeout.
pub struct GuardedRuntime {
    inner: Arc<dyn Runtime>,
    pull: Guard,
    lifecycle: Guard,
    inspect: Guard,
    logs: Guard,
}

impl GuardedRuntime {
    /// Wraps `inner`, registering the `docker` breaker and the `docker.*` bulkheads in
    /// `registry`.
    pub fn new(inner: Arc<dyn Runtime>, registry: &Registry, config: GuardedRuntimeConfig) -> Self {
        let breaker = registry.breaker(ENGINE, config.breaker);
        let guard = |kind: &str, bulkhead: BulkheadConfig, timeout: Duration| {
            Guard::new(breaker.clone(), registry.bulkhead(&format!("{ENGINE}.{kind}"), bulkhead), timeout)
        };
        GuardedRuntime {
            pull: guard("pull", config.pull, config.pull_timeout),
            lifecycle: guard("lifecycle", config.lifecycle, config.call_timeout),
            inspect: guard("inspect", config.inspect, config.call_timeout),
            logs: guard("logs", config.logs, config.call_timeout),
            inner,
        }
    }

    /// True unless the engine's breaker is open or probing: what the node reports as
    /// `engine_ok`.
    pub fn engine_ok(&self) -> bool {
        self.inspect.breaker.state() == BreakerState::Closed
    }
}

/// Only an unreachable or hung engine is the engine's fault; a refused spec, a missing
/// container or an unobtainable image say nothing about the daemon's health.
fn engine_failure(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::Unavailable(_))
}

/// The guard's own refusals become [`RuntimeError::Unavailable`] (the engine cannot be
/// used now, not the task's fault) with their kind kept in [`EngineUnavailable`].
fn flatten(e: GuardError<RuntimeError>) -> RuntimeError {
    let why = match e {
        GuardError::Inner(e) => return e,
        GuardError::Full(full) => EngineUnavailable::BulkheadFull(full),
        GuardError::Open { name, retry_in } => EngineUnavailable::BreakerOpen { name, retry_in },
        GuardError::TimedOut(t) => EngineUnavailable::TimedOut(t),
        GuardError::Panicked { name, message } => EngineUnavailable::Panicked { name, message },
    };
    RuntimeError::Unavailable(why)
}

async fn guarded<T>(
    guard: &Guard,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, RuntimeError>>,
) -> Result<T, RuntimeError> {
    guard.run_classified(what, engine_failure, fut).await.map_err(flatten)
}

#[async_trait::async_trait]
impl Runtime for GuardedRuntime {
    async fn ping(&self) -> Result<EngineInfo, RuntimeError> {
        guarded(&self.inspect, "docker.ping", self.inner.ping()).await
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        guarded(&self.pull, "docker.ensure_image", self.inner.ensure_image(image)).await
    }

    async fn image_size(&self, image: &str) -> Result<Option<u64>, RuntimeError> {
        guarded(&self.inspect, "docker.image_size", self.inner.image_size(image)).await
    }

    async fn image_ids(&self) -> Result<Vec<String>, RuntimeError> {
        guarded(&self.inspect, "docker.image_ids", self.inner.image_ids()).await
    }

    async fn image_chains(&self) -> Result<Vec<Vec<String>>, RuntimeError> {
        guarded(&self.inspect, "docker.image_chains", self.inner.image_chains()).await
    }

    async fn load_image(&self, archive: super::LoadStream) -> Result<(), RuntimeError> {
        guarded(&self.pull, "docker.load_image", self.inner.load_image(archive)).await
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        guarded(&self.lifecycle, "docker.create_and_start", self.inner.create_and_start(spec)).await
    }

    async fn start(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        guarded(&self.lifecycle, "docker.start", self.inner.start(id)).await
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        guarded(&self.inspect, "docker.inspect", self.inner.inspect(id)).await
    }

    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
        guarded(&self.inspect, "docker.list", self.inner.list(labels)).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        // The grace period is the caller's choice; the backstop must sit above it.
        let g = Guard { timeout: self.lifecycle.timeout + grace, ..self.lifecycle.clone() };
        guarded(&g, "docker.stop", self.inner.stop(id, grace)).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        guarded(&self.lifecycle, "docker.remove", self.inner.remove(id)).await
    }

    async fn logs(&self, id: &str, tail: usize) -> Result<String, RuntimeError> {
        guarded(&self.logs, "docker.logs", self.inner.logs(id, tail)).await
    }

    async fn logs_after(&self, id: &str, tail: usize, after: &str) -> Result<String, RuntimeError> {
        guarded(&self.logs, "docker.logs", self.inner.logs_after(id, tail, after)).await
    }

    async fn ensure_guard(&self) -> Result<(), RuntimeError> {
        // A build at worst, like the echo image: the pull pool.
        guarded(&self.pull, "docker.ensure_guard", self.inner.ensure_guard()).await
    }

    async fn set_deadline(&self, id: &str, deadline: crate::guard::Deadline) -> Result<(), RuntimeError> {
        // A small write to a running container: the lifecycle pool, so a pull never delays it.
        guarded(&self.lifecycle, "docker.set_deadline", self.inner.set_deadline(id, deadline)).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A fake engine: `down` makes every call fail as unreachable; `stop` hangs until
    /// released, to fill the lifecycle bulkhead.
    #[derive(Default)]
    struct Fake {
        down: AtomicBool,
        calls: AtomicUsize,
        stop_gate: tokio::sync::Notify,
    }

    impl Fake {
        fn answer<T>(&self, v: T) -> Result<T, RuntimeError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(RuntimeError::engine("connection refused"))
            } else {
                Ok(v)
            }
        }
    }

    #[async_trait::async_trait]
    impl Runtime for Fake {
        async fn ping(&self) -> Result<EngineInfo, RuntimeError> {
            self.answer(EngineInfo { root_dir: "/var/lib/docker".into(), version: "test".into() })
        }
        async fn ensure_image(&self, _: &str) -> Result<(), RuntimeError> {
            self.answer(())
        }
        async fn image_size(&self, _: &str) -> Result<Option<u64>, RuntimeError> {
            self.answer(None)
        }
        async fn create_and_start(&self, _: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
            Err(RuntimeError::Rejected("port taken".into()))
        }
        async fn start(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
            Err(RuntimeError::NotFound(id.into()))
        }
        async fn inspect(&self, _: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
            self.answer(None)
        }
        async fn list(&self, _: &[(String, String)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
            self.answer(Vec::new())
        }
        async fn stop(&self, _: &str, _: Duration) -> Result<(), RuntimeError> {
            self.stop_gate.notified().await;
            self.answer(())
        }
        async fn remove(&self, _: &str) -> Result<(), RuntimeError> {
            self.answer(())
        }
        async fn logs(&self, _: &str, _: usize) -> Result<String, RuntimeError> {
            self.answer(String::new())
        }
        async fn ensure_guard(&self) -> Result<(), RuntimeError> {
            self.answer(())
        }
        async fn set_deadline(&self, _: &str, _: crate::guard::Deadline) -> Result<(), RuntimeError> {
            self.answer(())
        }
    }

    fn setup() -> (Arc<Fake>, GuardedRuntime, Registry) {
        let fake = Arc::new(Fake::default());
        let reg = Registry::new();
        let cfg = GuardedRuntimeConfig { lifecycle: BulkheadConfig::fail_fast(nz(1)), ..Default::default() };
        let rt = GuardedRuntime::new(fake.clone(), &reg, cfg);
        (fake, rt, reg)
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_engine_opens_the_breaker_and_calls_fail_fast() {
        let (fake, rt, reg) = setup();
        fake.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(matches!(rt.list(&[]).await, Err(RuntimeError::Unavailable(_))));
        }
        assert!(!rt.engine_ok());
        assert!(reg.snapshot().degraded());
        let before = fake.calls.load(Ordering::SeqCst);
        let err = rt.ensure_image("holdfast/echo:latest").await.expect_err("open");
        assert!(
            matches!(&err, RuntimeError::Unavailable(EngineUnavailable::BreakerOpen { name, .. }) if name == ENGINE),
            "{err:?}"
        );
        assert_eq!(fake.calls.load(Ordering::SeqCst), before, "the engine was not called");
        // The engine comes back; after the open period one probe closes the breaker.
        fake.down.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(rt.ping().await.is_ok());
        assert!(rt.engine_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn task_errors_do_not_open_the_engine_breaker() {
        let (_fake, rt, _reg) = setup();
        for _ in 0..10 {
            assert!(matches!(rt.create_and_start(&spec()).await, Err(RuntimeError::Rejected(_))));
            assert!(matches!(rt.start("gone").await, Err(RuntimeError::NotFound(_))));
        }
        assert!(rt.engine_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_lifecycle_call_does_not_block_reads_or_pulls() {
        let (fake, rt, reg) = setup();
        let rt = Arc::new(rt);
        let stuck = tokio::spawn({
            let rt = rt.clone();
            async move { rt.stop("c1", Duration::from_secs(10)).await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while reg.snapshot().bulkheads.iter().all(|b| b.in_use == 0) {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        let err = rt.remove("c2").await.expect_err("lifecycle full");
        assert!(
            matches!(&err, RuntimeError::Unavailable(EngineUnavailable::BulkheadFull(f)) if f.name == "docker.lifecycle"),
            "{err:?}"
        );
        assert!(rt.list(&[]).await.is_ok());
        assert!(rt.ensure_image("holdfast/echo:latest").await.is_ok());
        assert!(rt.engine_ok(), "a full bulkhead is our load, not the engine's failure");
        fake.stop_gate.notify_one();
        assert!(stuck.await.expect("task").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_call_ends_at_the_backstop_as_a_timeout_and_counts_against_the_engine() {
        let (_fake, rt, _reg) = setup();
        // The fake's stop never returns unless released: the guard's backstop ends it.
        for _ in 0..3 {
            let err = rt.stop("c1", Duration::from_secs(1)).await.expect_err("hung");
            assert!(
                matches!(&err, RuntimeError::Unavailable(EngineUnavailable::TimedOut(t)) if t.what == "docker.stop"),
                "{err:?}"
            );
        }
        assert!(!rt.engine_ok(), "three timeouts open the engine's breaker");
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "t".into(),
            image: "holdfast/echo:latest".into(),
            command: Vec::new(),
            env: Default::default(),
            ports: Vec::new(),
            cpu_millis: 0,
            memory_mb: 0,
            labels: Default::default(),
            guard: None,
        }
    }
}
