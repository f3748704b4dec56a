//! Scheduling on an in-process cluster: one real manager (Raft on SQLite, HTTP API) and
//! several worker agents of different sizes and labels, each on its own in-memory
//! runtime. The fake runtime is fine here: this is about placement; the Docker runtime
//! is covered by `e2e_docker.rs`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use holdfast::manager::scheduler::Strategy;
use holdfast::model::sync::NodeResources;
use serde_json::{json, Value};

/// A manager placing with `strategy`, no worker yet.
async fn start(strategy: Strategy) -> InProcess {
    InProcess::builder()
        .lease(Duration::from_secs(10), Duration::from_secs(2))
        .manager(move |m| m.strategy = strategy)
        .start()
        .await
}

/// Adds a fake-runtime worker of size `res` with these labels.
async fn add_worker(c: &mut InProcess, name: &str, res: NodeResources, labels: &[(&str, &str)]) {
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
    c.add_worker(name, |wc| {
        wc.resources_override = Some(res);
        wc.labels = labels;
    })
    .await;
}

async fn submit_many(c: &InProcess, n: usize, spec: Value, parallel: usize) -> Vec<String> {
    let url = c.url("/v1/tasks");
    let client = c.client.clone();
    let results: Vec<(u16, Value)> = futures::stream::iter(0..n)
        .map(|_| {
            let (client, url, spec) = (client.clone(), url.clone(), spec.clone());
            async move {
                let r = client.post(&url).json(&spec).send().await.expect("submit");
                (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    assert!(results.iter().all(|(s, _)| *s == 201), "{results:?}");
    results.into_iter().map(|(_, v)| v["id"].as_str().unwrap().to_string()).collect()
}

async fn tasks(c: &InProcess) -> Vec<Value> {
    all_tasks(&c.client, &c.url("")).await.unwrap_or_default()
}

async fn nodes(c: &InProcess) -> Vec<Value> {
    get_json(&c.client, &c.url("/v1/nodes")).await.and_then(|v| v["nodes"].as_array().cloned()).unwrap_or_default()
}

/// Current placements' node per running task.
async fn running_on(c: &InProcess) -> BTreeMap<String, usize> {
    let mut per = BTreeMap::new();
    for t in tasks(c).await {
        if t["state"] == "running" {
            let node = t["placements"][0]["node"].as_str().unwrap_or_default().to_string();
            *per.entry(node).or_insert(0) += 1;
        }
    }
    per
}

fn spec(cpu: u64, mem: u64) -> Value {
    json!({"image": "holdfast/echo:latest", "resources": {"cpu_millis": cpu, "memory_mb": mem}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binpack_fills_one_node_before_the_next() {
    let mut c = start(Strategy::Binpack).await;
    add_worker(&mut c, "a", resources(4000, 8192), &[]).await;
    add_worker(&mut c, "b", resources(4000, 8192), &[]).await;
    submit_many(&c, 6, spec(500, 512), 1).await;
    let per = eventually(Duration::from_secs(20), "six running", || async {
        let per = running_on(&c).await;
        (per.values().sum::<usize>() == 6).then_some(per)
    })
    .await;
    assert_eq!(per.len(), 1, "binpack used more than one node: {per:?}");
    for w in &mut c.workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_balances_across_nodes() {
    let mut c = start(Strategy::Spread).await;
    for name in ["a", "b", "c"] {
        add_worker(&mut c, name, resources(4000, 8192), &[]).await;
    }
    submit_many(&c, 9, spec(200, 256), 1).await;
    let per = eventually(Duration::from_secs(20), "nine running", || async {
        let per = running_on(&c).await;
        (per.values().sum::<usize>() == 9).then_some(per)
    })
    .await;
    assert_eq!(per.values().copied().collect::<Vec<_>>(), vec![3, 3, 3], "{per:?}");
    for w in &mut c.workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_is_overcommitted_under_500_concurrent_submissions() {
    let mut c = start(Strategy::Binpack).await;
    add_worker(&mut c, "small", resources(1000, 2048), &[("zone", "a")]).await;
    add_worker(&mut c, "large", resources(4000, 8192), &[("zone", "b")]).await;
    add_worker(&mut c, "medium", resources(2000, 4096), &[("zone", "a")]).await;
    // 500 × 100 millis = 50,000 millis asked; 7,000 exist: exactly 70 fit.
    submit_many(&c, 500, spec(100, 64), 64).await;
    let (running, pending) = eventually(Duration::from_secs(60), "70 running, the rest pending", || async {
        let tasks = tasks(&c).await;
        let running = tasks.iter().filter(|t| t["state"] == "running").count();
        let pending = tasks.iter().filter(|t| t["state"] == "pending" && t["reason"].is_string()).count();
        (running + pending == 500 && running == 70).then_some((running, pending))
    })
    .await;
    assert_eq!((running, pending), (70, 430));
    for n in nodes(&c).await {
        let cap = n["capacity"]["cpu_millis"].as_u64().unwrap();
        let reserved = n["reserved"]["cpu_millis"].as_u64().unwrap();
        assert!(reserved <= cap, "node {} overcommitted: {reserved} > {cap}", n["id"]);
    }
    for w in &c.workers {
        let cap = match w.name.as_str() {
            "small" => 10,
            "medium" => 20,
            _ => 40,
        };
        let count = w.fake().running_count(&w.name);
        assert!(count <= cap, "{} runs {count} containers, room for {cap}", w.name);
    }
    let reason = tasks(&c).await.into_iter().find(|t| t["state"] == "pending").unwrap()["reason"].clone();
    assert!(reason.as_str().unwrap().starts_with("no node fits: cpu 100 millis > largest free 0 millis"), "{reason}");
    for w in &mut c.workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_tasks_move_and_a_drained_node_empties() {
    let _ = tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_test_writer().try_init();
    let mut c = start(Strategy::Binpack).await;
    add_worker(&mut c, "a", resources(4000, 8192), &[]).await;
    add_worker(&mut c, "b", resources(4000, 8192), &[]).await;
    let mut s = spec(500, 256);
    s["offline"] = json!({"lost_after_ms": 1000, "replace": true});
    submit_many(&c, 4, s, 1).await;
    let per = eventually(Duration::from_secs(20), "four running", || async {
        let per = running_on(&c).await;
        (per.values().sum::<usize>() == 4).then_some(per)
    })
    .await;
    let (victim, _) = per.iter().next().unwrap();
    let victim = victim.clone();
    let survivor = if victim == "a" { "b" } else { "a" }.to_string();

    // The victim's process dies: heartbeat_ttl (2 s) + lost_after (1 s) later its tasks
    // run on the survivor with higher fences.
    let vi = c.workers.iter().position(|w| w.name == victim).unwrap();
    c.workers[vi].stop().await;
    let started = std::time::Instant::now();
    let moved = tokio::time::timeout(
        Duration::from_secs(20),
        eventually(Duration::from_secs(21), "tasks moved off the dead node", || async {
            let per = running_on(&c).await;
            (per.get(&survivor) == Some(&4)).then_some(())
        }),
    )
    .await;
    assert!(moved.is_ok(), "tasks did not move: {:#?}\nnodes: {:#?}", tasks(&c).await, nodes(&c).await);
    let moved_after = started.elapsed();
    assert!(moved_after < Duration::from_secs(8), "took {moved_after:?}");
    for t in tasks(&c).await {
        let ps = t["placements"].as_array().unwrap();
        assert_eq!(ps.len(), 2, "{t}");
        assert!(ps[0]["fence"].as_u64() > ps[1]["fence"].as_u64(), "{t}");
        assert_eq!(ps[1]["desired"], "stop", "{t}");
        assert_eq!(ps[1]["node_status"], "disconnected", "{t}");
    }
    let node = get_json(&c.client, &c.url(&format!("/v1/nodes/{victim}"))).await.unwrap();
    assert_eq!(node["status"], "disconnected", "{node}");
    assert_eq!(node["disconnected"].as_array().unwrap().len(), 1, "{node}");

    // Drain the survivor after a fresh node joins: everything moves to the new node.
    add_worker(&mut c, "c", resources(4000, 8192), &[]).await;
    let r = c.client.post(c.url(&format!("/v1/nodes/{survivor}/drain"))).body("{}").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    eventually(Duration::from_secs(20), "drained node empty", || async {
        let per = running_on(&c).await;
        let survivor_fake = c.workers.iter().find(|w| w.name == survivor).unwrap().fake();
        (per.get("c") == Some(&4) && survivor_fake.running_count(&survivor) == 0).then_some(())
    })
    .await;
    let r = c.client.post(c.url("/v1/nodes/nope/drain")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    for w in &mut c.workers {
        w.stop().await;
    }
}
