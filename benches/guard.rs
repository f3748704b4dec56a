//! Benchmark (not a test): what the in-container guard costs an `exclusive` task.
//!
//! - Start latency on the real engine: create + start of the echo image until it
//!   answers on its published port, guarded (image inspect, guard volume, deadline
//!   written, `holdfast guard` as PID 1) against unguarded (the baseline), interleaved
//!   in the same run; medians and their ratio.
//! - The guard's resident memory inside the container (VmRSS of PID 1, read from the
//!   host's /proc), next to the echo app's own.
//!
//! Run: `cargo bench --bench guard` (env `BENCH_STARTS` changes the sample size).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{echo_answers, env, millis};
use holdfast::guard::{boottime_ms, Deadline};
use holdfast::worker::runtime::docker::{DockerConfig, DockerRuntime};
use holdfast::worker::runtime::{ContainerSpec, GuardSpec, PortMap, Runtime};

const ECHO: &str = "holdfast/echo:latest";

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// (VmRSS, RssAnon) in KiB of a host pid: all resident pages, and the private ones (the
/// rest are the binary's file pages, shared through the page cache by every guard that
/// maps the same volume file).
fn rss_kib(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn spec(name: &str, guarded: bool) -> ContainerSpec {
    ContainerSpec {
        name: name.to_string(),
        image: ECHO.to_string(),
        command: Vec::new(),
        env: BTreeMap::new(),
        ports: vec![PortMap { container: 7777, host: 0 }],
        cpu_millis: 0,
        memory_mb: 64,
        labels: BTreeMap::from([("holdfast.bench".to_string(), "guard".to_string())]),
        guard: guarded
            .then(|| GuardSpec { deadline: Deadline { at_boot_ms: boottime_ms() + 600_000, grace_ms: 2_000 } }),
    }
}

/// One start: create + start until the echo answers; returns the latency and the
/// container id (left running for the caller to measure and remove).
async fn start_once(rt: &DockerRuntime, http: &reqwest::Client, name: &str, guarded: bool) -> (Duration, String) {
    let started = Instant::now();
    let info = rt.create_and_start(&spec(name, guarded)).await.expect("create and start");
    let port = info.ports.iter().find(|(c, _)| *c == 7777).map(|(_, h)| *h).expect("published port");
    assert!(
        echo_answers(http, &format!("127.0.0.1:{port}"), Instant::now() + Duration::from_secs(30)).await,
        "echo never answered"
    );
    (started.elapsed(), info.id)
}

#[tokio::main]
async fn main() {
    let n: usize = env("BENCH_STARTS", 15);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
    let rt =
        DockerRuntime::connect_with(DockerConfig { self_binary: bin, ..Default::default() }).await.expect("docker");
    rt.ensure_image(ECHO).await.expect("echo image");
    rt.ensure_guard().await.expect("guard volume");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
    let tag = std::process::id();

    // Warm-up of both paths, then interleaved samples so drift hits both alike.
    let mut plain = Vec::new();
    let mut guarded = Vec::new();
    let mut rss = Vec::new();
    for i in 0..=n {
        for g in [false, true] {
            let name = format!("hf-bench-guard-{tag}-{i}-{g}");
            let (took, id) = start_once(&rt, &http, &name, g).await;
            if g {
                let pid1 = docker(&["inspect", "--format", "{{.State.Pid}}", &id]);
                let children =
                    std::fs::read_to_string(format!("/proc/{pid1}/task/{pid1}/children")).unwrap_or_default();
                let app = children.split_whitespace().next().unwrap_or_default().to_string();
                rss.push((rss_kib(&pid1), rss_kib(&app)));
            }
            let _ = rt.remove(&id).await;
            if i > 0 {
                if g {
                    guarded.push(took)
                } else {
                    plain.push(took)
                }
            }
        }
    }
    let (p, g) = (median(plain), median(guarded));
    let guard_rss = rss.iter().map(|r| r.0 .0).max().unwrap_or(0);
    let guard_anon = rss.iter().map(|r| r.0 .1).max().unwrap_or(0);
    let app_rss = rss.iter().map(|r| r.1 .0).max().unwrap_or(0);
    println!("start until the echo answers, median of {n} (interleaved, same run):");
    println!("  unguarded (baseline)  {:>8.1} ms", millis(p));
    println!("  guarded               {:>8.1} ms", millis(g));
    println!("  ratio guarded/unguarded {:.2}", g.as_secs_f64() / p.as_secs_f64());
    println!("resident memory inside the container (max over {} samples):", rss.len());
    println!("  guard (PID 1)         {guard_rss} KiB, of which private (anonymous) {guard_anon} KiB");
    println!("  echo app (its child)  {app_rss} KiB");
}
