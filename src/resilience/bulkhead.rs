//! Bulkheads: bounded concurrency per dependency and per kind of operation, so one
//! slow kind (image pulls) cannot take every slot from another (container stops).
//!
//! A tokio semaphore does the counting; what is added here is failing fast with a
//! named error, an optional short bounded wait, a bound on how many may wait, and the
//! counts that health and metrics show.

use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Tuning of one bulkhead.
#[derive(Clone, Debug)]
pub struct BulkheadConfig {
    /// Calls allowed to run at once.
    pub limit: NonZeroUsize,
    /// How long a caller may wait for a slot; zero fails fast.
    pub max_wait: Duration,
    /// Callers allowed to wait at once (beyond them, fail fast even with `max_wait`).
    pub max_waiting: usize,
}

impl BulkheadConfig {
    /// `limit` slots, no waiting.
    pub fn fail_fast(limit: NonZeroUsize) -> Self {
        BulkheadConfig { limit, max_wait: Duration::ZERO, max_waiting: 0 }
    }
}

/// The bulkhead was full.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bulkhead {name} is full ({limit} calls in flight); try again later")]
pub struct BulkheadFull {
    /// Bulkhead name.
    pub name: String,
    /// Its limit.
    pub limit: usize,
}

/// A point-in-time view of one bulkhead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkheadSnapshot {
    /// Bulkhead name.
    pub name: String,
    /// Calls running now.
    pub in_use: usize,
    /// The limit.
    pub limit: usize,
    /// Callers waiting for a slot now.
    pub waiting: usize,
    /// Calls turned away since start.
    pub rejected_total: u64,
}

/// One bulkhead; share it behind an `Arc`.
#[derive(Debug)]
pub struct Bulkhead {
    name: String,
    config: BulkheadConfig,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    rejected: AtomicU64,
}

/// A held slot; dropping it frees the slot.
#[derive(Debug)]
pub struct BulkheadPermit {
    _permit: OwnedSemaphorePermit,
}

impl Bulkhead {
    /// A bulkhead named after what it guards, e.g. `docker.pull`.
    pub fn new(name: impl Into<String>, config: BulkheadConfig) -> Self {
        let slots = Arc::new(Semaphore::new(config.limit.get()));
        Bulkhead { name: name.into(), config, slots, waiting: AtomicUsize::new(0), rejected: AtomicU64::new(0) }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Calls running now.
    pub fn in_use(&self) -> usize {
        self.config.limit.get().saturating_sub(self.slots.available_permits())
    }

    /// A view for health and metrics.
    pub fn snapshot(&self) -> BulkheadSnapshot {
        BulkheadSnapshot {
            name: self.name.clone(),
            in_use: self.in_use(),
            limit: self.config.limit.get(),
            waiting: self.waiting.load(Ordering::Relaxed),
            rejected_total: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// Takes a slot: at once, or within `max_wait` if few enough are already waiting.
    pub async fn acquire(&self) -> Result<BulkheadPermit, BulkheadFull> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(BulkheadPermit { _permit: p });
        }
        if self.config.max_wait > Duration::ZERO && self.enter_queue() {
            let got = tokio::time::timeout(self.config.max_wait, self.slots.clone().acquire_owned()).await;
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            // The semaphore is never closed, so only the timeout can fail here.
            if let Ok(Ok(p)) = got {
                return Ok(BulkheadPermit { _permit: p });
            }
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        Err(BulkheadFull { name: self.name.clone(), limit: self.config.limit.get() })
    }

    /// Runs `fut` in a slot, or fails with [`BulkheadFull`] without running it.
    pub async fn run<T>(&self, fut: impl Future<Output = T>) -> Result<T, BulkheadFull> {
        let _slot = self.acquire().await?;
        Ok(fut.await)
    }

    fn enter_queue(&self) -> bool {
        let max = self.config.max_waiting;
        self.waiting.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| (w < max).then_some(w + 1)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).expect("nonzero")
    }

    #[tokio::test]
    async fn rejects_when_full_and_admits_again_when_a_slot_frees() {
        let b = Bulkhead::new("docker.pull", BulkheadConfig::fail_fast(nz(2)));
        let one = b.acquire().await.expect("slot 1");
        let _two = b.acquire().await.expect("slot 2");
        assert_eq!(b.in_use(), 2);
        let err = b.acquire().await.expect_err("full");
        assert_eq!(err, BulkheadFull { name: "docker.pull".into(), limit: 2 });
        assert_eq!(err.to_string(), "bulkhead docker.pull is full (2 calls in flight); try again later");
        assert!(b.run(async { 1 }).await.is_err());
        assert_eq!(b.snapshot().rejected_total, 2);
        drop(one);
        assert_eq!(b.in_use(), 1);
        assert_eq!(b.run(async { 7 }).await, Ok(7));
    }

    #[tokio::test]
    async fn two_pools_are_isolated() {
        let pulls = Bulkhead::new("docker.pull", BulkheadConfig::fail_fast(nz(1)));
        let lifecycle = Bulkhead::new("docker.lifecycle", BulkheadConfig::fail_fast(nz(1)));
        let _slow_pull = pulls.acquire().await.expect("pull slot");
        assert!(pulls.acquire().await.is_err());
        // A stuck pull does not keep a stop from running.
        assert_eq!(lifecycle.run(async { "stopped" }).await, Ok("stopped"));
        assert_eq!((pulls.in_use(), lifecycle.in_use()), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_wait_admits_a_few_waiters_and_only_for_a_while() {
        let b = Arc::new(Bulkhead::new(
            "api.write",
            BulkheadConfig { limit: nz(1), max_wait: Duration::from_secs(1), max_waiting: 1 },
        ));
        let held = b.acquire().await.expect("slot");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.acquire().await.map(drop) }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while b.snapshot().waiting == 0 {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        // The queue (one place) is taken: the next caller fails fast, no wait.
        let before = tokio::time::Instant::now();
        assert!(b.acquire().await.is_err());
        assert_eq!(before.elapsed(), Duration::ZERO);
        drop(held);
        assert_eq!(waiter.await.expect("task"), Ok(()));
        // Nobody releases now: a waiter gives up after max_wait.
        let _held = b.acquire().await.expect("slot");
        let before = tokio::time::Instant::now();
        assert!(b.acquire().await.is_err());
        assert_eq!(before.elapsed(), Duration::from_secs(1));
        assert_eq!(b.snapshot().waiting, 0);
    }
}
