//! The public HTTP API (axum). The only manager module that knows the public JSON
//! shapes; every error leaves as `{"error":{"code","message","field"}}`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use holdfast_raft::DbError;
use serde::{Deserialize, Serialize};

use super::state::{query, Command, RejectCode, Rejection, TaskSubmitted};
use super::write::{self, WriteError};
use super::{now_ms, Manager};
use crate::model::spec::{SpecError, MAX_SPEC_BYTES};
use crate::model::TaskSpec;

pub mod auth;
pub mod day2;
mod error;
pub mod events;
pub mod images;
pub mod limits;
mod lists;
pub mod metrics;
pub mod openapi;
mod snapshot;
pub mod tls;
pub mod tokens;
pub mod ui;
pub use error::ApiError;
pub use lists::encode as encode_query;

/// Routes of the public API and the probes.
pub fn router(manager: Arc<Manager>) -> Router {
    // Install the recorder before the first request so nothing is recorded into the void.
    metrics::handle();
    Router::new()
        .route("/v1/tasks", post(submit_task).get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task).delete(stop_task))
        .route("/v1/tasks/{id}/logs", get(task_logs))
        .route("/v1/nodes", get(lists::list_nodes))
        .route("/v1/nodes/{id}", get(get_node).delete(day2::remove_node))
        .route("/v1/nodes/{id}/drain", post(drain_node))
        .route("/v1/nodes/{id}/eligibility", post(node_eligibility))
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/members/{id}", delete(remove_member))
        .route("/v1/cluster/snapshot", get(snapshot::cluster_snapshot))
        .route("/v1/audit", get(lists::audit_log))
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route("/v1/tokens/{id}", delete(tokens::revoke))
        .route("/v1/openapi.json", get(openapi::serve))
        .route("/v1/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics::endpoint))
        .merge(images::router())
        .merge(day2::test_hook_routes())
        .merge(ui::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(DefaultBodyLimit::max(MAX_SPEC_BYTES))
        .with_state(manager)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route; see GET /v1/tasks, /v1/nodes, /v1/cluster")
}

/// The one map from a rejection's code to its HTTP status.
fn rejected(r: Rejection) -> ApiError {
    let status = match r.code {
        RejectCode::Conflict | RejectCode::FeatureLevel => StatusCode::CONFLICT,
        RejectCode::NotFound => StatusCode::NOT_FOUND,
        RejectCode::TokenUnknown
        | RejectCode::TokenRevoked
        | RejectCode::TokenExpired
        | RejectCode::TokenUsedUp
        | RejectCode::TokenRole => StatusCode::FORBIDDEN,
        RejectCode::Invalid
        | RejectCode::BadCommand
        | RejectCode::BadCa
        | RejectCode::BadToken
        | RejectCode::BadNode
        | RejectCode::NoCa => StatusCode::UNPROCESSABLE_ENTITY,
    };
    ApiError::new(status, r.code.as_str(), r.message)
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Rejected(r) => rejected(r),
            WriteError::Db(e) => e.into(),
            WriteError::Encode(_) | WriteError::Answer(_) => ApiError::internal(e.to_string()),
        }
    }
}

/// Who made a mutating call: the authenticated token (name and id) is the actor; the
/// free-form `X-Holdfast-Actor` header is kept only as "on behalf of", never as the actor.
pub struct Who {
    /// The token's `name (id)`.
    pub actor: String,
    /// The header's text, control characters removed, at most 64 characters.
    pub on_behalf_of: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        // The auth layer puts the caller there; a mutating route without it would be a
        // wiring bug, refused rather than audited under a made-up name.
        let caller = parts
            .extensions
            .get::<auth::Caller>()
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "this call needs a bearer token"))?;
        let on_behalf_of = parts
            .headers
            .get("x-holdfast-actor")
            .and_then(|v| v.to_str().ok())
            .map(|a| a.chars().filter(|c| !c.is_control()).take(64).collect::<String>())
            .filter(|a| !a.is_empty());
        Ok(Who { actor: caller.who(), on_behalf_of })
    }
}

