//! `GET /metrics` in Prometheus text, and the latency middleware feeding it.
//!
//! State-derived figures (Raft indexes, tasks by state, nodes by status) are read at
//! scrape time, so they are never stale; request latencies are recorded as they happen.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::ApiError;
use crate::manager::{lock, Manager};

/// The process-wide recorder (the `metrics` facade has exactly one).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Fails only if another recorder was installed first (e.g. two managers in one
        // test process); the handle still renders this one's view.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Records `holdfast_api_request_duration_seconds{method,route,status}`.
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()).unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::histogram!("holdfast_api_request_duration_seconds", "method" => method, "route" => route, "status" => status)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// The scrape endpoint.
pub async fn endpoint(State(m): State<Arc<Manager>>) -> Result<Response, ApiError> {
    let h = handle();
    let s = m.db.status();
    metrics::gauge!("holdfast_raft_term").set(s.term as f64);
    metrics::gauge!("holdfast_raft_commit_index").set(s.commit_index.unwrap_or(0) as f64);
    metrics::gauge!("holdfast_raft_last_applied").set(s.last_applied.unwrap_or(0) as f64);
    metrics::gauge!("holdfast_raft_last_log_index").set(s.last_log_index.unwrap_or(0) as f64);
    metrics::gauge!("holdfast_raft_is_leader").set(if s.role == holdfast_raft::Role::Leader { 1.0 } else { 0.0 });
    metrics::gauge!("holdfast_raft_members").set(s.members.len() as f64);
    let (placements, nodes) =
        m.db.read_local(|c| {
            let mut p = c.prepare("SELECT observed, desired, COUNT(*) FROM placements GROUP BY observed, desired")?;
            let placements = p
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut n = c.prepare("SELECT status, draining, COUNT(*) FROM nodes GROUP BY status, draining")?;
            let nodes = n
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?, r.get::<_, i64>(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok((placements, nodes))
        })
        .await?;
    for (observed, desired, count) in placements {
        metrics::gauge!("holdfast_placements", "observed" => observed, "desired" => desired).set(count as f64);
    }
    for (status, draining, count) in nodes {
        metrics::gauge!("holdfast_nodes", "status" => status, "draining" => draining.to_string()).set(count as f64);
    }
    let heard = lock(&m.liveness).values().filter(|l| l.last_seen.elapsed() < m.settings.heartbeat_ttl).count();
    metrics::gauge!("holdfast_nodes_heard_within_ttl").set(heard as f64);
    let mut body = h.render();
    m.resilience.snapshot().write_prometheus(&mut body);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}
