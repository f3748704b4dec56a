//! Retry with exponential backoff and **full** jitter:
//! `delay(n) = uniform(0 ..= min(cap, base * 2^n))` (AWS "Exponential Backoff And
//! Jitter"). Full jitter spreads a crowd of clients that failed together (every worker
//! losing its manager at once) over the whole window instead of in synchronised waves.
//!
//! Written here rather than taken from a crate: `backon`'s jitter *adds* up to one delay
//! on top of the exponential delay (never shorter than the base curve, so retries stay
//! in waves), and `backoff` is unmaintained. Both are a dozen lines away from what we
//! need; the policy, the classification and the cancellation are below.

use std::future::Future;
use std::num::NonZeroU32;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// When and how often to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Window of the first retry's delay (`base * 2^0`).
    pub base: Duration,
    /// Upper bound of any window.
    pub cap: Duration,
    /// Attempts in total, the first included; `None` = until the deadline.
    pub max_attempts: Option<NonZeroU32>,
    /// Time budget for all attempts and waits together, from the first attempt;
    /// an attempt still running when it ends is abandoned. `None` = no budget.
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    /// 100 ms base, 10 s cap, 5 attempts, no deadline.
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            max_attempts: NonZeroU32::new(5),
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// The window `min(cap, base * 2^retry)` for the `retry`-th retry (0-based).
    pub fn window(&self, retry: u32) -> Duration {
        // 2^31 already overflows any useful window; saturate instead of wrapping.
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A full-jitter delay for the `retry`-th retry: uniform in `0 ..= window(retry)`.
    pub fn delay(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let window = self.window(retry).as_nanos().min(u64::MAX as u128) as u64;
        Duration::from_nanos(rng.gen_range(0..=window))
    }
}

/// Why [`retry`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    /// The operation failed with an error the classifier calls permanent.
    #[error("permanent failure after {attempts} attempt(s): {error}")]
    Permanent {
        /// Attempts made.
        attempts: u32,
        /// The error.
        error: E,
    },
    /// Every allowed attempt failed.
    #[error("gave up after {attempts} attempt(s): {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: E,
    },
    /// The time budget ran out.
    #[error("deadline of {deadline:?} passed after {attempts} attempt(s)")]
    DeadlineExceeded {
        /// Attempts started.
        attempts: u32,
        /// The budget.
        deadline: Duration,
        /// The last error, if an attempt had finished.
        last: Option<E>,
    },
    /// Cancelled (shutdown) while waiting or while an attempt ran.
    #[error("cancelled after {attempts} attempt(s)")]
    Cancelled {
        /// Attempts started.
        attempts: u32,
        /// The last error, if an attempt had finished.
        last: Option<E>,
    },
}

impl<E> RetryError<E> {
    /// The operation's own last error, if any attempt finished.
    pub fn last_error(&self) -> Option<&E> {
        match self {
            RetryError::Permanent { error, .. } | RetryError::Exhausted { last: error, .. } => Some(error),
            RetryError::DeadlineExceeded { last, .. } | RetryError::Cancelled { last, .. } => last.as_ref(),
        }
    }
}

/// Runs `op` until it succeeds, fails permanently, runs out of attempts or time, or
/// `cancel` resolves. `is_retryable` sorts errors (e.g. 503 and timeouts yes, 400 no).
/// `cancel` is any future that resolves on shutdown, e.g. `token.cancelled()` or
/// `async { let _ = shutdown_rx.recv().await; }`; it is polled during attempts and
/// waits alike, so shutdown is never held up by a backoff sleep.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    cancel: impl Future<Output = ()>,
    is_retryable: impl Fn(&E) -> bool,
    op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    // A fresh thread-local RNG per delay keeps the future `Send` (ThreadRng is not).
    retry_with_delays(policy, cancel, is_retryable, |n| policy.delay(n, &mut rand::thread_rng()), op).await
}