/// Whether the caller may see env values (every role but `reader`).
fn sees_env(caller: Option<&axum::Extension<auth::Caller>>) -> bool {
    caller.is_some_and(|c| c.role > tokens::Role::Reader)
}

/// Env values replaced by this for callers that may not see them.
pub const REDACTED: &str = "<redacted>";

fn redact(t: &mut query::TaskView) {
    for v in t.spec.env.values_mut() {
        *v = REDACTED.to_string();
    }
}

/// Replicates a command as an audited call: the audit row (who, what, when, result)
/// commits in the same Raft entry as the change itself.
pub async fn write_audited(
    manager: &Manager,
    who: Who,
    action: &str,
    subject: &str,
    cmd: Option<Command>,
) -> Result<serde_json::Value, ApiError> {
    write_audited_as(manager, who, action, subject, cmd).await
}

/// [`write_audited`], decoding the answer as the type the command answers with.
pub async fn write_audited_as<A: serde::de::DeserializeOwned>(
    manager: &Manager,
    who: Who,
    action: &str,
    subject: &str,
    cmd: Option<Command>,
) -> Result<A, ApiError> {
    let wrapped = Command::Audited {
        who: who.actor,
        on_behalf_of: who.on_behalf_of,
        action: action.to_string(),
        subject: subject.to_string(),
        at_ms: now_ms(),
        inner: cmd.map(Box::new),
    };
    Ok(write::replicate(&manager.db, &wrapped).await?)
}

/// Replicates one command and decodes the state machine's answer as loose JSON.
pub async fn write(manager: &Manager, cmd: &Command) -> Result<serde_json::Value, ApiError> {
    Ok(write::replicate(&manager.db, cmd).await?)
}

#[derive(Serialize)]
struct Submitted {
    id: String,
    created: bool,
    location: String,
}

async fn submit_task(
    State(m): State<Arc<Manager>>,
    who: Who,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body exceeds {MAX_SPEC_BYTES} bytes")
        } else {
            e.body_text()
        };
        ApiError::new(status, "bad_body", message)
    })?;
    let spec = TaskSpec::from_json(&body).map_err(ApiError::from)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 128).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "Idempotency-Key must be 1–128 visible ASCII characters",
                )
                .field("Idempotency-Key")
            })?;
            Some(k.to_string())
        }
    };
    let id = new_task_id();
    let cmd = Command::SubmitTask { id: id.clone(), spec: Box::new(spec), idempotency_key: key, now_ms: now_ms() };
    let TaskSubmitted { id, created } = write_audited_as(&m, who, "POST /v1/tasks", &id, Some(cmd)).await?;
    let location = format!("/v1/tasks/{id}");
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let mut resp = (status, Json(Submitted { id, created, location: location.clone() })).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// A new task id: `t` and a time-ordered UUID (v7: milliseconds, then 74 random bits),
/// so new ids land at the end of the id index instead of on a random page of it: fewer
/// pages written per apply (ARCHITECTURE.md, "Decisions"). A collision is not a
/// practical concern, and even one would be a `conflict` rejection in `apply`, never a
/// stopped state machine.
fn new_task_id() -> String {
    format!("t{}", uuid::Uuid::now_v7().simple())
}

/// Page sizes of `GET /v1/tasks` (README, "API").
pub const TASK_PAGE_DEFAULT: usize = 500;
/// Largest `limit` accepted.
pub const TASK_PAGE_MAX: usize = 2_000;

/// Query of `GET /v1/tasks`; every value arrives as text so a bad one is named.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskListQuery {
    limit: Option<String>,
    after: Option<String>,
    state: Option<String>,
    node: Option<String>,
    name: Option<String>,
}

