//! Domain events leaving the manager: the `GET /v1/events` stream and the
//! `--event-sink` forwarder, on an in-process cluster (one real manager, one worker on
//! the in-memory runtime; placement is what matters here, not Docker).

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use holdfast::manager::sink::{SinkConfig, SinkTarget, SPOOL_DIR, SPOOL_FILE};
use serde_json::{json, Value};

/// A manager forwarding to `sink` (if any).
fn cluster(sink: Option<SinkConfig>) -> InProcessBuilder {
    InProcess::builder().lease(Duration::from_secs(10), Duration::from_secs(2)).manager(move |m| m.event_sink = sink)
}

/// Where the manager spools what its sink has not taken.
fn spool(c: &InProcess) -> PathBuf {
    c.data().join(SPOOL_DIR).join(SPOOL_FILE)
}

/// Submits a small task; returns its id and when the submission was sent.
async fn submit(c: &InProcess) -> (String, Instant) {
    let at = Instant::now();
    let spec = json!({"image": "holdfast/echo:latest", "resources": {"cpu_millis": 10, "memory_mb": 16}});
    (c.submit(&spec).await, at)
}

/// One received SSE event and when it arrived.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    event: String,
    id: String,
    data: Value,
}

/// Reads `GET /v1/events{query}` in the background into a shared list.
struct EventTail {
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A client without an overall timeout (streams stay open) carrying the admin token.
fn stream_client(c: &InProcess) -> reqwest::Client {
    let token = std::fs::read_to_string(c.data().join("admin.token")).expect("admin.token");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {}", token.trim()).parse().unwrap());
    reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).default_headers(headers).build().unwrap()
}

impl EventTail {
    async fn open(c: &InProcess, query: &str) -> EventTail {
        // No overall timeout: the stream is meant to stay open.
        let client = stream_client(c);
        let mut resp =
            tokio::time::timeout(Duration::from_secs(10), client.get(c.url(&format!("/v1/events{query}"))).send())
                .await
                .expect("stream answers in time")
                .expect("stream");
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = seen.clone();
        let task = tokio::spawn(async move {
            let mut buf = String::new();
            while let Ok(Some(chunk)) = resp.chunk().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    let field =
                        |name: &str| frame.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
                    // Keep-alive comments (`:`) carry no event.
                    let Some(event) = field("event:") else { continue };
                    let data = field("data:").and_then(|d| serde_json::from_str(&d).ok()).unwrap_or(Value::Null);
                    let id = field("id:").unwrap_or_default();
                    out.lock().unwrap().push(Seen { at: Instant::now(), event, id, data });
                }
            }
        });
        EventTail { seen, task }
    }

    fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The first event of `kind` whose `pick` field is `value`.
    async fn wait_for(&self, kind: &str, pick: fn(&Value) -> &Value, value: &str, within: Duration) -> Seen {
        eventually(within, &format!("{kind} for {value}"), || async {
            self.all().into_iter().find(|s| s.event == kind && pick(&s.data) == value)
        })
        .await
    }
}

