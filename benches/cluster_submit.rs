//! Benchmark (not a test): three `holdfast agent --manager` processes on loopback with
//! fsync on. Measures committed submissions/s and latency at 1, 16 and 256 concurrent
//! clients, p99 at a fixed 1,000 req/s offered load, and failover time over repeated
//! leader SIGKILLs. Baseline in the same run: a three-member etcd (`etcd` from Debian's
//! `etcd-server`) doing the same number of puts through its JSON gateway.
//!
//! Run: `cargo bench --bench cluster_submit` (env `BENCH_SECS`, `BENCH_KILLS` shorten it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

struct Killer(Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Member {
    name: String,
    api: String,
    cluster: String,
    data: PathBuf,
    proc: Option<Killer>,
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

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Clone, Copy, Debug)]
struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
    errors: usize,
}

/// `clients` loops each sending requests made by `make` back to back for `secs`.
async fn closed_loop<F>(clients: usize, secs: u64, make: F) -> Figures
where
    F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let http = authed(reqwest::Client::builder())
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let make = Arc::new(make);
    let stop = Arc::new(AtomicBool::new(false));
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
                match make(&http, c * 1_000_000 + n).send().await {
                    Ok(r) if r.status().is_success() => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
                n += 1;
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for h in handles {
        let (l, e) = h.await.unwrap();
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    all.sort();
    Figures { rate: all.len() as f64 / elapsed.as_secs_f64(), p50: pct(&all, 0.5), p99: pct(&all, 0.99), errors }
}

/// Open loop: `rate` requests/s for `secs`, latency measured from the scheduled send.
async fn open_loop<F>(rate: u64, secs: u64, make: F) -> Figures
where
    F: Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let http = authed(reqwest::Client::builder())
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let make = Arc::new(make);
    let total = (rate * secs) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
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
    for h in handles {
        match h.await.unwrap() {
            Ok(d) => lat.push(d),
            Err(()) => errors += 1,
        }
    }
    lat.sort();
    Figures { rate: lat.len() as f64 / secs as f64, p50: pct(&lat, 0.5), p99: pct(&lat, 0.99), errors }
}

/// The admin API token of the bootstrap manager, once it has written it.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Adds the admin token to every request of a client (etcd ignores the header).
fn authed(b: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = TOKEN.get() {
        headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
    }
    b.default_headers(headers)
}

async fn get_json(url: &str) -> Option<serde_json::Value> {
    let r = authed(reqwest::Client::builder())
        .build()
        .unwrap()
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
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

async fn leader_api(ms: &[Member]) -> (usize, String) {
    wait_for(Duration::from_secs(30), || async {
        for m in ms.iter().filter(|m| m.proc.is_some()) {
            if let Some(v) = get_json(&format!("http://{}/v1/cluster", m.api)).await {
                if let Some(l) = v["leader"]["id"].as_str() {
                    let i = ms.iter().position(|m| m.name == l)?;
                    if ms[i].proc.is_some() {
                        return Some((i, ms[i].api.clone()));
                    }
                }
            }
        }
        None
    })
    .await
}

fn etcd_available() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn start_etcd(dir: &Path) -> (Vec<Killer>, Vec<String>) {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> =
        ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
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
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd");
        procs.push(Killer(child));
        clients.push(format!("127.0.0.1:{client}"));
    }
    (procs, clients)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(run());
}

