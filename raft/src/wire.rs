//! JSON bodies of the `/raft/` endpoints that are not openraft's own types.

use openraft::raft::InstallSnapshotRequest;
use openraft::{SnapshotMeta, Vote};
use serde::{Deserialize, Serialize};

use crate::types::{b64, Payload, TypeConfig};
use crate::Member;

/// One chunk of a snapshot; openraft's request with the bytes as base64.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotChunk {
    pub vote: Vote<u64>,
    pub meta: SnapshotMeta<u64, Member>,
    pub offset: u64,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    pub done: bool,
}

impl From<InstallSnapshotRequest<TypeConfig>> for SnapshotChunk {
    fn from(r: InstallSnapshotRequest<TypeConfig>) -> Self {
        SnapshotChunk { vote: r.vote, meta: r.meta, offset: r.offset, data: r.data, done: r.done }
    }
}

impl From<SnapshotChunk> for InstallSnapshotRequest<TypeConfig> {
    fn from(c: SnapshotChunk) -> Self {
        InstallSnapshotRequest { vote: c.vote, meta: c.meta, offset: c.offset, data: c.data, done: c.done }
    }
}

/// Why a member refused or failed a forwarded request.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WireError {
    /// The receiver is not the leader; it names the leader it knows, if any.
    #[error("not the leader (leader known: {leader:?})")]
    NotLeader { leader: Option<Member> },
    /// The receiver could not finish within the deadline it was given.
    #[error("timed out on the leader")]
    Timeout { leader: Option<Member> },
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
    /// Storage or Raft failed on the receiver.
    #[error("storage failure on the leader: {0}")]
    Storage(String),
    /// The request itself is wrong.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The receiver is shutting down.
    #[error("member is shutting down")]
    ShuttingDown,
    /// The leader's disk is below its free-space reserve; nothing was written.
    #[error("the leader's disk is full: {message}")]
    StorageFull {
        /// The leader's own message (path, free bytes, reserve).
        message: String,
    },
}

/// Answer of every forwarded request.
pub(crate) type WireResult<T> = Result<T, WireError>;

/// `POST /raft/write`: a client write forwarded by a follower.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WriteRequest {
    pub command: Payload,
    /// What is left of the caller's deadline.
    pub timeout_ms: u64,
}

/// `POST /raft/read-index`: a follower asking the leader for a read index.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReadIndexRequest {
    /// What is left of the caller's deadline.
    pub timeout_ms: u64,
}

/// `POST /raft/join`: add `member` as a voter.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct JoinRequest {
    pub id: u64,
    pub member: Member,
    /// Set by a member that forwarded it to the leader; such a request is never
    /// forwarded again, so a stale leader view cannot make a loop.
    pub forwarded: bool,
    /// What is left of the caller's deadline.
    pub timeout_ms: u64,
}

/// `POST /raft/remove`: remove the member with this node name.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RemoveRequest {
    pub name: String,
    /// See [`JoinRequest::forwarded`].
    pub forwarded: bool,
    /// What is left of the caller's deadline.
    pub timeout_ms: u64,
}
