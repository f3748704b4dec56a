//! Benchmark (not a test) of list pages: how long one page of 100 tasks takes to read
//! out of 100,000, and what it costs in memory.
//!
//! The state database is filled through the real state machine (`Apply::apply` of
//! [`DomainState`], the same code every manager runs on a committed entry), in one
//! transaction, so loading does not take minutes of Raft round trips. Pages are then read
//! with [`query::list_tasks`] as the API handler does, on its own connection.
//!
//! Baseline, measured in the same run: the same page out of 1,000 tasks. The ratio says
//! whether a page's cost follows the page (≈ 1) or the table (≫ 1) for the unfiltered
//! pages; with a `node=` or `name=` filter the small table holds far fewer matches
//! (a short page), so those ratios overstate the growth. Target: < 50 ms.
//!
//! Run: `cargo bench --bench lists` (env `BENCH_TASKS` changes the large size).

use std::collections::BTreeMap;
use std::time::Instant;

use holdfast::manager::state::query::{self, TaskFilter};
use holdfast::manager::state::{Command, DomainState, PlannedPlacement};
use holdfast_raft::Apply;

const NODES: usize = 50;

fn spec(i: usize) -> holdfast::model::TaskSpec {
    serde_json::from_value(serde_json::json!({
        "name": format!("svc-{}", i % 500),
        "image": "holdfast/echo:latest",
        "command": ["echo", "--listen", "0.0.0.0:7777"],
        "env": {"KEY": "value", "MODE": "bench", "INDEX": i.to_string()},
        "ports": [{"container": 7777, "host": 0}],
        "resources": {"cpu_millis": 10, "memory_mb": 16, "disk_mb": 1},
        "restart": {"policy": "on-failure", "max_attempts": 3, "delay_ms": 1000, "max_delay_ms": 60000},
        "health": {"http": {"path": "/", "port": 7777}, "interval_ms": 2000, "timeout_ms": 1000, "failures": 3},
        "constraints": {"labels": {"zone": "a"}}
    }))
    .expect("spec")
}

/// A state database with `tasks` tasks, 4 in 5 of them placed on one of 50 nodes.
fn load(path: &std::path::Path, tasks: usize) -> rusqlite::Connection {
    let (domain, _applied) = DomainState::new();
    let mut conn = rusqlite::Connection::open(path).expect("open");
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF").expect("pragma");
    domain.init_schema(&conn).expect("schema");
    let tx = conn.transaction().expect("tx");
    let mut index = 1u64;
    let mut apply = |cmd: &Command| {
        let out = domain.apply(&tx, index, &serde_json::to_vec(cmd).expect("json")).expect("apply");
        index += 1;
        out
    };
    for n in 0..NODES {
        apply(&Command::RegisterNode {
            name: format!("n{n:03}"),
            address: "10.0.0.1".into(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            cpu_millis: 1_000_000,
            memory_mb: 10_000_000,
            disk_mb: 10_000_000,
            now_ms: 1,
        });
    }
    let mut planned = Vec::new();
    for i in 0..tasks {
        let id = format!("t{i:07}");
        apply(&Command::SubmitTask { id: id.clone(), spec: Box::new(spec(i)), idempotency_key: None, now_ms: 2 });
        if i % 5 != 0 {
            planned.push(PlannedPlacement { task_id: id, node: format!("n{:03}", i % NODES), replaces: None });
        }
        if planned.len() == 500 {
            apply(&Command::ApplyPlan { placements: std::mem::take(&mut planned), unplaced: Vec::new(), now_ms: 3 });
        }
    }
    apply(&Command::ApplyPlan { placements: planned, unplaced: Vec::new(), now_ms: 3 });
    tx.commit().expect("commit");
    conn
}

/// Peak and current resident memory of this process, KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

struct Stats {
    median_ms: f64,
    p95_ms: f64,
    body_bytes: usize,
}

/// Times `rounds` reads of the page `f` describes (each serialised to JSON, as the API
/// answers it).
fn time_pages(conn: &rusqlite::Connection, f: &TaskFilter, rounds: usize) -> Stats {
    let mut samples = Vec::with_capacity(rounds);
    let mut body_bytes = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        let page = query::list_tasks(conn, f).expect("page");
        let body = serde_json::to_vec(&serde_json::json!({ "tasks": page.tasks, "next": page.next })).expect("json");
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        body_bytes = body.len();
        assert!(!page.tasks.is_empty() || f.state.is_some(), "empty page");
    }
    samples.sort_by(f64::total_cmp);
    Stats {
        median_ms: samples[samples.len() / 2],
        p95_ms: samples[(samples.len() * 95 / 100).min(samples.len() - 1)],
        body_bytes,
    }
}

/// A cursor halfway down the table: the walk's middle page.
fn middle_cursor(conn: &rusqlite::Connection, tasks: usize) -> u64 {
    conn.query_row(
        "SELECT created_index FROM tasks ORDER BY created_index LIMIT 1 OFFSET ?1",
        [(tasks / 2) as i64],
        |r| r.get::<_, i64>(0),
    )
    .expect("middle") as u64
}

fn main() {
    let large: usize = std::env::var("BENCH_TASKS").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let rounds = 101;
    let mut results = Vec::new();
    for tasks in [1_000, large] {
        let t = Instant::now();
        let conn = load(&dir.path().join(format!("state-{tasks}.db")), tasks);
        println!("loaded {tasks} tasks through apply in {:.1} s", t.elapsed().as_secs_f64());
        let mid = middle_cursor(&conn, tasks);
        let cases = [
            ("first page", TaskFilter { limit: 100, ..Default::default() }),
            ("middle page", TaskFilter { limit: 100, after: Some(mid), ..Default::default() }),
            ("node= filter", TaskFilter { limit: 100, node: Some("n007".into()), ..Default::default() }),
            ("name= filter", TaskFilter { limit: 100, name: Some("svc-42".into()), ..Default::default() }),
            ("state=pending", TaskFilter { limit: 100, state: Some("pending".into()), ..Default::default() }),
        ];
        let (hwm_before, _) = rss_kib();
        for (label, f) in cases {
            let s = time_pages(&conn, &f, rounds);
            results.push((tasks, label, s));
        }
        let (hwm_after, rss) = rss_kib();
        println!(
            "  memory: peak RSS {:.1} MiB (+{:.1} MiB while paging), RSS now {:.1} MiB",
            hwm_after as f64 / 1024.0,
            hwm_after.saturating_sub(hwm_before) as f64 / 1024.0,
            rss as f64 / 1024.0
        );
    }
    println!("\n== one page of 100 tasks, {rounds} reads each: median / p95 (target < 50 ms) ==");
    let small: Vec<_> = results.iter().filter(|r| r.0 == 1_000).collect();
    for (tasks, label, s) in results.iter().filter(|r| r.0 == large) {
        let base = small.iter().find(|r| r.1 == *label).map(|r| r.2.median_ms).unwrap_or(f64::NAN);
        println!(
            "{label:>14} of {tasks}: {:.2} ms / {:.2} ms, {} KiB body; baseline (of 1,000) {:.2} ms, ratio {:.2}; {:.0}% of the 50 ms target",
            s.median_ms,
            s.p95_ms,
            s.body_bytes / 1024,
            base,
            s.median_ms / base,
            s.median_ms / 50.0 * 100.0
        );
    }
}
