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
        // After installing: descriptions go to the global recorder.
        describe();
        handle
    })
}

/// `# HELP` text for every metric recorded through the `metrics` facade.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_histogram!("holdfast_api_request_duration_seconds", "API request latency by method, route and status.");
    describe_histogram!("holdfast_sync_duration_seconds", "Worker sync requests served by this manager, by outcome.");
    describe_histogram!("holdfast_worker_sync_seconds", "Round trip of this worker's successful syncs.");
    describe_gauge!("holdfast_raft_term", "Current Raft term.");
    describe_gauge!("holdfast_raft_commit_index", "Highest log index known committed (applied here).");
    describe_gauge!("holdfast_raft_last_applied", "Last log index applied to the state database.");
    describe_gauge!("holdfast_raft_last_log_index", "Last log index on this member.");
    describe_gauge!("holdfast_raft_is_leader", "1 while this member leads.");
    describe_gauge!("holdfast_raft_members", "Members in the Raft membership.");
    describe_gauge!("holdfast_placements", "Placements by observed and desired state.");
    describe_gauge!("holdfast_nodes", "Worker nodes by status and draining.");
    describe_gauge!("holdfast_nodes_heard_within_ttl", "Nodes heard from within the heartbeat TTL.");
    describe_gauge!("holdfast_event_sink_queued", "Events queued for the event sink.");
    describe_gauge!("holdfast_event_sink_spool_bytes", "Size of the event sink's spool file.");
    for c in ["delivered", "spooled", "dropped", "failed_deliveries"] {
        describe_counter!(format!("holdfast_event_sink_{c}_total"), format!("Event sink: events {c}."));
    }
}

/// Label sets written at the previous scrape, per gauge family, so a group that
/// disappears from the database is written as 0 instead of keeping its last value.
fn zero_missing(family: &'static str, now: &std::collections::BTreeSet<Vec<(&'static str, String)>>) {
    type Seen = std::collections::BTreeMap<&'static str, std::collections::BTreeSet<Vec<(&'static str, String)>>>;
    static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new(std::collections::BTreeMap::new());
    let mut seen = lock(&SEEN);
    let before = seen.entry(family).or_default();
    for gone in before.difference(now) {
        let labels: Vec<metrics::Label> = gone.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
        metrics::gauge!(family, labels).set(0.0);
    }
    before.extend(now.iter().cloned());
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
    let mut body = render(&m).await?;
    m.resilience.snapshot().write_prometheus(&mut body);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}

/// The manager's figures and everything recorded through the `metrics` facade in this
/// process, as Prometheus text (breakers and bulkheads are not included).
pub async fn render(m: &Manager) -> Result<String, ApiError> {
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
    let mut groups = std::collections::BTreeSet::new();
    for (observed, desired, count) in placements {
        groups.insert(vec![("observed", observed.clone()), ("desired", desired.clone())]);
        metrics::gauge!("holdfast_placements", "observed" => observed, "desired" => desired).set(count as f64);
    }
    zero_missing("holdfast_placements", &groups);
    let mut groups = std::collections::BTreeSet::new();
    for (status, draining, count) in nodes {
        groups.insert(vec![("status", status.clone()), ("draining", draining.to_string())]);
        metrics::gauge!("holdfast_nodes", "status" => status, "draining" => draining.to_string()).set(count as f64);
    }
    zero_missing("holdfast_nodes", &groups);
    let heard = lock(&m.liveness).values().filter(|l| l.last_seen.elapsed() < m.settings.heartbeat_ttl).count();
    metrics::gauge!("holdfast_nodes_heard_within_ttl").set(heard as f64);
    Ok(h.render())
}