/// Derived task states a `state=` filter may name.
const TASK_STATES: [&str; 9] =
    ["pending", "starting", "running", "restarting", "completed", "failed", "stopping", "stopped", "unknown"];

impl TaskListQuery {
    fn filter(self) -> Result<query::TaskFilter, ApiError> {
        let bad = |field: &str, msg: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid", msg).field(field);
        let limit = match self.limit.as_deref() {
            None => TASK_PAGE_DEFAULT,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=TASK_PAGE_MAX).contains(&n) => n,
                _ => {
                    return Err(bad(
                        "limit",
                        format!("limit must be a whole number from 1 to {TASK_PAGE_MAX}, got {l:?}"),
                    ))
                }
            },
        };
        let after =
            match self.after.as_deref() {
                None | Some("") => None,
                Some(a) => Some(a.parse::<u64>().map_err(|_| {
                    bad("after", format!("after must be the `next` cursor of a previous page, got {a:?}"))
                })?),
            };
        if let Some(s) = self.state.as_deref() {
            if !TASK_STATES.contains(&s) {
                return Err(bad("state", format!("state must be one of {TASK_STATES:?}, got {s:?}")));
            }
        }
        for (field, v) in [("node", &self.node), ("name", &self.name)] {
            if v.as_ref().is_some_and(|v| v.is_empty() || v.len() > 253) {
                return Err(bad(field, format!("{field} must be 1 to 253 characters")));
            }
        }
        Ok(query::TaskFilter { limit, after, state: self.state, node: self.node, name: self.name })
    }
}

/// The `next` link of a task page: the same filters, the new cursor.
fn next_link(f: &query::TaskFilter, next: u64) -> String {
    let mut q = vec![format!("limit={}", f.limit), format!("after={next}")];
    for (k, v) in [("state", &f.state), ("node", &f.node), ("name", &f.name)] {
        if let Some(v) = v {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect();
            q.push(format!("{k}={enc}"));
        }
    }
    format!("/v1/tasks?{}", q.join("&"))
}

async fn list_tasks(
    State(m): State<Arc<Manager>>,
    caller: Option<axum::Extension<auth::Caller>>,
    q: Result<Query<TaskListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{}; known parameters: limit, after, state, node, name", e.body_text()),
        )
    })?;
    let filter = q.filter()?;
    let f = filter.clone();
    let mut page = m.db.read(move |c| query::list_tasks(c, &f)).await?;
    if !sees_env(caller.as_ref()) {
        page.tasks.iter_mut().for_each(redact);
    }
    let next = page.next.map(|n| n.to_string());
    let mut resp = Json(serde_json::json!({ "tasks": page.tasks, "next": next })).into_response();
    if let Some(n) = page.next {
        if let Ok(v) = axum::http::HeaderValue::from_str(&format!("<{}>; rel=\"next\"", next_link(&filter, n))) {
            resp.headers_mut().insert(axum::http::header::LINK, v);
        }
    }
    Ok(resp)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if !super::state::valid_id(id) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("{id:?} is not a valid id")).field("id"));
    }
    Ok(())
}

async fn get_task(
    State(m): State<Arc<Manager>>,
    caller: Option<axum::Extension<auth::Caller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let key = id.clone();
    match m.db.read(move |c| query::get_task(c, &key)).await? {
        Some(mut t) => {
            if !sees_env(caller.as_ref()) {
                redact(&mut t);
            }
            Ok(Json(t).into_response())
        }
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no task with id {id}")).field("id")),
    }
}

async fn stop_task(State(m): State<Arc<Manager>>, who: Who, Path(id): Path<String>) -> Result<Response, ApiError> {
    check_id(&id)?;
    let cmd = Command::StopTask { id: id.clone(), now_ms: now_ms() };
    write_audited(&m, who, "DELETE /v1/tasks/{id}", &id, Some(cmd)).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id, "desired": "stop" }))).into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
    /// Following: the `cursor` of the previous answer (`""` to start); the answer is
    /// then JSON `{"lines": [...], "cursor": "..."}` with only lines written after it.
    after: Option<String>,
}

