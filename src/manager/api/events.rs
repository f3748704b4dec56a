//! `GET /v1/events`: the domain events this manager applies, as server-sent events.
//!
//! One SSE event per [`DomainEvent`]: `event: <kind>`, `id: <raft index>`,
//! `data: <json>` (the shape of [`event_json`], shared with the event sink).
//!
//! One recorder task per manager copies the applied events into an [`EventRing`] of the
//! newest [`EventStreamConfig::history`] events; every stream reads the ring from its
//! own position. A stream that falls more than the ring behind is told so with
//! `event: lagged` (`data: {"missed":N}`) and carries on from the oldest event kept:
//! memory stays bounded, nothing waits on a slow reader (the apply path only does a
//! non-blocking broadcast send to the recorder).
//!
//! **Resume.** A client that reconnects with `Last-Event-ID: N` first gets every kept
//! event of entry N and later (delivery is at least once: the events of entry N it has
//! already seen come again), then the live ones. When the ring no longer reaches back to
//! N (the manager restarted, or more than the ring has happened since), the stream
//! starts with `event: too_old` (`data: {"last_event_id":N,"oldest":M,...}`) and then
//! carries on live: the client must re-list (`GET /v1/tasks`, `/v1/nodes`) to catch up.
//!
//! Streams are long-lived, so this router is mounted *outside* the request timeout of
//! [`limits::apply`](super::limits::apply) (see `node.rs`); it has its own cap on
//! concurrent streams instead, answered with a 503 in the one error shape when full.
//! Every stream ends when the process shuts down, so a client cannot hold up a drain.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};

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
    /// Streams open at once; each holds a connection and a position in the ring.
    pub max_streams: NonZeroUsize,
    /// Interval of keep-alive comments, so proxies do not cut an idle stream and a
    /// vanished client is noticed by the failed write.
    pub keep_alive: Duration,
    /// Newest events kept, for streams to read and for `Last-Event-ID` to resume from.
    pub history: NonZeroUsize,
}

// Evaluated at compile time, so the unwrap cannot fail at run time.
const DEFAULT_STREAMS: NonZeroUsize = NonZeroUsize::new(64).unwrap();
const DEFAULT_HISTORY: NonZeroUsize = NonZeroUsize::new(crate::manager::state::EVENT_BUFFER).unwrap();

impl Default for EventStreamConfig {
    /// 64 streams (a UI tab or a tail each; far below the API's 512 in flight), a
    /// keep-alive every 15 s, and the newest 4,096 events kept (about 1 MiB).
    fn default() -> Self {
        EventStreamConfig {
            max_streams: DEFAULT_STREAMS,
            keep_alive: Duration::from_secs(15),
            history: DEFAULT_HISTORY,
        }
    }
}

/// One slot of the ring: an event, or the mark of events the recorder itself missed.
#[derive(Clone, Debug)]
enum Item {
    Event(DomainEvent),
    Lagged(u64),
}

#[derive(Debug)]
struct RingInner {
    /// `(sequence, item)`, oldest first; sequences are consecutive.
    items: VecDeque<(u64, Item)>,
    /// Sequence the next item gets.
    next_seq: u64,
    /// Every event of an entry above this index is kept, or was kept and read out in
    /// order; resuming from an id at or below it cannot be complete.
    covered_after: u64,
    capacity: usize,
}

/// The newest events this manager applied, in order, each with a sequence number local
/// to this process. Bounded: the oldest go first.
#[derive(Debug)]
pub struct EventRing {
    inner: Mutex<RingInner>,
    /// The next sequence, so streams wake when something is pushed.
    pushed: watch::Sender<u64>,
}

/// Where a stream starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// At this sequence: the first kept event of the requested entry or later.
    From(u64),
    /// The ring no longer reaches back to the requested entry; live from this sequence.
    TooOld {
        /// Sequence of the next event.
        live: u64,
        /// Oldest entry index that can still be resumed from.
        oldest: u64,
    },
}

