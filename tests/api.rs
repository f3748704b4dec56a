//! The public API contract on a real single-manager process: error shapes, validation,
//! idempotency, stop, pending reasons.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Manager {
    proc: Proc,
    api: String,
    client: reqwest::Client,
    token: String,
    _dir: tempfile::TempDir,
}

async fn manager() -> Manager {
    let dir = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let cluster = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("m1");
    let proc = Proc::spawn(
        &[
            "agent",
            "--manager",
            "--node-id",
            "m1",
            "--data-dir",
            data.to_str().unwrap(),
            "--api",
            &api,
            "--cluster",
            &cluster,
            "--bootstrap",
        ],
        &dir.path().join("m1.log"),
        &[],
    );
    let url = format!("http://{api}/health/ready");
    eventually(Duration::from_secs(20), "manager ready", || {
        let url = url.clone();
        async move { http().get(&url).send().await.ok().filter(|r| r.status().is_success()) }
    })
    .await;
    let token = admin_token(&data).await;
    Manager { proc, api: format!("http://{api}"), client: client_with_token(&token), token, _dir: dir }
}

async fn post(client: &reqwest::Client, url: &str, body: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = client.post(url).body(body.to_string());
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_field: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(e["code"].is_string() && e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    if let Some(f) = want_field {
        assert_eq!(e["field"], json!(f), "{body}");
    }
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_loses_nothing() {
    let m = manager().await;
    let tasks = format!("{}/v1/tasks", m.api);

    let (s, b) = post(&m.client, &tasks, "{not json", None).await;
    assert_error(s, &b, 400, None);
    let (s, b) = post(&m.client, &tasks, r#"{"image":"a","colour":"red"}"#, None).await;
    assert_error(s, &b, 400, Some("colour"));
    let (s, b) = post(&m.client, &tasks, r#"{"image":"a","resources":{"memory_mb":-5}}"#, None).await;
    assert_error(s, &b, 400, Some("resources.memory_mb"));
    let (s, b) = post(&m.client, &tasks, r#"{"command":["x"]}"#, None).await;
    assert_error(s, &b, 400, Some("image"));
    let big = format!(r#"{{"image":"a","env":{{"K":"{}"}}}}"#, "x".repeat(400_000));
    let (s, b) = post(&m.client, &tasks, &big, None).await;
    assert_error(s, &b, 413, None);

    let r = m.client.get(format!("{}/v1/tasks/nope", m.api)).send().await.unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 404, Some("id"));
    let r = m.client.get(format!("{}/v1/no/such/route", m.api)).send().await.unwrap();
    let s = r.status().as_u16();
    assert_error(s, &r.json().await.unwrap(), 404, None);

    // Nothing above created a task.
    let list = get_json(&m.client, &tasks).await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 0, "{list}");
}

#[tokio::test]
async fn idempotency_key_makes_retries_safe() {
    let m = manager().await;
    let tasks = format!("{}/v1/tasks", m.api);
    let (s1, b1) = post(&m.client, &tasks, r#"{"image":"holdfast/echo:latest"}"#, Some("k-1")).await;
    assert_eq!(s1, 201, "{b1}");
    let (s2, b2) = post(&m.client, &tasks, r#"{"image":"holdfast/echo:latest"}"#, Some("k-1")).await;
    assert_eq!(s2, 200, "{b2}");
    assert_eq!(b1["id"], b2["id"]);
    let (s3, b3) = post(&m.client, &tasks, r#"{"image":"other"}"#, Some("k-1")).await;
    assert_error(s3, &b3, 409, None);
    let list = get_json(&m.client, &tasks).await.unwrap();
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1, "{list}");

    // Every call that reached the state machine is audited, rejected ones too.
    let audit = get_json(&m.client, &format!("{}/v1/audit", m.api)).await.unwrap();
    let results: Vec<&str> =
        audit["entries"].as_array().unwrap().iter().map(|e| e["result"].as_str().unwrap()).collect();
    assert_eq!(results, vec!["conflict", "ok", "ok"], "{audit}");
    let first = &audit["entries"][2];
    assert_eq!(first["action"], "POST /v1/tasks");
    assert!(first["who"].as_str().unwrap().starts_with("admin ("), "{first}");
}

#[tokio::test]
async fn tasks_stay_pending_with_a_reason_and_stop() {
    let m = manager().await;
    let tasks = format!("{}/v1/tasks", m.api);
    let (s, b) = post(&m.client, &tasks, r#"{"image":"holdfast/echo:latest","name":"e1"}"#, None).await;
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let url = format!("{}/v1/tasks/{id}", m.api);
    let t = eventually(Duration::from_secs(10), "pending reason", || {
        let url = url.clone();
        let client = m.client.clone();
        async move { get_json(&client, &url).await.filter(|t| t["reason"].is_string()) }
    })
    .await;
    assert_eq!(t["state"], "pending");
    assert_eq!(t["name"], "e1");
    assert_eq!(t["reason"], "no worker nodes registered");

    let r = m.client.delete(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let t = get_json(&m.client, &url).await.unwrap();
    assert_eq!(t["desired"], "stop");
    assert_eq!(t["state"], "stopped");

    let c = get_json(&m.client, &format!("{}/v1/cluster", m.api)).await.unwrap();
    assert_eq!(c["leader"]["id"], "m1", "{c}");
    assert_eq!(c["members"].as_array().unwrap().len(), 1, "{c}");
    assert!(c["commit_index"].as_u64().unwrap() >= 2, "{c}");
}

#[tokio::test]
async fn metrics_speak_prometheus_text() {
    let m = manager().await;
    let (s, _) = post(&m.client, &format!("{}/v1/tasks", m.api), r#"{"image":"holdfast/echo:latest"}"#, None).await;
    assert_eq!(s, 201);
    let text = m.client.get(format!("{}/metrics", m.api)).send().await.unwrap().text().await.unwrap();
    let h = get_json(&m.client, &format!("{}/v1/health", m.api)).await.expect("health answers 200");
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["control_plane"]["quorum"], true, "{h}");
    assert_eq!(h["control_plane"]["role"], "leader", "{h}");
    assert!(h["data_plane"]["nodes"].as_array().is_some_and(|n| n.is_empty()), "{h}");
    for needle in [
        "holdfast_raft_is_leader 1",
        "holdfast_raft_term ",
        "holdfast_raft_commit_index ",
        "holdfast_api_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/tasks\",status=\"201\"",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

/// Resident memory of a process in KiB, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_submissions_get_clear_answers_and_bounded_memory() {
    use futures::StreamExt;
    let mut m = manager().await;
    let pid = m.proc.child.id();
    let before = rss_kib(pid);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let url = format!("{}/v1/tasks", m.api);
    let statuses: Vec<u16> = futures::stream::iter(0..2_000)
        .map(|i| {
            let (client, url, token) = (client.clone(), url.clone(), m.token.clone());
            async move {
                let body = format!(r#"{{"image":"holdfast/echo:latest","name":"c{i}"}}"#);
                match client.post(&url).bearer_auth(&token).body(body).send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        if status != 201 {
                            // Every refusal is the JSON error shape.
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            assert!(v["error"]["code"].is_string(), "{status}: {v}");
                        }
                        status
                    }
                    Err(e) => panic!("request {i} failed at the transport: {e}"),
                }
            }
        })
        .buffer_unordered(2_000)
        .collect()
        .await;
    let ok = statuses.iter().filter(|s| **s == 201).count();
    assert!(statuses.iter().all(|s| matches!(s, 201 | 429 | 503)), "unexpected statuses");
    assert!(ok > 0, "nothing admitted");
    // Still alive and answering, with memory bounded.
    assert!(m.proc.child.try_wait().unwrap().is_none(), "manager died");
    let after = rss_kib(pid);
    assert!(after < before + 512 * 1024, "RSS grew from {before} KiB to {after} KiB");
    let list = get_json(&m.client, &url).await.expect("still answering");
    assert_eq!(list["tasks"].as_array().unwrap().len(), ok, "every 201 is a task, nothing else is");
    eprintln!("2,000 concurrent: {ok} admitted, {} refused; RSS {before} → {after} KiB", 2_000 - ok);
}