async fn task_logs(
    State(m): State<Arc<Manager>>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let tail = q.tail.unwrap_or(200).clamp(1, 10_000);
    let key = id.clone();
    let task = m.db.read(move |c| query::get_task(c, &key)).await?.ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no task with id {id}")).field("id")
    })?;
    let Some(p) = task.placements.iter().find(|p| p.current) else {
        return Err(ApiError::new(StatusCode::CONFLICT, "not_placed", format!("task {id} has not been placed yet")));
    };
    let status = m.db.status();
    if status.role != holdfast_raft::Role::Leader {
        return Err(ApiError::unavailable(
            "logs are relayed by the leader; ask it".to_string(),
            status.leader.map(|l| l.api_addr),
        ));
    }
    if let Some(after) = &q.after {
        if !after.is_empty() && crate::model::log_time_key(after).is_none() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "after must be the cursor of a previous answer (an RFC 3339 UTC time), or empty to start",
            )
            .field("after"));
        }
    }
    let (req_id, rx) = m.logs.request(&p.node, &p.id, tail, q.after.clone());
    m.log_signal.send_modify(|v| *v += 1);
    match tokio::time::timeout(m.settings.log_timeout, rx).await {
        Ok(Ok(Ok(text))) => match q.after {
            Some(after) => Ok(Json(follow_page(&text, after)).into_response()),
            None => Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()),
        },
        Ok(Ok(Err(reason))) => Err(ApiError::new(StatusCode::BAD_GATEWAY, "logs_unavailable", reason)),
        _ => {
            m.logs.forget(req_id);
            Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "worker_timeout",
                format!("node {} did not send logs within {:?}", p.node, m.settings.log_timeout),
            ))
        }
    }
}

/// One page of a followed log: the lines without their engine timestamps, and the
/// newest timestamp as the cursor of the next request (unchanged when none is new).
fn follow_page(text: &str, after: String) -> serde_json::Value {
    let mut cursor = after;
    let mut lines = Vec::new();
    for line in text.lines() {
        match line.split_once(' ') {
            Some((ts, rest)) if crate::model::log_time_key(ts).is_some() => {
                cursor = ts.to_string();
                lines.push(rest.to_string());
            }
            _ => lines.push(line.to_string()),
        }
    }
    serde_json::json!({ "lines": lines, "cursor": cursor })
}

fn node_json(n: &query::NodeRow, l: Option<&super::Liveness>) -> serde_json::Value {
    serde_json::json!({
        "id": n.name,
        "address": n.address,
        "status": n.status,
        "status_since_ms": n.status_since_ms,
        "draining": n.draining,
        "drain_deadline_ms": n.drain_deadline_ms,
        "eligible": n.eligible,
        "labels": n.labels,
        "capacity": { "cpu_millis": n.cpu_millis, "memory_mb": n.memory_mb, "disk_mb": n.disk_mb },
        "reserved": {
            "cpu_millis": n.reserved_cpu_millis,
            "memory_mb": n.reserved_memory_mb,
            "disk_mb": n.reserved_disk_mb,
        },
        "free": l.map(|l| serde_json::json!({
            "memory_mb": l.resources.memory_free_mb,
            "disk_mb": l.resources.disk_free_mb,
            "load1": l.resources.load1,
        })),
        "engine_ok": l.map(|l| l.resources.engine_ok),
        "last_seen_ms_ago": l.map(|l| l.last_seen.elapsed().as_millis() as u64),
        "placements": n.placements,
    })
}