impl EventRing {
    /// An empty ring of `capacity` items; events of entries up to `covered_after`
    /// (what was applied before recording began) count as gone.
    pub fn new(capacity: NonZeroUsize, covered_after: u64) -> Self {
        let inner = RingInner { items: VecDeque::new(), next_seq: 0, covered_after, capacity: capacity.get() };
        EventRing { inner: Mutex::new(inner), pushed: watch::channel(0).0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RingInner> {
        // A panic while holding the lock leaves consistent data (each push is whole).
        crate::lock(&self.inner)
    }

    fn push_item(&self, item: Item) {
        let mut r = self.lock();
        if r.items.len() == r.capacity {
            if let Some((_, Item::Event(old))) = r.items.pop_front() {
                r.covered_after = r.covered_after.max(old.index);
            }
        }
        let seq = r.next_seq;
        r.items.push_back((seq, item));
        r.next_seq += 1;
        let next = r.next_seq;
        drop(r);
        self.pushed.send_replace(next);
    }

    /// Records one applied event.
    pub fn push(&self, e: DomainEvent) {
        self.push_item(Item::Event(e));
    }

    /// Records that the recorder missed `missed` events, the next of which is of entry
    /// `next_index`: nothing up to that entry can be resumed from any more.
    pub fn push_gap(&self, missed: u64, next_index: u64) {
        {
            let mut r = self.lock();
            r.covered_after = r.covered_after.max(next_index);
        }
        self.push_item(Item::Lagged(missed));
    }

    /// Where a stream with `Last-Event-ID: last` (or none: live) starts.
    pub fn resume(&self, last: Option<u64>) -> Resume {
        let r = self.lock();
        let Some(last) = last else { return Resume::From(r.next_seq) };
        if last <= r.covered_after {
            return Resume::TooOld { live: r.next_seq, oldest: r.covered_after + 1 };
        }
        let seq = r
            .items
            .iter()
            .find(|(_, i)| matches!(i, Item::Event(e) if e.index >= last))
            .map_or(r.next_seq, |(s, _)| *s);
        Resume::From(seq)
    }

    /// Items from sequence `from` on (at most `max`), or how many were dropped before
    /// the oldest kept one when `from` is already gone.
    fn read(&self, from: u64, max: usize) -> Result<Vec<(u64, Item)>, (u64, u64)> {
        let r = self.lock();
        let first = r.items.front().map_or(r.next_seq, |(s, _)| *s);
        if from < first {
            return Err((first - from, first));
        }
        let skip = (from - first) as usize;
        Ok(r.items.iter().skip(skip).take(max).cloned().collect())
    }
}

/// Copies the manager's applied events into `ring` until `stop` fires.
pub fn record(ring: Arc<EventRing>, mut events: broadcast::Receiver<DomainEvent>, mut stop: broadcast::Receiver<()>) {
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                _ = stop.recv() => return,
                r = events.recv() => r,
            };
            match next {
                Ok(e) => ring.push(e),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "event recorder lagged; resuming from before this point is refused");
                    // The next event names the entry the gap ends at.
                    match events.recv().await {
                        Ok(e) => {
                            ring.push_gap(missed, e.index);
                            ring.push(e);
                        }
                        Err(_) => return,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

struct Streams {
    ring: Arc<EventRing>,
    permits: Arc<Semaphore>,
    limit: usize,
    keep_alive: Duration,
    shutdown: broadcast::Sender<()>,
}

/// The `/v1/events` route. Merge it into the API *after* `limits::apply`; `shutdown`
/// is the process's stop signal, which ends every open stream and the recorder. Call
/// it inside the runtime: it starts the recorder.
pub fn router(manager: Arc<Manager>, config: EventStreamConfig, shutdown: broadcast::Sender<()>) -> Router {
    // Subscribe before reading the applied index, so no event falls between the two.
    let events = manager.events.subscribe();
    let applied = manager.db.status().last_applied.unwrap_or(0);
    let ring = Arc::new(EventRing::new(config.history, applied));
    record(ring.clone(), events, shutdown.subscribe());
    let state = Arc::new(Streams {
        ring,
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
    ring: Arc<EventRing>,
    pushed: watch::Receiver<u64>,
    /// Sequence of the next item to read.
    seq: u64,
    /// Frames ready to send.
    pending: VecDeque<Event>,
    stop: broadcast::Receiver<()>,
    prefix: String,
    _slot: OwnedSemaphorePermit,
}

/// `Last-Event-ID`, if any: a Raft index.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else { return Ok(None) };
    let text = v.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<u64>().map(Some).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("Last-Event-ID must be the id of an event of this stream (a Raft index), got {text:?}"),
        )
        .field("Last-Event-ID")
    })
}

async fn stream(
    State(s): State<Arc<Streams>>,
    headers: HeaderMap,
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
    let last = last_event_id(&headers)?;
    let slot = s.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("{} event streams are open, the limit; close one or retry after the Retry-After delay", s.limit),
        )
    })?;
    let open = open(s.ring.clone(), last, s.shutdown.subscribe(), prefix, slot);
    Ok(Sse::new(events(open)).keep_alive(KeepAlive::new().interval(s.keep_alive)).into_response())
}