async fn run() {
    let secs: u64 = std::env::var("BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let kills: usize = std::env::var("BENCH_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_holdfast"));
    let dir = tempfile::tempdir().unwrap();
    let mut ms: Vec<Member> = (1..=3)
        .map(|i| Member {
            name: format!("m{i}"),
            api: format!("127.0.0.1:{}", free_port()),
            cluster: format!("127.0.0.1:{}", free_port()),
            data: dir.path().join(format!("m{i}")),
            proc: None,
        })
        .collect();
    let seed = ms[0].cluster.clone();
    let token_file = ms[0].data.join("join-manager.token");
    let token_arg = token_file.to_str().expect("utf-8 path").to_string();
    for (i, m) in ms.iter_mut().enumerate() {
        let log = dir.path().join(format!("m{}.log", i + 1));
        // Mutual TLS on the cluster port: the others join with the first one's token.
        let extra: Vec<&str> =
            if i == 0 { vec!["--bootstrap"] } else { vec!["--join", &seed, "--token-file", &token_arg] };
        if i == 1 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !token_file.exists() {
                assert!(Instant::now() < deadline, "the first manager wrote no join token");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        spawn(&bin, m, &extra, &log);
    }
    let token_file = ms[0].data.join("admin.token");
    let token = wait_for(Duration::from_secs(60), || async { std::fs::read_to_string(&token_file).ok() }).await;
    let _ = TOKEN.set(token.trim().to_string());
    let api0 = ms[0].api.clone();
    wait_for(Duration::from_secs(60), || async {
        let v = get_json(&format!("http://{api0}/v1/cluster")).await?;
        (v["members"].as_array()?.iter().filter(|m| m["voter"] == true).count() == 3).then_some(())
    })
    .await;
    let (_, leader) = leader_api(&ms).await;

    let etcd = if etcd_available() {
        let (procs, clients) = start_etcd(dir.path());
        let c0 = clients[0].clone();
        wait_for(Duration::from_secs(30), || async { get_json(&format!("http://{c0}/health")).await }).await;
        Some((procs, clients))
    } else {
        println!("etcd not installed (apt-get install etcd-server): no baseline this run");
        None
    };

    println!("\n== submissions, closed loop, {secs}s per row (3 managers, fsync on) ==");
    println!(
        "{:>8} | {:>10} {:>8} {:>8} {:>6} | {:>10} {:>8} {:>8} | {:>7}",
        "clients", "holdfast/s", "p50 ms", "p99 ms", "errors", "etcd/s", "p50 ms", "p99 ms", "ratio"
    );
    for clients in [1usize, 16, 256] {
        let url = format!("http://{leader}/v1/tasks");
        let h = closed_loop(clients, secs, move |http, n| {
            http.post(&url).body(format!(r#"{{"image":"holdfast/echo:latest","name":"b{n}"}}"#))
        })
        .await;
        let e = match &etcd {
            Some((_, clients_urls)) => {
                let url = format!("http://{}/v3/kv/put", clients_urls[0]);
                Some(
                    closed_loop(clients, secs, move |http, n| {
                        // base64 of a short key/value; etcd's JSON gateway wants bytes as base64.
                        let body = format!(r#"{{"key":"{}","value":"dGFzaw=="}}"#, b64(&format!("k{n}")));
                        http.post(&url).body(body)
                    })
                    .await,
                )
            }
            None => None,
        };
        let (er, ep50, ep99, ratio) = match e {
            Some(e) => (
                format!("{:.0}", e.rate),
                format!("{:.2}", millis(e.p50)),
                format!("{:.2}", millis(e.p99)),
                format!("{:.2}", h.rate / e.rate),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{clients:>8} | {:>10.0} {:>8.2} {:>8.2} {:>6} | {er:>10} {ep50:>8} {ep99:>8} | {ratio:>7}",
            h.rate,
            millis(h.p50),
            millis(h.p99),
            h.errors
        );
    }

    println!("\n== open loop at 1000 req/s offered, {secs}s ==");
    let url = format!("http://{leader}/v1/tasks");
    let h = open_loop(1000, secs, move |http, n| {
        http.post(&url).body(format!(r#"{{"image":"holdfast/echo:latest","name":"o{n}"}}"#))
    })
    .await;
    println!(
        "holdfast: {:.0} ok/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
        h.rate,
        millis(h.p50),
        millis(h.p99),
        h.errors
    );
    if let Some((_, c)) = &etcd {
        let url = format!("http://{}/v3/kv/put", c[0]);
        let e = open_loop(1000, secs, move |http, n| {
            http.post(&url).body(format!(r#"{{"key":"{}","value":"dGFzaw=="}}"#, b64(&format!("o{n}"))))
        })
        .await;
        println!(
            "etcd:     {:.0} ok/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
            e.rate,
            millis(e.p50),
            millis(e.p99),
            e.errors
        );
    }
    drop(etcd);

    println!("\n== failover: leader SIGKILL -> next acknowledged write, {kills} kills ==");
    let http = authed(reqwest::Client::builder()).timeout(Duration::from_secs(2)).build().unwrap();
    let mut times = Vec::new();
    for k in 0..kills {
        let (li, _) = leader_api(&ms).await;
        ms[li].proc = None; // SIGKILL
        let t = Instant::now();
        let survivors: Vec<String> = ms.iter().filter(|m| m.proc.is_some()).map(|m| m.api.clone()).collect();
        'outer: loop {
            for api in &survivors {
                let r = http
                    .post(format!("http://{api}/v1/tasks"))
                    .body(format!(r#"{{"image":"x","name":"f{k}"}}"#))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status().as_u16() == 201) {
                    break 'outer;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no write accepted 30 s after a leader kill");
        }
        times.push(t.elapsed());
        let log = dir.path().join(format!("{}-{k}.log", ms[li].name));
        let seed = ms[(li + 1) % 3].cluster.clone();
        spawn(&bin, &mut ms[li], &["--join", &seed], &log);
        // Let it rejoin before the next kill so a quorum survives it.
        let api = ms[li].api.clone();
        wait_for(Duration::from_secs(30), || async {
            let v = get_json(&format!("http://{api}/v1/cluster")).await?;
            v["leader"]["id"].as_str().map(|_| ())
        })
        .await;
    }
    times.sort();
    println!(
        "failover over {} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        times.len(),
        millis(pct(&times, 0.5)),
        millis(pct(&times, 0.99)),
        millis(*times.last().unwrap_or(&Duration::ZERO))
    );
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
