//! Day-2 recovery on real processes and the real Docker engine: a snapshot saved
//! through the API, quorum lost for good and `--force-new-cluster` on the survivor,
//! then a restore into a new data directory; a worker's container runs untouched
//! throughout and no duplicate appears.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Flags every manager here runs with: a short heartbeat TTL so the worker is seen
/// quickly after each restart, and a lease long enough to carry it through them.
const MANAGER_FLAGS: [&str; 4] = ["--heartbeat-ttl", "2s", "--lease", "20s"];

async fn submit(c: &reqwest::Client, m: &Node, spec: Value) -> Result<String, String> {
    let resp = c.post(m.url("/v1/tasks")).json(&spec).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    match status {
        201 => Ok(v["id"].as_str().unwrap_or_default().to_string()),
        _ => Err(format!("{status}: {v}")),
    }
}

async fn task_ids(c: &reqwest::Client, m: &Node) -> Option<Vec<String>> {
    let v = get_json(c, &m.url("/v1/tasks")).await?;
    let mut ids: Vec<String> =
        v["tasks"].as_array()?.iter().filter_map(|t| t["id"].as_str().map(String::from)).collect();
    ids.sort();
    Some(ids)
}

async fn lone_leader(c: &reqwest::Client, m: &Node) {
    eventually(Duration::from_secs(30), &format!("a one-member cluster led by {}", m.name), || async {
        let v = get_json(c, &m.url("/v1/cluster")).await.ok_or("no /v1/cluster answer")?;
        let members = v["members"].as_array().map_or(0, |a| a.len());
        if v["leader"]["id"] == json!(m.name) && members == 1 {
            Ok(())
        } else {
            Err(format!("{v}\nlog:\n{}", m.log()))
        }
    })
    .await
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
async fn worker_converged(c: &reqwest::Client, m: &Node, worker: &str, task: &str, container: &str) {
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
    // m1 bootstraps; m2, m3 and the worker join the cluster port (mutual TLS) with tokens.
    let worker = format!("rec-{}", free_port());
    let _cleanup = NodeContainers(worker.clone());
    let mut cluster = Cluster::builder().managers(3).manager_args(&MANAGER_FLAGS).workers(&[&worker]).start().await;
    let token = admin_token(cluster.first_data()).await;
    let client = cluster.client.clone();
    let c = &client;
    let r = cluster.root.path().to_path_buf();
    let ms = &mut cluster.managers;
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
    let api_url = ms[1].url("");
    let out =
        holdfast(&["cluster", "snapshot", "save", snap.to_str().unwrap(), "--api-url", &api_url, "--token", &token]);
    assert!(out.status.success(), "save failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("saved"), "{out:?}");

    // Quorum lost for good: two managers die and never come back.
    for m in &mut ms[1..] {
        m.kill();
    }
    let refused = submit(c, &ms[0], json!({"image": "holdfast/echo:latest"})).await;
    assert!(refused.is_err(), "a lone manager of three must refuse writes: {refused:?}");

    // The survivor restarts as a one-member cluster with all its state.
    ms[0].stop();
    ms[0].manager(&[&MANAGER_FLAGS[..], &["--force-new-cluster"]].concat());
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
    ms[0].kill();
    let fresh = r.join("m1-restored");
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

    ms[0].data = fresh;
    ms[0].manager(&MANAGER_FLAGS);
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
