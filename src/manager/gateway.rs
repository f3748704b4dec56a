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
use axum::{Json, Router};

use super::api::{write, ApiError};
use super::state::{query, Command};
use super::{lock, now_ms, Liveness, Manager};
use crate::model::sync::{Assignment, LogReply, NotLeader, SyncRequest, SyncResponse};

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

async fn sync(State(m): State<Arc<Manager>>, Json(req): Json<SyncRequest>) -> Result<Response, ApiError> {
    if m.db.status().role != holdfast_raft::Role::Leader {
        return Ok(not_leader(&m));
    }
    lock(&m.liveness)
        .insert(req.node.clone(), Liveness { last_seen: Instant::now(), resources: req.resources.clone() });

    let name = req.node.clone();
    let reg = m.db.read_local(move |c| query::node_registration(c, &name)).await?;
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
        write(
            &m,
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
    let mut acked_seq = reg.map(|r| r.last_seq).unwrap_or(0);
    if !req.reports.is_empty() {
        let out = write(
            &m,
            &Command::ReportStatus { node: req.node.clone(), reports: req.reports.clone(), now_ms: now_ms() },
        )
        .await?;
        acked_seq = out["acked_seq"].as_u64().unwrap_or(acked_seq);
    }

    // Long-poll: hold the request until the desired set changes, a log request is
    // queued, or the wait is over.
    let wait = Duration::from_millis(req.wait_ms).min(m.timers.max_long_poll);
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
            lock(&m.liveness)
                .insert(req.node.clone(), Liveness { last_seen: Instant::now(), resources: req.resources.clone() });
            let resp = SyncResponse {
                version,
                lease_ms: m.timers.lease.as_millis() as u64,
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

async fn log_reply(State(m): State<Arc<Manager>>, Json(reply): Json<LogReply>) -> StatusCode {
    m.logs.answer(reply.id, reply.result);
    StatusCode::NO_CONTENT
}
