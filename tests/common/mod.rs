//! Helpers shared by the integration tests: free ports, real `holdfast` processes that
//! die with the test, and polling with a deadline (never sleeping to wait).
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The static `holdfast` binary cargo built for these tests.
pub fn holdfast_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_holdfast"))
}

/// A `holdfast` child process, killed (SIGKILL) when dropped.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `holdfast args...`, logging to `log`.
    pub fn spawn(args: &[&str], log: &Path, envs: &[(&str, &str)]) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(holdfast_bin());
        cmd.args(args).stdout(Stdio::from(out)).stderr(Stdio::from(err)).env("HOLDFAST_LOG", "info,openraft=warn");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Proc { child: cmd.spawn().expect("spawn holdfast"), log: log.to_path_buf() }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait up to `within` for a clean exit; returns the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The process log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP client with a per-request timeout.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

/// The admin API token a bootstrapping manager writes in its data dir, waiting up to
/// 30 s for it (it is written once the manager has elected itself).
pub async fn admin_token(data_dir: &Path) -> String {
    let path = data_dir.join("admin.token");
    eventually(Duration::from_secs(30), "admin.token in the data dir", || {
        let path = path.clone();
        async move { std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) }
    })
    .await
}

/// An HTTP client (10 s per request) that sends `token` as its bearer token.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("token is a header value");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder().timeout(Duration::from_secs(10)).default_headers(headers).build().expect("client")
}

/// The one way tests talk to the API: a client carrying the admin token of the
/// bootstrapping manager whose data dir is `data_dir`.
pub async fn api_client(data_dir: &Path) -> reqwest::Client {
    client_with_token(&admin_token(data_dir).await)
}

/// GET `url` as JSON with `client`, `None` on any failure.
pub async fn get_json(client: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    let resp = client.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// Fails loudly when Docker is missing: the e2e tests must never pass by skipping.
pub fn require_docker() {
    let ok = Command::new("docker").arg("info").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        matches!(ok, Ok(s) if s.success()),
        "these tests need a running Docker engine (CI={:?}); start dockerd",
        std::env::var("CI").ok()
    );
}

/// Container ids carrying label `key=value` (running or not), via the docker CLI so
/// the check does not share code with what it checks.
pub fn containers_with_label(key: &str, value: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter", &format!("label={key}={value}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// Removes every container of a test's node, so tests leave nothing behind.
pub struct NodeContainers(pub String);

impl Drop for NodeContainers {
    fn drop(&mut self) {
        for id in containers_with_label("holdfast.node", &self.0) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).stdout(Stdio::null()).status();
        }
    }
}

/// Every task, walking the pages of `GET {api}/v1/tasks` by their `next` cursor;
/// `None` on any failure.
pub async fn all_tasks(client: &reqwest::Client, api: &str) -> Option<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    let mut url = format!("{api}/v1/tasks?limit=2000");
    loop {
        let page = get_json(client, &url).await?;
        out.extend(page["tasks"].as_array()?.iter().cloned());
        match page["next"].as_str() {
            Some(next) => url = format!("{api}/v1/tasks?limit=2000&after={next}"),
            None => return Some(out),
        }
    }
}
/// The join token of `role` (`worker` | `manager`) that the first manager wrote in
/// its data dir, polled until it appears (the manager writes it as it starts).
pub fn join_token(data_dir: &Path, role: &str) -> String {
    let path = data_dir.join(format!("join-{role}.token"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(t) = std::fs::read_to_string(&path) {
            if !t.trim().is_empty() {
                return t.trim().to_string();
            }
        }
        assert!(Instant::now() < deadline, "no join token at {} after 20 s", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a CA-signed identity for `node` in `<dir>/tls`, as a token join would
/// (tests that talk to a fake manager instead of a real one).
pub fn write_identity(ca: &holdfast::net::pki::Ca, dir: &Path, node: &str, role: holdfast::net::pki::Role) {
    let (cert, key) = ca.issue(node, role, Duration::from_secs(3600)).expect("issue");
    let tls = dir.join("tls");
    holdfast::net::identity::write_private(&tls.join("ca.pem"), &ca.cert_pem).expect("ca.pem");
    holdfast::net::identity::write_private(&tls.join("node.pem"), &cert).expect("node.pem");
    holdfast::net::identity::write_private(&tls.join("node.key"), &key).expect("node.key");
}

/// Server TLS for a fake manager: a manager certificate of `ca`, asking clients for one.
pub fn fake_manager_tls(ca: &holdfast::net::pki::Ca) -> std::sync::Arc<rustls::ServerConfig> {
    use holdfast::net::tls;
    let (cert, key) =
        ca.issue("fake-manager", holdfast::net::pki::Role::Manager, Duration::from_secs(3600)).expect("issue");
    let resolver = tls::CertResolver::new(tls::certified_key(&cert, &key, &ca.cert_pem).expect("key"));
    let ca_der = ca.cert_der().expect("CA der");
    tls::server_config(&[ca_der], resolver, Duration::from_secs(60)).expect("server config")
}

/// Client and server TLS for in-process managers that serve their cluster router by
/// hand: one throwaway CA, one manager certificate shared by all of them.
pub fn manager_tls() -> (std::sync::Arc<rustls::ClientConfig>, std::sync::Arc<rustls::ServerConfig>) {
    use holdfast::net::{pki, tls};
    let ca = pki::Ca::generate().expect("CA");
    let (cert, key) = ca.issue("test-manager", pki::Role::Manager, Duration::from_secs(3600)).expect("issue");
    let resolver = tls::CertResolver::new(tls::certified_key(&cert, &key, &ca.cert_pem).expect("key"));
    let ca_der = ca.cert_der().expect("CA der");
    let client = tls::client_config(std::slice::from_ref(&ca_der), resolver.clone()).expect("client config");
    let server = tls::server_config(&[ca_der], resolver, Duration::from_secs(60)).expect("server config");
    (client, server)
}
