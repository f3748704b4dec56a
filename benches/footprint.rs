//! Benchmark (not a test): the footprint guard of the write-path work (README
//! "Benchmarks"). For each build, a manager (`--bootstrap`, cluster mTLS and API token as
//! users run it) and one worker joined to it with a join token, both idle; after
//! `BENCH_IDLE` seconds the resident memory of each process is sampled five times, a
//! second apart, and the median is quoted, split into private (anonymous) pages and
//! pages of the binary and other files. The binary's size on disk is printed beside it.
//!
//! Baseline in the same run: `BENCH_COMPARE=/path/to/holdfast` (for example the build
//! before a change) runs in the same rounds, alternating with the build under test, and
//! the ratios are printed. `BENCH_BIN` replaces the build under test (default: the
//! binary cargo built for this bench, i.e. the release profile under `cargo bench`).
//!
//! Run: `cargo bench --bench footprint` (env `BENCH_ROUNDS`, default 3; `BENCH_IDLE`,
//! default 20 s). The worker needs the Docker engine.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{env, free_port, median, Killer};

/// Goals of the write-path issue, in MiB (README "Benchmarks").
const MANAGER_GOAL_MIB: f64 = 12.0;
const WORKER_GOAL_MIB: f64 = 10.0;
const BINARY_GOAL_MIB: f64 = 12.0;

/// Resident memory of one process in KiB: (all, private anonymous, file-backed).
#[derive(Clone, Copy, Default)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

fn rss_of(pid: u32) -> Option<Rss> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()
    };
    Some(Rss { total: field("VmRSS:")?, anon: field("RssAnon:")?, file: field("RssFile:")? + field("RssShmem:")? })
}

/// The median (by total) of five samples a second apart.
fn sample(pid: u32) -> Rss {
    let mut v: Vec<Rss> = (0..5)
        .filter_map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            rss_of(pid)
        })
        .collect();
    assert!(!v.is_empty(), "process {pid} is gone: see its log");
    v.sort_by_key(|r| r.total);
    v[v.len() / 2]
}

fn spawn(bin: &Path, args: &[&str], log: &Path) -> Killer {
    let out = std::fs::File::create(log).expect("log file");
    let child = Command::new(bin)
        .args(args)
        .env("HOLDFAST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(out))
        .spawn()
        .expect("spawn holdfast");
    Killer(child)
}

/// Polls `f` every 100 ms until it gives a value or `within` passes.
fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the worker `w1` shows as ready in the manager's node list.
fn worker_ready(api: &str, token: &str) -> bool {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("http://{api}/v1/nodes"))
        .output();
    let Ok(out) = out else { return false };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return false };
    v["nodes"].as_array().is_some_and(|ns| ns.iter().any(|n| n["id"] == "w1" && n["status"] == "ready"))
}

/// One round of one build: (manager, worker) resident memory after the idle wait.
fn round(bin: &Path, dir: &Path, idle: Duration) -> (Rss, Rss) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("bench dir");
    let (mdata, wdata) = (dir.join("m1"), dir.join("w1"));
    let api = format!("127.0.0.1:{}", free_port());
    let cluster = format!("127.0.0.1:{}", free_port());
    let m_args = ["agent", "--manager", "--node-id", "m1", "--data-dir", path(&mdata), "--api", &api];
    let manager = spawn(bin, &[&m_args[..], &["--cluster", &cluster, "--bootstrap"]].concat(), &dir.join("m1.log"));
    let token = wait_for(Duration::from_secs(60), "the admin token", || {
        std::fs::read_to_string(mdata.join("admin.token")).ok()
    });
    let join = mdata.join("join-worker.token");
    let w_args = ["agent", "--worker", "--node-id", "w1", "--data-dir", path(&wdata), "--join", &cluster];
    let worker = spawn(bin, &[&w_args[..], &["--token-file", path(&join)]].concat(), &dir.join("w1.log"));
    wait_for(Duration::from_secs(60), "the worker to be ready", || worker_ready(&api, token.trim()).then_some(()));
    std::thread::sleep(idle);
    let m = sample(manager.0.id());
    let w = sample(worker.0.id());
    drop(worker);
    drop(manager);
    (m, w)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The medians over rounds of (total, anon, file) in MiB.
fn medians(v: &[Rss]) -> (f64, f64, f64) {
    (
        median(v.iter().map(|r| mib(r.total)).collect()),
        median(v.iter().map(|r| mib(r.anon)).collect()),
        median(v.iter().map(|r| mib(r.file)).collect()),
    )
}

struct Build {
    label: String,
    bin: PathBuf,
    managers: Vec<Rss>,
    workers: Vec<Rss>,
}

fn main() {
    let rounds: usize = env("BENCH_ROUNDS", 3);
    let idle = Duration::from_secs(env("BENCH_IDLE", 20));
    let under_test = std::env::var_os("BENCH_BIN").map(PathBuf::from).unwrap_or(env!("CARGO_BIN_EXE_holdfast").into());
    let mut builds = vec![Build { label: "this build".into(), bin: under_test, managers: vec![], workers: vec![] }];
    if let Some(other) = std::env::var_os("BENCH_COMPARE") {
        builds.push(Build { label: "compared build".into(), bin: other.into(), managers: vec![], workers: vec![] });
    }
    let dir = tempfile::tempdir().expect("temp dir");
    println!("footprint: manager + one joined worker, idle {} s, {rounds} rounds, medians", idle.as_secs());
    for r in 0..rounds {
        // Alternate the order so a noisy neighbour does not always hit the same build.
        let order: Vec<usize> =
            if r % 2 == 0 { (0..builds.len()).collect() } else { (0..builds.len()).rev().collect() };
        for i in order {
            let (m, w) = round(&builds[i].bin, &dir.path().join(format!("b{i}")), idle);
            println!(
                "  round {} {:<15} manager {:.1} MiB, worker {:.1} MiB",
                r + 1,
                builds[i].label,
                mib(m.total),
                mib(w.total)
            );
            builds[i].managers.push(m);
            builds[i].workers.push(w);
        }
    }
    println!("\n| build | binary MiB | manager RSS MiB (anon + file) | worker RSS MiB (anon + file) |");
    println!("|---|---|---|---|");
    for b in &builds {
        let size = std::fs::metadata(&b.bin).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
        let (mt, ma, mf) = medians(&b.managers);
        let (wt, wa, wf) = medians(&b.workers);
        println!("| {} | {size:.1} | {mt:.1} ({ma:.1} + {mf:.1}) | {wt:.1} ({wa:.1} + {wf:.1}) |", b.label);
    }
    println!("| goal | ≤ {BINARY_GOAL_MIB} (stripped) | ≤ {MANAGER_GOAL_MIB} | ≤ {WORKER_GOAL_MIB} |");
    if builds.len() == 2 {
        let ratio = |f: &dyn Fn(&Build) -> &Vec<Rss>| {
            let per_round: Vec<f64> =
                f(&builds[0]).iter().zip(f(&builds[1])).map(|(a, b)| a.total as f64 / b.total as f64).collect();
            median(per_round)
        };
        println!(
            "\nthis build / compared build (median of per-round ratios): manager {:.2}, worker {:.2}",
            ratio(&|b| &b.managers),
            ratio(&|b| &b.workers)
        );
    }
}
