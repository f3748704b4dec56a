//! The public API's backpressure (`manager::api::limits::apply`) under overload, over
//! real TCP: only 2xx or JSON 503s come back, handlers in flight never exceed the
//! limit, bodies over the limit get a JSON 413, slow requests a JSON 503 `timeout`.

mod common;

use std::net::SocketAddr;

use common::eventually;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use holdfast::manager::api::limits::{apply, ApiLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counts handlers running now and the most ever seen at once.
#[derive(Default)]
struct Probe {
    now: AtomicUsize,
    max: AtomicUsize,
    gate: tokio::sync::Notify,
    open: std::sync::atomic::AtomicBool,
    slow_ms: AtomicUsize,
}

/// Decrements on drop, so a handler cancelled by the timeout still counts out.
struct InFlight<'a>(&'a Probe);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn slow(State(p): State<Arc<Probe>>) -> &'static str {
    let n = p.now.fetch_add(1, Ordering::SeqCst) + 1;
    p.max.fetch_max(n, Ordering::SeqCst);
    let _guard = InFlight(&p);
    // A deliberately slow handler: sleeping here is the workload, not a wait.
    tokio::time::sleep(Duration::from_millis(p.slow_ms.load(Ordering::SeqCst) as u64)).await;
    "done"
}

async fn gated(State(p): State<Arc<Probe>>) -> &'static str {
    let n = p.now.fetch_add(1, Ordering::SeqCst) + 1;
    p.max.fetch_max(n, Ordering::SeqCst);
    let _guard = InFlight(&p);
    while !p.open.load(Ordering::SeqCst) {
        let notified = p.gate.notified();
        if p.open.load(Ordering::SeqCst) {
            break;
        }
        notified.await;
    }
    "done"
}

async fn echo(body: Bytes) -> Bytes {
    body
}

async fn serve(limits: ApiLimits, slow_ms: usize) -> (SocketAddr, Arc<Probe>) {
    let probe = Arc::new(Probe::default());
    probe.slow_ms.store(slow_ms, Ordering::SeqCst);
    let router = Router::new()
        .route("/slow", get(slow))
        .route("/gated", get(gated))
        .route("/echo", post(echo))
        .with_state(probe.clone());
    let app = apply(router, limits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, probe)
}

