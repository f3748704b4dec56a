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
