//! End to end on the real Docker engine: `holdfast dev` runs the echo image it builds
//! from its own static binary. Fails (never skips) when Docker is missing.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Dev {
    proc: Proc,
    api: String,
    cluster: String,
    node: String,
    dir: tempfile::TempDir,
    client: reqwest::Client,
    _cleanup: NodeContainers,
}

impl Dev {
    async fn start() -> Dev {
        require_docker();
        let dir = tempfile::tempdir().unwrap();
        let node = format!("e2e-{}", &uuid_like());
        let api = format!("127.0.0.1:{}", free_port());
        let cluster = format!("127.0.0.1:{}", free_port());
        let proc = spawn_dev(dir.path(), &node, &api, &cluster);
        let client = api_client(&dir.path().join("data")).await;
        let dev = Dev { proc, api, cluster, node: node.clone(), dir, client, _cleanup: NodeContainers(node) };
        dev.wait_ready().await;
        dev
    }

    async fn wait_ready(&self) {
        let url = self.url("/v1/nodes");
        let node = self.node.clone();
        eventually(Duration::from_secs(60), "dev node registered", || {
            let (url, node, client) = (url.clone(), node.clone(), self.client.clone());
            async move {
                let v = get_json(&client, &url).await?;
                v["nodes"].as_array()?.iter().any(|n| n["id"] == json!(node) && n["engine_ok"] == true).then_some(())
            }
        })
        .await;
    }

    fn restart(&mut self) {
        self.proc.kill();
        self.proc = spawn_dev(self.dir.path(), &self.node, &self.api, &self.cluster);
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    async fn submit(&self, spec: Value) -> String {
        let resp = self.client.post(self.url("/v1/tasks")).json(&spec).send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status.as_u16(), 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn task(&self, id: &str) -> Option<Value> {
        get_json(&self.client, &self.url(&format!("/v1/tasks/{id}"))).await
    }

    async fn wait_state(&self, id: &str, state: &str, within: Duration) -> Value {
        let what = format!("task {id} {state}");
        let last = std::sync::Mutex::new(Value::Null);
        let got = tokio::time::timeout(
            within,
            eventually(within + Duration::from_secs(1), &what, || async {
                let t = self.task(id).await?;
                *last.lock().unwrap() = t.clone();
                (t["state"] == state).then_some(t)
            }),
        )
        .await;
        match got {
            Ok(t) => t,
            Err(_) => panic!("{what}: last seen {}\n--- log ---\n{}", last.lock().unwrap(), self.proc.log_text()),
        }
    }
}

fn spawn_dev(dir: &std::path::Path, node: &str, api: &str, cluster: &str) -> Proc {
    let data = dir.join("data");
    Proc::spawn(
        &["dev", "--data-dir", data.to_str().unwrap(), "--api", api, "--cluster", cluster, "--node-id", node],
        &dir.join("dev.log"),
        &[],
    )
}

fn uuid_like() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
    )
}

