//! A named timeout for every external call, so "no await on the network is unbounded"
//! holds with an error that says *what* took too long.

use std::future::Future;
use std::time::Duration;

/// The call named `what` did not finish within `after`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} did not finish within {after:?}")]
pub struct TimedOut {
    /// The operation, e.g. `docker.create`.
    pub what: &'static str,
    /// The limit that passed.
    pub after: Duration,
}

/// Runs `fut` for at most `after`; on expiry the future is dropped (cancelled).
pub async fn with_timeout<T>(after: Duration, what: &'static str, fut: impl Future<Output = T>) -> Result<T, TimedOut> {
    tokio::time::timeout(after, fut).await.map_err(|_| TimedOut { what, after })
}
