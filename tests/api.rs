//! The public API contract on a real single-manager process: error shapes, validation,
//! idempotency, stop, pending reasons.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Manager {
    /// The one bootstrapped manager (its process and tempdir live in here).
    cluster: Cluster,
    api: String,
    client: reqwest::Client,
    token: String,
}

impl Manager {
    fn proc(&mut self) -> &mut Proc {
        self.cluster.managers[0].proc()
    }
}

async fn manager() -> Manager {
    let cluster = Cluster::builder().start().await;
    cluster.managers[0].ready().await;
    let token = admin_token(cluster.first_data()).await;
    Manager { api: cluster.url(""), client: cluster.client.clone(), token, cluster }
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

/// Resident memory of a process in KiB, from /proc; panics when it cannot be read, so a
/// memory bound is never passed unmeasured.
fn rss_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .filter(|kib| *kib > 0)
        .unwrap_or_else(|| panic!("no VmRSS in {path}:\n{status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_submissions_get_clear_answers_and_bounded_memory() {
    use futures::StreamExt;
    let mut m = manager().await;
    let pid = m.proc().child.id();
    let before = rss_kib(pid);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let url = format!("{}/v1/tasks", m.api);
    // Each submission carries its own Idempotency-Key, as a careful client's would.
    let answers: Vec<(usize, u16, String)> = futures::stream::iter(0..2_000)
        .map(|i| {
            let (client, url, token) = (client.clone(), url.clone(), m.token.clone());
            async move {
                let body = format!(r#"{{"image":"holdfast/echo:latest","name":"c{i}"}}"#);
                let req = client.post(&url).bearer_auth(&token).header("Idempotency-Key", format!("c-{i}")).body(body);
                match req.send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        if status == 201 {
                            return (i, status, String::new());
                        }
                        // Every refusal is the JSON error shape.
                        let code = v["error"]["code"].as_str().unwrap_or_else(|| panic!("{status}: {v}"));
                        (i, status, code.to_string())
                    }
                    Err(e) => panic!("request {i} failed at the transport: {e}"),
                }
            }
        })
        .buffer_unordered(2_000)
        .collect()
        .await;
    let ok = answers.iter().filter(|(_, s, _)| *s == 201).count();
    assert!(answers.iter().all(|(_, s, _)| matches!(s, 201 | 503)), "unexpected statuses");
    assert!(ok > 0, "nothing admitted");
    // Still alive and answering, with memory bounded.
    assert!(m.proc().child.try_wait().unwrap().is_none(), "manager died");
    let after = rss_kib(pid);
    assert!(after < before + 512 * 1024, "RSS grew from {before} KiB to {after} KiB");
    // Every 201 is a task. A request shed at the door (`overloaded`) was never applied:
    // its retry creates the task. Any other 503 (a write that timed out waiting for its
    // commit) may or may not have committed: its retry with the same key says which,
    // and never makes a second task. So after the retries there are exactly 2,000.
    let mut shed_then_created = 0;
    for (i, _, code) in answers.iter().filter(|(_, s, _)| *s != 201) {
        let body = format!(r#"{{"image":"holdfast/echo:latest","name":"c{i}"}}"#);
        let (s, v) = post(&m.client, &url, &body, Some(&format!("c-{i}"))).await;
        assert!(s == 201 || s == 200, "retry of {i} ({code}): {s} {v}");
        if code == "overloaded" {
            assert_eq!(s, 201, "a shed request ({i}) must not have been applied: {v}");
            shed_then_created += 1;
        }
    }
    let list = all_tasks(&m.client, &m.api).await.expect("still answering");
    assert_eq!(list.len(), 2_000, "one task per key: none lost, none twice");
    eprintln!(
        "2,000 concurrent: {ok} admitted, {} refused ({shed_then_created} shed); RSS {before} → {after} KiB",
        2_000 - ok
    );
}

async fn submit_many(client: reqwest::Client, api: String, range: std::ops::Range<usize>) -> Vec<String> {
    use futures::StreamExt;
    let url = format!("{api}/v1/tasks");
    futures::stream::iter(range)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let body = format!(r#"{{"image":"holdfast/echo:latest","name":"pg{i}"}}"#);
                for _ in 0..20 {
                    let (s, v) = post(&client, &url, &body, Some(&format!("pg-{i}"))).await;
                    match s {
                        201 | 200 => return v["id"].as_str().unwrap().to_string(),
                        503 => tokio::time::sleep(Duration::from_millis(50)).await,
                        _ => panic!("submit {i}: {s} {v}"),
                    }
                }
                panic!("submit {i}: still overloaded after 20 tries")
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_walk_ten_thousand_tasks_without_gap_or_repeat_while_tasks_are_added() {
    let m = manager().await;
    let submitted = submit_many(m.client.clone(), m.api.clone(), 0..10_000).await;
    let tasks = format!("{}/v1/tasks", m.api);

    // Bad parameters name themselves; nothing else about the request is guessed.
    for (q, field) in [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("limit=999999", "limit"),
        ("after=xyz", "after"),
        ("state=bogus", "state"),
        ("name=", "name"),
    ] {
        let r = m.client.get(format!("{tasks}?{q}")).send().await.unwrap();
        let status = r.status().as_u16();
        assert_error(status, &r.json().await.unwrap(), 400, Some(field));
    }
    let r = m.client.get(format!("{tasks}?colour=red")).send().await.unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    assert_error(status, &body, 400, None);
    assert!(body["error"]["message"].as_str().unwrap().contains("limit, after"), "{body}");

    // The default page is bounded and says where the next one starts, in the body and
    // in a Link header.
    let r = m.client.get(&tasks).send().await.unwrap();
    let link = r.headers().get("link").map(|v| v.to_str().unwrap().to_string()).expect("Link header");
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["tasks"].as_array().unwrap().len(), 500);
    let next = first["next"].as_str().expect("a next cursor");
    assert_eq!(link, format!("</v1/tasks?limit=500&after={next}>; rel=\"next\""));

    // Walk in pages of 700 while 300 more tasks arrive: every task that existed when
    // the walk began appears exactly once, newest first.
    let adder = tokio::spawn(submit_many(m.client.clone(), m.api.clone(), 10_000..10_300));
    let mut seen = Vec::new();
    let mut url = format!("{tasks}?limit=700");
    let started = std::time::Instant::now();
    let mut pages = 0;
    loop {
        let page = get_json(&m.client, &url).await.expect("page");
        pages += 1;
        seen.extend(page["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(n) => url = format!("{tasks}?limit=700&after={n}"),
            None => break,
        }
    }
    let walk = started.elapsed();
    let added = adder.await.unwrap();
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a task appeared twice");
    for id in &submitted {
        assert!(seen.contains(id), "task {id} missing from the walk");
    }
    assert!(seen.iter().all(|id| submitted.contains(id) || added.contains(id)));
    eprintln!("walked {} tasks in {pages} pages of 700 in {walk:?}", seen.len());

    // Filters: by name, by state, and a page of 100 from the middle.
    let one = get_json(&m.client, &format!("{tasks}?name=pg4242")).await.unwrap();
    assert_eq!(one["tasks"].as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one["tasks"][0]["name"], "pg4242");
    assert_eq!(one["next"], Value::Null);
    // A rare state may take several short (even empty) pages: follow `next` to the end.
    let (mut running, mut url, mut short_pages) = (0, format!("{tasks}?state=running&limit=10"), 0);
    loop {
        let page = get_json(&m.client, &url).await.expect("filtered page");
        running += page["tasks"].as_array().unwrap().len();
        match page["next"].as_str() {
            Some(n) => {
                short_pages += 1;
                url = format!("{tasks}?state=running&limit=10&after={n}");
            }
            None => break,
        }
    }
    assert_eq!(running, 0, "no worker, nothing runs");
    assert!(short_pages >= 4, "10,300 rows take several bounded scans, got {short_pages} continuations");
    let pending = get_json(&m.client, &format!("{tasks}?state=pending&limit=10")).await.unwrap();
    assert_eq!(pending["tasks"].as_array().unwrap().len(), 10);
    assert!(pending["tasks"].as_array().unwrap().iter().all(|t| t["state"] == "pending"));
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let page = get_json(&m.client, &format!("{tasks}?limit=100&after={next}")).await.unwrap();
        times.push(t.elapsed());
        assert_eq!(page["tasks"].as_array().unwrap().len(), 100);
    }
    times.sort();
    eprintln!("a page of 100 out of 10,300 tasks: median {:?}, max {:?}", times[10], times[19]);
}
