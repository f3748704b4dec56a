//! Benchmark (not a test): three `holdfast agent --manager` processes on loopback with
//! fsync on and mutual TLS between them (on by default). Measures committed
//! submissions/s and latency at 1, 16 and 256 concurrent clients, p99 at a fixed
//! 1,000 req/s offered load, and failover time over repeated leader SIGKILLs as a client
//! that knows all three API addresses sees it, and the CPU time all members spend per
//! acknowledged write (etcd's too).
//!
//! Baseline in the same run: a three-member etcd (`etcd` from Debian's `etcd-server`)
//! with **peer TLS on** (the bench makes its CA and certificates with `openssl` in a
//! temporary directory), doing the same number of puts through its JSON gateway. Rows
//! alternate holdfast and etcd for `BENCH_ROUNDS` rounds, and who goes first rotates
//! each round; the tables quote the median of the rounds and the median of the
//! per-round ratios, so a noisy neighbour hits both. The open loop runs once per round
//! in the same rotating order, each run printed.
//!
//! `BENCH_COMPARE=/path/to/holdfast` adds a second build (for example the last build
//! before cluster TLS) as a third column group, run in the same rounds; its ratio to the
//! build under test is printed too. `BENCH_BIN` replaces the build under test.
//!
//! Run: `cargo bench --bench cluster_submit` (env `BENCH_SECS`, `BENCH_ROUNDS`,
//! `BENCH_KILLS`, `BENCH_COMPARE`, `BENCH_BIN`, `BENCH_ONLY=writes|failover`, `BENCH_KEEP=1`,
//! `BENCH_CLIENTS=1,16,256`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env, free_port, median, millis, Killer};

struct Member {
    name: String,
    api: String,
    cluster: String,
    data: PathBuf,
    proc: Option<Killer>,
}

/// One three-manager holdfast cluster of one build.
struct Cluster {
    label: String,
    bin: PathBuf,
    dir: PathBuf,
    ms: Vec<Member>,
    /// The admin API token.
    token: String,
    /// Whether this build joins with a join token (cluster mTLS); older builds do not.
    tls: bool,
}

fn spawn(bin: &Path, m: &mut Member, extra: &[&str], log: &Path) {
    let out = std::fs::File::create(log).expect("log");
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--manager", "--node-id", &m.name, "--data-dir"])
        .arg(&m.data)
        .args(["--api", &m.api, "--cluster", &m.cluster])
        .args(extra)
        .env("HOLDFAST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(out));
    m.proc = Some(Killer(cmd.spawn().expect("spawn holdfast")));
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[derive(Clone, Copy, Debug)]
struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
    /// CPU time (user + system) the system's processes spent per acknowledged write, µs.
    cpu_us: f64,
}

/// User + system CPU time of `pids` so far (`/proc/<pid>/stat`), in seconds; a process
/// that is gone counts nothing.
fn cpu_secs(pids: &[u32]) -> f64 {
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces): state is the first,
            // utime and stime the 12th and 13th.
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / clock_ticks()
}

/// The kernel's clock ticks per second for `/proc` times (`getconf CLK_TCK`).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// An HTTP client sending `token` (if any) as a bearer token on every request.
fn client(token: Option<&str>, timeout: Duration) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .pool_max_idle_per_host(512)
        .tcp_nodelay(true)
        .timeout(timeout)
        .build()
        .unwrap()
}

type Make = Arc<dyn Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync>;

