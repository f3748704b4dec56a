//! The echo task over real HTTP on loopback.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::eventually;
use holdfast::echo::{EchoConfig, MAX_BODY_BYTES};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest any condition in this file may take to come true.
const DEADLINE: Duration = Duration::from_secs(10);

/// A running echo server and the handles to stop and await it.
struct Running {
    /// Where it listens.
    addr: SocketAddr,
    /// Fire to request a graceful stop.
    stop: Option<oneshot::Sender<()>>,
    /// The server's result.
    done: JoinHandle<std::io::Result<i32>>,
}

impl Running {
    /// `http://addr/path`.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits for the server to end on its own; its exit code.
    async fn exit_code(self) -> i32 {
        let _keep_running_until_now = self.stop;
        tokio::time::timeout(DEADLINE, self.done)
            .await
            .expect("echo did not end in time")
            .expect("echo task panicked")
            .expect("echo failed")
    }
}

/// Config listening on an OS-picked loopback port, no knobs.
fn config() -> EchoConfig {
    EchoConfig {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        exit_after: None,
        exit_code: 0,
        crash_on: None,
        startup_delay: None,
        fail_health_after: None,
    }
}

async fn start(config: EchoConfig) -> Running {
    let bound = holdfast::echo::bind(config).await.expect("bind");
    let addr = bound.local_addr().expect("local addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    Running { addr, stop: Some(stop), done }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("http client")
}

#[tokio::test]
async fn post_echoes_body_and_content_type() {
    let server = start(config()).await;
    let http = client();
    let check = |body: &'static [u8], content_type: Option<&'static str>, expect_type: &str| {
        let http = http.clone();
        let url = server.url("/");
        let expect_type = expect_type.to_owned();
        async move {
            let mut request = http.post(url).body(body);
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            let response = request.send().await.expect("POST /");
            assert_eq!(response.status(), 200);
            assert_eq!(response.headers()["content-type"].to_str().expect("ascii"), expect_type);
            assert_eq!(response.bytes().await.expect("body"), body);
        }
    };
    check(b"hello", None, "application/octet-stream").await;
    check(b"{\"a\":1}", Some("application/json"), "application/json").await;
    check(b"", Some("text/plain"), "text/plain").await;
    check(&[0, 159, 146, 150, 255], None, "application/octet-stream").await;
}

#[tokio::test]
async fn routes_other_than_post_root_and_get_health_are_refused() {
    let server = start(config()).await;
    let http = client();
    let get_root = http.get(server.url("/")).send().await.expect("GET /");
    assert_eq!(get_root.status(), 405);
    let missing = http.post(server.url("/nope")).send().await.expect("POST /nope");
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn body_over_the_limit_gets_413() {
    let server = start(config()).await;
    let http = client();
    let at_limit = vec![b'x'; MAX_BODY_BYTES];
    let ok = http.post(server.url("/")).body(at_limit.clone()).send().await;
    let ok = ok.expect("POST at the limit");
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.bytes().await.expect("body").len(), MAX_BODY_BYTES);

    let over = vec![b'x'; MAX_BODY_BYTES + 1];
    let refused = http.post(server.url("/")).body(over).send().await;
    assert_eq!(refused.expect("POST over the limit").status(), 413);
}

#[tokio::test]
async fn health_turns_500_after_fail_health_after() {
    let server = start(EchoConfig { fail_health_after: Some(Duration::from_millis(300)), ..config() }).await;
    let http = client();
    let first = http.get(server.url("/health")).send().await.expect("health");
    assert_eq!(first.status(), 200);
    assert_eq!(first.text().await.expect("text"), "ok");
    eventually(DEADLINE, "health to turn 500", || async {
        let status = http.get(server.url("/health")).send().await.expect("health").status();
        assert!(status == 500 || status == 200, "health is either ok or failed: {status}");
        (status == 500).then_some(())
    })
    .await;
}

#[tokio::test]
async fn exit_after_returns_exit_code() {
    let started = Instant::now();
    let server = start(EchoConfig { exit_after: Some(Duration::from_millis(200)), exit_code: 3, ..config() }).await;
    let addr = server.addr;
    assert_eq!(server.exit_code().await, 3);
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed after exit");
}

#[tokio::test]
async fn shutdown_is_graceful_and_returns_zero() {
    let mut server = start(config()).await;
    let http = client();
    let ok = http.post(server.url("/")).body("before").send().await;
    assert_eq!(ok.expect("POST").status(), 200);
    if let Some(stop) = server.stop.take() {
        let _ = stop.send(());
    }
    assert_eq!(server.exit_code().await, 0);
}

#[tokio::test]
async fn crash_on_drops_the_request_and_returns_one() {
    let server = start(EchoConfig { crash_on: Some("boom".to_owned()), ..config() }).await;
    let http = client();
    let fine = http.post(server.url("/")).body("not boom").send().await;
    assert_eq!(fine.expect("POST").status(), 200);
    let crashed = http.post(server.url("/")).body("boom").send().await;
    let error = crashed.expect_err("a crash must not answer");
    assert!(!error.is_timeout(), "the connection is dropped, not left hanging: {error}");
    assert_eq!(server.exit_code().await, 1);
}

#[tokio::test]
async fn startup_delay_postpones_listening() {
    let delay = Duration::from_millis(300);
    let started = Instant::now();
    let server = start(EchoConfig { startup_delay: Some(delay), ..config() }).await;
    assert!(started.elapsed() >= delay, "bound before the delay passed");
    let ok = client().post(server.url("/")).body("late").send().await;
    assert_eq!(ok.expect("POST").status(), 200);
}

#[tokio::test]
async fn run_reports_bind_errors() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let result = holdfast::echo::run(EchoConfig { listen: addr, ..config() }, std::future::pending()).await;
    let error = result.expect_err("the port is taken");
    assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
}
