//! Benchmark (not a test): snapshot save and restore at 100,000 tasks. One
//! `holdfast agent --manager` process (fsync on) is filled through the API, then
//! `holdfast cluster snapshot save` (online, through the API, streamed with its
//! checksum) and `holdfast cluster snapshot restore` (a new data dir) are timed, three
//! runs each, medians quoted. Baseline in the same run: a plain copy of the same
//! `state.db` file (`std::fs::copy`, what a cold file-level backup would cost), and
//! SQLite's own `VACUUM INTO` of it.
//!
//! Run: `cargo bench --bench snapshot` (env `BENCH_TASKS` changes the task count).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{env, free_port, Killer};
use futures::StreamExt;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run(bin: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(bin).args(args).env("HOLDFAST_LOG", "warn").output().expect("run holdfast");
    let took = t.elapsed();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    took
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tasks: usize = env("BENCH_TASKS", 100_000);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("m1");
    let api = format!("127.0.0.1:{}", free_port());
    let cluster = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(root.path().join("m1.log")).expect("log");
    let _m = Killer(
        Command::new(&bin)
            .args(["agent", "--manager", "--bootstrap", "--node-id", "m1", "--data-dir"])
            .arg(&data)
            .args(["--api", &api, "--cluster", &cluster])
            .env("HOLDFAST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn holdfast"),
    );
    let token_file = data.join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(60);
    let token = loop {
        if let Some(t) = std::fs::read_to_string(&token_file).ok().filter(|t| !t.trim().is_empty()) {
            break t.trim().to_string();
        }
        assert!(Instant::now() < deadline, "no admin token");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().expect("header"));
    let client = reqwest::Client::builder().default_headers(headers).timeout(Duration::from_secs(30)).build().unwrap();

    // Fill: tasks that no node can take (there is none), as a cluster with a backlog.
    let fill = Instant::now();
    let url = format!("http://{api}/v1/tasks");
    let ok: usize = futures::stream::iter(0..tasks)
        .map(|i| {
            let (c, url) = (client.clone(), url.clone());
            async move {
                let spec = serde_json::json!({"image": "holdfast/echo:latest", "name": format!("bench-{i}"),
                    "env": {"N": i.to_string()}});
                for _ in 0..5 {
                    if let Ok(r) = c.post(&url).json(&spec).send().await {
                        if r.status().as_u16() == 201 {
                            return 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                0
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<usize>>()
        .await
        .iter()
        .sum();
    assert_eq!(ok, tasks, "every task submitted");
    println!("filled {tasks} tasks through the API in {:.1} s", fill.elapsed().as_secs_f64());

    let api_url = format!("http://{api}");
    let mut saves = Vec::new();
    let mut size = 0;
    for i in 0..3 {
        let file = root.path().join(format!("s{i}.snapshot"));
        let f = file.to_str().unwrap();
        saves.push(run(&bin, &["cluster", "snapshot", "save", f, "--api-url", &api_url, "--token", &token]));
        size = std::fs::metadata(&file).expect("snapshot").len();
    }
    let mut restores = Vec::new();
    for i in 0..3 {
        let dir = root.path().join(format!("r{i}"));
        let file = root.path().join(format!("s{i}.snapshot"));
        restores.push(run(
            &bin,
            &[
                "cluster",
                "snapshot",
                "restore",
                file.to_str().unwrap(),
                "--data-dir",
                dir.to_str().unwrap(),
                "--node-id",
                "r1",
            ],
        ));
    }
    // Baselines on the same state.db.
    let state = data.join("manager").join("state.db");
    let db_size = std::fs::metadata(&state).expect("state.db").len();
    let mut copies = Vec::new();
    let mut vacuums = Vec::new();
    for i in 0..3 {
        let dest = root.path().join(format!("copy{i}.db"));
        let t = Instant::now();
        std::fs::copy(&state, &dest).expect("copy");
        copies.push(t.elapsed());
        let dest = root.path().join(format!("vacuum{i}.db"));
        let conn = rusqlite::Connection::open_with_flags(&state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let t = Instant::now();
        conn.execute("VACUUM INTO ?1", [dest.to_str().unwrap()]).expect("vacuum into");
        vacuums.push(t.elapsed());
    }
    let (save, restore, copy, vacuum) = (median(saves), median(restores), median(copies), median(vacuums));
    println!("snapshot at {tasks} tasks (medians of 3):");
    println!("  save (API, streamed, checksummed): {:>9.1} ms, file {:.1} MiB", ms(save), size as f64 / 1048576.0);
    println!("  restore into a new data dir:       {:>9.1} ms", ms(restore));
    println!("  baseline file copy of state.db:    {:>9.1} ms, {:.1} MiB", ms(copy), db_size as f64 / 1048576.0);
    println!("  baseline SQLite VACUUM INTO:       {:>9.1} ms", ms(vacuum));
    println!(
        "  ratios: save/copy {:.1}x, save/vacuum {:.2}x, restore/copy {:.1}x, file/state.db {:.2}x",
        ms(save) / ms(copy).max(0.001),
        ms(save) / ms(vacuum).max(0.001),
        ms(restore) / ms(copy).max(0.001),
        size as f64 / db_size.max(1) as f64
    );
}