/// [`retry`] with an injected RNG (seeded in tests, so jitter is reproducible).
pub async fn retry_with_rng<T, E, F, Fut, R>(
    policy: &RetryPolicy,
    cancel: impl Future<Output = ()>,
    is_retryable: impl Fn(&E) -> bool,
    rng: &mut R,
    op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    R: Rng,
{
    retry_with_delays(policy, cancel, is_retryable, |n| policy.delay(n, rng), op).await
}

async fn retry_with_delays<T, E, F, Fut>(
    policy: &RetryPolicy,
    cancel: impl Future<Output = ()>,
    is_retryable: impl Fn(&E) -> bool,
    mut next_delay: impl FnMut(u32) -> Duration,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let ends = policy.deadline.map(|d| started + d);
    let max = policy.max_attempts.map_or(u32::MAX, NonZeroU32::get);
    tokio::pin!(cancel);
    let mut last: Option<E> = None;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = op(attempts - 1);
        // The attempt races shutdown and the deadline; a far-future sleep stands in for
        // "no deadline" so there is one select! shape.
        let budget = ends.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        let outcome = tokio::select! {
            biased;
            _ = &mut cancel => return Err(RetryError::Cancelled { attempts, last }),
            out = attempt => out,
            _ = tokio::time::sleep_until(budget) => {
                let deadline = policy.deadline.unwrap_or_default();
                return Err(RetryError::DeadlineExceeded { attempts, deadline, last });
            }
        };
        let error = match outcome {
            Ok(v) => return Ok(v),
            Err(e) if !is_retryable(&e) => return Err(RetryError::Permanent { attempts, error: e }),
            Err(e) => e,
        };
        if attempts >= max {
            return Err(RetryError::Exhausted { attempts, last: error });
        }
        let wake = Instant::now() + next_delay(attempts - 1);
        if let (Some(ends), Some(deadline)) = (ends, policy.deadline) {
            // Sleeping past the budget only to fail is pointless: fail now.
            if wake >= ends {
                return Err(RetryError::DeadlineExceeded { attempts, deadline, last: Some(error) });
            }
        }
        last = Some(error);
        tokio::select! {
            biased;
            _ = &mut cancel => return Err(RetryError::Cancelled { attempts, last }),
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn policy(base_ms: u64, cap_ms: u64, attempts: Option<u32>, deadline: Option<Duration>) -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(base_ms),
            cap: Duration::from_millis(cap_ms),
            max_attempts: attempts.and_then(NonZeroU32::new),
            deadline,
        }
    }

    #[derive(Debug, PartialEq)]
    enum E {
        Transient,
        Bad,
    }

    fn retryable(e: &E) -> bool {
        *e == E::Transient
    }

    #[test]
    fn full_jitter_stays_in_the_window_and_covers_it() {
        let p = policy(100, 5_000, None, None);
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 0..10 {
            let window = p.window(retry);
            assert_eq!(window, Duration::from_millis((100u64 << retry).min(5_000)));
            let samples: Vec<Duration> = (0..20_000).map(|_| p.delay(retry, &mut rng)).collect();
            let max = samples.iter().max().copied().unwrap_or_default();
            let min = samples.iter().min().copied().unwrap_or_default();
            let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
            assert!(max <= window, "retry {retry}: {max:?} > {window:?}");
            // Full jitter: the whole window is used, down to ~0, and the mean is half of it.
            assert!(min < window / 100, "retry {retry}: min {min:?}");
            assert!(max > window * 99 / 100, "retry {retry}: max {max:?}");
            let half = window / 2;
            assert!(mean > half * 95 / 100 && mean < half * 105 / 100, "retry {retry}: mean {mean:?} vs {half:?}");
        }
    }

    #[test]
    fn the_window_saturates_instead_of_overflowing() {
        let p = policy(100, 60_000, None, None);
        assert_eq!(p.window(40), Duration::from_secs(60));
        assert_eq!(p.window(u32::MAX), Duration::from_secs(60));
        let huge = RetryPolicy { cap: Duration::MAX, ..p };
        assert!(huge.window(200) > Duration::from_secs(1 << 20));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(&policy(10, 100, Some(5), None), std::future::pending(), retryable, |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(E::Bad) }
        })
        .await;
        assert!(matches!(r, Err(RetryError::Permanent { attempts: 1, error: E::Bad })));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_success_or_exhaustion() {
        let mut rng = StdRng::seed_from_u64(1);
        let r = retry_with_rng(
            &policy(10, 100, Some(5), None),
            std::future::pending(),
            retryable,
            &mut rng,
            |n| async move {
                if n < 2 {
                    Err(E::Transient)
                } else {
                    Ok(n)
                }
            },
        )
        .await;
        assert_eq!(r.ok(), Some(2));
        let r: Result<(), _> =
            retry(&policy(10, 100, Some(3), None), std::future::pending(), retryable, |_| async { Err(E::Transient) })
                .await;
        assert!(matches!(r, Err(RetryError::Exhausted { attempts: 3, last: E::Transient })));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_waits_and_hung_attempts() {
        let started = Instant::now();
        let r: Result<(), _> = retry(
            &policy(100, 1_000, None, Some(Duration::from_secs(2))),
            std::future::pending(),
            retryable,
            |_| async { Err(E::Transient) },
        )
        .await;
        assert!(matches!(r, Err(RetryError::DeadlineExceeded { last: Some(E::Transient), .. })), "{r:?}");
        assert!(started.elapsed() <= Duration::from_secs(2));
        let started = Instant::now();
        let r: Result<(), RetryError<E>> =
            retry(&policy(100, 1_000, None, Some(Duration::from_secs(2))), std::future::pending(), retryable, |_| {
                std::future::pending()
            })
            .await;
        assert!(matches!(r, Err(RetryError::DeadlineExceeded { attempts: 1, last: None, .. })), "{r:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn cancellation_during_a_backoff_wait_returns_promptly() {
        // Real time: a 1-hour backoff window, cancelled right after the first failure.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tx = Some(tx);
        let started = std::time::Instant::now();
        let r: Result<(), _> = retry(
            &RetryPolicy {
                base: Duration::from_secs(3_600),
                cap: Duration::from_secs(3_600),
                max_attempts: None,
                deadline: None,
            },
            async {
                let _ = rx.await;
            },
            retryable,
            |_| {
                // Cancel as the attempt fails, so the cancellation lands in the wait.
                let tx = tx.take();
                async move {
                    if let Some(tx) = tx {
                        let _ = tx.send(());
                    }
                    Err(E::Transient)
                }
            },
        )
        .await;
        assert!(matches!(r, Err(RetryError::Cancelled { attempts: 1, last: Some(E::Transient) })), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn cancellation_during_an_attempt_returns_promptly() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut tx = Some(tx);
        let started = std::time::Instant::now();
        let r: Result<(), RetryError<E>> = retry(
            &RetryPolicy::default(),
            async {
                let _ = rx.await;
            },
            retryable,
            |_| {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
                std::future::pending()
            },
        )
        .await;
        assert!(matches!(r, Err(RetryError::Cancelled { attempts: 1, last: None })), "{r:?}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }
}
