//! A Docker engine that turns slow or refuses, on the real engine: one worker reaches
//! Docker through a fault-injecting unix-socket proxy, another directly. The proxied
//! worker's breaker must open (`engine_ok: false`, cluster `degraded`), new work must
//! go to the other node, nothing already running may be declared failed, and once the
//! engine answers again the breaker closes and the node takes placements again.
//! Fails (never skips) without Docker.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use holdfast::resilience::{BreakerConfig, BreakerState, Registry};
use holdfast::worker::runtime::docker::{DockerConfig, DockerRuntime, DockerTimeouts};
use holdfast::worker::runtime::guarded::{GuardedRuntime, GuardedRuntimeConfig, ENGINE};
use holdfast::worker::runtime::Runtime;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

const ENGINE_SOCKET: &str = "/var/run/docker.sock";

/// How the proxy treats traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Bytes flow both ways untouched.
    Pass,
    /// Every chunk towards the engine waits this long first (a slow engine).
    Latency(Duration),
    /// New connections are closed at once and open ones are cut (a dead engine).
    Refuse,
}

/// A unix-socket proxy in front of the real engine, test-only.
struct Proxy {
    socket: PathBuf,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    fn start(dir: &Path) -> Proxy {
        let socket = dir.join("docker-proxy.sock");
        let listener = UnixListener::bind(&socket).expect("bind proxy socket");
        let (mode, rx) = watch::channel(Mode::Pass);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, rx.clone()));
            }
        });
        Proxy { socket, mode, task }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn refused(mode: &mut watch::Receiver<Mode>) {
    // Sender gone means the test is over: cut too.
    let _ = mode.wait_for(|m| *m == Mode::Refuse).await;
}