/// Liveness (last seen, measured free resources, engine state) lives in the leader's
/// memory only, so a follower asks the leader for it over the cluster port with its
/// own manager certificate (mutual TLS; `GET /cluster/v1/leader/liveness`, managers
/// only) and answers from its own state with it. Without an answer in time the live
/// fields are `null`. The leader answers from its own memory.
async fn liveness(m: &Manager) -> std::collections::HashMap<String, super::Liveness> {
    let s = m.db.status();
    if s.role == holdfast_raft::Role::Leader {
        return super::lock(&m.liveness).clone();
    }
    let (Some(leader), Some(tls)) = (s.leader, m.cluster_tls.get()) else {
        return Default::default();
    };
    let url = format!("https://{}{}", leader.cluster_addr, crate::net::door::LIVENESS_PATH);
    let resp = tls.http().get(&url).timeout(Duration::from_secs(2)).send().await;
    let body = match resp {
        Ok(r) if r.status().is_success() => r.json::<super::trust::LeaderLiveness>().await.ok(),
        Ok(r) => {
            tracing::debug!(status = %r.status(), %url, "leader liveness refused");
            None
        }
        Err(e) => {
            tracing::debug!(error = %crate::net::identity::chain(&e), %url, "leader liveness unreachable");
            None
        }
    };
    body.map(|b| b.into_liveness()).unwrap_or_default()
}

fn no_node(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no node named {id}")).field("id")
}

/// [`write_audited`] of a command on node `id`: a rejection for an unknown node is
/// the node route's own 404 ([`no_node`]).
async fn write_node_audited(m: &Manager, who: Who, action: &str, id: &str, cmd: Command) -> Result<(), ApiError> {
    match write_audited(m, who, action, id, Some(cmd)).await {
        Err(e) if e.status == StatusCode::NOT_FOUND => Err(no_node(id)),
        other => other.map(|_| ()),
    }
}

async fn get_node(State(m): State<Arc<Manager>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    check_id(&id)?;
    let key = id.clone();
    let (rows, events, dropped) =
        m.db.read(move |c| {
            Ok((query::nodes(c)?, query::node_events(c, &key)?, super::state::retention::dropped(c, "node", &key)?))
        })
        .await?;
    let n = rows.iter().find(|n| n.name == id).ok_or_else(|| no_node(&id))?;
    let live = liveness(&m).await.remove(&id);
    let mut body = node_json(n, live.as_ref());
    // Disconnected intervals, from the committed status changes.
    let mut intervals = Vec::new();
    let mut open: Option<u64> = None;
    for e in &events {
        match e.what.as_str() {
            "disconnected" if open.is_none() => open = Some(e.at_ms),
            "ready" => {
                if let Some(from) = open.take() {
                    intervals.push(serde_json::json!({ "from_ms": from, "to_ms": e.at_ms }));
                }
            }
            _ => {}
        }
    }
    if let Some(from) = open {
        intervals.push(serde_json::json!({ "from_ms": from, "to_ms": null }));
    }
    body["disconnected"] = serde_json::json!(intervals);
    body["events"] = serde_json::json!(events);
    body["events_dropped"] = serde_json::json!(dropped);
    Ok(Json(body).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    /// `false` ends a drain.
    enable: Option<bool>,
    /// Placements left after this many ms are stopped regardless.
    deadline_ms: Option<u64>,
}

fn json_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(T::default());
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.inner().to_string()).field(if field == "." {
            ""
        } else {
            &field
        })
    })
}

async fn drain_node(
    State(m): State<Arc<Manager>>,
    who: Who,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let b: DrainBody = json_body(&body)?;
    let now = now_ms();
    let deadline = match b.deadline_ms {
        Some(d) if d > 7 * 24 * 3_600_000 => {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", "deadline_ms must be at most 7 days")
                .field("deadline_ms"))
        }
        d => d.map(|d| now + d),
    };
    let enable = b.enable.unwrap_or(true);
    let cmd = Command::DrainNode { name: id.clone(), enable, deadline_ms: deadline, now_ms: now };
    write_node_audited(&m, who, "POST /v1/nodes/{id}/drain", &id, cmd).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id, "draining": enable, "deadline_ms": deadline })))
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EligibilityBody {
    eligible: bool,
}

