//! An in-process cluster: one real manager (Raft on SQLite, the HTTP API with its
//! admin token) run by `holdfast::node::run_with_runtime` on a tokio task, and worker
//! agents on tasks beside it, each on its own runtime (a [`FakeRuntime`] unless the
//! test brings one, e.g. Docker behind a fault proxy). Build with
//! [`InProcess::builder`]; dropping it signals every node to stop.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use holdfast::config::{Config, ManagerRole, WorkerRole};
use holdfast::model::sync::NodeResources;
use holdfast::node::NodeError;
use holdfast::worker::agent::{self, WorkerConfig, WorkerError};
use holdfast::worker::runtime::fake::FakeRuntime;
use holdfast::worker::runtime::Runtime;
use serde_json::Value;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use super::{api_client, eventually, free_port, get_json, http, join_token};

/// How long a node has to show up in `GET /v1/nodes` with `engine_ok: true`.
const REGISTER_WITHIN: Duration = Duration::from_secs(30);

/// How long a clean stop of the manager may take (the drain waits up to 15 s).
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// Simulated node resources: `cpu_millis` (whole CPUs rounded down, at least one) and
/// `memory_mb`, all of it free, and 100 GB of free disk; the engine is up.
pub fn resources(cpu_millis: u64, memory_mb: u64) -> NodeResources {
    NodeResources {
        cpus: (cpu_millis / 1000).max(1) as u32,
        cpu_millis,
        load1: 0.0,
        memory_total_mb: memory_mb,
        memory_free_mb: memory_mb,
        disk_total_mb: 100_000,
        disk_free_mb: 100_000,
        engine_ok: true,
    }
}

/// A worker agent running on a tokio task.
pub struct InWorker {
    /// Its node id.
    pub name: String,
    /// Its in-memory runtime, when it runs on one.
    pub fake: Option<Arc<FakeRuntime>>,
    /// Its shutdown broadcast (dropping it stops the agent too).
    stop: Option<broadcast::Sender<()>>,
    /// What `agent::run` returned.
    task: Option<JoinHandle<Result<(), WorkerError>>>,
}

impl InWorker {
    /// Runs `agent::run(cfg, runtime)` until [`InWorker::stop`] or drop; `fake` is the
    /// runtime's handle when it is a [`FakeRuntime`].
    pub fn spawn(cfg: WorkerConfig, runtime: Arc<dyn Runtime>, fake: Option<Arc<FakeRuntime>>) -> InWorker {
        let (stop, rx) = broadcast::channel(1);
        let name = cfg.node.clone();
        let task = tokio::spawn(agent::run(cfg, runtime, rx));
        InWorker { name, fake, stop: Some(stop), task: Some(task) }
    }

    /// Its fake runtime (panics when it runs on another).
    pub fn fake(&self) -> &Arc<FakeRuntime> {
        self.fake.as_ref().unwrap_or_else(|| panic!("{} does not run on the fake runtime", self.name))
    }

    /// Signals the agent to stop (as SIGTERM would; its containers stay) and waits
    /// until it has returned, asserting it returned `Ok`.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let result = tokio::time::timeout(STOP_WITHIN, t).await;
            assert!(matches!(result, Ok(Ok(Ok(())))), "worker {} stopped cleanly: {result:?}", self.name);
        }
    }
}

/// The running manager process (a task) and its shutdown trigger.
struct Running {
    /// Fires the shutdown future `run_with_runtime` waits on.
    stop: oneshot::Sender<()>,
    /// What `run_with_runtime` returned.
    task: JoinHandle<Result<(), NodeError>>,
}

/// One in-process manager (node id `m1` unless told) and its workers.
pub struct InProcess {
    /// The manager's API address, `host:port`.
    pub api: String,
    /// The manager's cluster address, `host:port` (what workers join).
    pub cluster: String,
    /// A client carrying the admin token the manager wrote.
    pub client: reqwest::Client,
    /// The workers added with [`InProcess::add_worker`] (and the builder's `workers`).
    pub workers: Vec<InWorker>,
    /// The fake runtime of the manager's own worker role, when it has one.
    local_fake: Option<Arc<FakeRuntime>>,
    /// What the manager runs with, kept to start it again from its data dir.
    config: Config,
    /// The manager while it runs.
    manager: Option<Running>,
    /// The temporary root of every data dir; removed last.
    pub root: tempfile::TempDir,
}

