//! Images without a registry, end to end on the real Docker engine: an app image built
//! locally FROM scratch is pushed to the managers with the CLI, removed from the
//! engine, and a task that needs it runs because the worker fetches it from the
//! managers; a second version whose only change is its top layer is fetched without
//! the layers the engine already has. Bad uploads get clear errors and leave the
//! catalogue as it was. Fails (never skips) when Docker is missing.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn unique() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
    )
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker CLI");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes the test's image tags from the engine when the test ends.
struct Tags(Vec<String>);

impl Drop for Tags {
    fn drop(&mut self) {
        for t in &self.0 {
            let _ = Command::new("docker").args(["rmi", "-f", t]).output();
        }
    }
}

/// Builds `tag` FROM `from` with the files given (name, content), in its own context.
fn build(dir: &Path, tag: &str, from: &str, files: &[(&str, &[u8])]) {
    let ctx = dir.join(format!("ctx-{}", tag.replace([':', '/'], "_")));
    std::fs::create_dir_all(&ctx).unwrap();
    let mut dockerfile = format!("FROM {from}\n");
    for (name, data) in files {
        std::fs::write(ctx.join(name), data).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(ctx.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
        dockerfile.push_str(&format!("COPY {name} /{name}\n"));
    }
    if from == "scratch" {
        dockerfile.push_str("ENTRYPOINT [\"/holdfast\"]\n");
    }
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    docker(&["build", "-q", "-t", tag, ctx.to_str().unwrap()]);
}

fn save(dir: &Path, tag: &str) -> PathBuf {
    let file = dir.join(format!("{}.tar", tag.replace([':', '/'], "_")));
    docker(&["save", "-o", file.to_str().unwrap(), tag]);
    file
}

/// `holdfast image ...` against the dev node; returns (success, stdout + stderr).
fn cli(data: &Path, api: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(holdfast_bin())
        .arg("image")
        .args(args)
        .args(["--api-url", &format!("http://{api}"), "--data-dir", data.to_str().unwrap()])
        .output()
        .expect("holdfast CLI");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn post_raw(client: &reqwest::Client, url: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = client.post(url).body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Sends a push whose `Content-Length` claims `claimed` bytes over a raw connection
/// and returns the status line (the server answers before reading the body).
fn push_claiming(api: &str, token: &str, claimed: u64) -> String {
    let mut s = std::net::TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/images HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {token}\r\nContent-Length: {claimed}\r\n\r\nxx"
    )
    .unwrap();
    let mut buf = [0u8; 2048];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).to_string()
}

async fn wait_task(client: &reqwest::Client, api: &str, id: &str, state: &str) -> Value {
    let url = format!("http://{api}/v1/tasks/{id}");
    let last = std::sync::Mutex::new(Value::Null);
    let got = tokio::time::timeout(
        Duration::from_secs(120),
        eventually(Duration::from_secs(121), &format!("task {id} {state}"), || async {
            let t = get_json(client, &url).await?;
            *last.lock().unwrap() = t.clone();
            (t["state"] == state).then_some(t)
        }),
    )
    .await;
    match got {
        Ok(t) => t,
        Err(_) => panic!("task {id} never {state}; last seen {}", last.lock().unwrap()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_image_runs_on_a_worker_whose_engine_lacks_it() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let id = unique();
    let v1 = format!("holdfast-images-test/app:{id}-v1");
    let v2 = format!("holdfast-images-test/app:{id}-v2");
    let _tags = Tags(vec![v1.clone(), v2.clone()]);
    let binary = std::fs::read(holdfast_bin()).unwrap();
    // Two layers: the binary, then a marker; v2 adds one more layer on top of v1.
    build(dir.path(), &v1, "scratch", &[("holdfast", &binary), ("marker", id.as_bytes())]);
    build(dir.path(), &v2, &v1, &[("marker2", b"version two")]);
    let v1_tar = save(dir.path(), &v1);
    let v2_tar = save(dir.path(), &v2);

    let node = format!("images-{id}");
    let _cleanup = NodeContainers(node.clone());
    let api = format!("127.0.0.1:{}", free_port());
    let cluster = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data");
    let dev = Proc::spawn(
        &["dev", "--data-dir", data.to_str().unwrap(), "--api", &api, "--cluster", &cluster, "--node-id", &node],
        &dir.path().join("dev.log"),
        &[],
    );
    let token = admin_token(&data).await;
    let client = client_with_token(&token);
    let url = |p: &str| format!("http://{api}{p}");

    // Bad uploads: clear errors, nothing in the catalogue.
    let (status, body) = post_raw(&client, &url("/v1/images"), b"not a tar at all".repeat(64)).await;
    assert!(status == 400 && ["not_a_tar", "not_docker_save"].contains(&body["error"]["code"].as_str().unwrap_or("")), "{status} {body}");
    let mut plain = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_cksum();
    plain.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
    let (status, body) = post_raw(&client, &url("/v1/images"), plain.into_inner().unwrap()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("not_docker_save")), "{body}");
    let whole = std::fs::read(&v1_tar).unwrap();
    let (status, body) = post_raw(&client, &url("/v1/images"), whole[..whole.len() / 2].to_vec()).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("truncated")), "{body}");
    let answer = push_claiming(&api, &token, 1 << 50);
    assert!(answer.starts_with("HTTP/1.1 507") && answer.contains("insufficient_storage"), "{answer}");
    let listed = get_json(&client, &url("/v1/images")).await.unwrap();
    assert_eq!(listed["images"], json!([]), "nothing half-written is visible: {listed}");

    // Push v1 with the CLI; the catalogue lists it with its layers.
    let (ok, out) = cli(&data, &api, &["push", v1_tar.to_str().unwrap()]);
    assert!(ok, "push failed: {out}");
    let listed = get_json(&client, &url("/v1/images")).await.unwrap();
    let img = &listed["images"][0];
    assert_eq!(img["reference"], json!(v1), "{listed}");
    assert_eq!(img["layers"].as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(img["blobs_here"], true, "{listed}");

    // The engine no longer has it; a task that needs it runs.
    docker(&["rmi", "-f", &v1, &v2]);
    let spec = json!({"image": v1, "command": ["echo", "--listen", "0.0.0.0:7777"], "ports": [{"container": 7777}]});
    let resp = client.post(url("/v1/tasks")).json(&spec).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let task: Value = resp.json().await.unwrap();
    let task_id = task["id"].as_str().unwrap().to_string();
    let t = wait_task(&client, &api, &task_id, "running").await;
    let history = t.to_string();
    assert!(history.contains("pulling") && history.contains("from the managers"), "placement shows the fetch: {t}");
    let endpoint = t["placements"][0]["endpoints"][0].as_str().unwrap().to_string();
    let echoed = http().post(format!("http://{endpoint}/")).body("from the catalogue").send().await.unwrap();
    assert_eq!(echoed.text().await.unwrap(), "from the catalogue");
    assert!(!docker(&["image", "inspect", "--format", "{{.Id}}", &v1]).is_empty());

    // In use: removal is refused unless forced.
    let resp = client.delete(url(&format!("/v1/images/{v1}"))).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 409, "{}", resp.text().await.unwrap());

    // v2 differs by its top layer: the worker fetches only that (and the config).
    let (ok, out) = cli(&data, &api, &["push", v2_tar.to_str().unwrap()]);
    assert!(ok, "push failed: {out}");
    let spec2 = json!({"image": v2, "command": ["echo", "--listen", "0.0.0.0:7777"], "ports": [{"container": 7777}]});
    let resp = client.post(url("/v1/tasks")).json(&spec2).send().await.unwrap();
    let task2: Value = resp.json().await.unwrap();
    let task2_id = task2["id"].as_str().unwrap().to_string();
    wait_task(&client, &api, &task2_id, "running").await;
    let log = dev.log_text();
    let fetched: Vec<&str> = log.lines().filter(|l| l.contains("image fetched from the managers")).collect();
    assert_eq!(fetched.len(), 2, "two fetches: {fetched:?}");
    assert!(
        fetched[1].contains("skipped_layers=2") && fetched[1].contains("fetched_layers=1"),
        "v2 reuses v1's two layers: {}",
        fetched[1]
    );

    // Forced removal works; the catalogue keeps v2.
    let resp = client.delete(url(&format!("/v1/images/{v1}?force=true"))).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (ok, out) = cli(&data, &api, &["list"]);
    assert!(ok && out.contains(&v2) && !out.contains(&format!("\"{v1}\"")), "{out}");
    for id in [&task_id, &task2_id] {
        let _ = client.delete(url(&format!("/v1/tasks/{id}"))).send().await;
    }
    drop(dev);
}
