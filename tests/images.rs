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
    let _tags = RemoveImages(vec![v1.clone(), v2.clone()]);
    let binary = std::fs::read(holdfast_bin()).unwrap();
    // Two layers: the binary, then a marker; v2 adds one more layer on top of v1.
    build_image(dir.path(), &v1, "scratch", &[("holdfast", &binary), ("marker", id.as_bytes())]);
    build_image(dir.path(), &v2, &v1, &[("marker2", b"version two")]);
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
    assert!(
        status == 400 && ["not_a_tar", "not_docker_save"].contains(&body["error"]["code"].as_str().unwrap_or("")),
        "{status} {body}"
    );
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
    eventually(Duration::from_secs(30), "the fetched app answering", || async {
        let r = http().post(format!("http://{endpoint}/")).body("from the catalogue").send().await.ok()?;
        (r.text().await.ok()? == "from the catalogue").then_some(())
    })
    .await;
    assert!(!docker(&["image", "inspect", "--format", "{{.Id}}", &v1]).is_empty());

    // In use: removal is refused unless forced.
    let resp = client.delete(url(&format!("/v1/images/{v1}"))).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 409, "{}", resp.text().await.unwrap());

    // v2 differs by its top layer: the worker fetches only that (and the config).
    let (ok, out) = cli(&data, &api, &["push", v2_tar.to_str().unwrap()]);
    assert!(ok, "push failed: {out}");
    let log = dev.log_text();
    let verified: Vec<&str> = log.lines().filter(|l| l.contains("image push verified")).collect();
    assert!(
        verified.last().is_some_and(|l| l.contains("layers_not_sent=1")),
        "the CLI left out the binary's layer, which the manager holds (the tiny marker layer \
         is sent without asking): {verified:?}"
    );
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

/// A second, separate Docker engine (own data root, exec root, pid file and socket;
/// no bridge, no iptables) standing in for a remote worker that has never seen the
/// image. Stopped and wiped when dropped. It runs in its own network namespace: a
/// dockerd started with `--bridge=none` deletes any `docker0` it sees, which would
/// cut the host engine's default bridge.
struct SecondEngine {
    dir: PathBuf,
    socket: PathBuf,
    child: std::process::Child,
}