/// One change to the manager's settings.
type ManagerTune = Box<dyn FnOnce(&mut ManagerRole)>;

/// How to start an [`InProcess`] cluster.
pub struct InProcessBuilder {
    /// The manager's node id.
    node_id: String,
    /// Changes to `ManagerRole::bootstrap`, in order.
    tune: Vec<ManagerTune>,
    /// Whether the manager's process runs the worker role too.
    local_worker: bool,
    /// Fake-runtime workers to add once the manager runs.
    workers: Vec<String>,
}

impl InProcess {
    /// A manager `m1` with the defaults of `agent --manager --bootstrap`, no worker.
    pub fn builder() -> InProcessBuilder {
        InProcessBuilder { node_id: "m1".into(), tune: Vec::new(), local_worker: false, workers: Vec::new() }
    }

    /// `http://<api><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// The manager's data dir (admin and join tokens, `manager/state.db`).
    pub fn data(&self) -> &Path {
        &self.config.data_dir
    }

    /// The manager's node id.
    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// The fake runtime of the manager's own worker role (builder's `local_worker`).
    pub fn local_fake(&self) -> &Arc<FakeRuntime> {
        self.local_fake.as_ref().expect("the builder asked for a local worker")
    }

    /// The worker named `name` (panics if there is none).
    pub fn worker(&mut self, name: &str) -> &mut InWorker {
        self.workers.iter_mut().find(|w| w.name == name).unwrap_or_else(|| panic!("no worker {name}"))
    }

    /// Starts the manager from its data dir (again, after [`InProcess::stop_manager`])
    /// on the same addresses and settings, and waits for its admin token.
    pub async fn start_manager(&mut self) {
        assert!(self.manager.is_none(), "the manager already runs");
        let (stop, stopped) = oneshot::channel::<()>();
        let runtime = self.local_fake.clone().map(|f| f as Arc<dyn Runtime>);
        let task = tokio::spawn(holdfast::node::run_with_runtime(self.config.clone(), runtime, async {
            let _ = stopped.await;
        }));
        self.manager = Some(Running { stop, task });
        self.client = api_client(self.data()).await;
    }

    /// Stops the manager as SIGTERM would and waits (20 s) until it has, asserting it
    /// returned `Ok`.
    pub async fn stop_manager(&mut self) {
        if let Some(Running { stop, task }) = self.manager.take() {
            let _ = stop.send(());
            let result = tokio::time::timeout(STOP_WITHIN, task).await;
            assert!(matches!(result, Ok(Ok(Ok(())))), "node stopped cleanly: {result:?}");
        }
    }

    /// The settings a worker named `name` joins with: its data dir under the root,
    /// the manager's cluster address and worker join token (mutual TLS on the cluster
    /// port), 500 ms long polls and a roomy simulated node (64 CPUs, 256 GB), so
    /// placement never hinges on this machine.
    pub fn worker_config(&self, name: &str) -> WorkerConfig {
        let mut wc = WorkerConfig::new(name, self.root.path().join(name), vec![self.cluster.clone()]);
        wc.token = Some(join_token(self.data(), "worker"));
        wc.resources_override = Some(resources(64_000, 256_000));
        wc.sync_wait = Duration::from_millis(500);
        wc
    }

    /// Starts a worker on `runtime` with [`InProcess::worker_config`] changed by `tune`,
    /// and waits until it is registered with its engine up. The caller owns it.
    pub async fn spawn_worker(
        &self,
        name: &str,
        runtime: Arc<dyn Runtime>,
        fake: Option<Arc<FakeRuntime>>,
        tune: impl FnOnce(&mut WorkerConfig),
    ) -> InWorker {
        let mut wc = self.worker_config(name);
        tune(&mut wc);
        let worker = InWorker::spawn(wc, runtime, fake);
        self.wait_registered(name).await;
        worker
    }

    /// [`InProcess::spawn_worker`] on a new [`FakeRuntime`], kept in `workers`.
    pub async fn add_worker(&mut self, name: &str, tune: impl FnOnce(&mut WorkerConfig)) -> &mut InWorker {
        let fake = Arc::new(FakeRuntime::new());
        let worker = self.spawn_worker(name, fake.clone(), Some(fake), tune).await;
        self.workers.push(worker);
        self.workers.last_mut().expect("just pushed")
    }

