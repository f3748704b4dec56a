//! Day-2 recovery on real processes and the real Docker engine: a snapshot saved
//! through the API, quorum lost for good and `--force-new-cluster` on the survivor,
//! then a restore into a new data directory; a worker's container runs untouched
//! throughout and no duplicate appears.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Manager {
    name: String,
    api: String,
    cluster: String,
    proc: Option<Proc>,
}

impl Manager {
    fn new(name: &str) -> Manager {
        Manager {
            name: name.into(),
            api: format!("127.0.0.1:{}", free_port()),
            cluster: format!("127.0.0.1:{}", free_port()),
            proc: None,
        }
    }

    fn start(&mut self, root: &Path, data: &Path, extra: &[&str]) {
        let mut args = vec!["agent", "--manager", "--node-id", &self.name, "--data-dir"];
        let data = data.to_str().expect("utf-8 path");
        args.extend([data, "--api", &self.api, "--cluster", &self.cluster, "--heartbeat-ttl", "2s", "--lease", "20s"]);
        args.extend_from_slice(extra);
        self.proc = Some(Proc::spawn(&args, &root.join(format!("{}.log", self.name)), &[]));
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // The drain waits up to 15 s for the roles and 5 s for Raft (node.rs).
            if p.terminate(Duration::from_secs(30)).is_none() {
                panic!("{} did not stop on SIGTERM:\n{}", self.name, p.log_text());
            }
        }
    }
}

async fn submit(c: &reqwest::Client, m: &Manager, spec: Value) -> Result<String, String> {
    let resp = c.post(m.url("/v1/tasks")).json(&spec).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    match status {
        201 => Ok(v["id"].as_str().unwrap_or_default().to_string()),
        _ => Err(format!("{status}: {v}")),
    }
}

async fn task_ids(c: &reqwest::Client, m: &Manager) -> Option<Vec<String>> {
    let v = get_json(c, &m.url("/v1/tasks")).await?;
    let mut ids: Vec<String> =
        v["tasks"].as_array()?.iter().filter_map(|t| t["id"].as_str().map(String::from)).collect();
    ids.sort();
    Some(ids)
}

async fn lone_leader(c: &reqwest::Client, m: &Manager) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        last = get_json(c, &m.url("/v1/cluster")).await;
        if let Some(v) = &last {
            let members = v["members"].as_array().map_or(0, |a| a.len());
            if v["leader"]["id"] == json!(m.name) && members == 1 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = m.proc.as_ref().map(|p| p.log_text()).unwrap_or_default();
    panic!("no one-member cluster led by {} within 30 s; last /v1/cluster: {last:?}\nlog:\n{log}", m.name);
}

