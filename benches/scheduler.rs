//! Benchmark (not a test) of placement.
//!
//! 1. The pure scheduler: time per placement at 500, 5,000 and 50,000 nodes.
//! 2. Placements committed per second by the leader's planner (plan → Raft → apply with
//!    its re-check) on a single-member cluster with fsync on: 5,000 simulated nodes and
//!    100,000 tasks. Anchor: Nomad's C1M placed about 3,750 containers/s (5 servers,
//!    5,000 hosts).
//!
//! Run: `cargo bench --bench scheduler` (env `BENCH_TASKS`, `BENCH_NODES` shrink it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use holdfast::manager::scheduler::{plan, ClusterView, NodeView, Pending};
use holdfast::manager::state::{Command, DomainState};
use holdfast::manager::{leader, Liveness, Manager, ManagerSettings};
use holdfast::model::spec::{Constraints, Resources};
use holdfast::model::sync::NodeResources;

fn node(i: usize) -> NodeView {
    let mut labels = BTreeMap::new();
    labels.insert("zone".to_string(), format!("z{}", i % 3));
    NodeView {
        name: format!("n{i:05}"),
        eligible: true,
        status: "ready".into(),
        labels,
        cpu_millis: 8_000,
        memory_mb: 32_768,
        disk_mb: 200_000,
        reserved_cpu_millis: 0,
        reserved_memory_mb: 0,
        reserved_disk_mb: 0,
        measured_free_memory_mb: Some(30_000),
        measured_free_disk_mb: Some(150_000),
        images: Default::default(),
    }
}

fn pure(nodes: usize, tasks: usize) -> f64 {
    let view = ClusterView { nodes: (0..nodes).map(node).collect(), ..Default::default() };
    let work: Vec<Pending> = (0..tasks)
        .map(|i| Pending {
            task_id: format!("t{i}"),
            resources: Resources { cpu_millis: 100, memory_mb: 128, disk_mb: 10 },
            constraints: Constraints::default(),
            replaces: None,
            avoid: Vec::new(),
            image: None,
        })
        .collect();
    let mut samples = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(&view, &work);
        samples.push(t.elapsed().as_secs_f64() * 1e6 / p.placements.len().max(1) as f64);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

async fn write(m: &Manager, cmd: &Command) {
    let bytes = serde_json::to_vec(cmd).unwrap();
    m.db.write(bytes).await.expect("write");
}

fn now_ms() -> u64 {
    holdfast::manager::now_ms()
}

/// The TLS client of a one-member cluster: a manager certificate of a fresh CA, which
/// is the only root (a client with no root is refused when built).
fn bench_tls() -> std::sync::Arc<rustls::ClientConfig> {
    use holdfast::net::{pki, tls};
    let ca = pki::Ca::generate().expect("CA");
    let (cert, key) = ca.issue("bench", pki::Role::Manager, Duration::from_secs(3600)).expect("leaf");
    let resolver = tls::CertResolver::new(tls::certified_key(&cert, &key, &ca.cert_pem).expect("key"));
    tls::client_config(&[ca.cert_der().expect("CA der")], resolver).expect("tls")
}

async fn committed(nodes: usize, tasks: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (domain, applied) = DomainState::new();
    // A one-member cluster never dials a peer; its TLS client is never used.
    let tls = bench_tls();
    let cfg = holdfast_raft::Config::new("bench", dir.path().join("m"), "127.0.0.1:1", "127.0.0.1:2", tls);
    let db = holdfast_raft::ReplicatedDb::open(cfg, domain.clone()).await.expect("open");
    db.bootstrap().await.expect("bootstrap");
    let settings = ManagerSettings { heartbeat_ttl: Duration::from_secs(3600), ..Default::default() };
    let m = Manager::new(db, applied, settings, Default::default(), domain);
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.db.status().role != holdfast_raft::Role::Leader {
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Register nodes, 64 writes in flight (openraft batches concurrent appends).
    let t = Instant::now();
    let mut names = Vec::new();
    for chunk in (0..nodes).collect::<Vec<_>>().chunks(64) {
        let futs = chunk.iter().map(|i| {
            let v = node(*i);
            names.push(v.name.clone());
            let cmd = Command::RegisterNode {
                name: v.name,
                address: "10.0.0.1".into(),
                labels: v.labels,
                cpu_millis: v.cpu_millis,
                memory_mb: v.memory_mb,
                disk_mb: v.disk_mb,
                now_ms: now_ms(),
            };
            let m = &m;
            async move { write(m, &cmd).await }
        });
        futures::future::join_all(futs).await;
    }
    println!("registered {nodes} nodes in {:.1} s", t.elapsed().as_secs_f64());
    {
        let mut live = m.liveness.lock().unwrap();
        for n in &names {
            live.insert(
                n.clone(),
                Liveness {
                    last_seen: Instant::now(),
                    resources: NodeResources {
                        memory_free_mb: 30_000,
                        disk_free_mb: 150_000,
                        engine_ok: true,
                        ..Default::default()
                    },
                },
            );
        }
    }

    let t = Instant::now();
    let spec: holdfast::model::TaskSpec = serde_json::from_str(
        r#"{"image":"holdfast/echo:latest","resources":{"cpu_millis":100,"memory_mb":128,"disk_mb":10}}"#,
    )
    .unwrap();
    for chunk in (0..tasks).collect::<Vec<_>>().chunks(256) {
        let futs = chunk.iter().map(|i| {
            let cmd = Command::SubmitTask {
                id: format!("t{i:06}"),
                spec: Box::new(spec.clone()),
                idempotency_key: None,
                now_ms: now_ms(),
            };
            let m = &m;
            async move { write(m, &cmd).await }
        });
        futures::future::join_all(futs).await;
    }
    let submit = t.elapsed();
    println!("submitted {tasks} tasks in {:.1} s ({:.0}/s)", submit.as_secs_f64(), tasks as f64 / submit.as_secs_f64());

    let t = Instant::now();
    let mut placed = 0;
    loop {
        let n = leader::plan_once(&m).await.expect("plan");
        if n == 0 {
            break;
        }
        placed += n;
    }
    let took = t.elapsed();
    println!(
        "placed {placed} tasks on {nodes} nodes in {:.1} s: {:.0} placements/s committed (Nomad C1M anchor: 3,750/s; ratio {:.2})",
        took.as_secs_f64(),
        placed as f64 / took.as_secs_f64(),
        placed as f64 / took.as_secs_f64() / 3750.0
    );
    m.db.shutdown().await;
}

fn main() {
    let tasks: usize = std::env::var("BENCH_TASKS").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let nodes: usize = std::env::var("BENCH_NODES").ok().and_then(|s| s.parse().ok()).unwrap_or(5_000);
    println!("== pure scheduler: time per placement (median of 5 plans of 2,000 tasks) ==");
    let mut prev: Option<(usize, f64)> = None;
    for n in [500, 5_000, 50_000] {
        let us = pure(n, 2_000);
        let growth =
            prev.map(|(pn, pus)| format!(" ({:.2}x the cost for {}x the nodes)", us / pus, n / pn)).unwrap_or_default();
        println!("{n:>6} nodes: {us:.1} µs/placement{growth}");
        prev = Some((n, us));
    }
    println!("\n== committed placements: {nodes} nodes, {tasks} tasks, single manager, fsync on ==");
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(committed(nodes, tasks));
}
