//! Benchmark (not a test): images without a registry on the real Docker engine.
//!
//! - push: `holdfast image push FILE` of a ~100 MB image to `holdfast dev`, in MB/s;
//! - fetch: the worker's fetch + `docker load` of it (the placement's `pulling` →
//!   `starting` interval), in MB/s;
//! - baseline, same run: `docker save IMAGE | docker load` of the same image;
//! - one-layer update: bytes a worker fetches for version 2 (version 1 + one 1 MiB
//!   layer) while it holds version 1.
//!
//! Medians of `BENCH_ROUNDS` (default 3). Run: `cargo bench --bench images`.

mod common;
#[path = "../tests/common/docker.rs"]
mod docker_cli;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{env, free_port, Killer};
use docker_cli::{build_image, docker, RemoveImages};
use serde_json::{json, Value};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Bytes that do not compress (an xorshift stream).
fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(n);
    out
}

async fn json_get(http: &reqwest::Client, url: &str) -> Option<Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

/// Submits a task for `image`, waits until it runs, and returns the time between its
/// placement's `pulling` and `starting` events (the fetch and load).
async fn run_and_time_fetch(http: &reqwest::Client, api: &str, image: &str) -> (String, Duration) {
    let spec = json!({"image": image, "command": ["echo", "--listen", "0.0.0.0:7777"], "ports": [{"container": 7777}]});
    let v: Value = http.post(format!("http://{api}/v1/tasks")).json(&spec).send().await.unwrap().json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(Instant::now() < deadline, "task {id} did not run");
        if let Some(t) = json_get(http, &format!("http://{api}/v1/tasks/{id}")).await {
            if t["state"] == "failed" {
                panic!("task failed: {t}");
            }
            if t["state"] == "running" {
                let events = t["placements"][0]["events"].as_array().cloned().unwrap_or_default();
                let at = |what: &str| events.iter().find(|e| e["what"] == what).and_then(|e| e["at_ms"].as_u64());
                let (p, s) = (at("pulling").expect("a pulling event"), at("starting").expect("a starting event"));
                return (id, Duration::from_millis(s - p));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop_and_wait(http: &reqwest::Client, api: &str, id: &str, node: &str) {
    let _ = http.delete(format!("http://{api}/v1/tasks/{id}")).send().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=holdfast.task={id}"),
                "--filter",
                &format!("label=holdfast.node={node}"),
            ])
            .output()
            .unwrap();
        if out.stdout.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() {
    let rounds: usize = env("BENCH_ROUNDS", 3).max(1);
    let dir = tempfile::tempdir().unwrap();
    let id = format!("{:x}", std::process::id());
    let (v1, v2) = (format!("holdfast-images-bench/app:{id}-v1"), format!("holdfast-images-bench/app:{id}-v2"));
    let _tags = RemoveImages(vec![v1.clone(), v2.clone()]);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
    let binary = std::fs::read(&bin).unwrap();
    let filler = 100usize.saturating_sub(binary.len() >> 20).max(1) << 20;
    build_image(dir.path(), &v1, "scratch", &[("holdfast", &binary), ("filler", &noise(filler, 7))]);
    build_image(dir.path(), &v2, &v1, &[("update", &noise(1 << 20, 9))]);
    let tar1 = dir.path().join("v1.tar");
    let tar2 = dir.path().join("v2.tar");
    docker(&["save", "-o", tar1.to_str().unwrap(), &v1]);
    docker(&["save", "-o", tar2.to_str().unwrap(), &v2]);
    let size = std::fs::metadata(&tar1).unwrap().len();
    println!("image {v1}: {:.1} MiB as a docker save archive", size as f64 / (1 << 20) as f64);

    // Baseline: docker save | docker load of the same image.
    let mut base = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let ok = Command::new("sh")
            .args(["-c", &format!("docker save {v1} | docker load -q")])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        base.push(t.elapsed());
    }
    let base = median(base);

    let node = format!("bench-images-{id}");
    let api = format!("127.0.0.1:{}", free_port());
    let cluster = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("data");
    let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
    let _dev = Killer(
        Command::new(&bin)
            .args([
                "dev",
                "--data-dir",
                data.to_str().unwrap(),
                "--api",
                &api,
                "--cluster",
                &cluster,
                "--node-id",
                &node,
            ])
            .env("HOLDFAST_LOG", "info,openraft=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let token_file = data.join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !token_file.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    let http = reqwest::Client::builder().default_headers(headers).timeout(Duration::from_secs(30)).build().unwrap();
    let push = |file: &Path| {
        let t = Instant::now();
        let out = Command::new(&bin)
            .args([
                "image",
                "push",
                file.to_str().unwrap(),
                "--api-url",
                &format!("http://{api}"),
                "--data-dir",
                data.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
        t.elapsed()
    };
    // Wait for the worker to register.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = json_get(&http, &format!("http://{api}/v1/nodes")).await.unwrap_or(Value::Null);
        if v["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["engine_ok"] == true)) || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pushes = median((0..rounds).map(|_| push(&tar1)).collect());
    let mut fetches = Vec::new();
    for _ in 0..rounds {
        docker(&["rmi", "-f", &v1, &v2]);
        let (task, d) = run_and_time_fetch(&http, &api, &v1).await;
        fetches.push(d);
        stop_and_wait(&http, &api, &task, &node).await;
    }
    let fetch = median(fetches);

    // One-layer update: the worker holds v1 (just fetched), v2 adds one 1 MiB layer.
    push(&tar2);
    let (_task, _) = run_and_time_fetch(&http, &api, &v2).await;
    let logtext = std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default();
    let bytes_of = |line: &str| -> u64 {
        line.split_whitespace().find_map(|w| w.strip_prefix("bytes=")).and_then(|b| b.parse().ok()).unwrap_or(0)
    };
    let fetched: Vec<u64> =
        logtext.lines().filter(|l| l.contains("image fetched from the managers")).map(bytes_of).collect();
    let update_bytes = fetched.last().copied().unwrap_or(0);
    let full_bytes = fetched.first().copied().unwrap_or(0);

    println!(
        "baseline docker save | docker load: {:>8.0} ms  {:>7.1} MiB/s",
        base.as_secs_f64() * 1e3,
        mbps(size, base)
    );
    println!(
        "holdfast image push (file):         {:>8.0} ms  {:>7.1} MiB/s  ratio to baseline {:.2}",
        pushes.as_secs_f64() * 1e3,
        mbps(size, pushes),
        pushes.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "worker fetch + load:                {:>8.0} ms  {:>7.1} MiB/s  ratio to baseline {:.2}",
        fetch.as_secs_f64() * 1e3,
        mbps(size, fetch),
        fetch.as_secs_f64() / base.as_secs_f64()
    );
    println!(
        "one-layer update: fetched {update_bytes} bytes for v2 ({:.1}% of the {full_bytes} bytes of a full fetch)",
        100.0 * update_bytes as f64 / full_bytes.max(1) as f64
    );
}