async fn node_eligibility(
    State(m): State<Arc<Manager>>,
    who: Who,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", "body must be {\"eligible\": true|false}")
            .field("eligible"));
    }
    let b: EligibilityBody = json_body(&body)?;
    let cmd = Command::SetEligibility { name: id.clone(), eligible: b.eligible, now_ms: now_ms() };
    write_node_audited(&m, who, "POST /v1/nodes/{id}/eligibility", &id, cmd).await?;
    Ok(Json(serde_json::json!({ "id": id, "eligible": b.eligible })).into_response())
}

async fn cluster(State(m): State<Arc<Manager>>) -> Json<serde_json::Value> {
    // The CA rotation's state (`null` while this manager cannot read it).
    let ca = super::trust::ca_status(&m).await.ok();
    let s = m.db.status();
    Json(serde_json::json!({
        "ca": ca,
        "id": s.name,
        "role": s.role,
        "leader": s.leader.as_ref().map(|l| serde_json::json!({
            "id": l.name, "api": l.api_addr, "cluster": l.cluster_addr,
        })),
        "term": s.term,
        "commit_index": s.commit_index,
        "last_applied": s.last_applied,
        "last_log_index": s.last_log_index,
        "snapshot_index": s.snapshot_index,
        "feature_level": day2::level_json(&m).await,
        "members": s.members.iter().map(|mm| serde_json::json!({
            "id": mm.member.name,
            "api": mm.member.api_addr,
            "cluster": mm.member.cluster_addr,
            "version": (!mm.member.version.is_empty()).then_some(&mm.member.version),
            "feature_level": mm.member.feature_level,
            "voter": mm.voter,
            "role": if mm.voter { "voter" } else { "learner" },
            "last_applied": mm.matched,
        })).collect::<Vec<_>>(),
    }))
}

async fn remove_member(State(m): State<Arc<Manager>>, who: Who, Path(id): Path<String>) -> Result<Response, ApiError> {
    check_id(&id)?;
    m.db.remove_member(&id).await?;
    // A removed manager's certificates are refused from now on (ARCHITECTURE.md "Trust").
    let revoke =
        super::state::trust::TrustCommand::RevokeNode { node: id.clone(), reason: "removed".into(), now_ms: now_ms() };
    write(&m, &Command::Trust(revoke)).await?;
    write_audited(&m, who, "DELETE /v1/cluster/members/{id}", &id, None).await?;
    Ok((StatusCode::OK, Json(serde_json::json!({ "removed": id }))).into_response())
}

