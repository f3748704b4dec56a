//! The write path, below the API: encode a [`Command`], replicate it through Raft, and
//! decode `apply`'s answer as the type the caller expects. The leader loops, the
//! gateway and the API all write through here; the API maps [`WriteError`] to its
//! error shape, so nothing inside the manager imports `manager::api`.

use holdfast_raft::{DbError, ReplicatedDb};
use serde::de::DeserializeOwned;

use super::state::{Command, Rejection};

/// Why a write did not produce its answer.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// `apply` refused the command (its content), on every replica alike.
    #[error("command refused: {0}")]
    Rejected(#[source] Rejection),
    /// Replication failed: no leader, timeout, full disk, storage.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The command could not be encoded.
    #[error("cannot encode the command: {0}")]
    Encode(#[source] serde_json::Error),
    /// The answer was not the shape this command answers with (a bug, or a newer
    /// leader's answer this version cannot read).
    #[error("unreadable answer from apply: {0}")]
    Answer(#[source] serde_json::Error),
}

/// Replicates `cmd` and decodes its answer as `A` (`serde::de::IgnoredAny` when the
/// caller needs none).
pub async fn replicate<A: DeserializeOwned>(db: &ReplicatedDb, cmd: &Command) -> Result<A, WriteError> {
    let bytes = serde_json::to_vec(cmd).map_err(WriteError::Encode)?;
    let answer = db.write(bytes).await?;
    let outcome: Result<A, Rejection> = serde_json::from_slice(&answer).map_err(WriteError::Answer)?;
    outcome.map_err(WriteError::Rejected)
}

/// [`replicate`] when the answer does not matter, only that the command applied.
pub async fn replicate_only(db: &ReplicatedDb, cmd: &Command) -> Result<(), WriteError> {
    replicate::<serde::de::IgnoredAny>(db, cmd).await.map(|_| ())
}