impl Drop for EventTail {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn subject(v: &Value) -> &Value {
    &v["subject"]
}

fn task_of(v: &Value) -> &Value {
    &v["detail"]["task_id"]
}

fn key(v: &Value) -> (u64, String, String) {
    (
        v["index"].as_u64().unwrap_or(0),
        v["kind"].as_str().unwrap_or_default().to_string(),
        v["subject"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_shows_a_task_submitted_then_placed() {
    let mut c = cluster(None).start().await;
    let all = EventTail::open(&c, "").await;
    let placements = EventTail::open(&c, "?kind=placement.").await;
    c.add_worker("w1", |_| {}).await;
    let registered = all.wait_for("node.registered", subject, "w1", Duration::from_secs(10)).await;
    assert_eq!(registered.data["kind"], "node.registered");

    let mut latencies = Vec::new();
    for _ in 0..5 {
        let (id, sent) = submit(&c).await;
        let submitted = all.wait_for("task.submitted", subject, &id, Duration::from_secs(10)).await;
        let placed = all.wait_for("placement.created", task_of, &id, Duration::from_secs(10)).await;
        assert!(
            submitted.id.parse::<u64>().unwrap() < placed.id.parse::<u64>().unwrap(),
            "ids are Raft indexes: {submitted:?} before {placed:?}"
        );
        assert_eq!(placed.data["detail"]["node"], "w1");
        assert_eq!(placed.data["index"].to_string(), placed.id);
        latencies.push(placed.at - sent);
    }
    latencies.sort();
    println!("submit → placement.created on the stream, no sink: median {:?}, max {:?}", latencies[2], latencies[4]);

    // The filtered stream carries only what it asked for.
    eventually(Duration::from_secs(10), "filtered stream has the placements", || async {
        (placements.all().iter().filter(|s| s.event == "placement.created").count() >= 5).then_some(())
    })
    .await;
    assert!(placements.all().iter().all(|s| s.event.starts_with("placement.")), "{:?}", placements.all());

    // At most 64 streams at once (two are open above); the next is refused in the one
    // error shape, and a closed stream frees its slot.
    let client = stream_client(&c);
    let mut open = Vec::new();
    for _ in 0..62 {
        let r = client.get(c.url("/v1/events")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        open.push(r);
    }
    let r = client.get(c.url("/v1/events")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams");
    drop(open.pop());
    eventually(Duration::from_secs(10), "a slot freed by a closed stream", || async {
        let r = client.get(c.url("/v1/events")).send().await.ok()?;
        (r.status().as_u16() == 200).then_some(r)
    })
    .await;
    drop(open);

    // Only GET; errors keep the one shape even outside the API's limits layer.
    let r = c.client.post(c.url("/v1/events")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let long = "k".repeat(65);
    let r = c.client.get(c.url(&format!("/v1/events?kind={long}"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["field"], "kind");
}

/// A sink collector whose answers can be switched off (it then holds every request
/// open without answering, like a hung server).
#[derive(Clone, Default)]
struct Collector {
    answering: Arc<AtomicBool>,
    received: Arc<Mutex<Vec<Value>>>,
    requests: Arc<std::sync::atomic::AtomicU64>,
}

async fn collect(State(c): State<Collector>, Json(batch): Json<Vec<Value>>) -> &'static str {
    c.requests.fetch_add(1, Ordering::Relaxed);
    if !c.answering.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    c.received.lock().unwrap().extend(batch);
    "ok"
}

async fn start_collector(c: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/events", post(collect)).with_state(c);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/events")
}

fn fast_sink(target: SinkTarget) -> SinkConfig {
    let mut s = SinkConfig::new(target);
    s.delivery_timeout = Duration::from_millis(500);
    s.retry_every = Duration::from_millis(100);
    s.linger = Duration::from_millis(20);
    s.breaker.open_for = Duration::from_millis(500);
    s
}

fn spool_len(path: &std::path::Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sink_never_slows_placement_and_its_spool_replays_in_order() {
    let collector = Collector::default();
    let url = start_collector(collector.clone()).await;
    let mut c = cluster(Some(fast_sink(SinkTarget::Http(url)))).start().await;
    // The ground truth: every event the manager applied, from the stream.
    let truth = EventTail::open(&c, "").await;
    c.add_worker("w1", |_| {}).await;

    let mut latencies = Vec::new();
    let mut ids = Vec::new();
    for round in 0..10 {
        let (id, sent) = submit(&c).await;
        let placed = truth.wait_for("placement.created", task_of, &id, Duration::from_secs(10)).await;
        latencies.push(placed.at - sent);
        ids.push(id);
        if round == 4 {
            // Half-way: the spool must already hold what the hung sink did not take.
            eventually(Duration::from_secs(10), "spool written", || async { spool_len(&spool(&c)).filter(|n| *n > 0) })
                .await;
        }
    }
    latencies.sort();
    let (median, max) = (latencies[latencies.len() / 2], latencies[latencies.len() - 1]);
    println!("submit → placement.created with a hung sink: median {median:?}, max {max:?}");
    assert!(max < Duration::from_secs(2), "a hung sink slowed placement: {latencies:?}");
    assert!(collector.requests.load(Ordering::Relaxed) > 0, "the sink was tried");
    assert!(collector.received.lock().unwrap().is_empty(), "nothing was answered yet");

    // The spool grows as more events arrive, and the breaker shows in health.
    let before = spool_len(&spool(&c)).unwrap_or(0);
    let (id, _) = submit(&c).await;
    ids.push(id.clone());
    truth.wait_for("placement.created", task_of, &id, Duration::from_secs(10)).await;
    let grown =
        eventually(Duration::from_secs(10), "spool grows", || async { spool_len(&spool(&c)).filter(|n| *n > before) })
            .await;
    println!("spool: {before} → {grown} bytes while the sink hangs");
    // Three timed-out deliveries in a row open the breaker; health shows it.
    let health = eventually(Duration::from_secs(10), "event-sink breaker open in health", || async {
        let h = get_json(&c.client, &c.url("/v1/health")).await?;
        let b = h["dependencies"]["breakers"].as_array()?.iter().find(|b| b["name"] == "event-sink")?.clone();
        (b["state"] != "closed").then_some(h)
    })
    .await;
    assert_eq!(health["status"], "degraded", "{health}");

    // The sink answers again: the spool is replayed in order and removed.
    let flipped = Instant::now();
    collector.answering.store(true, Ordering::Relaxed);
    eventually(Duration::from_secs(15), "spool replayed and removed", || async { (!spool(&c).exists()).then_some(()) })
        .await;
    println!("spool of {grown} bytes replayed and removed {:?} after the sink answered", flipped.elapsed());

    // Every event the stream saw reached the sink, in the same order (a delivery that
    // timed out may have arrived twice: de-duplicate, as consumers do).
    let dedup = |events: Vec<Value>| {
        let mut seen = HashSet::new();
        events.into_iter().filter(|e| seen.insert(key(e))).map(|e| key(&e)).collect::<Vec<_>>()
    };
    let want = eventually(Duration::from_secs(15), "sink has every event", || async {
        let want = dedup(truth.all().into_iter().map(|s| s.data).collect());
        let got = dedup(collector.received.lock().unwrap().clone());
        (got.len() >= want.len()).then_some(want)
    })
    .await;
    let got = dedup(collector.received.lock().unwrap().clone());
    assert_eq!(got[..want.len()], want[..], "the sink saw the events in apply order");
    for id in &ids {
        assert!(got.iter().any(|(_, k, s)| k == "task.submitted" && s == id), "task.submitted {id} delivered");
    }
    let health = get_json(&c.client, &c.url("/v1/health")).await.expect("health");
    assert_eq!(health["status"], "healthy", "breaker closed again: {health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sink_appends_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let c = cluster(Some(fast_sink(SinkTarget::File(file.clone())))).workers(&["w1"]).start().await;
    let (id, _) = submit(&c).await;
    let lines = eventually(Duration::from_secs(10), "task events in the file", || async {
        let text = std::fs::read_to_string(&file).ok()?;
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect();
        let placed = lines.iter().any(|e| e["kind"] == "placement.created" && e["detail"]["task_id"] == json!(id));
        placed.then_some(lines)
    })
    .await;
    let kinds: Vec<&str> = lines.iter().filter_map(|e| e["kind"].as_str()).collect();
    let submitted = lines.iter().position(|e| e["kind"] == "task.submitted" && e["subject"] == json!(id));
    let placed = lines.iter().position(|e| e["kind"] == "placement.created" && e["detail"]["task_id"] == json!(id));
    assert!(submitted.is_some() && submitted < placed, "{kinds:?}");
    assert_eq!(kinds.first(), Some(&"node.registered"), "{kinds:?}");
    assert!(!spool(&c).exists(), "a healthy sink leaves no spool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_left_at_shutdown_is_replayed_by_the_next_start() {
    let collector = Collector::default();
    let url = start_collector(collector.clone()).await;
    let mut c = cluster(Some(fast_sink(SinkTarget::Http(url)))).workers(&["w1"]).start().await;
    let (id, _) = submit(&c).await;
    let spooled = |id: String, path: PathBuf| async move {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().any(|l| l.contains("task.submitted") && l.contains(&id)).then_some(())
    };
    eventually(Duration::from_secs(10), "the hung sink's events spooled", || spooled(id.clone(), spool(&c))).await;
    // A second task whose events may still be queued in memory when the stop comes.
    let (late, _) = submit(&c).await;
    c.stop_manager().await;
    assert!(spool(&c).exists(), "the spool outlives the process");
    assert!(spooled(late.clone(), spool(&c)).await.is_some(), "queued events were spooled at shutdown");

    collector.answering.store(true, Ordering::Relaxed);
    c.start_manager().await;
    eventually(Duration::from_secs(15), "spool replayed after the restart", || async {
        (!spool(&c).exists()).then_some(())
    })
    .await;
    let got = collector.received.lock().unwrap().clone();
    for task in [&id, &late] {
        assert!(
            got.iter().any(|e| e["kind"] == "task.submitted" && e["subject"] == json!(task)),
            "task.submitted {task} delivered after the restart: {got:?}"
        );
    }
    let indexes: Vec<u64> = got.iter().filter_map(|e| e["index"].as_u64()).collect();
    assert!(indexes.windows(2).all(|w| w[0] <= w[1]), "in order: {indexes:?}");
}
