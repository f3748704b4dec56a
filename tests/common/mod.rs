//! Helpers shared by the integration tests: free ports, real `holdfast` processes that
//! die with the test, and polling with a deadline (never sleeping to wait).
#![allow(dead_code)]

mod docker;
mod inprocess;

#[allow(unused_imports)]
pub use docker::*;
#[allow(unused_imports)]
pub use inprocess::*;

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
        poll_blocking(within, || self.child.try_wait().ok().flatten()).ok()
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

/// What a poll of [`eventually`] returns: a value when done, else why not yet (if it
/// can say). `Option` says nothing; `Result<_, String>` names the last reason.
pub trait Polled {
    /// The value waited for.
    type Out;
    /// `Ok` when done; otherwise the reason (if any) for the failure message.
    fn done(self) -> Result<Self::Out, Option<String>>;
}

impl<T> Polled for Option<T> {
    type Out = T;
    fn done(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T> Polled for Result<T, String> {
    type Out = T;
    fn done(self) -> Result<T, Option<String>> {
        self.map_err(Some)
    }
}

/// How often [`eventually`] polls.
const POLL_EVERY: Duration = Duration::from_millis(50);

fn timed_out(within: Duration, what: &str, last: Option<String>) -> ! {
    match last {
        Some(last) => panic!("timed out after {within:?} waiting for {what}; last: {last}"),
        None => panic!("timed out after {within:?} waiting for {what}"),
    }
}

/// The one way tests wait: polls `f` until it is done (`Some`/`Ok`), or panics with
/// `what` (and the last reason `f` gave) after `within`. Never a sleep to wait.
pub async fn eventually<P, F, Fut>(within: Duration, what: &str, mut f: F) -> P::Out
where
    P: Polled,
    F: FnMut() -> Fut,
    Fut: Future<Output = P>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = match f().await.done() {
            Ok(v) => return v,
            Err(last) => last,
        };
        if Instant::now() > deadline {
            timed_out(within, what, last);
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`eventually`] for code outside a runtime (drop guards, plain `#[test]`s): polls
/// `f` on this thread.
pub fn eventually_blocking<P: Polled>(within: Duration, what: &str, f: impl FnMut() -> P) -> P::Out {
    poll_blocking(within, f).unwrap_or_else(|last| timed_out(within, what, last))
}

/// Polls `f` on this thread until it is done or `within` passes; on timeout, the last
/// reason it gave. For the callers that handle a timeout themselves.
pub fn poll_blocking<P: Polled>(within: Duration, mut f: impl FnMut() -> P) -> Result<P::Out, Option<String>> {
    let deadline = Instant::now() + within;
    loop {
        let last = match f().done() {
            Ok(v) => return Ok(v),
            Err(last) => last,
        };
        if Instant::now() > deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(20));
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
    eventually_blocking(Duration::from_secs(20), &format!("a join token at {}", path.display()), || {
        std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
    })
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

/// One `holdfast agent` of a test cluster on loopback, run as users run it: its name,
/// ports and data dir, and while it runs its process (SIGKILLed when dropped). The
/// first manager bootstraps (writing `admin.token` and the join tokens in its data
/// dir); other managers and workers join the cluster port, mutual TLS, with a token.
pub struct Node {
    /// `--node-id`.
    pub name: String,
    /// The API address, `host:port`.
    pub api: String,
    /// The cluster port address, `host:port`.
    pub cluster: String,
    /// `--data-dir`.
    pub data: PathBuf,
    /// Where its log file (`<name>.log`) goes.
    pub root: PathBuf,
    /// The process, while it runs.
    pub proc: Option<Proc>,
}

impl Node {
    /// A node named `name` with fresh loopback ports and its data in `root/name`.
    pub fn new(root: &Path, name: &str) -> Node {
        Node {
            name: name.into(),
            api: format!("127.0.0.1:{}", free_port()),
            cluster: format!("127.0.0.1:{}", free_port()),
            data: root.join(name),
            root: root.to_path_buf(),
            proc: None,
        }
    }

    /// The same node with its data dir at `data` instead.
    pub fn with_data(mut self, data: PathBuf) -> Node {
        self.data = data;
        self
    }

    /// Starts `holdfast agent --manager` with its ports and data dir, plus `extra`.
    pub fn manager(&mut self, extra: &[&str]) {
        self.agent("--manager", &["--api", &self.api.clone(), "--cluster", &self.cluster.clone()], extra);
    }

    /// Starts the first manager of a new cluster (`--bootstrap`), plus `extra`.
    pub fn bootstrap(&mut self, extra: &[&str]) {
        self.manager(&[&["--bootstrap"][..], extra].concat());
    }

    /// Starts a manager that joins `seed`'s cluster with its manager join token.
    pub fn join_manager(&mut self, seed: &Node, extra: &[&str]) {
        let token = join_token(&seed.data, "manager");
        self.manager(&[&["--join", &seed.cluster, "--token", &token][..], extra].concat());
    }

    /// Starts `holdfast agent --worker` joining `join` (one or more cluster addresses,
    /// comma-separated) with the worker join token found in `token_dir`, plus `extra`.
    pub fn worker(&mut self, join: &str, token_dir: &Path, extra: &[&str]) {
        let token = join_token(token_dir, "worker");
        self.agent("--worker", &["--join", join, "--token", &token], extra);
    }

    fn agent(&mut self, role: &str, own: &[&str], extra: &[&str]) {
        let data = self.data.to_str().expect("utf-8 data dir").to_string();
        let mut args = vec!["agent", role, "--node-id", &self.name, "--data-dir", &data];
        args.extend_from_slice(own);
        args.extend_from_slice(extra);
        self.proc = Some(Proc::spawn(&args, &self.root.join(format!("{}.log", self.name)), &[]));
    }

    /// `http://<api><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// Its log so far, for failure messages.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }

    /// The running process (panics if it is not running).
    pub fn proc(&mut self) -> &mut Proc {
        self.proc.as_mut().unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    /// SIGKILL, if it runs.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM, waiting up to 30 s for a clean exit (the drain waits up to 15 s for
    /// the roles and 5 s for Raft); panics with the log if it does not stop.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if p.terminate(Duration::from_secs(30)).is_none() {
                panic!("{} did not stop on SIGTERM:\n{}", self.name, p.log_text());
            }
        }
    }

    /// Waits (20 s) until `/health/ready` answers 2xx.
    pub async fn ready(&self) {
        let url = self.url("/health/ready");
        eventually(Duration::from_secs(20), &format!("{} ready", self.name), || async {
            http().get(&url).send().await.ok().filter(|r| r.status().is_success())
        })
        .await;
    }
}

/// Managers and workers on loopback, formed as users form a cluster: `m1` bootstraps,
/// `m2..` join with the manager token, workers `w1..` join every manager with the
/// worker token. Build with [`Cluster::builder`].
pub struct Cluster {
    /// The managers, `m1` first (the bootstrap member).
    pub managers: Vec<Node>,
    /// The workers (Docker runtime: the binary has no other).
    pub workers: Vec<Node>,
    /// A client carrying the admin token `m1` wrote.
    pub client: reqwest::Client,
    /// The temporary root of every data dir and log; removed last.
    pub root: tempfile::TempDir,
}

/// How to form a [`Cluster`].
#[derive(Default)]
pub struct ClusterBuilder {
    managers: usize,
    workers: Vec<String>,
    manager_args: Vec<String>,
    worker_args: Vec<String>,
}

impl Cluster {
    /// One manager, no worker, no extra flags.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder { managers: 1, ..ClusterBuilder::default() }
    }