fn limits(in_flight: usize, queued: usize, timeout: Duration, body: usize) -> ApiLimits {
    ApiLimits {
        max_in_flight: NonZeroUsize::new(in_flight).expect("nonzero"),
        max_queued: NonZeroUsize::new(queued).expect("nonzero"),
        request_timeout: timeout,
        max_body_bytes: body,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client")
}

/// Checks a response is the API's error shape with the given status and code.
async fn expect_error(resp: reqwest::Response, status: u16, code: &str) {
    assert_eq!(resp.status().as_u16(), status);
    if status == 503 {
        assert_eq!(
            resp.headers().get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1"),
            "503 without Retry-After"
        );
    }
    let ctype = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(ctype.starts_with("application/json"), "content-type {ctype:?}");
    let body: serde_json::Value = resp.json().await.expect("JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body["error"].get("field").is_some(), "{body}");
}

/// Waits (polling, never sleeping a fixed time) until `cond` holds.
async fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    eventually(within, what, || std::future::ready(cond().then_some(()))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_requests_get_2xx_or_json_503_and_never_exceed_the_limit() {
    const IN_FLIGHT: usize = 32;
    let (addr, probe) = serve(limits(IN_FLIGHT, 64, Duration::from_secs(30), 1 << 20), 100).await;
    let http = client();
    let url = format!("http://{addr}/slow");
    let calls: Vec<_> = (0..2_000)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { http.get(&url).send().await })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for c in calls {
        let resp = c.await.expect("task").expect("every request is answered");
        match resp.status().as_u16() {
            200 => {
                ok += 1;
                assert_eq!(resp.text().await.expect("body"), "done");
            }
            503 => {
                shed += 1;
                expect_error(resp, 503, "overloaded").await;
            }
            s => panic!("status {s} is neither 2xx nor 503"),
        }
    }
    let max = probe.max.load(Ordering::SeqCst);
    eprintln!("2000 concurrent: {ok} x 200, {shed} x 503, at most {max} handlers at once");
    assert!(max <= IN_FLIGHT, "{max} handlers ran at once; the limit is {IN_FLIGHT}");
    assert!(ok >= IN_FLIGHT, "only {ok} requests succeeded");
    assert!(shed > 0, "2,000 requests against 32 slots + 64 queued should shed some");
    assert_eq!(ok + shed, 2_000);
    // Still alive, and back to normal once the burst has drained.
    wait_until("handlers to drain", Duration::from_secs(10), || probe.now.load(Ordering::SeqCst) == 0).await;
    let resp = http.get(&url).send().await.expect("alive after the burst");
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_is_bounded_and_queued_requests_run_when_a_slot_frees() {
    // One slot, one queue place (+1 held by the dispatcher): of 1 + 4 requests,
    // 3 are served, 2 are shed at once.
    let (addr, probe) = serve(limits(1, 1, Duration::from_secs(30), 1 << 20), 0).await;
    let http = client();
    let url = format!("http://{addr}/gated");
    let first = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move { http.get(&url).send().await }
    });
    wait_until("the first request to hold the slot", Duration::from_secs(10), || probe.now.load(Ordering::SeqCst) == 1)
        .await;
    let done = Arc::new(AtomicUsize::new(0));
    let rest: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, done) = (http.clone(), url.clone(), done.clone());
            tokio::spawn(async move {
                let r = http.get(&url).send().await;
                done.fetch_add(1, Ordering::SeqCst);
                r
            })
        })
        .collect();
    wait_until("two requests to be shed", Duration::from_secs(10), || done.load(Ordering::SeqCst) >= 2).await;
    assert_eq!(probe.now.load(Ordering::SeqCst), 1, "queued requests must not run while the slot is taken");
    probe.open.store(true, Ordering::SeqCst);
    probe.gate.notify_waiters();
    assert_eq!(first.await.expect("task").expect("answered").status().as_u16(), 200);
    let mut statuses = Vec::new();
    for r in rest {
        let resp = r.await.expect("task").expect("answered");
        statuses.push(resp.status().as_u16());
        if resp.status().as_u16() == 503 {
            expect_error(resp, 503, "overloaded").await;
        }
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 503, 503]);
    assert_eq!(probe.max.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_request_over_the_time_limit_gets_a_json_503_timeout() {
    let (addr, probe) = serve(limits(8, 8, Duration::from_millis(200), 1 << 20), 10_000).await;
    let started = Instant::now();
    let resp = client().get(format!("http://{addr}/slow")).send().await.expect("answered");
    expect_error(resp, 503, "timeout").await;
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    // The cancelled handler gave its slot back.
    wait_until("the handler to be cancelled", Duration::from_secs(5), || probe.now.load(Ordering::SeqCst) == 0).await;
}

#[tokio::test]
async fn an_oversized_body_gets_a_json_413_whether_announced_or_chunked() {
    let (addr, _) = serve(limits(8, 8, Duration::from_secs(30), 1024), 0).await;
    let http = client();
    let url = format!("http://{addr}/echo");
    let small = http.post(&url).body(vec![b'a'; 1000]).send().await.expect("answered");
    assert_eq!(small.status().as_u16(), 200);
    let big = http.post(&url).body(vec![b'a'; 4096]).send().await.expect("answered");
    expect_error(big, 413, "too_large").await;

    // No Content-Length: the limit cuts the stream inside the handler's extractor.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let chunk = vec![b'a'; 4096];
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
        chunk.len()
    )
    .into_bytes();
    req.extend_from_slice(&chunk);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    tcp.write_all(&req).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw)).await.expect("in time").expect("read");
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(raw.to_ascii_lowercase().contains("content-type: application/json"), "{raw}");
    assert!(raw.contains(r#""code":"too_large""#), "{raw}");
}

#[tokio::test]
async fn plain_errors_from_the_router_are_rewritten_into_the_error_shape() {
    let (addr, _) = serve(limits(8, 8, Duration::from_secs(30), 1024), 0).await;
    let http = client();
    let resp = http.delete(format!("http://{addr}/echo")).send().await.expect("answered");
    expect_error(resp, 405, "method_not_allowed").await;
    let resp = http.get(format!("http://{addr}/nowhere")).send().await.expect("answered");
    expect_error(resp, 404, "not_found").await;
}
