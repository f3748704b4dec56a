//! Benchmark (not a test): submit → echo answers, through `holdfast dev` on the real
//! Docker engine, against raw `docker run` of the same image in the same run (the
//! floor). Then 100 echo tasks on one worker, all answering.
//!
//! Run: `cargo bench --bench docker_e2e` (env `BENCH_TASKS` changes the sample size;
//! `BENCH_BIN=/path/to/holdfast` measures another build than the one cargo built).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{echo_answers, env, free_port, millis, Killer};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::main]
async fn main() {
    let n: usize = env("BENCH_TASKS", 50);
    let bin = std::env::var_os("BENCH_BIN").map(PathBuf::from).unwrap_or(env!("CARGO_BIN_EXE_holdfast").into());
    let dir = tempfile::tempdir().unwrap();
    let node = format!("bench-{}", std::process::id());
    let api = format!("127.0.0.1:{}", free_port());
    let cluster = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("dev.log")).unwrap();
    let _dev = Killer(
        Command::new(&bin)
            .args(["dev", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--api", &api, "--cluster", &cluster, "--node-id", &node])
            .env("HOLDFAST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn holdfast dev"),
    );
    // The API needs the admin token `holdfast dev` writes once it has elected itself.
    let ready_by = Instant::now() + Duration::from_secs(60);
    let token_file = dir.path().join("data").join("admin.token");
    let token = loop {
        if let Ok(t) = std::fs::read_to_string(&token_file) {
            break t.trim().to_string();
        }
        assert!(Instant::now() < ready_by, "holdfast dev wrote no admin.token within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).default_headers(headers).build().unwrap();
    let base = format!("http://{api}");

    // Wait for the dev node: API up and its worker registered with a working engine.
    loop {
        let ready = match http.get(format!("{base}/v1/nodes")).send().await {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .is_some_and(|v| v["nodes"].as_array().is_some_and(|n| n.iter().any(|n| n["engine_ok"] == true))),
            Err(_) => false,
        };
        if ready {
            break;
        }
        assert!(Instant::now() < ready_by, "holdfast dev did not become ready within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Warm-up: the first task builds the echo image from the binary.
    let first = submit_and_wait(&http, &base, 0).await.expect("first echo task");
    println!("first task (includes building holdfast/echo from the binary): {:.0} ms", millis(first));

    let mut hf = Vec::new();
    let mut raw = Vec::new();
    for i in 0..n {
        // Interleave the two so machine noise hits both alike.
        if let Some(d) = submit_and_wait(&http, &base, i + 1).await {
            hf.push(d);
        }
        let t0 = Instant::now();
        let id = docker(&[
            "run",
            "-d",
            "--label",
            &format!("holdfast.bench={node}"),
            "-p",
            "127.0.0.1:0:7777",
            "holdfast/echo:latest",
        ]);
        let port = docker(&["port", &id, "7777/tcp"]);
        let endpoint = port.lines().next().unwrap_or_default().to_string();
        if echo_answers(&http, &endpoint, Instant::now() + Duration::from_secs(30)).await {
            raw.push(t0.elapsed());
        }
        docker(&["rm", "-f", &id]);
    }
    hf.sort();
    raw.sort();
    println!("\n== submit -> echo answers, {n} tasks (holdfast dev vs docker run, same image, same run) ==");
    println!(
        "holdfast:   p50 {:.0} ms  p95 {:.0} ms  ({} ok)",
        millis(pct(&hf, 0.5)),
        millis(pct(&hf, 0.95)),
        hf.len()
    );
    println!(
        "docker run: p50 {:.0} ms  p95 {:.0} ms  ({} ok)",
        millis(pct(&raw, 0.5)),
        millis(pct(&raw, 0.95)),
        raw.len()
    );
    println!(
        "ratio p50 {:.2}x, p95 {:.2}x",
        millis(pct(&hf, 0.5)) / millis(pct(&raw, 0.5)),
        millis(pct(&hf, 0.95)) / millis(pct(&raw, 0.95))
    );

    // 100 tasks on one worker.
    let t = Instant::now();
    let mut ids = Vec::new();
    for i in 0..100 {
        let body = format!(
            r#"{{"image":"holdfast/echo:latest","name":"many{i}","ports":[{{"container":7777}}],"resources":{{"cpu_millis":10,"memory_mb":16}}}}"#
        );
        let r: serde_json::Value =
            http.post(format!("{base}/v1/tasks")).body(body).send().await.unwrap().json().await.unwrap();
        ids.push(r["id"].as_str().unwrap().to_string());
    }
    let mut answering = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    for id in &ids {
        let endpoint = loop {
            let t: serde_json::Value =
                http.get(format!("{base}/v1/tasks/{id}")).send().await.unwrap().json().await.unwrap();
            if let Some(e) = t["endpoints"][0].as_str() {
                break Some(e.to_string());
            }
            if Instant::now() > deadline || t["state"] == "failed" {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Some(e) = endpoint {
            if echo_answers(&http, &e, deadline).await {
                answering += 1;
            }
        }
    }
    println!("\n100 echo tasks on one worker: {answering}/100 answering after {:.1} s", t.elapsed().as_secs_f64());
    for id in &ids {
        let _ = http.delete(format!("{base}/v1/tasks/{id}")).send().await;
    }
    // Containers of this node are removed by the stops; sweep whatever is left.
    let left = docker(&["ps", "-aq", "--filter", &format!("label=holdfast.node={node}")]);
    for id in left.lines() {
        docker(&["rm", "-f", id]);
    }
}

async fn submit_and_wait(http: &reqwest::Client, base: &str, i: usize) -> Option<Duration> {
    let body = format!(
        r#"{{"image":"holdfast/echo:latest","name":"lat{i}","ports":[{{"container":7777}}],"resources":{{"cpu_millis":10,"memory_mb":16}}}}"#
    );
    let t0 = Instant::now();
    let r: serde_json::Value = http.post(format!("{base}/v1/tasks")).body(body).send().await.ok()?.json().await.ok()?;
    let id = r["id"].as_str()?.to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let endpoint = loop {
        let t: serde_json::Value = http.get(format!("{base}/v1/tasks/{id}")).send().await.ok()?.json().await.ok()?;
        if let Some(e) = t["endpoints"][0].as_str() {
            break e.to_string();
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let ok = echo_answers(http, &endpoint, deadline).await;
    let took = t0.elapsed();
    let _ = http.delete(format!("{base}/v1/tasks/{id}")).send().await;
    ok.then_some(took)
}