    /// `http://<m1 api><path>`.
    pub fn url(&self, path: &str) -> String {
        self.managers[0].url(path)
    }

    /// Every manager's cluster address, comma-separated (a worker's `--join`).
    pub fn seeds(&self) -> String {
        self.managers.iter().map(|m| m.cluster.as_str()).collect::<Vec<_>>().join(",")
    }

    /// The data dir of the bootstrap manager (admin and join tokens).
    pub fn first_data(&self) -> &Path {
        &self.managers[0].data
    }
}

impl ClusterBuilder {
    /// `n` managers (at least one).
    pub fn managers(mut self, n: usize) -> Self {
        self.managers = n.max(1);
        self
    }

    /// Workers with these node ids (unique per test when they run Docker containers).
    pub fn workers(mut self, names: &[&str]) -> Self {
        self.workers = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Extra flags for every manager.
    pub fn manager_args(mut self, args: &[&str]) -> Self {
        self.manager_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Extra flags for every worker.
    pub fn worker_args(mut self, args: &[&str]) -> Self {
        self.worker_args = args.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Starts the managers, waits for `m1`'s admin token and for every manager to be
    /// a voter, then starts the workers.
    pub async fn start(self) -> Cluster {
        let root = tempfile::tempdir().expect("tempdir");
        let margs: Vec<&str> = self.manager_args.iter().map(String::as_str).collect();
        let mut managers: Vec<Node> = (1..=self.managers).map(|i| Node::new(root.path(), &format!("m{i}"))).collect();
        managers[0].bootstrap(&margs);
        let client = api_client(&managers[0].data).await;
        let (first, rest) = managers.split_at_mut(1);
        for m in rest {
            m.join_manager(&first[0], &margs);
        }
        let mut cluster = Cluster { managers, workers: Vec::new(), client, root };
        let want = self.managers;
        let url = cluster.url("/v1/cluster");
        eventually(Duration::from_secs(30), &format!("{want} voters"), || async {
            let v = get_json(&cluster.client, &url).await?;
            (v["members"].as_array()?.iter().filter(|m| m["voter"] == true).count() == want).then_some(())
        })
        .await;
        let wargs: Vec<&str> = self.worker_args.iter().map(String::as_str).collect();
        let seeds = cluster.seeds();
        for name in &self.workers {
            let mut w = Node::new(cluster.root.path(), name);
            w.worker(&seeds, &cluster.managers[0].data, &wargs);
            cluster.workers.push(w);
        }
        cluster
    }
}

/// The notify socket systemd would own: a datagram socket at `<dir>/notify.sock`
/// (reads time out after 100 ms) and its path, for `NOTIFY_SOCKET`.
pub fn notify_socket(dir: &Path) -> (std::os::unix::net::UnixDatagram, String) {
    let path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
    (sock, path.to_str().expect("utf-8 path").to_string())
}

/// The next datagram on `sock` before `deadline`, or `None`.
pub fn recv_datagram(sock: &std::os::unix::net::UnixDatagram, deadline: Instant) -> Option<String> {
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    None
}

/// Whether `msg` (an `sd_notify` datagram) has exactly the line `line`.
pub fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

/// A name part unique to this process and moment, for what tests create in Docker.
pub fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").subsec_nanos();
    format!("{:x}{nanos:x}", std::process::id())
}
