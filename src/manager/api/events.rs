//! `GET /v1/events`: the domain events this manager applies, as server-sent events.
//!
//! One SSE event per [`DomainEvent`]: `event: <kind>`, `id: <raft index>`,
//! `data: <json>` (the shape of [`event_json`], shared with the event sink). A subscriber
//! that falls more than [`EVENT_BUFFER`](crate::manager::state::EVENT_BUFFER) events
//! behind is told so with `event: lagged` (`data: {"missed":N}`) and carries on from the
//! oldest event still buffered: memory per stream stays bounded, nothing waits on a
//! slow reader (the apply path only does a non-blocking broadcast send).
//!
//! Streams are long-lived, so this router is mounted *outside* the request timeout of
//! [`limits::apply`](super::limits::apply) (see `node.rs`); it has its own cap on
//! concurrent streams instead, answered with a 503 in the one error shape when full.
//! Every stream ends when the process shuts down, so a client cannot hold up a drain.

use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::manager::state::DomainEvent;
use crate::manager::Manager;

/// Path of the stream.
pub const PATH: &str = "/v1/events";

/// Longest `kind` filter accepted; every kind is far shorter.
const MAX_KIND_FILTER: usize = 64;

/// Limits of the event stream endpoint.
#[derive(Clone, Debug)]
pub struct EventStreamConfig {
    /// Streams open at once; each holds a connection and a broadcast receiver.
    pub max_streams: NonZeroUsize,
    /// Interval of keep-alive comments, so proxies do not cut an idle stream and a
    /// vanished client is noticed by the failed write.
    pub keep_alive: Duration,
}

// Evaluated at compile time, so the unwrap cannot fail at run time.
const DEFAULT_STREAMS: NonZeroUsize = NonZeroUsize::new(64).unwrap();

impl Default for EventStreamConfig {
    /// 64 streams (a UI tab or a tail each; far below the API's 512 in flight) and a
    /// keep-alive every 15 s.
    fn default() -> Self {
        EventStreamConfig { max_streams: DEFAULT_STREAMS, keep_alive: Duration::from_secs(15) }
    }
}

struct Streams {
    manager: Arc<Manager>,
    permits: Arc<Semaphore>,
    limit: usize,
    keep_alive: Duration,
    shutdown: broadcast::Sender<()>,
}

/// The `/v1/events` route. Merge it into the API *after* `limits::apply`; `shutdown`
/// is the process's stop signal, which ends every open stream.
pub fn router(manager: Arc<Manager>, config: EventStreamConfig, shutdown: broadcast::Sender<()>) -> Router {
    let state = Arc::new(Streams {
        manager,
        permits: Arc::new(Semaphore::new(config.max_streams.get())),
        limit: config.max_streams.get(),
        keep_alive: config.keep_alive,
        shutdown,
    });
    Router::new().route(PATH, get(stream).fallback(method_not_allowed)).with_state(state)
}

/// The JSON of one event, as the stream and the event sink send it.
pub fn event_json(e: &DomainEvent) -> serde_json::Value {
    serde_json::json!({
        "index": e.index,
        "at_ms": e.at_ms,
        "kind": e.kind.as_str(),
        "subject": e.subject,
        "detail": e.detail,
    })
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{PATH} only answers GET"))
}

#[derive(Deserialize)]
struct StreamQuery {
    /// Only kinds starting with this (`task.`, `placement.created`).
    kind: Option<String>,
}

/// What one open stream owns; dropping it (client gone) frees its slot.
struct Open {
    events: broadcast::Receiver<DomainEvent>,
    stop: broadcast::Receiver<()>,
    prefix: String,
    _slot: OwnedSemaphorePermit,
}

async fn stream(
    State(s): State<Arc<Streams>>,
    q: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    // Outside `limits::apply`, so no layer rewrites a plain-text rejection: do it here.
    let Query(q) = q.map_err(|e| ApiError::new(e.status(), "invalid", e.body_text()).field("kind"))?;
    let prefix = q.kind.unwrap_or_default();
    if prefix.len() > MAX_KIND_FILTER {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("kind filter is {} bytes; at most {MAX_KIND_FILTER}", prefix.len()),
        )
        .field("kind"));
    }
    let slot = s.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("{} event streams are open, the limit; close one or retry after the Retry-After delay", s.limit),
        )
    })?;
    let open = Open { events: s.manager.events.subscribe(), stop: s.shutdown.subscribe(), prefix, _slot: slot };
    Ok(Sse::new(events(open)).keep_alive(KeepAlive::new().interval(s.keep_alive)).into_response())
}

fn events(open: Open) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(open, |mut open| async move {
        loop {
            let next = tokio::select! {
                _ = open.stop.recv() => return None,
                r = open.events.recv() => r,
            };
            match next {
                Ok(e) if e.kind.as_str().starts_with(&open.prefix) => return Some((Ok(sse_event(&e)), open)),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event stream subscriber lagged; told it and carrying on");
                    let data = serde_json::json!({ "missed": missed }).to_string();
                    return Some((Ok(Event::default().event("lagged").data(data)), open));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

fn sse_event(e: &DomainEvent) -> Event {
    Event::default().event(e.kind.as_str()).id(e.index.to_string()).data(event_json(e).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::state::EventKind;

    fn event(index: u64, kind: EventKind) -> DomainEvent {
        DomainEvent { index, at_ms: 1, kind, subject: format!("s{index}"), detail: serde_json::Value::Null }
    }

    fn open(events: broadcast::Receiver<DomainEvent>, stop: broadcast::Receiver<()>, prefix: &str) -> Open {
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().expect("slot");
        Open { events, stop, prefix: prefix.into(), _slot: slot }
    }

    /// (event, id, data) of each SSE frame.
    async fn frames(open: Open) -> Vec<(String, String, serde_json::Value)> {
        let body = Sse::new(events(open)).into_response().into_body();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
        let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
        text.split("\n\n")
            .filter(|f| !f.trim().is_empty())
            .map(|f| {
                let field = |name: &str| {
                    f.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string())).unwrap_or_default()
                };
                let data = serde_json::from_str(&field("data:")).expect("json data");
                (field("event:"), field("id:"), data)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_lagging_stream_is_told_how_many_it_missed_and_carries_on_filtered() {
        let (tx, rx) = broadcast::channel(4);
        let (_stop_tx, stop) = broadcast::channel(1);
        for i in 1..=10 {
            let _ = tx.send(event(i, if i % 2 == 0 { EventKind::TaskSubmitted } else { EventKind::NodeStatus }));
        }
        drop(tx);
        let got = frames(open(rx, stop, "task.")).await;
        let summary: Vec<(&str, &str)> = got.iter().map(|(e, id, _)| (e.as_str(), id.as_str())).collect();
        assert_eq!(summary, [("lagged", ""), ("task.submitted", "8"), ("task.submitted", "10")]);
        assert_eq!(got[0].2, serde_json::json!({ "missed": 6 }));
        assert_eq!(got[1].2["subject"], "s8");
        assert_eq!(got[1].2["kind"], "task.submitted");
    }

    #[tokio::test]
    async fn a_stream_ends_when_the_process_stops() {
        let (tx, rx) = broadcast::channel(4);
        let (stop_tx, stop) = broadcast::channel(1);
        let _ = tx.send(event(1, EventKind::TaskSubmitted));
        let _ = stop_tx.send(());
        // The sender lives on: only the stop signal can end the body.
        let got = tokio::time::timeout(Duration::from_secs(5), frames(open(rx, stop, ""))).await.expect("ended");
        assert!(got.len() <= 1, "{got:?}");
        drop(tx);
    }
}
