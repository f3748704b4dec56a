//! The `/raft/` endpoints of a member's cluster port.
//!
//! Raft RPCs answer openraft's own `Result` types as JSON; forwarded requests answer a
//! [`WireResult`]. Every handler is bounded by a timeout, and a member that is shutting
//! down answers 503 so peers treat it as unreachable and back off.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openraft::raft::{AppendEntriesRequest, VoteRequest};

use crate::election::PreVoteRequest;
use crate::network::PREFIX;
use crate::node::{Inner, BODY_LIMIT};
use crate::types::TypeConfig;
use crate::wire::{JoinRequest, ReadIndexRequest, RemoveRequest, SnapshotChunk, WireResult, WriteRequest};

type St = State<Arc<Inner>>;

/// Body limit of the small control calls (vote, pre-vote, read-index, membership).
const SMALL_BODY: usize = 64 * 1024;

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    // Entries, snapshot chunks and forwarded commands may be large; the rest never is.
    let small = DefaultBodyLimit::max(SMALL_BODY);
    let routes = Router::new()
        .route("/append", post(append))
        .route("/snapshot", post(snapshot))
        .route("/write", post(write))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .route("/vote", post(vote).layer(small))
        .route("/pre-vote", post(pre_vote).layer(small))
        .route("/read-index", post(read_index).layer(small))
        .route("/join", post(join).layer(small))
        .route("/remove", post(remove).layer(small))
        .route("/status", get(status))
        .with_state(inner);
    Router::new().nest(PREFIX, routes)
}

fn unavailable(why: &str) -> Response {
    // Closing the connection drops it from the peer's pool, so a restarted member on the
    // same address is reached on a fresh connection instead of a dead one.
    (StatusCode::SERVICE_UNAVAILABLE, [(header::CONNECTION, "close")], why.to_string()).into_response()
}

/// Runs a Raft RPC unless the member is stopped, bounded by `limit`.
async fn raft_rpc<T, Fut>(inner: &Inner, limit: Duration, fut: Fut) -> Response
where
    T: serde::Serialize,
    Fut: Future<Output = T>,
{
    if inner.is_stopped() {
        return unavailable("member is shutting down");
    }
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => Json(v).into_response(),
        Err(_) => unavailable("Raft did not answer in time"),
    }
}

async fn append(State(inner): St, Json(req): Json<AppendEntriesRequest<TypeConfig>>) -> Response {
    let limit = inner.config.rpc_timeout;
    raft_rpc(&inner, limit, inner.raft.append_entries(req)).await
}

async fn vote(State(inner): St, Json(req): Json<VoteRequest<u64>>) -> Response {
    let limit = inner.config.rpc_timeout;
    raft_rpc(&inner, limit, inner.raft.vote(req)).await
}

async fn pre_vote(State(inner): St, Json(req): Json<PreVoteRequest>) -> Response {
    let limit = inner.config.rpc_timeout;
    raft_rpc(&inner, limit, inner.serve_pre_vote(req)).await
}

async fn snapshot(State(inner): St, Json(chunk): Json<SnapshotChunk>) -> Response {
    if let Err(why) = accept_chunk(&inner, &chunk) {
        tracing::warn!(offset = chunk.offset, "refused a snapshot chunk: {why}");
        let body = serde_json::json!({"error": {"code": "bad_chunk", "message": why, "field": "offset"}});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    // The last chunk installs the snapshot, which copies the whole database.
    let limit = inner.config.rpc_timeout.max(inner.config.op_timeout);
    raft_rpc(&inner, limit, inner.raft.install_snapshot(chunk.into())).await
}

/// Accepts a chunk that starts a snapshot (offset 0) or continues the one being
/// received at or before the end of what arrived; anything else would make the
/// in-memory snapshot buffer grow to the offset.
fn accept_chunk(inner: &Inner, chunk: &SnapshotChunk) -> Result<(), String> {
    let mut receiving = inner.receiving.lock().unwrap_or_else(|e| e.into_inner());
    let id = chunk.meta.snapshot_id.clone();
    let len = chunk.data.len() as u64;
    match receiving.as_mut() {
        _ if chunk.offset == 0 => {
            *receiving = Some((id, len));
            Ok(())
        }
        Some((current, end)) if *current == id && chunk.offset <= *end => {
            *end = (*end).max(chunk.offset.saturating_add(len));
            Ok(())
        }
        Some((current, end)) if *current == id => {
            Err(format!("chunk offset {} is past the {end} bytes received of snapshot {id}", chunk.offset))
        }
        _ => Err(format!("chunk at offset {} of snapshot {id}, which was never started", chunk.offset)),
    }
}

/// Answers a forwarded request; the handlers bound themselves by the caller's budget.
fn wire<T: serde::Serialize>(inner: &Inner, res: WireResult<T>) -> Response {
    if inner.is_stopped() {
        return unavailable("member is shutting down");
    }
    Json(res).into_response()
}

async fn write(State(inner): St, Json(req): Json<WriteRequest>) -> Response {
    if inner.is_stopped() {
        return unavailable("member is shutting down");
    }
    let res = inner.serve_write(req).await;
    wire(&inner, res)
}

async fn read_index(State(inner): St, Json(req): Json<ReadIndexRequest>) -> Response {
    if inner.is_stopped() {
        return unavailable("member is shutting down");
    }
    let res = inner.serve_read_index(req).await;
    wire(&inner, res)
}

async fn join(State(inner): St, Json(req): Json<JoinRequest>) -> Response {
    if inner.is_stopped() {
        return unavailable("member is shutting down");
    }
    let res = inner.serve_join(req).await;
    wire(&inner, res)
}

async fn remove(State(inner): St, Json(req): Json<RemoveRequest>) -> Response {
    if inner.is_stopped() {
        return unavailable("member is shutting down");
    }
    let res = inner.serve_remove(req).await;
    wire(&inner, res)
}

async fn status(State(inner): St) -> Response {
    Json(inner.status()).into_response()
}
