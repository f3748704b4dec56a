//! Cluster-port endpoints that workers dial: long-poll sync and log replies. Managers
//! never dial workers; everything a manager needs from a worker rides on these.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};

use crate::net::tls::Peer;

use axum::http::StatusCode as Status;
use holdfast_raft::ReplicatedDb;
use tokio::sync::{mpsc, oneshot};

use super::api::ApiError;
use super::state::{query, Command, NodeReports, NodeStatus, ReportsApplied};
use super::write::{replicate, replicate_only};
use super::{lock, now_ms, Liveness, Manager};
use crate::model::sync::{Assignment, LogReply, NotLeader, StatusReport, SyncRequest, SyncResponse};

/// Most jobs merged into one `ReportStatus` command.
const BATCH_MAX: usize = 256;
/// Jobs waiting for the batcher; a full queue answers 503 instead of growing.
const BATCH_QUEUE: usize = 1_024;

type Job = (NodeReports, oneshot::Sender<Result<u64, ApiError>>);

/// Merges status reports from many workers into one Raft command per round: while one
/// command commits, the next batch gathers.
#[derive(Clone)]
pub struct ReportBatcher {
    tx: mpsc::Sender<Job>,
}

impl ReportBatcher {
    /// Starts the batching task on the current runtime.
    pub fn spawn(db: ReplicatedDb) -> Self {
        let (tx, mut rx) = mpsc::channel::<Job>(BATCH_QUEUE);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut jobs = vec![first];
                while jobs.len() < BATCH_MAX {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let cmd =
                    Command::ReportStatus { batches: jobs.iter().map(|(r, _)| r.clone()).collect(), now_ms: now_ms() };
                let result = replicate::<ReportsApplied>(&db, &cmd).await.map_err(ApiError::from);
                for (reports, reply) in jobs {
                    let answer = match &result {
                        Ok(v) => v.acked.get(&reports.node).copied().ok_or_else(|| {
                            ApiError::new(
                                Status::NOT_FOUND,
                                "not_found",
                                format!("node {} is not registered", reports.node),
                            )
                        }),
                        Err(e) => Err(e.clone()),
                    };
                    let _ = reply.send(answer);
                }
            }
        });
        ReportBatcher { tx }
    }

    /// Queues one node's reports and waits for the acknowledged sequence number.
    pub async fn submit(&self, node: &str, reports: Vec<StatusReport>) -> Result<u64, ApiError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send((NodeReports { node: node.to_string(), reports }, reply))
            .map_err(|_| ApiError::unavailable("status report queue is full; retry shortly".into(), None))?;
        answer.await.map_err(|_| ApiError::internal("report batcher stopped".into()))?
    }
}

/// Routes under `/cluster/v1/` for workers.
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new().route("/cluster/v1/sync", post(sync)).route("/cluster/v1/logs", post(log_reply)).with_state(manager)
}

fn version_of(assignments: &[Assignment]) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_string(assignments).unwrap_or_default().hash(&mut h);
    // 0 means "I have nothing yet" on the worker side.
    h.finish().max(1)
}

fn not_leader(m: &Manager) -> Response {
    let leader = m.db.status().leader.map(|l| l.cluster_addr);
    (StatusCode::MISDIRECTED_REQUEST, Json(NotLeader { leader_cluster_addr: leader })).into_response()
}

async fn sync(
    State(m): State<Arc<Manager>>,
    Extension(peer): Extension<Peer>,
    Json(req): Json<SyncRequest>,
) -> Result<Response, ApiError> {
    if !peer.speaks_for(&req.node) {
        tracing::warn!(peer = peer.name(), node = %req.node, "refused a sync for another node");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "wrong_node",
            format!("the certificate names {}; it cannot sync as {}", peer.name(), req.node),
        )
        .field("node"));
    }
    let started = Instant::now();
    let result = sync_inner(&m, req).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::histogram!("holdfast_sync_duration_seconds", "outcome" => outcome).record(started.elapsed().as_secs_f64());
    result
}