impl SecondEngine {
    async fn start() -> SecondEngine {
        let dir = std::env::temp_dir().join(format!("holdfast-images-dockerd-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        // An empty config file: the host's daemon.json names its own data root.
        std::fs::write(dir.join("daemon.json"), "{}").unwrap();
        let socket = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("unshare")
            .args(["--net", "dockerd"])
            .args(["--config-file", dir.join("daemon.json").to_str().unwrap()])
            .args(["--data-root", dir.join("root").to_str().unwrap()])
            .args(["--exec-root", dir.join("exec").to_str().unwrap()])
            .args(["--pidfile", dir.join("dockerd.pid").to_str().unwrap()])
            .args(["-H", &format!("unix://{}", socket.display())])
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false", "--storage-driver=vfs"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("a second dockerd must start here (root; unshare and dockerd on PATH)");
        let engine = SecondEngine { dir, socket, child };
        let sock = engine.socket.clone();
        eventually(Duration::from_secs(60), "the second dockerd answering", || {
            let sock = sock.clone();
            async move {
                let out = Command::new("docker")
                    .env("DOCKER_HOST", format!("unix://{}", sock.display()))
                    .arg("version")
                    .output()
                    .ok()?;
                out.status.success().then_some(())
            }
        })
        .await;
        engine
    }

    fn docker(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("docker")
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .expect("docker CLI");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for SecondEngine {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a fake manager saw: the `Range` header of every blob request.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

/// Serves blobs of `store` like a manager's cluster port; when `cut` is set, every
/// blob over 64 KiB is cut off halfway (the connection drops mid-body).
async fn fake_manager(
    store: PathBuf,
    cut: bool,
    seen: Seen,
    tls: std::sync::Arc<rustls::ServerConfig>,
    stop: tokio::sync::broadcast::Receiver<()>,
) -> String {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    async fn blob(
        State((store, cut, seen)): State<(PathBuf, bool, Seen)>,
        UrlPath(digest): UrlPath<String>,
        headers: HeaderMap,
    ) -> axum::response::Response {
        let range = headers.get("range").and_then(|v| v.to_str().ok()).map(str::to_string);
        seen.lock().unwrap().push((digest.clone(), range.clone()));
        let Ok(data) = std::fs::read(store.join("sha256").join(&digest[7..])) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let from: usize =
            range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()).unwrap_or(0);
        let rest = bytes::Bytes::from(data[from..].to_vec());
        let status = if from > 0 { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
        let len = rest.len();
        if cut && len > 64 << 10 {
            let half = rest.slice(..len / 2);
            let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
                vec![Ok(half), Err(std::io::Error::other("cable cut"))];
            let body = axum::body::Body::from_stream(futures::stream::iter(chunks));
            return (status, [("content-length", len.to_string())], body).into_response();
        }
        (status, rest).into_response()
    }
    let router = axum::Router::new()
        .route("/cluster/v1/blobs/{digest}", axum::routing::get(blob))
        .with_state((store, cut, seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(holdfast::net::tls::serve(listener, tls, router, Default::default(), stop));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_fetch_resumes_from_another_manager_and_skips_layers_the_remote_engine_has() {
    require_docker();
    let engine = SecondEngine::start().await;
    let dir = tempfile::tempdir().unwrap();
    let id = unique();
    let v1 = format!("holdfast-images-test/remote:{id}-v1");
    let v2 = format!("holdfast-images-test/remote:{id}-v2");
    let _tags = RemoveImages(vec![v1.clone(), v2.clone()]);
    let noise = |n: usize, seed: u8| (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>();
    build_image(dir.path(), &v1, "scratch", &[("a", &noise(3 << 20, 1)), ("b", &noise(1 << 20, 2))]);
    build_image(dir.path(), &v2, &v1, &[("c", &noise(512 << 10, 3))]);
    // The managers' side: the archives ingested into a blob store, as a push does.
    let store_dir = dir.path().join("blobs");
    let store = holdfast::manager::images::BlobStore::new(store_dir.clone(), 0);
    let read = |tag: &str| std::fs::File::open(save(dir.path(), tag)).unwrap();
    let e1 = holdfast::manager::images::ingest(&store, read(&v1)).unwrap().remove(0);
    let e2 = holdfast::manager::images::ingest(&store, read(&v2)).unwrap().remove(0);
    assert_eq!((e1.layers.len(), e2.layers.len()), (2, 3));

    let (client_tls, server_tls) = manager_tls();
    let (stop, _) = tokio::sync::broadcast::channel(1);
    let (seen_a, seen_b): (Seen, Seen) = Default::default();
    let a = fake_manager(store_dir.clone(), true, seen_a.clone(), server_tls.clone(), stop.subscribe()).await;
    let b = fake_manager(store_dir.clone(), false, seen_b.clone(), server_tls, stop.subscribe()).await;
    let fetcher = holdfast::worker::images::Fetcher {
        http: holdfast::net::tls::http_client(client_tls, Duration::from_secs(5)),
        managers: vec![a, b],
        dir: dir.path().join("worker-images"),
        bandwidth: None,
    };
    let config =
        holdfast::worker::runtime::docker::DockerConfig { socket: Some(engine.socket.clone()), ..Default::default() };
    let runtime = holdfast::worker::runtime::docker::DockerRuntime::connect_with(config).await.unwrap();
    let progress: holdfast::worker::images::Progress = std::sync::Arc::new(|_, _| {});

    // v1: manager A cuts every big blob halfway; the rest comes from B by byte range.
    let f1 = fetcher.fetch(&runtime, &e1, progress.clone()).await.expect("v1 fetched");
    assert_eq!((f1.skipped_layers, f1.fetched_layers), (0, 2), "{f1:?}");
    let resumed: Vec<_> = seen_b.lock().unwrap().iter().filter_map(|(_, r)| r.clone()).collect();
    assert!(
        resumed.iter().any(|r| r.starts_with("bytes=") && r != "bytes=0-"),
        "B was asked only for the rest of a cut blob: {resumed:?} (A saw {:?})",
        seen_a.lock().unwrap()
    );
    let total1 = e1.layers.iter().map(|l| l.size).sum::<u64>() + e1.config_size;
    assert_eq!(f1.bytes, total1, "every byte moved once");
    let (ok, id1) = engine.docker(&["image", "inspect", "--format", "{{.Id}}", &v1]);
    assert!(ok && id1 == e1.config_digest, "v1 loaded into the second engine: {id1}");

    // v2: only its top layer and config move.
    let f2 = fetcher.fetch(&runtime, &e2, progress).await.expect("v2 fetched");
    assert_eq!((f2.skipped_layers, f2.fetched_layers), (2, 1), "{f2:?}");
    assert_eq!(f2.bytes, e2.layers[2].size + e2.config_size, "one-layer update moves one layer");
    let (ok, id2) = engine.docker(&["image", "inspect", "--format", "{{.Id}}", &v2]);
    assert!(ok && id2 == e2.config_digest, "v2 loaded: {id2}");
    let _ = stop.send(());
}

/// A minimal `docker save` archive (one layer, a config, a manifest) for `tag`.
fn synthetic_archive(tag: &str, payload: &[u8]) -> (Vec<u8>, String) {
    use sha2::Digest;
    let layer = tar_of(&[("payload", payload)], 0o644);
    let diff_id = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&layer)));
    let config = serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}}))
    .unwrap();
    let cfg = format!("{}.json", hex::encode(sha2::Sha256::digest(&config)));
    let manifest =
        serde_json::to_vec(&json!([{"Config": cfg, "RepoTags": [tag], "Layers": ["l1/layer.tar"]}])).unwrap();
    (tar_of(&[("l1/layer.tar", &layer), (&cfg, &config), ("manifest.json", &manifest)], 0o644), diff_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manager_of_three_ends_up_with_the_blobs_of_a_push() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["m1", "m2", "m3"];
    let apis: Vec<String> = names.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let clusters: Vec<String> = names.iter().map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let data: Vec<PathBuf> = names.iter().map(|n| dir.path().join(n)).collect();
    let start = |i: usize, extra: &[&str]| {
        let mut args = vec!["agent", "--manager", "--node-id", names[i], "--data-dir", data[i].to_str().unwrap()];
        args.extend_from_slice(&["--api", &apis[i], "--cluster", &clusters[i]]);
        args.extend_from_slice(extra);
        Proc::spawn(&args, &dir.path().join(format!("{}.log", names[i])), &[])
    };
    let _m1 = start(0, &["--bootstrap"]);
    let client = api_client(&data[0]).await;
    let token = join_token(&data[0], "manager");
    let _m2 = start(1, &["--join", &clusters[0], "--token", &token]);
    let _m3 = start(2, &["--join", &clusters[0], "--token", &token]);
    eventually(Duration::from_secs(60), "three voters", || async {
        let v = get_json(&client, &format!("http://{}/v1/cluster", apis[0])).await?;
        let voters = v["members"].as_array()?.iter().filter(|m| m["voter"] == true).count();
        (voters == 3).then_some(())
    })
    .await;

    // Pushed to a follower: it stores the blobs, the catalogue entry goes through the leader.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (archive, layer) = synthetic_archive("tiny:1", &payload);
    let follower = eventually(Duration::from_secs(30), "a follower", || async {
        for api in &apis {
            let v = get_json(&client, &format!("http://{api}/v1/cluster")).await?;
            if v["role"] == "Follower" || v["role"] == "follower" {
                return Some(api.clone());
            }
        }
        None
    })
    .await;
    let (status, body) = post_raw(&client, &format!("http://{follower}/v1/images"), archive).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["images"][0]["reference"], "tiny:1");

    // Every manager ends up holding every blob, verified, in its own data dir.
    for (i, api) in apis.iter().enumerate() {
        let url = format!("http://{api}/v1/images");
        eventually(Duration::from_secs(60), &format!("{} holds the blobs", names[i]), || async {
            let v = get_json(&client, &url).await?;
            (v["images"][0]["blobs_here"] == true).then_some(())
        })
        .await;
        assert!(data[i].join("blobs/sha256").join(&layer[7..]).is_file(), "{} has the layer file", names[i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_image_is_retired_and_a_reader_cannot_push() {
    let dir = tempfile::tempdir().unwrap();
    let (api, cluster) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let data = dir.path().join("m1");
    let _m = Proc::spawn(
        &["agent", "--manager", "--bootstrap", "--node-id", "m1", "--data-dir", data.to_str().unwrap()]
            .into_iter()
            .chain(["--api", &api, "--cluster", &cluster, "--image-retain", "1s"])
            .collect::<Vec<_>>(),
        &dir.path().join("m1.log"),
        &[],
    );
    let client = api_client(&data).await;
    let url = |p: &str| format!("http://{api}{p}");

    // A reader may list but not push.
    let made: Value = client
        .post(url("/v1/tokens"))
        .json(&json!({"name": "viewer", "role": "reader"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reader = client_with_token(made["token"].as_str().unwrap());
    let (unused, _) = synthetic_archive("unused:1", b"nobody runs me");
    let (status, body) = post_raw(&reader, &url("/v1/images"), unused.clone()).await;
    assert_eq!(status, 403, "{body}");
    assert!(get_json(&reader, &url("/v1/images")).await.is_some());

    // Two images; a task that should run names one of them (no worker: it stays pending).
    let (kept, _) = synthetic_archive("kept:1", b"a task wants me");
    for archive in [unused, kept] {
        let (status, body) = post_raw(&client, &url("/v1/images"), archive).await;
        assert_eq!(status, 201, "{body}");
    }
    let resp = client.post(url("/v1/tasks")).json(&json!({"image": "kept:1"})).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);

    let left = eventually(Duration::from_secs(30), "the unused image retired", || async {
        let v = get_json(&client, &url("/v1/images")).await?;
        let refs: Vec<String> =
            v["images"].as_array()?.iter().filter_map(|i| i["reference"].as_str().map(String::from)).collect();
        (!refs.contains(&"unused:1".to_string())).then_some(refs)
    })
    .await;
    assert_eq!(left, vec!["kept:1".to_string()], "the image a task wants is kept");
}
