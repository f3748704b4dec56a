//! Backpressure for the public API: a bounded number of requests in flight, a bounded
//! admission queue in front of them, a request body limit and a per-request timeout.
//! Whatever does not fit is answered at once in the one error shape
//! (`{"error":{"code","message","field"}}`, 503 with `Retry-After`, or 413), so an
//! overload costs a small, bounded amount of memory and never a hang or a crash.
//!
//! Everything is a tower / tower-http layer; this file only orders them and maps their
//! errors to [`ApiError`]. Outer to inner:
//!
//! 1. `map_response`: any 4xx/5xx that is not JSON yet (tower-http's 413, axum's
//!    plain-text rejections, an empty 405) is rewritten into the error shape.
//! 2. `HandleErrorLayer`: `Overloaded` → 503 `overloaded`; `Elapsed` → 503 `timeout`.
//! 3. `TimeoutLayer`: the whole request, queue time included, within `request_timeout`.
//! 4. `LoadShedLayer`: when the queue is full, fail now instead of waiting.
//! 5. `BufferLayer`: the admission queue (`max_queued` places, a bounded channel).
//! 6. `ConcurrencyLimitLayer`: at most `max_in_flight` handlers running.
//! 7. `RequestBodyLimitLayer`: a `Content-Length` over the limit is refused before the
//!    handler runs; a chunked body is cut off at the limit.
//!
//! The stack wraps the router as *one* service (its fallback), not route by route:
//! `Router::layer` would give every route its own limit and its own queue.

use std::num::NonZeroUsize;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Router};
use tower::ServiceBuilder;

use super::ApiError;
use crate::resilience::{BreakerState, Snapshot};

/// Limits of the public API.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    /// Handlers running at once. Each may hold a SQLite read or wait on Raft.
    pub max_in_flight: NonZeroUsize,
    /// Requests waiting for a handler slot; beyond them, 503 at once. (The queue's
    /// dispatcher holds one more request while it waits, so up to `max_queued + 1` wait.)
    pub max_queued: NonZeroUsize,
    /// Limit for one request from admission to response, queue time included.
    pub request_timeout: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

// Evaluated at compile time, so the unwraps cannot fail at run time.
const DEFAULT_IN_FLIGHT: NonZeroUsize = NonZeroUsize::new(512).unwrap();
const DEFAULT_QUEUED: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

impl Default for ApiLimits {
    /// 512 in flight, 1,024 queued, 30 s per request, 1 MiB bodies: far above what an
    /// edge cluster's operators send, far below what exhausts a small manager.
    fn default() -> Self {
        ApiLimits {
            max_in_flight: DEFAULT_IN_FLIGHT,
            max_queued: DEFAULT_QUEUED,
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
        }
    }
}

/// Wraps `router` in the API's backpressure. Routes merged into the result *after*
/// this call are outside the limits (meant for long-lived streams such as
/// `/v1/events`, which a request timeout would cut).
///
/// # Panics
/// Outside a tokio runtime: the admission queue spawns its dispatcher task.
pub fn apply(router: Router, limits: ApiLimits) -> Router {
    let timeout = limits.request_timeout;
    let max_body = limits.max_body_bytes;
    let stack = ServiceBuilder::new()
        .layer(axum::middleware::map_response(move |r: Response| json_errors(r, max_body)))
        .layer(HandleErrorLayer::new(move |e: BoxError| async move { admission_error(e, timeout) }))
        .timeout(timeout)
        .load_shed()
        .buffer(limits.max_queued.get())
        .concurrency_limit(limits.max_in_flight.get())
        .layer(tower_http::limit::RequestBodyLimitLayer::new(max_body))
        .service(router);
    Router::new().fallback_service(stack)
}

fn admission_error(e: BoxError, timeout: Duration) -> ApiError {
    if e.is::<tower::load_shed::error::Overloaded>() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the manager is at its request limit and its queue is full; retry after the Retry-After delay",
        )
    } else if e.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request did not finish within {timeout:?}; the manager may be overloaded or without quorum; \
                 retry later (a write may still be committed: use an Idempotency-Key)"
            ),
        )
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("request not admitted: {e}"))
    }
}

/// Rewrites a 4xx/5xx without a JSON body into the error shape, so no layer or
/// extractor can leak a plain-text or empty error past the API.
async fn json_errors(r: Response, max_body: usize) -> Response {
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let retry_after = r.headers().get(header::RETRY_AFTER).cloned();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("request body exceeds {max_body} bytes")
    } else {
        // Error bodies from layers and extractors are short; cap the read anyway.
        let text = axum::body::to_bytes(r.into_body(), 4096).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text).trim().to_string();
        if text.is_empty() {
            status.canonical_reason().unwrap_or("request failed").to_string()
        } else {
            text
        }
    };
    let mut out = ApiError::new(status, code, message).into_response();
    if let Some(v) = retry_after {
        out.headers_mut().insert(header::RETRY_AFTER, v);
    }
    out
}

/// The `dependencies` part of `/v1/health`: every breaker and bulkhead of the
/// process. Lives here because only `manager::api` knows the public JSON shapes.
pub fn dependencies_json(snapshot: &Snapshot) -> serde_json::Value {
    serde_json::json!({
        "breakers": snapshot.breakers.iter().map(|b| serde_json::json!({
            "name": b.name,
            "state": b.state.as_str(),
            "consecutive_failures": b.consecutive_failures,
            "retry_in_ms": (b.state == BreakerState::Open).then_some(b.retry_in.as_millis() as u64),
            "rejected_total": b.rejected_total,
        })).collect::<Vec<_>>(),
        "bulkheads": snapshot.bulkheads.iter().map(|b| serde_json::json!({
            "name": b.name,
            "in_use": b.in_use,
            "limit": b.limit,
            "waiting": b.waiting,
            "rejected_total": b.rejected_total,
        })).collect::<Vec<_>>(),
    })
}