async fn sync_inner(m: &Arc<Manager>, req: SyncRequest) -> Result<Response, ApiError> {
    let m = m.clone();
    if m.db.status().role != holdfast_raft::Role::Leader {
        return Ok(not_leader(&m));
    }
    mark_seen(&m, &req);
    super::images::note_held(&m, &req.node, &req.images);
    let reg = register(&m, &req).await?;
    let mut acked_seq = reg.as_ref().map(|r| r.last_seq).unwrap_or(0);
    if !req.reports.is_empty() {
        acked_seq = m.reports.submit(&req.node, req.reports.clone()).await?;
    }
    long_poll(&m, &req, acked_seq).await
}

/// Notes that `req`'s node was heard from just now, with the resources it measured.
fn mark_seen(m: &Manager, req: &SyncRequest) {
    lock(&m.liveness)
        .insert(req.node.clone(), Liveness { last_seen: Instant::now(), resources: req.resources.clone() });
}

/// Commits what the sync changes in the node's registration: a node heard from again
/// is back to ready, and a new node or new labels, address or capacity are recorded.
/// The registration as it was before.
async fn register(m: &Manager, req: &SyncRequest) -> Result<Option<query::Registration>, ApiError> {
    let name = req.node.clone();
    let reg = m.db.read_local(move |c| query::node_registration(c, &name)).await?;
    if reg.as_ref().is_some_and(|g| g.status != NodeStatus::Ready.as_str()) {
        // Heard from again: back to ready (committed; the heartbeat itself is not).
        let status = NodeStatus::Ready.as_str().into();
        replicate_only(&m.db, &Command::SetNodeStatus { name: req.node.clone(), status, now_ms: now_ms() }).await?;
    }
    let r = &req.resources;
    let changed = match &reg {
        None => true,
        Some(g) => {
            g.labels != req.labels
                || g.address != req.address
                || g.cpu_millis != r.cpu_millis
                || g.memory_mb != r.memory_total_mb
                || g.disk_mb != r.disk_total_mb
        }
    };
    if changed {
        replicate_only(
            &m.db,
            &Command::RegisterNode {
                name: req.node.clone(),
                address: req.address.clone(),
                labels: req.labels.clone(),
                cpu_millis: r.cpu_millis,
                memory_mb: r.memory_total_mb,
                disk_mb: r.disk_total_mb,
                now_ms: now_ms(),
            },
        )
        .await?;
    }
    Ok(reg)
}

/// Long-poll: holds the request until the desired set changes, a log request is
/// queued, this manager stops leading, or the wait is over; then answers.
async fn long_poll(m: &Manager, req: &SyncRequest, acked_seq: u64) -> Result<Response, ApiError> {
    let wait = Duration::from_millis(req.wait_ms).min(m.settings.max_long_poll);
    let deadline = tokio::time::Instant::now() + wait;
    let mut applied = m.applied.clone();
    let mut logs = m.log_signal.subscribe();
    loop {
        applied.mark_unchanged();
        logs.mark_unchanged();
        let name = req.node.clone();
        let assignments = m.db.read_local(move |c| query::assignments_for(c, &name)).await?;
        let version = version_of(&assignments);
        let log_requests = m.logs.take(&req.node);
        let still_leader = m.db.status().role == holdfast_raft::Role::Leader;
        if version != req.have_version
            || !log_requests.is_empty()
            || !still_leader
            || tokio::time::Instant::now() >= deadline
        {
            mark_seen(m, req);
            let resp = SyncResponse {
                version,
                lease_ms: m.settings.lease.as_millis() as u64,
                acked_seq,
                assignments,
                log_requests,
            };
            return Ok(Json(resp).into_response());
        }
        tokio::select! {
            _ = applied.changed() => {}
            _ = logs.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

async fn log_reply(
    State(m): State<Arc<Manager>>,
    Extension(peer): Extension<Peer>,
    Json(reply): Json<LogReply>,
) -> Result<StatusCode, ApiError> {
    if !m.logs.answer(reply.id, peer.name(), reply.result) {
        tracing::warn!(peer = peer.name(), id = reply.id, "refused a log reply for a request not sent to that node");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_your_request",
            format!("log request {} was not sent to node {}", reply.id, peer.name()),
        ));
    }
    Ok(StatusCode::NO_CONTENT)
}
