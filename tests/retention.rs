//! Bounded state under churn: thousands of short batch tasks run to completion on the
//! fake runtime through a real manager (real SQLite, real Raft, the API with a token)
//! with a short `--retain`; the tables' row counts and the database size level off
//! instead of growing with the total. Then `DELETE /v1/nodes/{id}` on the worker.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use holdfast::config::Retention;
use holdfast::worker::runtime::ContainerState;
use serde_json::{json, Value};

const WAVES: usize = 12;
const PER_WAVE: usize = 200;

/// Rows of the bounded tables and the database's used bytes (pages minus free pages).
fn state_size(data: &Path) -> (BTreeMap<String, i64>, i64) {
    let conn = rusqlite::Connection::open_with_flags(
        data.join("manager").join("state.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open state.db");
    let mut rows = BTreeMap::new();
    for t in ["tasks", "placements", "placement_events", "audit"] {
        let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0)).expect("count");
        rows.insert(t.to_string(), n);
    }
    let used: i64 = conn
        .query_row(
            "SELECT (SELECT page_count FROM pragma_page_count()) - (SELECT freelist_count FROM pragma_freelist_count())",
            [],
            |r| r.get(0),
        )
        .expect("pages");
    let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).expect("page size");
    (rows, used * page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_short_batch_tasks_levels_off() {
    let retention = Retention {
        retain: Duration::from_secs(1),
        node_gc: Duration::ZERO,
        audit_retain: Duration::from_secs(3_600),
        audit_max_rows: 300,
    };
    let mut c =
        InProcess::builder().node_id("churn-1").manager(move |m| m.retention = retention).local_worker().start().await;
    let (client, fake, node) = (c.client.clone(), c.local_fake().clone(), c.node_id().to_string());
    let (data, base) = (c.data().to_path_buf(), c.url(""));

    let spec =
        json!({"image": "holdfast/echo:latest", "kind": "batch", "resources": {"cpu_millis": 1, "memory_mb": 4}});
    let started = Instant::now();
    let mut sizes = Vec::new();
    for wave in 0..WAVES {
        let statuses: Vec<u16> = futures::stream::iter(0..PER_WAVE)
            .map(|_| {
                let (c, url, spec) = (client.clone(), format!("{base}/v1/tasks"), spec.clone());
                async move { c.post(&url).json(&spec).send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        assert!(statuses.iter().all(|s| *s == 201), "wave {wave}: {statuses:?}");
        // Every container of the wave runs, then its process ends with 0: completed.
        let mut done = 0;
        eventually(Duration::from_secs(60), "the wave's containers ran and exited", || {
            for c in fake.containers() {
                if c.state == ContainerState::Running && fake.exit(&c.id, 0) {
                    done += 1;
                }
            }
            let finished = done >= PER_WAVE;
            async move { finished.then_some(()) }
        })
        .await;
        let (rows, bytes) = state_size(&data);
        eprintln!("wave {wave}: {} tasks submitted so far; rows {rows:?}; {bytes} bytes used", (wave + 1) * PER_WAVE);
        sizes.push((rows, bytes));
    }
    // Let the last waves age out too.
    let (rows, bytes) = eventually(Duration::from_secs(60), "finished tasks collected", || async {
        let (rows, bytes) = state_size(&data);
        (rows["tasks"] == 0 && rows["placements"] == 0).then_some((rows, bytes))
    })
    .await;
    let total = WAVES * PER_WAVE;
    eprintln!("{total} tasks through in {:?}; at rest: rows {rows:?}, {bytes} bytes used", started.elapsed());

    // Levelled off: no wave ever held more than a few waves' worth of tasks, the audit
    // stayed at its cap, and the late waves' database is no bigger than the early ones'.
    for (i, (r, _)) in sizes.iter().enumerate() {
        assert!(r["tasks"] <= (4 * PER_WAVE) as i64, "wave {i} held {} tasks of {total}", r["tasks"]);
        assert!(r["audit"] <= 300 + PER_WAVE as i64, "wave {i}: audit {}", r["audit"]);
    }
    let early = sizes[2..5].iter().map(|(_, b)| *b).max().unwrap();
    let late = sizes[WAVES - 3..].iter().map(|(_, b)| *b).max().unwrap();
    assert!(late <= early * 3 / 2, "state grows with churn: early waves {early} bytes, late waves {late} bytes");
    let audit = get_json(&client, &format!("{base}/v1/audit?limit=10000")).await.expect("audit");
    assert!(audit["entries"].as_array().unwrap().len() <= 300, "audit kept beyond its cap");

    // A decommissioned host: refused while it runs something, then forced out and revoked.
    let svc = client
        .post(format!("{base}/v1/tasks"))
        .json(&json!({"image": "holdfast/echo:latest",
        "resources": {"cpu_millis": 1, "memory_mb": 4}}))
        .send()
        .await
        .unwrap();
    let svc: Value = svc.json().await.unwrap();
    let id = svc["id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(30), "service running", || async {
        (get_json(&client, &format!("{base}/v1/tasks/{id}")).await?["state"] == "running").then_some(())
    })
    .await;
    let url = format!("{base}/v1/nodes/{node}");
    let refused = client.delete(&url).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 409);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("force=true"), "{body}");
    let bad = client.delete(format!("{url}?force=maybe")).send().await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let removed = client.delete(format!("{url}?force=true")).send().await.unwrap();
    assert_eq!(removed.status().as_u16(), 200);
    let gone = client.get(&url).send().await.unwrap();
    assert_eq!(gone.status().as_u16(), 404);
    let missing = client.delete(format!("{base}/v1/nodes/nope")).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    c.stop_manager().await;
}