/// The running containers of a task, straight from the engine.
fn running_containers(task: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-q", "--no-trunc", "--filter", &format!("label=holdfast.task={task}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// The worker is ready on `m` and its echo task still runs in the same container.
async fn worker_converged(c: &reqwest::Client, m: &Manager, worker: &str, task: &str, container: &str) {
    eventually(Duration::from_secs(60), "worker ready and the task running on it", || async {
        let nodes = get_json(c, &m.url("/v1/nodes")).await?;
        let ready = nodes["nodes"].as_array()?.iter().any(|n| n["id"] == json!(worker) && n["status"] == "ready");
        let t = get_json(c, &m.url(&format!("/v1/tasks/{task}"))).await?;
        (ready && t["state"] == "running").then_some(())
    })
    .await;
    assert_eq!(running_containers(task), vec![container.to_string()], "the same single container runs");
}

fn holdfast(args: &[&str]) -> std::process::Output {
    Command::new(holdfast_bin()).args(args).output().expect("run holdfast")
}

/// `holdfast cluster snapshot restore FILE --data-dir DIR --node-id m1`.
fn restore(file: &Path, data_dir: &Path) -> std::process::Output {
    let (file, dir) = (file.to_str().expect("utf-8"), data_dir.to_str().expect("utf-8"));
    holdfast(&["cluster", "snapshot", "restore", file, "--data-dir", dir, "--node-id", "m1"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_force_new_cluster_and_restore_keep_state_and_containers() {
    require_docker();
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let mut ms: Vec<Manager> = ["m1", "m2", "m3"].iter().map(|n| Manager::new(n)).collect();
    let data = |n: &str| -> PathBuf { r.join(n) };
    let seed = ms[0].cluster.clone();
    ms[0].start(r, &data("m1"), &["--bootstrap"]);
    // The cluster port is mutual TLS: managers and the worker join with tokens.
    let mtoken = join_token(&data("m1"), "manager");
    ms[1].start(r, &data("m2"), &["--join", &seed, "--token", &mtoken]);
    ms[2].start(r, &data("m3"), &["--join", &seed, "--token", &mtoken]);
    let token = admin_token(&data("m1")).await;
    let c = &client_with_token(&token);
    eventually(Duration::from_secs(30), "three voters", || async {
        let v = get_json(c, &ms[0].url("/v1/cluster")).await?;
        (v["members"].as_array()?.iter().filter(|m| m["voter"] == true).count() == 3).then_some(())
    })
    .await;

    let worker = format!("rec-{}", free_port());
    let _cleanup = NodeContainers(worker.clone());
    let joins = ms.iter().map(|m| m.cluster.clone()).collect::<Vec<_>>().join(",");
    let _w = Proc::spawn(
        &[
            "agent",
            "--worker",
            "--node-id",
            &worker,
            "--data-dir",
            data(&worker).to_str().unwrap(),
            "--join",
            &joins,
            "--token",
            &join_token(&data("m1"), "worker"),
        ],
        &r.join("worker.log"),
        &[],
    );
    let echo = submit(c, &ms[0], json!({"image": "holdfast/echo:latest", "ports": [{"container": 7777}]}))
        .await
        .expect("submit echo");
    let mut pending = Vec::new();
    for i in 0..10 {
        let spec = json!({"image": "holdfast/echo:latest", "name": format!("p{i}"),
                          "constraints": {"labels": {"zone": "nowhere"}}});
        pending.push(submit(c, &ms[i % 3], spec).await.expect("submit pending"));
    }
    eventually(Duration::from_secs(90), "echo running", || async {
        let t = get_json(c, &ms[0].url(&format!("/v1/tasks/{echo}"))).await?;
        (t["state"] == "running").then_some(())
    })
    .await;
    let container = running_containers(&echo).pop().expect("a running container");
    let before = task_ids(c, &ms[0]).await.expect("task list");
    assert_eq!(before.len(), 11);

    // An online backup through the API, with the CLI.
    let snap = r.join("cluster.snapshot");
    let api_url = format!("http://{}", ms[1].api);
    let out =
        holdfast(&["cluster", "snapshot", "save", snap.to_str().unwrap(), "--api-url", &api_url, "--token", &token]);
    assert!(out.status.success(), "save failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("saved"), "{out:?}");

    // Quorum lost for good: two managers die and never come back.
    for m in &mut ms[1..] {
        m.proc.take().expect("running").kill();
    }
    let refused = submit(c, &ms[0], json!({"image": "holdfast/echo:latest"})).await;
    assert!(refused.is_err(), "a lone manager of three must refuse writes: {refused:?}");

    // The survivor restarts as a one-member cluster with all its state.
    ms[0].stop();
    ms[0].start(r, &data("m1"), &["--force-new-cluster"]);
    lone_leader(c, &ms[0]).await;
    let after_force = task_ids(c, &ms[0]).await.expect("task list after the reset");
    for id in &before {
        assert!(after_force.contains(id), "task {id} lost by the reset");
    }
    let extra = submit(c, &ms[0], json!({"image": "holdfast/echo:latest", "constraints": {"labels": {"zone": "x"}}}))
        .await
        .expect("writable after the reset");
    worker_converged(c, &ms[0], &worker, &echo, &container).await;

    // Disaster: the survivor's disk is gone too. Restore the snapshot into a new data
    // directory under the same name and addresses; the worker reconnects unchanged.
    ms[0].proc.take().expect("running").kill();
    let fresh = data("m1-restored");
    let mut truncated = std::fs::read(&snap).expect("read snapshot");
    truncated.truncate(truncated.len() - 100);
    let bad = r.join("truncated.snapshot");
    std::fs::write(&bad, &truncated).expect("write");
    let out = restore(&bad, &fresh);
    assert!(!out.status.success(), "a truncated snapshot must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("truncated"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!fresh.join("manager").exists(), "a refused restore writes nothing");
    let out = restore(&snap, &fresh);
    assert!(out.status.success(), "restore failed: {}", String::from_utf8_lossy(&out.stderr));
    let again = restore(&snap, &fresh);
    assert!(!again.status.success(), "restoring over an existing manager is refused");

    ms[0].start(r, &fresh, &[]);
    lone_leader(c, &ms[0]).await;
    let restored = task_ids(c, &ms[0]).await.expect("task list after restore");
    assert_eq!(restored, before, "the restored cluster holds exactly what the snapshot held");
    assert!(!restored.contains(&extra), "a task submitted after the snapshot is not in it");
    // Tokens are part of the state: the old admin token works on the restored cluster.
    worker_converged(c, &ms[0], &worker, &echo, &container).await;
    submit(c, &ms[0], json!({"image": "holdfast/echo:latest", "constraints": {"labels": {"zone": "y"}}}))
        .await
        .expect("the restored cluster takes writes");
}