fn open(
    ring: Arc<EventRing>,
    last: Option<u64>,
    stop: broadcast::Receiver<()>,
    prefix: String,
    slot: OwnedSemaphorePermit,
) -> Open {
    let pushed = ring.pushed.subscribe();
    let mut pending = VecDeque::new();
    let seq = match ring.resume(last) {
        Resume::From(seq) => seq,
        Resume::TooOld { live, oldest } => {
            let data = serde_json::json!({
                "last_event_id": last,
                "oldest": oldest,
                "message": "this manager no longer holds the events after that id; \
                            re-list (GET /v1/tasks, /v1/nodes) and carry on from the events that follow",
            });
            pending.push_back(Event::default().event("too_old").data(data.to_string()));
            live
        }
    };
    Open { ring, pushed, seq, pending, stop, prefix, _slot: slot }
}

/// Items read from the ring per wake-up.
const READ_BATCH: usize = 256;

fn events(open: Open) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(open, |mut open| async move {
        loop {
            if let Some(frame) = open.pending.pop_front() {
                return Some((Ok(frame), open));
            }
            match open.ring.read(open.seq, READ_BATCH) {
                Err((missed, first)) => {
                    tracing::warn!(missed, "event stream subscriber lagged; told it and carrying on");
                    let data = serde_json::json!({ "missed": missed }).to_string();
                    open.seq = first;
                    return Some((Ok(Event::default().event("lagged").data(data)), open));
                }
                Ok(items) if !items.is_empty() => {
                    for (seq, item) in items {
                        open.seq = seq + 1;
                        match item {
                            Item::Event(e) if e.kind.as_str().starts_with(&open.prefix) => {
                                open.pending.push_back(sse_event(&e))
                            }
                            Item::Event(_) => {}
                            Item::Lagged(missed) => {
                                let data = serde_json::json!({ "missed": missed }).to_string();
                                open.pending.push_back(Event::default().event("lagged").data(data));
                            }
                        }
                    }
                }
                Ok(_) => {
                    // Nothing new: wait for a push or the stop signal.
                    let seq = open.seq;
                    tokio::select! {
                        _ = open.stop.recv() => return None,
                        r = open.pushed.wait_for(|next| *next > seq) => {
                            if r.is_err() {
                                return None;
                            }
                        }
                    }
                }
            }
        }
    })
}

fn sse_event(e: &DomainEvent) -> Event {
    Event::default().event(e.kind.as_str()).id(e.index.to_string()).data(event_json(e).to_string())
}

#[cfg(test)]
mod tests {
    use futures::{FutureExt, StreamExt};

    use super::*;
    use crate::manager::state::EventKind;

    fn event(index: u64, kind: &str) -> DomainEvent {
        let kind: EventKind = serde_json::from_value(serde_json::json!(kind)).expect("an event kind");
        DomainEvent { index, at_ms: 1, kind, subject: format!("s{index}"), detail: serde_json::Value::Null }
    }

    fn ring(capacity: usize, covered_after: u64) -> Arc<EventRing> {
        Arc::new(EventRing::new(NonZeroUsize::new(capacity).unwrap(), covered_after))
    }