/// `clients` loops each sending requests made by `make` back to back for `secs`;
/// `pids` are the processes of the system under load, whose CPU time is counted.
async fn closed_loop(http: &reqwest::Client, clients: usize, secs: f64, make: Make, pids: &[u32]) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu_secs(pids);
    let started = Instant::now();
    let mut handles = Vec::new();
    for c in 0..clients {
        let (http, make, stop) = (http.clone(), make.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match make(&http, c * 10_000_000 + n).send().await {
                    Ok(r) if r.status().is_success() => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    let cpu_us = (cpu_secs(pids) - cpu_before) * 1e6 / all.len().max(1) as f64;
    all.sort();
    Figures {
        rate: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(&all, 0.5),
        p99: pct(&all, 0.99),
        errors,
        cpu_us,
    }
}

/// What one open loop measured, and when its slowest request was due (wall clock, to
/// find in the members' logs kept with `BENCH_KEEP=1`).
struct OpenLoop {
    figures: Figures,
    slowest: Option<(std::time::SystemTime, Duration)>,
}

impl OpenLoop {
    fn print(&self, label: &str) {
        let h = &self.figures;
        let mut line = format!(
            "{label:>8}: {:.0} ok/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
            h.rate,
            millis(h.p50),
            millis(h.p99),
            h.errors
        );
        if let Some((at, took)) = self.slowest {
            line += &format!(" (slowest {:.0} ms, due at {})", millis(took), humantime::format_rfc3339_millis(at));
        }
        println!("{line}");
    }
}

/// Open loop: `rate` requests/s for `secs`, latency measured from the scheduled send.
async fn open_loop(http: &reqwest::Client, rate: u64, secs: u64, make: Make) -> OpenLoop {
    let total = (rate * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let wall = std::time::SystemTime::now();
    let mut handles = Vec::with_capacity(total);
    for i in 0..total {
        let at = start + interval * i as u32;
        tokio::time::sleep_until(at).await;
        let (http, make) = (http.clone(), make.clone());
        handles.push(tokio::spawn(async move {
            match make(&http, i).send().await {
                Ok(r) if r.status().is_success() => Ok(at.elapsed()),
                _ => Err(()),
            }
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut slowest: Option<(std::time::SystemTime, Duration)> = None;
    for (i, h) in handles.into_iter().enumerate() {
        match h.await.unwrap() {
            Ok(d) => {
                if slowest.is_none_or(|(_, s)| d > s) {
                    slowest = Some((wall + interval * i as u32, d));
                }
                lat.push(d)
            }
            Err(()) => errors += 1,
        }
    }
    lat.sort();
    let figures = Figures {
        rate: lat.len() as f64 / secs as f64,
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        errors,
        cpu_us: 0.0,
    };
    OpenLoop { figures, slowest }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    let r = http.get(url).timeout(Duration::from_secs(2)).send().await.ok()?;
    r.json().await.ok()
}

async fn wait_for<T, Fut: std::future::Future<Output = Option<T>>>(within: Duration, mut f: impl FnMut() -> Fut) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "benchmark setup timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Cluster {
    /// Starts three managers of `bin` under `dir`: the first bootstraps, the others join
    /// it (with its join token when the build writes one).
    async fn start(label: &str, bin: PathBuf, dir: PathBuf) -> Cluster {
        std::fs::create_dir_all(&dir).unwrap();
        let mut ms: Vec<Member> = (1..=3)
            .map(|i| Member {
                name: format!("m{i}"),
                api: format!("127.0.0.1:{}", free_port()),
                cluster: format!("127.0.0.1:{}", free_port()),
                data: dir.join(format!("m{i}")),
                proc: None,
            })
            .collect();
        let seed = ms[0].cluster.clone();
        spawn(&bin, &mut ms[0], &["--bootstrap"], &dir.join("m1.log"));
        let admin = ms[0].data.join("admin.token");
        let token = wait_for(Duration::from_secs(60), || async { std::fs::read_to_string(&admin).ok() }).await;
        let token = token.trim().to_string();
        // A build with cluster mTLS writes its join token before the admin token (which
        // needs an elected leader); a plain build never writes one.
        let join_token = ms[0].data.join("join-manager.token");
        let tls = join_token.exists();
        let token_arg = join_token.to_str().expect("utf-8 path").to_string();
        for (i, m) in ms.iter_mut().enumerate().skip(1) {
            let extra: Vec<&str> =
                if tls { vec!["--join", &seed, "--token-file", &token_arg] } else { vec!["--join", &seed] };
            spawn(&bin, m, &extra, &dir.join(format!("m{}.log", i + 1)));
        }
        let http = client(Some(&token), Duration::from_secs(2));
        let api0 = ms[0].api.clone();
        wait_for(Duration::from_secs(60), || async {
            let v = get_json(&http, &format!("http://{api0}/v1/cluster")).await?;
            (v["members"].as_array()?.iter().filter(|m| m["voter"] == true).count() == 3).then_some(())
        })
        .await;
        Cluster { label: label.to_string(), bin, dir, ms, token, tls }
    }

    fn http(&self, timeout: Duration) -> reqwest::Client {
        client(Some(&self.token), timeout)
    }

    /// The index and API address of the current leader, as the members report it.
    async fn leader(&self) -> (usize, String) {
        let http = self.http(Duration::from_secs(2));
        wait_for(Duration::from_secs(30), || async {
            for m in self.ms.iter().filter(|m| m.proc.is_some()) {
                if let Some(v) = get_json(&http, &format!("http://{}/v1/cluster", m.api)).await {
                    if let Some(l) = v["leader"]["id"].as_str() {
                        let i = self.ms.iter().position(|m| m.name == l)?;
                        if self.ms[i].proc.is_some() {
                            return Some((i, self.ms[i].api.clone()));
                        }
                    }
                }
            }
            None
        })
        .await
    }

    /// Closed-loop submissions to the leader.
    async fn submit(&self, clients: usize, secs: f64) -> Figures {
        let (_, leader) = self.leader().await;
        let url = format!("http://{leader}/v1/tasks");
        let make: Make = Arc::new(move |http: &reqwest::Client, n| {
            http.post(&url).body(format!(r#"{{"image":"holdfast/echo:latest","name":"b{n}"}}"#))
        });
        closed_loop(&self.http(Duration::from_secs(10)), clients, secs, make, &self.pids()).await
    }

    /// Process ids of the running members.
    fn pids(&self) -> Vec<u32> {
        self.ms.iter().filter_map(|m| m.proc.as_ref().map(|k| k.0.id())).collect()
    }

    /// Leader SIGKILL → the first write acknowledged by any member, as a client that
    /// knows the three API addresses and tries them in turn sees it; `kills` times.
    async fn failover(&mut self, kills: usize) -> Vec<Duration> {
        // A short per-request timeout: a client that waited on a dead member for long
        // would measure its own patience, not the cluster.
        let http = self.http(Duration::from_millis(1500));
        let addrs: Vec<String> = self.ms.iter().map(|m| m.api.clone()).collect();
        let mut times = Vec::new();
        for k in 0..kills {
            let (li, _) = self.leader().await;
            self.ms[li].proc = None; // SIGKILL
            let t = Instant::now();
            let mut next = (li + 1) % addrs.len();
            loop {
                let r = http
                    .post(format!("http://{}/v1/tasks", addrs[next]))
                    .body(format!(r#"{{"image":"x","name":"f{k}"}}"#))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status().as_u16() == 201) {
                    break;
                }
                next = (next + 1) % addrs.len();
                assert!(t.elapsed() < Duration::from_secs(30), "no write accepted 30 s after a leader kill");
            }
            let took = t.elapsed();
            if took > Duration::from_millis(1500) {
                // The slow ones are what to read the members' logs for (BENCH_KEEP=1).
                println!("  kill {k}: {:.0} ms (leader was {})", millis(took), self.ms[li].name);
            }
            times.push(took);
            let log = self.dir.join(format!("{}-{k}.log", self.ms[li].name));
            let seed = self.ms[(li + 1) % 3].cluster.clone();
            let bin = self.bin.clone();
            spawn(&bin, &mut self.ms[li], &["--join", &seed], &log);
            // Let it rejoin and catch up before the next kill: it must know the leader
            // and have applied what the leader had committed when it came back. A kill
            // while it still catches up (after the write rows, through a snapshot of a
            // large state) is two faults at once: it campaigns first with a stale log,
            // is refused, and the election takes another round.
            let api = self.ms[li].api.clone();
            let http2 = self.http(Duration::from_secs(2));
            let addrs = addrs.clone();
            wait_for(Duration::from_secs(60), || async {
                let v = get_json(&http2, &format!("http://{api}/v1/cluster")).await?;
                let leader_api = v["leader"]["api"].as_str()?.to_string();
                let applied = v["last_applied"].as_u64()?;
                let lv = get_json(&http2, &format!("http://{leader_api}/v1/cluster")).await?;
                let committed = lv["commit_index"].as_u64()?;
                (addrs.contains(&leader_api) && applied >= committed).then_some(())
            })
            .await;
        }
        times.sort();
        times
    }
}

fn etcd_available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn openssl(args: &[&str], dir: &Path) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "openssl {} failed", args.join(" "));
}

/// A CA and one peer certificate per etcd member (ECDSA P-256, SAN 127.0.0.1), made with
/// the `openssl` command line in `dir`.
fn etcd_certs(dir: &Path, members: usize) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"], dir);
    openssl(
        &["req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench-etcd-ca", "-days", "2", "-out", "ca.pem"],
        dir,
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )
    .unwrap();
    for i in 0..members {
        let (key, csr, pem) = (format!("e{i}.key"), format!("e{i}.csr"), format!("e{i}.pem"));
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key], dir);
        openssl(&["req", "-new", "-key", &key, "-subj", &format!("/CN=e{i}"), "-out", &csr], dir);
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-out",
                &pem,
            ],
            dir,
        );
    }
}

/// Three etcd members with mutual TLS between peers; clients speak plain HTTP on
/// loopback, as holdfast's API does here.
fn start_etcd(dir: &Path) -> (Vec<Killer>, Vec<String>) {
    let certs = dir.join("etcd-pki");
    etcd_certs(&certs, 3);
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=https://127.0.0.1:{peer}")).collect();
    let mut procs = Vec::new();
    let mut clients = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let log = std::fs::File::create(dir.join(format!("etcd{i}.log"))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(dir.join(format!("etcd{i}")))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--listen-peer-urls", &format!("https://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("https://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .arg("--peer-client-cert-auth")
            .arg("--peer-trusted-ca-file")
            .arg(certs.join("ca.pem"))
            .arg("--peer-cert-file")
            .arg(certs.join(format!("e{i}.pem")))
            .arg("--peer-key-file")
            .arg(certs.join(format!("e{i}.key")))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd");
        procs.push(Killer(child));
        clients.push(format!("127.0.0.1:{client}"));
    }
    (procs, clients)
}

async fn etcd_put(url: &str, clients: usize, secs: f64, pids: &[u32]) -> Figures {
    let url = format!("http://{url}/v3/kv/put");
    let make: Make = Arc::new(move |http: &reqwest::Client, n| {
        // etcd's JSON gateway wants bytes as base64.
        let body = format!(r#"{{"key":"{}","value":"dGFzaw=="}}"#, b64(&format!("k{n}")));
        http.post(&url).body(body)
    });
    closed_loop(&client(None, Duration::from_secs(10)), clients, secs, make, pids).await
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let secs: f64 = env("BENCH_SECS", 4.0);
    let rounds: usize = env("BENCH_ROUNDS", 3).max(1);
    let kills: usize = env("BENCH_KILLS", 20);
    let only: String = env("BENCH_ONLY", String::new());
    let bin = std::env::var_os("BENCH_BIN").map(PathBuf::from).unwrap_or(PathBuf::from(env!("CARGO_BIN_EXE_holdfast")));
    // BENCH_KEEP=1 keeps the members' data and logs (`m<i>.log`, `m<i>-<kill>.log`),
    // also when an assertion stops the bench.
    let keep = env("BENCH_KEEP", 0) == 1;
    let dir = tempfile::Builder::new().disable_cleanup(keep).tempdir().unwrap();
    if keep {
        println!("keeping {}", dir.path().display());
    }
    let mut systems = vec![Cluster::start("holdfast", bin, dir.path().join("a")).await];
    if let Some(other) = std::env::var_os("BENCH_COMPARE") {
        systems.push(Cluster::start("compare", PathBuf::from(other), dir.path().join("b")).await);
    }
    for s in &systems {
        println!("{}: {} (cluster mTLS {})", s.label, s.bin.display(), if s.tls { "on" } else { "off" });
    }
    let etcd = if etcd_available() {
        let (procs, clients) = start_etcd(dir.path());
        let c0 = clients[0].clone();
        let http = client(None, Duration::from_secs(2));
        wait_for(Duration::from_secs(30), || async { get_json(&http, &format!("http://{c0}/health")).await }).await;
        println!("etcd: three members, peer mutual TLS on");
        Some((procs, clients))
    } else {
        println!("etcd not installed (apt-get install etcd-server): no baseline this run");
        None
    };

    if only.is_empty() || only == "writes" {
        let baseline = etcd.as_ref().map(|(procs, c)| (c[0].as_str(), procs.iter().map(|k| k.0.id()).collect()));
        writes(&systems, baseline, secs, rounds).await;
    }
    drop(etcd);

    if only.is_empty() || only == "failover" {
        println!("\n== failover: leader SIGKILL -> next acknowledged write, {kills} kills, load {} ==", load());
        for s in systems.iter_mut() {
            let times = s.failover(kills).await;
            println!(
                "{:>8}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} kills",
                s.label,
                millis(pct(&times, 0.5)),
                millis(pct(&times, 0.99)),
                millis(*times.last().unwrap_or(&Duration::ZERO)),
                times.len()
            );
        }
    }
}

/// The closed-loop table, then CPU per write, then the open loop. `etcd` is the
/// baseline's client address and process ids.
async fn writes(systems: &[Cluster], etcd: Option<(&str, Vec<u32>)>, secs: f64, rounds: usize) {
    println!("\n== submissions, closed loop, {secs}s per row x {rounds} rounds (3 members each, fsync on) ==");
    println!("   medians over rounds; ratio = median of per-round holdfast/etcd (and holdfast/compare)");
    let mut head = format!("{:>7} |", "clients");
    for s in systems {
        head += &format!(
            " {:>9} {:>7} {:>7} {:>4} |",
            format!("{}/s", &s.label[..s.label.len().min(7)]),
            "p50",
            "p99",
            "err"
        );
    }
    head += &format!(" {:>7} {:>7} {:>7} | {:>8}", "etcd/s", "p50", "p99", "vs etcd");
    if systems.len() > 1 {
        head += &format!(" {:>8}", "vs cmp");
    }
    println!("{head}");
    let mut cpu_rows = Vec::new();
    let rows: Vec<usize> = std::env::var("BENCH_CLIENTS")
        .ok()
        .map(|s| s.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or(vec![1, 16, 256]);
    for clients in rows {
        let mut per: Vec<Vec<Figures>> = vec![Vec::new(); systems.len()];
        let mut e: Vec<Figures> = Vec::new();
        for round in 0..rounds {
            for i in turns(systems.len() + usize::from(etcd.is_some()), round) {
                match (systems.get(i), &etcd) {
                    (Some(s), _) => per[i].push(s.submit(clients, secs).await),
                    (None, Some((url, pids))) => e.push(etcd_put(url, clients, secs, pids).await),
                    (None, None) => unreachable!("turns() yields only the systems and etcd"),
                }
            }
        }
        let med = |f: &[Figures]| {
            (
                median(f.iter().map(|x| x.rate).collect()),
                median(f.iter().map(|x| millis(x.p50)).collect()),
                median(f.iter().map(|x| millis(x.p99)).collect()),
                f.iter().map(|x| x.errors).sum::<usize>(),
            )
        };
        let mut line = format!("{clients:>7} |");
        for f in &per {
            let (r, p50, p99, err) = med(f);
            line += &format!(" {r:>9.0} {p50:>7.2} {p99:>7.2} {err:>4} |");
        }
        if e.is_empty() {
            line += &format!(" {:>7} {:>7} {:>7} | {:>8}", "-", "-", "-", "-");
        } else {
            let (r, p50, p99, _) = med(&e);
            let ratio = median(per[0].iter().zip(&e).map(|(h, e)| h.rate / e.rate).collect());
            line += &format!(" {r:>7.0} {p50:>7.2} {p99:>7.2} | {ratio:>8.2}");
        }
        if systems.len() > 1 {
            let ratio = median(per[0].iter().zip(&per[1]).map(|(a, b)| a.rate / b.rate).collect());
            line += &format!(" {ratio:>8.2}");
        }
        println!("{line}   (load {})", load());
        let cpu = |f: &[Figures]| median(f.iter().map(|x| x.cpu_us).collect());
        cpu_rows.push((clients, per.iter().map(|f| cpu(f)).collect::<Vec<_>>(), (!e.is_empty()).then(|| cpu(&e))));
    }

    // Where throughput on a shared machine goes: every member's CPU, not only the
    // leader's, is spent on each write.
    println!("\n== CPU per acknowledged write, all three members together (user + system, µs; medians) ==");
    for (clients, per, e) in cpu_rows {
        let mut line = format!("{clients:>7} |");
        for (s, c) in systems.iter().zip(&per) {
            line += &format!(" {}: {c:>6.0}", s.label);
        }
        if let Some(e) = e {
            line += &format!(" | etcd: {e:>6.0} | holdfast/etcd {:.2}", per[0] / e);
        }
        println!("{line}");
    }

    println!("\n== open loop at 1000 req/s offered, {}s, x {rounds} rounds ==", secs.ceil() as u64);
    for round in 0..rounds {
        for i in turns(systems.len() + usize::from(etcd.is_some()), round) {
            let (label, run) = match (systems.get(i), &etcd) {
                (Some(s), _) => {
                    let (_, leader) = s.leader().await;
                    let url = format!("http://{leader}/v1/tasks");
                    let make: Make = Arc::new(move |http: &reqwest::Client, n| {
                        http.post(&url).body(format!(r#"{{"image":"holdfast/echo:latest","name":"o{round}-{n}"}}"#))
                    });
                    (
                        s.label.as_str(),
                        open_loop(&s.http(Duration::from_secs(10)), 1000, secs.ceil() as u64, make).await,
                    )
                }
                (None, Some((c, _))) => {
                    let url = format!("http://{c}/v3/kv/put");
                    let make: Make = Arc::new(move |http: &reqwest::Client, n| {
                        let key = b64(&format!("o{round}-{n}"));
                        http.post(&url).body(format!(r#"{{"key":"{key}","value":"dGFzaw=="}}"#))
                    });
                    ("etcd", open_loop(&client(None, Duration::from_secs(10)), 1000, secs.ceil() as u64, make).await)
                }
                (None, None) => unreachable!("turns() yields only the systems and etcd"),
            };
            run.print(&format!("{label} r{}", round + 1));
        }
    }
}

/// The order in which `n` contenders run in round `round`: rotated by one each round,
/// so that no build always runs right after another one (the one run second inherits
/// the machine's dirty pages and a warmer or fuller page cache; an open-loop A/B run
/// once in a fixed order could not tell two builds apart).
fn turns(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + round) % n)
}

/// Minimal standard base64 for the etcd gateway's byte fields (written here to keep
/// a dependency out of the benchmark for six lines).
fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
