//! Cached, fenced, time-bounded authority, in process: a real manager (Raft on SQLite)
//! and a worker agent on the in-memory runtime. The manager goes away; when the worker's
//! lease runs out each offline mode does what it promises; the manager comes back from
//! its data dir and the story is in the history. The multi-host suite does the same
//! with real containers and real network cuts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use holdfast::config::{Config, ManagerRole};
use holdfast::model::sync::NodeResources;
use holdfast::worker::agent::{self, WorkerConfig};
use holdfast::worker::runtime::fake::FakeRuntime;
use holdfast::worker::runtime::{ContainerState, Runtime};
use serde_json::{json, Value};
use tokio::sync::broadcast;

struct ManagerProc {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn start_manager(dir: &std::path::Path, api: &str, cluster: &str) -> ManagerProc {
    let config = Config {
        node_id: "m1".into(),
        data_dir: dir.join("m1"),
        trust: Default::default(),
        manager: Some(ManagerRole {
            lease: Duration::from_secs(3),
            heartbeat_ttl: Duration::from_secs(1),
            ..ManagerRole::bootstrap(api, cluster)
        }),
        worker: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        holdfast::node::run(config, async {
            let _ = stopped.await;
        })
        .await
        .expect("manager runs");
    });
    ManagerProc { stop: Some(stop), task: Some(task) }
}

impl ManagerProc {
    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

async fn task(client: &reqwest::Client, api: &str, id: &str) -> Option<Value> {
    get_json(client, &format!("http://{api}/v1/tasks/{id}")).await
}

fn container_state(fake: &FakeRuntime, task_id: &str) -> Option<ContainerState> {
    fake.containers()
        .into_iter()
        .find(|c| c.labels.get("holdfast.task").map(String::as_str) == Some(task_id))
        .map(|c| c.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_modes_hold_when_the_manager_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let cluster = format!("127.0.0.1:{}", free_port());
    let mut manager = start_manager(dir.path(), &api, &cluster);

    let fake = Arc::new(FakeRuntime::new());
    let runtime: Arc<dyn Runtime> = fake.clone();
    let mut wc = WorkerConfig::new("edge-1", dir.path().join("w"), vec![cluster.clone()]);
    // Mutual TLS on the cluster port: the worker joins with the first manager's token.
    wc.token = Some(join_token(&dir.path().join("m1"), "worker"));
    wc.sync_wait = Duration::from_millis(300);
    wc.lease_margin = Duration::from_millis(500);
    wc.resources_override = Some(NodeResources {
        cpus: 4,
        cpu_millis: 4000,
        load1: 0.0,
        memory_total_mb: 8192,
        memory_free_mb: 8192,
        disk_total_mb: 100_000,
        disk_free_mb: 100_000,
        engine_ok: true,
    });
    let (stop_worker, rx) = broadcast::channel(1);
    let worker = tokio::spawn(async move { agent::run(wc, runtime, rx).await.expect("worker runs") });

    let client = api_client(&dir.path().join("m1")).await;
    let ready = format!("http://{api}/v1/nodes");
    eventually(Duration::from_secs(20), "worker registered", || async {
        let v = get_json(&client, &ready).await?;
        v["nodes"].as_array()?.iter().any(|n| n["engine_ok"] == true).then_some(())
    })
    .await;
    let mut ids = Vec::new();
    for mode in ["keep", "finish", "exclusive"] {
        let spec = json!({"image": "holdfast/echo:latest", "name": mode, "offline": {"mode": mode}});
        let r = client.post(format!("http://{api}/v1/tasks")).json(&spec).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 201);
        ids.push(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        eventually(Duration::from_secs(20), "running", || async {
            (task(&client, &api, id).await?["state"] == "running").then_some(())
        })
        .await;
    }
    let (keep, finish, exclusive) = (&ids[0], &ids[1], &ids[2]);

    // The manager goes away. Within the lease (3 s, counted from the last sync's send)
    // everything runs; after it, exclusive stops and the others carry on.
    manager.stop().await;
    eventually(Duration::from_secs(10), "exclusive stopped on lease expiry", || async {
        matches!(container_state(&fake, exclusive), Some(ContainerState::Exited { .. })).then_some(())
    })
    .await;
    assert_eq!(container_state(&fake, keep), Some(ContainerState::Running));
    assert_eq!(container_state(&fake, finish), Some(ContainerState::Running));

    // Without a lease, a crash of the `finish` task is final; `keep` restarts.
    let cid = |t: &str| {
        fake.containers().into_iter().find(|c| c.labels.get("holdfast.task").map(String::as_str) == Some(t)).unwrap().id
    };
    fake.exit(&cid(finish), 1);
    fake.exit(&cid(keep), 1);
    eventually(Duration::from_secs(10), "keep restarted locally", || async {
        (container_state(&fake, keep) == Some(ContainerState::Running)).then_some(())
    })
    .await;
    assert!(matches!(container_state(&fake, finish), Some(ContainerState::Exited { code: 1 })));

    // The manager returns from its data dir; the lease is renewed and exclusive resumes
    // (same container), and the buffered story reaches the history.
    let mut manager = start_manager(dir.path(), &api, &cluster);
    eventually(Duration::from_secs(20), "exclusive resumed", || async {
        (container_state(&fake, exclusive) == Some(ContainerState::Running)).then_some(())
    })
    .await;
    let story = |t: Value| -> Vec<String> {
        t["placements"][0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["what"].as_str().unwrap().to_string())
            .collect()
    };
    let ex = eventually(Duration::from_secs(20), "exclusive story", || async {
        let t = task(&client, &api, exclusive).await?;
        let s = story(t.clone());
        (s.contains(&"stopped-on-expiry".to_string()) && s.contains(&"resumed".to_string()) && t["state"] == "running")
            .then_some(t)
    })
    .await;
    assert_eq!(ex["restarts"], 0, "a suspension is not a restart: {ex}");
    let fin = eventually(Duration::from_secs(20), "finish failed for good", || async {
        let t = task(&client, &api, finish).await?;
        (t["state"] == "failed").then_some(t)
    })
    .await;
    assert!(fin["reason"].as_str().unwrap().contains("lease expired (offline mode finish)"), "{fin}");
    let kp = eventually(Duration::from_secs(20), "keep story", || async {
        let t = task(&client, &api, keep).await?;
        let s = story(t.clone());
        (s.contains(&"cached-authority".to_string()) && t["state"] == "running" && t["restarts"] == 1).then_some(t)
    })
    .await;
    let events = story(kp);
    assert_eq!(events.iter().filter(|e| *e == "restarting").count(), 1, "each report once: {events:?}");
    let _ = stop_worker.send(());
    let _ = worker.await;
    manager.stop().await;
}