fn echo_spec(extra: &[&str]) -> Value {
    let mut cmd = vec!["echo", "--listen", "0.0.0.0:7777"];
    cmd.extend_from_slice(extra);
    json!({ "image": "holdfast/echo:latest", "command": cmd, "ports": [{"container": 7777}],
            "resources": {"cpu_millis": 100, "memory_mb": 32} })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_runs_answers_logs_and_stops() {
    let dev = Dev::start().await;
    let id = dev.submit(echo_spec(&[])).await;
    let t = dev.wait_state(&id, "running", Duration::from_secs(90)).await;
    let endpoint = t["endpoints"][0].as_str().expect("endpoint").to_string();
    let body = r#"{"Msg":"Hello, world!"}"#;
    let answer = eventually(Duration::from_secs(15), "echo answers", || {
        let url = format!("http://{endpoint}/");
        async move {
            let r = http().post(&url).body(body).send().await.ok()?;
            r.status().is_success().then_some(())?;
            r.text().await.ok()
        }
    })
    .await;
    assert_eq!(answer, body);
    assert_eq!(containers_with_label("holdfast.task", &id).len(), 1);

    let logs = dev.client.get(dev.url(&format!("/v1/tasks/{id}/logs"))).send().await.unwrap();
    assert_eq!(logs.status().as_u16(), 200);

    let r = dev.client.delete(dev.url(&format!("/v1/tasks/{id}"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    dev.wait_state(&id, "stopped", Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "container removed", || async {
        containers_with_label("holdfast.task", &id).is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_exit_codes_complete_or_fail() {
    let dev = Dev::start().await;
    let mut ok = echo_spec(&["--exit-after", "2s"]);
    ok["kind"] = json!("batch");
    let ok_id = dev.submit(ok).await;
    let mut bad = echo_spec(&["--exit-after", "1s", "--exit-code", "3"]);
    bad["kind"] = json!("batch");
    bad["restart"] = json!({"policy": "no"});
    bad["reschedule"] = json!({"attempts": 0});
    let bad_id = dev.submit(bad).await;
    let t = dev.wait_state(&ok_id, "completed", Duration::from_secs(90)).await;
    assert_eq!(t["exit_code"], 0);
    let t = dev.wait_state(&bad_id, "failed", Duration::from_secs(60)).await;
    assert_eq!(t["exit_code"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_restarts_with_backoff_then_fails() {
    let dev = Dev::start().await;
    let mut spec = echo_spec(&["--exit-after", "300ms", "--exit-code", "1"]);
    spec["restart"] = json!({"policy": "on-failure", "max_attempts": 3, "delay_ms": 300, "max_delay_ms": 2000});
    spec["reschedule"] = json!({"attempts": 0});
    let id = dev.submit(spec).await;
    let t = dev.wait_state(&id, "failed", Duration::from_secs(90)).await;
    assert_eq!(t["restarts"], 3, "{t}");
    assert_eq!(t["exit_code"], 1, "{t}");
    assert!(t["reason"].as_str().unwrap().contains("gave up after 3 restarts"), "{t}");
    let events = t["placements"][0]["events"].as_array().unwrap();
    let restarting = events.iter().filter(|e| e["what"] == "restarting").count();
    assert_eq!(restarting, 3, "{t}");
    assert_eq!(t["placements"].as_array().unwrap().len(), 1, "restarts stay in one placement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_worker_adopts_its_container() {
    let mut dev = Dev::start().await;
    let id = dev.submit(echo_spec(&[])).await;
    let t = dev.wait_state(&id, "running", Duration::from_secs(90)).await;
    let before = t["placements"][0]["container_id"].as_str().unwrap().to_string();
    dev.restart();
    dev.wait_ready().await;
    // Give the restarted worker a reconcile round, then the same single container runs.
    let t = dev.wait_state(&id, "running", Duration::from_secs(30)).await;
    assert_eq!(t["placements"][0]["container_id"], json!(before));
    let ids = containers_with_label("holdfast.task", &id);
    assert_eq!(ids, vec![before.clone()], "exactly the adopted container");
    let after = eventually(Duration::from_secs(10), "worker reports after restart", || async {
        let t = dev.task(&id).await?;
        (t["placements"][0]["restarts"] == 0).then_some(t)
    })
    .await;
    assert_eq!(after["placements"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_fails_and_huge_task_stays_pending() {
    let dev = Dev::start().await;
    // One reschedule allowed, after 300 ms: two placements fail with Docker's reason, then
    // the task stays failed (no retry storm).
    let spec = json!({"image": "nonexistent.invalid/nope:1", "reschedule": {"attempts": 1, "delay_ms": 300}});
    let id = dev.submit(spec).await;
    // The replaced placement is told to stop; its history keeps the failure.
    let t = eventually(Duration::from_secs(60), "two failed placements", || async {
        let t = dev.task(&id).await?;
        let ps = t["placements"].as_array()?;
        let failed = |p: &Value| p["events"].as_array().is_some_and(|e| e.iter().any(|e| e["what"] == "failed"));
        (ps.len() == 2 && ps[0]["observed"] == "failed" && failed(&ps[1])).then_some(t)
    })
    .await;
    assert_eq!(t["state"], "failed", "{t}");
    assert!(t["reason"].as_str().is_some_and(|r| r.contains("nonexistent.invalid")), "{t}");
    assert!(t["placements"][0]["fence"].as_u64() > t["placements"][1]["fence"].as_u64(), "{t}");

    let id = dev.submit(json!({"image": "holdfast/echo:latest", "resources": {"memory_mb": 999_999}})).await;
    let t = eventually(Duration::from_secs(20), "pending reason", || async {
        dev.task(&id).await.filter(|t| t["reason"].is_string())
    })
    .await;
    assert_eq!(t["state"], "pending");
    let reason = t["reason"].as_str().unwrap();
    assert!(reason.starts_with("no node fits: memory 999999 MB > largest free "), "{reason}");
}

/// Waits for the task to fail and checks the health check drove it there: every run was
/// stopped by the probe, restarts were counted, and the reason names the probe.
async fn fails_by_health(dev: &Dev, id: &str, probe: &str) -> Value {
    let t = dev.wait_state(id, "failed", Duration::from_secs(60)).await;
    assert_eq!(t["restarts"], 2, "{t}");
    let reason = t["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("health check failed 2 times: "), "{t}");
    assert!(reason.contains(probe), "reason should name {probe:?}: {t}");
    assert!(reason.ends_with("; gave up after 2 restarts"), "{t}");
    let events = t["placements"][0]["events"].as_array().unwrap();
    let restarting: Vec<&Value> = events.iter().filter(|e| e["what"] == "restarting").collect();
    assert_eq!(restarting.len(), 2, "{t}");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_http_health_check_restarts_then_fails() {
    let dev = Dev::start().await;
    let mut spec = echo_spec(&["--fail-health-after", "1s"]);
    spec["health"] =
        json!({"http": {"path": "/health", "port": 7777}, "interval_ms": 300, "timeout_ms": 200, "failures": 2});
    spec["restart"] = json!({"policy": "always", "max_attempts": 2, "delay_ms": 200});
    let id = dev.submit(spec).await;
    // Probed on the container's own IP (not the published port), and 500 is the answer.
    let t = fails_by_health(&dev, &id, "GET /health on 172.").await;
    assert!(t["reason"].as_str().unwrap().contains(":7777: 500"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_check_on_a_closed_port_restarts_then_fails() {
    let dev = Dev::start().await;
    let mut spec = echo_spec(&[]);
    spec["health"] = json!({"tcp": {"port": 7778}, "interval_ms": 300, "timeout_ms": 200, "failures": 2});
    spec["restart"] = json!({"policy": "always", "max_attempts": 2, "delay_ms": 200});
    let id = dev.submit(spec).await;
    fails_by_health(&dev, &id, "TCP connect to 172.").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_health_check_keeps_the_task_running() {
    let dev = Dev::start().await;
    let mut spec = echo_spec(&[]);
    spec["health"] =
        json!({"http": {"path": "/health", "port": 7777}, "interval_ms": 200, "timeout_ms": 150, "failures": 1});
    let id = dev.submit(spec).await;
    dev.wait_state(&id, "running", Duration::from_secs(60)).await;
    // The echo task logs every probe it answers: wait until ten have reached it. With
    // failures = 1 a single failed probe would have restarted it, so ten answered
    // probes and no restart show probes run, reach the container and pass; with no
    // probe at all this times out.
    let logs_url = dev.url(&format!("/v1/tasks/{id}/logs"));
    eventually(Duration::from_secs(30), "ten health probes answered by the task", || async {
        let text = dev
            .client
            .get(&logs_url)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let answered = text.lines().filter(|l| l.contains("health probe answered")).count();
        if answered >= 10 {
            Ok(())
        } else {
            Err(format!("{answered} probes answered so far; logs:\n{text}"))
        }
    })
    .await;
    let t = dev.task(&id).await.unwrap();
    assert_eq!((t["state"].as_str(), t["restarts"].as_u64()), (Some("running"), Some(0)), "{t}");
}