async fn forward(client: UnixStream, mut mode: watch::Receiver<Mode>) {
    if *mode.borrow() == Mode::Refuse {
        return;
    }
    let Ok(Ok(engine)) = tokio::time::timeout(Duration::from_secs(5), UnixStream::connect(ENGINE_SOCKET)).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (er, ew) = engine.into_split();
    let up = tokio::spawn(pump(cr, ew, mode.clone(), true));
    tokio::select! {
        _ = pump(er, cw, mode.clone(), false) => {}
        _ = refused(&mut mode) => {}
    }
    up.abort();
}

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    mut mode: watch::Receiver<Mode>,
    towards_engine: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = refused(&mut mode) => return,
        };
        let delay = match *mode.borrow() {
            Mode::Latency(d) if towards_engine => Some(d),
            _ => None,
        };
        if let Some(d) = delay {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = refused(&mut mode) => return,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

struct Worker {
    name: String,
    registry: Registry,
    /// Stops the agent when dropped, before `_cleanup` removes its containers.
    _agent: InWorker,
    _cleanup: NodeContainers,
}

/// The in-process cluster with this file's helpers.
struct Cluster(InProcess);

impl std::ops::Deref for Cluster {
    type Target = InProcess;
    fn deref(&self) -> &InProcess {
        &self.0
    }
}

impl Cluster {
    async fn start() -> Cluster {
        Cluster(InProcess::builder().lease(Duration::from_secs(20), Duration::from_secs(2)).start().await)
    }

    /// A worker on its own registry (each process has one; two in one test must not
    /// share a `docker` breaker), reaching Docker at `socket` or directly.
    async fn add_worker(&self, name: &str, zone: &str, socket: Option<PathBuf>) -> Worker {
        let cleanup = NodeContainers(name.to_string());
        // Short engine timeouts so a 5 s latency is a failure, not just a slow call.
        let timeouts = DockerTimeouts {
            connect: Duration::from_secs(5),
            inspect: Duration::from_secs(2),
            create: Duration::from_secs(10),
            start: Duration::from_secs(10),
            stop_extra: Duration::from_secs(5),
            remove: Duration::from_secs(10),
            logs: Duration::from_secs(5),
            ..DockerTimeouts::default()
        };
        let docker = DockerConfig { timeouts, self_binary: holdfast_bin(), socket };
        let docker = DockerRuntime::connect_with(docker).await.expect("a Docker engine (these tests need one)");
        let mut guard = GuardedRuntimeConfig::default();
        guard.breaker = BreakerConfig { open_for: Duration::from_secs(1), ..guard.breaker };
        let registry = Registry::new();
        let runtime: Arc<dyn Runtime> = Arc::new(GuardedRuntime::new(Arc::new(docker), &registry, guard));
        let agent = self
            .spawn_worker(name, runtime, None, |wc| {
                wc.labels = [("zone".to_string(), zone.to_string())].into();
                wc.stop_grace = Duration::from_secs(1);
                wc.resources_override = Some(resources(4_000, 4_096));
            })
            .await;
        Worker { name: name.to_string(), registry, _agent: agent, _cleanup: cleanup }
    }

    async fn wait_health(&self, status: &str) {
        eventually(Duration::from_secs(30), &format!("health {status}"), || async {
            let h = get_json(&self.client, &self.url("/v1/health")).await?;
            (h["status"] == status).then_some(())
        })
        .await;
    }

    /// Submits an echo task, optionally pinned to a zone.
    async fn submit(&self, zone: Option<&str>) -> String {
        let mut spec = json!({"image": "holdfast/echo:latest", "ports": [{"container": 7777}],
                              "resources": {"cpu_millis": 10, "memory_mb": 16}});
        if let Some(z) = zone {
            spec["constraints"] = json!({"labels": {"zone": z}});
        }
        self.0.submit(&spec).await
    }

    async fn task(&self, id: &str) -> Value {
        self.0.task(id).await.unwrap_or(Value::Null)
    }

    /// Waits until task `id` runs on `node`.
    async fn wait_running_on(&self, id: &str, node: &str, within: Duration) {
        eventually(within, &format!("task {id} running on {node}"), || async {
            let t = self.task(id).await;
            let current = t["placements"].as_array()?.iter().find(|p| p["current"] == true)?.clone();
            (t["state"] == "running" && current["node"] == json!(node)).then_some(())
        })
        .await;
    }

    /// Asserts task `id` still runs (not failed, not replaced) on `node`.
    async fn assert_still_running_on(&self, id: &str, node: &str) {
        let t = self.task(id).await;
        assert_eq!(t["state"], "running", "{t}");
        let placements = t["placements"].as_array().expect("placements");
        assert_eq!(placements.len(), 1, "not replaced: {t}");
        assert_eq!(placements[0]["node"], json!(node), "{t}");
        assert_eq!(placements[0]["observed"], "running", "{t}");
    }
}

impl Worker {
    /// State of this worker's `docker` breaker.
    fn engine_breaker(&self) -> BreakerState {
        let snap = self.registry.snapshot();
        snap.breakers.iter().find(|b| b.name == ENGINE).map(|b| b.state).expect("docker breaker registered")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_engine_opens_the_breaker_and_work_moves_to_the_healthy_node() {
    require_docker();
    let started = Instant::now();
    let c = Cluster::start().await;
    let proxy = Proxy::start(c.root.path());
    let uniq = unique();
    let (name_a, name_b) = (format!("px-a-{uniq}"), format!("px-b-{uniq}"));
    let (a, b) =
        tokio::join!(c.add_worker(&name_a, "a", Some(proxy.socket.clone())), c.add_worker(&name_b, "b", None),);
    c.wait_health("healthy").await;

    // A task already running on the proxied node before anything goes wrong.
    let steady = c.submit(Some("a")).await;
    c.wait_running_on(&steady, &a.name, Duration::from_secs(60)).await;
    println!("setup and first task running: {:?}", started.elapsed());

    for (fault, mode) in [("refuse", Mode::Refuse), ("latency", Mode::Latency(Duration::from_secs(5)))] {
        let t0 = Instant::now();
        proxy.set(mode);
        c.wait_engine(&a.name, false).await;
        c.wait_health("degraded").await;
        // The first failed call already reports `engine_ok: false`; the breaker opens
        // after a few in a row (each taking the 2 s timeout under latency).
        eventually(Duration::from_secs(20), &format!("{fault}: proxied engine's breaker open"), || async {
            (a.engine_breaker() == BreakerState::Open).then_some(())
        })
        .await;
        assert_eq!(b.engine_breaker(), BreakerState::Closed, "{fault}: the direct engine's breaker stays closed");
        println!("{fault}: breaker open and cluster degraded after {:?}", t0.elapsed());

        // New work goes to the healthy node and runs there; work pinned to the sick
        // node waits instead of failing.
        let elsewhere = c.submit(None).await;
        c.wait_running_on(&elsewhere, &b.name, Duration::from_secs(30)).await;
        let pinned = c.submit(Some("a")).await;
        c.assert_still_running_on(&steady, &a.name).await;
        let t = c.task(&pinned).await;
        assert_eq!(t["state"], "pending", "{t}");

        // The engine answers again: the breaker closes, the node takes placements.
        let t1 = Instant::now();
        proxy.set(Mode::Pass);
        c.wait_engine(&a.name, true).await;
        c.wait_health("healthy").await;
        assert_eq!(a.engine_breaker(), BreakerState::Closed, "{fault}: closed again");
        println!("{fault}: breaker closed and cluster healthy {:?} after the engine recovered", t1.elapsed());
        c.wait_running_on(&pinned, &a.name, Duration::from_secs(30)).await;
        c.assert_still_running_on(&steady, &a.name).await;
        assert_eq!(containers_with_label("holdfast.task", &steady).len(), 1, "no duplicate of the steady task");
    }
    println!("whole test: {:?}", started.elapsed());
}
