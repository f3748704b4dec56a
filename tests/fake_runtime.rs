//! The in-memory runtime wired end to end, for scheduling at scale without Docker, and
//! worker-side behaviour that needs a controllable engine or manager: admission with
//! simulated resources, and a slow pull that must not hold up a stop. The Docker
//! runtime itself is covered by `docker_runtime.rs` and `e2e_docker.rs`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use common::*;
use futures::StreamExt;
use holdfast::model::sync::{Assignment, NodeResources, StatusReport, SyncRequest, SyncResponse};
use holdfast::model::{Desired, Observed, TaskSpec};
use holdfast::worker::agent::WorkerConfig;
use holdfast::worker::runtime::fake::{FakeImage, FakeRuntime};
use serde_json::{json, Value};
use tokio::sync::broadcast;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tasks_reach_running_on_the_fake_runtime() {
    let mut c = InProcess::builder().node_id("fake-1").local_worker().start().await;
    let (client, fake, node) = (c.client.clone(), c.local_fake().clone(), c.node_id().to_string());
    let started = Instant::now();
    const TASKS: usize = 200;
    let url = c.url("/v1/tasks");
    // Tiny reservations so 200 fit this machine's measured CPU and memory.
    let spec = json!({"image": "holdfast/echo:latest", "ports": [{"container": 7777}],
                      "resources": {"cpu_millis": 1, "memory_mb": 4}});
    let submitted: Vec<u16> = futures::stream::iter(0..TASKS)
        .map(|_| {
            let (client, url, spec) = (client.clone(), url.clone(), spec.clone());
            async move { client.post(&url).json(&spec).send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(submitted.iter().all(|s| *s == 201), "{submitted:?}");

    let list = c.url("/v1/tasks");
    let seen = Mutex::new(String::new());
    let running = tokio::time::timeout(
        Duration::from_secs(40),
        eventually(Duration::from_secs(41), "200 tasks running", || async {
            let v = get_json(&client, &list).await?;
            let tasks = v["tasks"].as_array()?;
            let mut states = BTreeMap::<String, usize>::new();
            for t in tasks {
                *states.entry(format!("{} {}", t["state"], t["reason"])).or_default() += 1;
            }
            *seen.lock().unwrap() = format!("{states:?}; fake runs {}", fake.running_count(&node));
            (tasks.len() == TASKS && states.len() == 1 && tasks[0]["state"] == "running").then_some(tasks.clone())
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("not all {TASKS} tasks running after 40 s; last seen: {}", seen.lock().unwrap()));
    let elapsed = started.elapsed();
    assert_eq!(fake.running_count(&node), TASKS, "one container per task, no duplicates");
    assert_eq!(fake.containers().len(), TASKS);
    assert!(running.iter().all(|t| t["endpoints"][0].as_str().is_some_and(|e| e.starts_with("127.0.0.1:"))));
    eprintln!("{TASKS} tasks submitted and running on the fake runtime in {elapsed:?}");
    c.stop_manager().await;
}

/// A stand-in manager: hands the worker a fixed desired set and keeps what it reports.
#[derive(Default)]
struct FakeManager {
    assignments: Mutex<Vec<Assignment>>,
    version: AtomicU64,
    reports: Mutex<BTreeMap<u64, StatusReport>>,
    resources: Mutex<Option<NodeResources>>,
}

impl FakeManager {
    fn assign(&self, assignments: Vec<Assignment>) {
        *self.assignments.lock().unwrap() = assignments;
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    /// The newest report for a placement.
    fn last(&self, placement: &str) -> Option<StatusReport> {
        self.reports.lock().unwrap().values().rev().find(|r| r.placement_id == placement).cloned()
    }

    async fn serve(self: Arc<Self>) -> String {
        async fn sync(State(m): State<Arc<FakeManager>>, Json(req): Json<SyncRequest>) -> Json<SyncResponse> {
            let quiet = req.reports.is_empty() && req.have_version == m.version.load(Ordering::SeqCst);
            *m.resources.lock().unwrap() = Some(req.resources.clone());
            let acked_seq = {
                let mut reports = m.reports.lock().unwrap();
                for r in req.reports {
                    reports.insert(r.seq, r);
                }
                reports.keys().next_back().copied().unwrap_or(0)
            };
            if quiet {
                // A short long-poll, so the worker does not spin.
                tokio::time::sleep(Duration::from_millis(req.wait_ms.min(100))).await;
            }
            Json(SyncResponse {
                version: m.version.load(Ordering::SeqCst),
                lease_ms: 30_000,
                acked_seq,
                assignments: m.assignments.lock().unwrap().clone(),
                log_requests: vec![],
            })
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let app = Router::new().route("/cluster/v1/sync", post(sync)).with_state(self);
        // Served as a real manager serves: mutual TLS with a manager certificate.
        let (stop, rx) = broadcast::channel(1);
        std::mem::forget(stop);
        holdfast::net::tls::serve(listener, fake_manager_tls(test_ca()), app, Default::default(), rx);
        addr
    }
}

fn assignment(placement: &str, spec: Value) -> Assignment {
    Assignment {
        placement_id: placement.into(),
        task_id: format!("t-{placement}"),
        fence: 10,
        desired: Desired::Run,
        spec: TaskSpec::from_json(spec.to_string().as_bytes()).unwrap(),
    }
}

/// One throwaway cluster CA for the fake manager and its workers.
fn test_ca() -> &'static holdfast::net::pki::Ca {
    static CA: std::sync::OnceLock<holdfast::net::pki::Ca> = std::sync::OnceLock::new();
    CA.get_or_init(|| holdfast::net::pki::Ca::generate().expect("CA"))
}

/// A worker on the fake runtime syncing with `manager` (it stops when dropped).
fn start_worker(
    node: &str,
    dir: &std::path::Path,
    manager: &str,
    fake: &Arc<FakeRuntime>,
    tune: impl FnOnce(&mut WorkerConfig),
) -> InWorker {
    write_identity(test_ca(), &dir.join(node), node, holdfast::net::pki::Role::Worker);
    let mut cfg = WorkerConfig::new(node, dir.join(node), vec![manager.to_string()]);
    cfg.sync_wait = Duration::from_millis(100);
    cfg.stop_grace = Duration::from_millis(100);
    tune(&mut cfg);
    InWorker::spawn(cfg, fake.clone(), Some(fake.clone()))
}

/// A temp dir, a fake manager serving on the returned address, and a fake runtime.
async fn fake_manager() -> (tempfile::TempDir, Arc<FakeManager>, String, Arc<FakeRuntime>) {
    let manager = Arc::new(FakeManager::default());
    let addr = manager.clone().serve().await;
    (tempfile::tempdir().unwrap(), manager, addr, Arc::new(FakeRuntime::new()))
}

async fn observed(m: &FakeManager, placement: &str, want: Observed, within: Duration) -> StatusReport {
    eventually(within, &format!("{placement} {}", want.as_str()), || async {
        m.last(placement).filter(|r| r.status.observed == want)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_a_placement_that_does_not_fit_its_free_memory() {
    let (dir, manager, addr, fake) = fake_manager().await;
    // Capacity 8 GiB, but only 1200 MB free: the scheduler's view and the machine's disagree.
    let small = NodeResources { memory_free_mb: 1200, disk_free_mb: 5_000, ..resources(4000, 8192) };
    let _stop = start_worker("w1", dir.path(), &addr, &fake, |c| c.resources_override = Some(small.clone()));
    let big = assignment("big", json!({"image": "holdfast/echo:latest", "resources": {"memory_mb": 4096}}));
    manager.assign(vec![big.clone()]);
    let refused = observed(&manager, "big", Observed::Failed, Duration::from_secs(10)).await;
    assert_eq!(refused.status.reason.as_deref(), Some("admission refused: memory 4096 MB > free 1200 MB on node w1"));
    manager.assign(vec![
        big,
        assignment("disky", json!({"image": "holdfast/echo:latest", "resources": {"disk_mb": 6000}})),
        assignment("small", json!({"image": "holdfast/echo:latest", "resources": {"memory_mb": 100}})),
    ]);
    let disky = observed(&manager, "disky", Observed::Failed, Duration::from_secs(10)).await;
    let reason = disky.status.reason.unwrap_or_default();
    assert!(reason.starts_with("admission refused: disk 6000 MB > free "), "{reason}");
    observed(&manager, "small", Observed::Running, Duration::from_secs(10)).await;
    assert_eq!(fake.running_count("w1"), 1, "refused placements never reach the engine");
    assert_eq!(fake.containers().len(), 1);

    // The override is what the worker reports, less what its placements hold.
    let reported = eventually(Duration::from_secs(5), "resources net of the running task", || async {
        manager.resources.lock().unwrap().clone().filter(|r| r.memory_free_mb == 1100)
    })
    .await;
    assert_eq!((reported.memory_total_mb, reported.cpus, reported.disk_free_mb), (8192, 4, 5_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pull_does_not_hold_up_a_stop() {
    let (dir, manager, addr, fake) = fake_manager().await;
    fake.set_image("example/slow:1", FakeImage::SlowPull(Duration::from_secs(30)));
    let _stop = start_worker("w2", dir.path(), &addr, &fake, |c| c.create_concurrency = 1);
    let quick = assignment("quick", json!({"image": "holdfast/echo:latest"}));
    manager.assign(vec![quick.clone()]);
    observed(&manager, "quick", Observed::Running, Duration::from_secs(10)).await;

    // The only create slot is now stuck in a 30 s pull...
    let slow = assignment("slow", json!({"image": "example/slow:1"}));
    manager.assign(vec![quick.clone(), slow.clone()]);
    observed(&manager, "slow", Observed::Starting, Duration::from_secs(10)).await;
    // ...and a stop still goes through at once, from its own pool.
    let started = Instant::now();
    manager.assign(vec![Assignment { desired: Desired::Stop, ..quick }, slow]);
    observed(&manager, "quick", Observed::Stopped, Duration::from_secs(5)).await;
    assert_eq!(fake.running_count("w2"), 0);
    assert!(started.elapsed() < Duration::from_secs(5));
}