async fn health(State(m): State<Arc<Manager>>) -> Response {
    let s = m.db.status();
    let leader_known = s.leader.is_some();
    let leading = s.role == holdfast_raft::Role::Leader;
    let apply_lag = s.last_log_index.unwrap_or(0).saturating_sub(s.last_applied.unwrap_or(0));
    let voters = s.members.iter().filter(|mm| mm.voter).count();
    // A leader that has not heard from a quorum for two election timeouts has lost it.
    let quorum_ok =
        if leading { voters <= 1 || s.millis_since_quorum_ack.is_some_and(|ms| ms < 1_000) } else { leader_known };
    let deps = m.resilience.snapshot();

    // The data plane is judged where liveness lives: on the leader.
    let nodes = if leading { m.db.read_local(query::nodes).await.ok() } else { None };
    let live = super::lock(&m.liveness).clone();
    let mut node_views = Vec::new();
    let mut data_degraded = false;
    if let Some(rows) = &nodes {
        for n in rows {
            let l = live.get(&n.name);
            let engine_ok = l.map(|l| l.resources.engine_ok);
            let disk_pressure = l.is_some_and(|l| {
                let r = &l.resources;
                r.disk_total_mb > 0 && (r.disk_free_mb * 10 < r.disk_total_mb || r.disk_free_mb < 1_024)
            });
            let silent = n.status != super::state::NodeStatus::Ready.as_str();
            let unknown = if silent { n.placements } else { 0 };
            data_degraded |= engine_ok == Some(false) || disk_pressure || unknown > 0;
            node_views.push(serde_json::json!({
                "node": n.name,
                "status": n.status,
                "engine_ok": engine_ok,
                "last_seen_ms_ago": l.map(|l| l.last_seen.elapsed().as_millis() as u64),
                "live_placements": n.placements,
                "unknown_placements": unknown,
                "disk_pressure": disk_pressure,
            }));
        }
    }
    let upgrade_required = day2::upgrade_required(&m);
    let overall = if !leader_known || !quorum_ok || upgrade_required.is_some() {
        "critical"
    } else if data_degraded || deps.degraded() {
        "degraded"
    } else {
        "healthy"
    };
    let code = if overall == "critical" { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = serde_json::json!({
        "status": overall,
        "upgrade_required": upgrade_required,
        "control_plane": {
            "role": s.role,
            "leader": s.leader.map(|l| l.name),
            "quorum": quorum_ok,
            "voters": voters,
            "term": s.term,
            "commit_index": s.commit_index,
            "last_applied": s.last_applied,
            "last_log_index": s.last_log_index,
            "apply_lag": apply_lag,
            "millis_since_quorum_ack": s.millis_since_quorum_ack,
        },
        "dependencies": limits::dependencies_json(&deps),
        "data_plane": {
            "judged_by": if leading { "this manager (leader)" } else { "the leader only; ask it" },
            "nodes": node_views,
        },
    });
    (code, Json(body)).into_response()
}

/// Fails from the moment Raft is gone (a fatal storage error): the process is about
/// to exit, and a supervisor must not take it for alive meanwhile.
async fn live(State(m): State<Arc<Manager>>) -> Result<&'static str, ApiError> {
    let s = m.db.status();
    if let Some(why) = day2::upgrade_required(&m) {
        return Err(ApiError::unavailable(why, None));
    }
    if s.role == holdfast_raft::Role::Shutdown {
        return Err(ApiError::unavailable("Raft has stopped on this manager; the process is exiting".into(), None));
    }
    Ok("ok")
}

async fn ready(State(m): State<Arc<Manager>>) -> Result<&'static str, ApiError> {
    let s = m.db.status();
    if s.leader.is_some() {
        Ok("ok")
    } else {
        Err(ApiError::unavailable("no leader known yet".into(), None))
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.message).field(&e.field)
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match &e {
            DbError::NoLeader { last_known } => {
                ApiError::unavailable(e.to_string(), last_known.as_ref().map(|l| l.api_addr.clone()))
            }
            DbError::Timeout { leader, .. } => ApiError::unavailable(
                format!("{e}; the cluster may have lost its quorum"),
                leader.as_ref().map(|l| l.api_addr.clone()),
            ),
            DbError::Network { .. } => ApiError::unavailable(e.to_string(), None),
            DbError::Membership(_) => ApiError::new(StatusCode::CONFLICT, "membership", e.to_string()),
            DbError::StorageFull(_) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", e.to_string())
            }
            DbError::DataDir { .. } | DbError::Storage(_) => ApiError::internal(e.to_string()),
        }
    }
}

/// Retry hint for 503s.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    /// Ids made one after another sort in that order (so they append to the id index),
    /// also within one millisecond, and keep the `t` + 32 hex digits shape.
    #[test]
    fn task_ids_sort_in_the_order_they_were_made() {
        let ids: Vec<String> = (0..10_000).map(|_| super::new_task_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of creation order");
        for id in &ids {
            assert!(id.len() == 33 && id.starts_with('t'), "{id}");
            assert!(id[1..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        }
    }
}
