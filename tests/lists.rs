//! Paged lists beyond tasks (audit), event stream resume from `Last-Event-ID`, and the
//! OpenAPI document, on a real single-manager process with a token.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

struct Manager {
    _proc: Proc,
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
    Manager { _proc: proc, api: format!("http://{api}"), client: client_with_token(&token), token, _dir: dir }
}

async fn submit(m: &Manager, name: &str) -> String {
    let body = format!(r#"{{"name":"{name}","image":"holdfast/echo:latest"}}"#);
    let r = m.client.post(format!("{}/v1/tasks", m.api)).body(body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: Value = r.json().await.unwrap();
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn audit_pages_walk_every_entry_once_with_next_and_link() {
    let m = manager().await;
    for i in 0..25 {
        submit(&m, &format!("a{i}")).await;
    }
    let base = format!("{}/v1/audit", m.api);
    for (q, field) in [("limit=0", "limit"), ("limit=x", "limit"), ("after=abc", "after"), ("colour=red", "")] {
        let r = m.client.get(format!("{base}?{q}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{q}");
        let body: Value = r.json().await.unwrap();
        if !field.is_empty() {
            assert_eq!(body["error"]["field"], field, "{body}");
        }
    }
    let mut url = format!("{base}?limit=10");
    let mut subjects = Vec::new();
    let mut pages = 0;
    loop {
        let r = m.client.get(&url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let link = r.headers().get("link").map(|v| v.to_str().unwrap().to_string());
        let page: Value = r.json().await.unwrap();
        pages += 1;
        subjects.extend(
            page["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["action"] == "POST /v1/tasks")
                .map(|e| e["subject"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(n) => {
                assert_eq!(link.as_deref(), Some(format!("</v1/audit?limit=10&after={n}>; rel=\"next\"").as_str()));
                url = format!("{base}?limit=10&after={n}");
            }
            None => {
                assert_eq!(link, None);
                break;
            }
        }
    }
    assert!(pages >= 3, "{pages} pages");
    let unique: std::collections::BTreeSet<_> = subjects.iter().collect();
    assert_eq!((subjects.len(), unique.len()), (25, 25), "{subjects:?}");
    // Nodes page the same way (a manager without workers has none: an empty last page).
    let nodes = get_json(&m.client, &format!("{}/v1/nodes?limit=5", m.api)).await.unwrap();
    assert_eq!(nodes, serde_json::json!({ "nodes": [], "next": null }));
    let r = m.client.get(format!("{}/v1/nodes?limit=99999", m.api)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

/// Reads SSE frames `(event, id, data)` from a `/v1/events` response until `until`
/// holds, or the deadline.
async fn read_until(
    resp: &mut reqwest::Response,
    within: Duration,
    until: impl Fn(&[(String, String, Value)]) -> bool,
) -> Vec<(String, String, Value)> {
    let mut frames = Vec::new();
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + within;
    while !until(&frames) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk()).await.expect("events in time").expect("chunk");
        let Some(chunk) = chunk else { break };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let field = |name: &str| frame.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
            let Some(event) = field("event:") else { continue };
            let data = field("data:").and_then(|d| serde_json::from_str(&d).ok()).unwrap_or(Value::Null);
            frames.push((event, field("id:").unwrap_or_default(), data));
        }
    }
    frames
}

async fn open_stream(m: &Manager, last_event_id: Option<&str>) -> reqwest::Response {
    // No overall timeout: the stream stays open; each read has its own deadline.
    let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().unwrap();
    let mut req = client.get(format!("{}/v1/events?kind=task.", m.api)).bearer_auth(&m.token);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), req.send()).await.expect("answers").expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    resp
}

fn submitted(frames: &[(String, String, Value)], id: &str) -> bool {
    frames.iter().any(|(e, _, d)| e == "task.submitted" && d["subject"] == id)
}

#[tokio::test]
async fn the_event_stream_resumes_after_last_event_id_or_says_it_is_too_old() {
    let m = manager().await;
    let mut live = open_stream(&m, None).await;
    let a = submit(&m, "first").await;
    let frames = read_until(&mut live, Duration::from_secs(10), |f| submitted(f, &a)).await;
    let last_id = frames.iter().find(|(_, _, d)| d["subject"] == a.as_str()).map(|(_, id, _)| id.clone()).unwrap();
    drop(live);

    // Disconnected meanwhile: two more tasks.
    let b = submit(&m, "second").await;
    let c = submit(&m, "third").await;
    let mut resumed = open_stream(&m, Some(&last_id)).await;
    let frames = read_until(&mut resumed, Duration::from_secs(10), |f| submitted(f, &b) && submitted(f, &c)).await;
    let order: Vec<&str> = frames.iter().filter_map(|(_, _, d)| d["subject"].as_str()).collect();
    assert_eq!(order, [a.as_str(), b.as_str(), c.as_str()], "at least once from the last id, in order: {frames:?}");
    // Then it carries on live.
    let d = submit(&m, "fourth").await;
    read_until(&mut resumed, Duration::from_secs(10), |f| submitted(f, &d)).await;

    // An id from before anything this manager keeps: told so, then live.
    let mut old = open_stream(&m, Some("0")).await;
    let frames = read_until(&mut old, Duration::from_secs(10), |f| !f.is_empty()).await;
    assert_eq!(frames[0].0, "too_old", "{frames:?}");
    assert_eq!(frames[0].2["last_event_id"], 0);
    let e = submit(&m, "fifth").await;
    read_until(&mut old, Duration::from_secs(10), |f| submitted(f, &e)).await;

    // A malformed id is refused in the one error shape.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/events", m.api))
        .bearer_auth(&m.token)
        .header("Last-Event-ID", "yesterday")
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["field"], "Last-Event-ID", "{body}");
}

#[tokio::test]
async fn every_operation_of_the_openapi_document_is_served() {
    let m = manager().await;
    let doc = get_json(&m.client, &format!("{}/v1/openapi.json", m.api)).await.expect("document");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{doc}");
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 20, "{} paths", paths.len());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let mut checked = 0;
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            // A harmless id: nothing by that name exists.
            let url = format!("{}{}", m.api, path.replace("{id}", "zz-openapi-probe"));
            let req = match method.as_str() {
                "get" => client.get(&url),
                "post" => client.post(&url).body("{}"),
                "delete" => client.delete(&url),
                other => panic!("unexpected method {other}"),
            };
            let resp = req.bearer_auth(&m.token).send().await.unwrap();
            let status = resp.status().as_u16();
            assert_ne!(status, 405, "{method} {path}: method not allowed");
            if status == 404 {
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let msg = body["error"]["message"].as_str().unwrap_or_default();
                assert!(!msg.contains("no such route"), "{method} {path} is documented but not routed: {body}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 24, "{checked} operations checked");
    // And a route that is not in the document is the fallback's 404.
    let r = m.client.get(format!("{}/v1/no-such-thing", m.api)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
}