    fn slot() -> OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1)).try_acquire_owned().expect("slot")
    }

    /// (event, id, data) of the first `n` SSE frames of a stream.
    async fn frames(o: Open, n: usize) -> Vec<(String, String, serde_json::Value)> {
        let body = Sse::new(events(o).take(n)).into_response().into_body();
        let bytes = tokio::time::timeout(Duration::from_secs(5), axum::body::to_bytes(body, 1 << 20))
            .await
            .expect("frames in time")
            .expect("body");
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

    fn opened(r: &Arc<EventRing>, last: Option<u64>, prefix: &str) -> Open {
        // The sender is dropped: `recv` on the stop receiver then fails at once, so
        // keep one alive in a leaked channel for streams meant to wait.
        let (stop_tx, stop) = broadcast::channel(1);
        std::mem::forget(stop_tx);
        open(r.clone(), last, stop, prefix.into(), slot())
    }

    /// Whether the stream has nothing to send right now (it waits for a push).
    fn waits(o: Open) -> bool {
        let mut s = Box::pin(events(o));
        s.next().now_or_never().is_none()
    }

    fn summary(got: &[(String, String, serde_json::Value)]) -> Vec<(&str, &str)> {
        got.iter().map(|(e, id, _)| (e.as_str(), id.as_str())).collect()
    }

    #[tokio::test]
    async fn a_lagging_stream_is_told_how_many_it_missed_and_carries_on_filtered() {
        let r = ring(4, 0);
        // Opened (live) before the events: then ten arrive while it does not read.
        let o = opened(&r, None, "task.");
        for i in 1..=10 {
            r.push(event(i, if i % 2 == 0 { "task.submitted" } else { "node.status" }));
        }
        let got = frames(o, 3).await;
        assert_eq!(summary(&got), [("lagged", ""), ("task.submitted", "8"), ("task.submitted", "10")]);
        assert_eq!(got[0].2, serde_json::json!({ "missed": 6 }));
        assert_eq!(got[1].2["subject"], "s8");
    }

    #[tokio::test]
    async fn a_stream_resumes_after_its_last_event_id_with_that_entry_again() {
        let r = ring(16, 2);
        for (i, kind) in
            [(3, "task.submitted"), (4, "placement.created"), (4, "placement.created"), (5, "task.stopped")]
        {
            r.push(event(i, kind));
        }
        let got = frames(opened(&r, Some(4), ""), 3).await;
        assert_eq!(summary(&got), [("placement.created", "4"), ("placement.created", "4"), ("task.stopped", "5")]);
        // Filtered replay.
        let got = frames(opened(&r, Some(3), "task."), 2).await;
        assert_eq!(summary(&got), [("task.submitted", "3"), ("task.stopped", "5")]);
        // An id newer than anything kept, or none: nothing replayed, live from here.
        assert!(waits(opened(&r, Some(9), "")));
        assert!(waits(opened(&r, None, "")));
        let o = opened(&r, Some(5), "");
        r.push(event(6, "task.submitted"));
        assert_eq!(summary(&frames(o, 2).await), [("task.stopped", "5"), ("task.submitted", "6")]);
    }

    #[tokio::test]
    async fn an_id_the_ring_no_longer_reaches_is_answered_too_old_then_live() {
        // Recording began after entry 2 was applied: entries up to 2 are gone.
        let r = ring(3, 2);
        assert_eq!(r.resume(Some(2)), Resume::TooOld { live: 0, oldest: 3 });
        for i in 3..=6 {
            r.push(event(i, "task.submitted"));
        }
        // Entry 3 was pushed out of the ring of three.
        assert_eq!(r.resume(Some(3)), Resume::TooOld { live: 4, oldest: 4 });
        assert_eq!(r.resume(Some(4)), Resume::From(1));
        let o = opened(&r, Some(3), "");
        r.push(event(7, "task.stopped"));
        let got = frames(o, 2).await;
        assert_eq!(summary(&got), [("too_old", ""), ("task.stopped", "7")]);
        assert_eq!(got[0].2["last_event_id"], 3);
        assert_eq!(got[0].2["oldest"], 4);
        // A gap in the recorder itself also ends what can be resumed.
        r.push_gap(5, 12);
        assert!(matches!(r.resume(Some(12)), Resume::TooOld { oldest: 13, .. }));
    }

    #[test]
    fn a_bad_last_event_id_names_itself() {
        let mut h = HeaderMap::new();
        assert_eq!(last_event_id(&h).unwrap(), None);
        h.insert("last-event-id", "17".parse().unwrap());
        assert_eq!(last_event_id(&h).unwrap(), Some(17));
        h.insert("last-event-id", "x17".parse().unwrap());
        assert_eq!(last_event_id(&h).unwrap_err().field.as_deref(), Some("Last-Event-ID"));
    }

    #[tokio::test]
    async fn a_stream_ends_when_the_process_stops() {
        let r = ring(4, 0);
        let (stop_tx, stop) = broadcast::channel(1);
        let o = open(r.clone(), None, stop, String::new(), slot());
        let _ = stop_tx.send(());
        let body = Sse::new(events(o)).into_response().into_body();
        // The ring lives on: only the stop signal can end the body.
        let got =
            tokio::time::timeout(Duration::from_secs(5), axum::body::to_bytes(body, 1 << 20)).await.expect("ended");
        assert!(got.is_ok());
        drop(r);
    }
}