    /// Node `name` as `GET /v1/nodes` lists it.
    pub async fn node(&self, name: &str) -> Option<Value> {
        let v = get_json(&self.client, &self.url("/v1/nodes")).await?;
        v["nodes"].as_array()?.iter().find(|n| n["id"] == name).cloned()
    }

    /// Waits (30 s) until node `name` is listed with `engine_ok` equal to `ok`.
    pub async fn wait_engine(&self, name: &str, ok: bool) {
        eventually(REGISTER_WITHIN, &format!("{name} engine_ok {ok}"), || async {
            self.node(name).await.filter(|n| n["engine_ok"] == ok).map(|_| ())
        })
        .await;
    }

    /// Waits (30 s) until node `name` is registered with its engine up.
    pub async fn wait_registered(&self, name: &str) {
        self.wait_engine(name, true).await;
    }

    /// Submits task `spec`, asserting `201 Created`; returns its id.
    pub async fn submit(&self, spec: &Value) -> String {
        let r = self.client.post(self.url("/v1/tasks")).json(spec).send().await.expect("submit");
        let status = r.status().as_u16();
        let v: Value = r.json().await.expect("json");
        assert_eq!(status, 201, "{v}");
        v["id"].as_str().expect("id").to_string()
    }

    /// Task `id` as `GET /v1/tasks/{id}` shows it.
    pub async fn task(&self, id: &str) -> Option<Value> {
        get_json(&self.client, &self.url(&format!("/v1/tasks/{id}"))).await
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Signal only: a drop cannot wait. Each task sees its trigger fire or vanish.
        if let Some(m) = self.manager.take() {
            let _ = m.stop.send(());
        }
        for w in &mut self.workers {
            if let Some(s) = w.stop.take() {
                let _ = s.send(());
            }
        }
    }
}

impl InProcessBuilder {
    /// The manager's node id (and data dir name).
    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = id.into();
        self
    }

    /// Changes the manager's settings (lease, strategy, event sink, retention...).
    pub fn manager(mut self, tune: impl FnOnce(&mut ManagerRole) + 'static) -> Self {
        self.tune.push(Box::new(tune));
        self
    }

    /// The lease the manager grants and the silence after which a node is
    /// `disconnected`.
    pub fn lease(self, lease: Duration, heartbeat_ttl: Duration) -> Self {
        self.manager(move |m| {
            m.lease = lease;
            m.heartbeat_ttl = heartbeat_ttl;
        })
    }

    /// The manager's process also runs the worker role (as `agent --manager --worker`
    /// would), on a fake runtime, reporting this machine's measured resources.
    pub fn local_worker(mut self) -> Self {
        self.local_worker = true;
        self
    }

    /// Worker agents with these node ids, each on its own fake runtime, with
    /// [`InProcess::worker_config`].
    pub fn workers(mut self, names: &[&str]) -> Self {
        self.workers = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Starts the manager, waits for its admin token, then starts the workers (the
    /// local one first) and waits until each is registered.
    pub async fn start(self) -> InProcess {
        let root = tempfile::tempdir().expect("tempdir");
        let api = format!("127.0.0.1:{}", free_port());
        let cluster = format!("127.0.0.1:{}", free_port());
        let mut role = ManagerRole::bootstrap(&api, &cluster);
        for tune in self.tune {
            tune(&mut role);
        }
        let worker = self.local_worker.then(|| WorkerRole {
            managers: vec![cluster.clone()],
            advertise_host: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            resources_override: None,
            image_bandwidth: None,
        });
        let config = Config {
            node_id: self.node_id.clone(),
            data_dir: root.path().join(&self.node_id),
            trust: Default::default(),
            manager: Some(role),
            worker,
        };
        let mut c = InProcess {
            api,
            cluster,
            client: http(),
            workers: Vec::new(),
            local_fake: self.local_worker.then(|| Arc::new(FakeRuntime::new())),
            config,
            manager: None,
            root,
        };
        c.start_manager().await;
        if self.local_worker {
            c.wait_registered(&self.node_id).await;
        }
        for name in &self.workers {
            c.add_worker(name, |_| {}).await;
        }
        c
    }
}
