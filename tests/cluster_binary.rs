//! Three real `holdfast agent --manager` processes on loopback: formation from flags,
//! forwarding from followers, leader SIGKILL with nothing acknowledged lost, restart
//! from disk, minority refusing writes in bounded time.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

async fn cluster_view(c: &reqwest::Client, m: &Node) -> Option<Value> {
    get_json(c, &m.url("/v1/cluster")).await
}

async fn submit(c: &reqwest::Client, m: &Node, n: usize) -> Result<String, String> {
    let body = format!(r#"{{"image":"holdfast/echo:latest","name":"t{n}"}}"#);
    let resp = c.post(m.url("/v1/tasks")).body(body).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let v: Value = resp.json().await.map_err(|e| e.to_string())?;
    if status.as_u16() == 201 {
        Ok(v["id"].as_str().unwrap_or_default().to_string())
    } else {
        Err(format!("{status}: {v}"))
    }
}

async fn task_ids(c: &reqwest::Client, m: &Node) -> Option<Vec<String>> {
    let v = get_json(c, &m.url("/v1/tasks")).await?;
    Some(v["tasks"].as_array()?.iter().filter_map(|t| t["id"].as_str().map(String::from)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_survive_leader_kill_and_restart() {
    // m1 bootstraps; m2 and m3 join the cluster port (mutual TLS) with its token.
    let mut cluster = Cluster::builder().managers(3).start().await;
    let seed = cluster.managers[0].cluster.clone();
    let client = cluster.client.clone();
    let c = &client;
    let ms = &mut cluster.managers;

    // Writes on every member, followers forwarding to the leader.
    let mut acked = Vec::new();
    for i in 0..30 {
        let id = submit(c, &ms[i % 3], i).await.unwrap_or_else(|e| panic!("submit {i}: {e}"));
        acked.push(id);
    }
    // Node reads on any member answer (followers ask the leader for liveness).
    for m in ms.iter() {
        let v = get_json(c, &m.url("/v1/nodes")).await.expect("nodes on every member");
        assert!(v["nodes"].is_array(), "{v}");
    }
    // Linearizable reads on a follower see every acknowledged write.
    let on_m3 = task_ids(c, &ms[2]).await.expect("read on m3");
    for id in &acked {
        assert!(on_m3.contains(id), "m3 misses {id}");
    }

    let leader = cluster_view(c, &ms[0]).await.unwrap()["leader"]["id"].as_str().unwrap().to_string();
    let li = ms.iter().position(|m| m.name == leader).unwrap();
    ms[li].kill();
    let killed_at = Instant::now();

    let other = (li + 1) % 3;
    let new_leader = eventually(Duration::from_secs(15), "a new leader", || {
        let m = &ms[other];
        let old = leader.clone();
        async move {
            let v = cluster_view(c, m).await?;
            let l = v["leader"]["id"].as_str()?.to_string();
            (l != old).then_some(l)
        }
    })
    .await;
    // The next acknowledged write after the kill.
    let id = eventually(Duration::from_secs(15), "a write after failover", || {
        let m = &ms[other];
        async move { submit(c, m, 100).await.ok() }
    })
    .await;
    acked.push(id);
    eprintln!("failover: {leader} killed, {new_leader} leads, next write acknowledged after {:?}", killed_at.elapsed());

    let ni = ms.iter().position(|m| m.name == new_leader).unwrap();
    let present = task_ids(c, &ms[ni]).await.expect("read on new leader");
    for id in &acked {
        assert!(present.contains(id), "acknowledged task {id} lost after leader kill");
    }

    // The killed member comes back from its data dir; repeating --join is harmless.
    ms[li].manager(&["--join", &seed]);
    let expect = acked.len();
    eventually(Duration::from_secs(30), "restarted member catches up", || {
        let m = &ms[li];
        async move { task_ids(c, m).await.filter(|ids| ids.len() == expect) }
    })
    .await;

    // Minority: with two members gone, a write fails with a clear 503 in bounded time.
    let survivor = (li + 1) % 3;
    for (i, m) in ms.iter_mut().enumerate() {
        if i != survivor {
            m.kill();
        }
    }
    let started = Instant::now();
    let resp = c
        .post(ms[survivor].url("/v1/tasks"))
        .body(r#"{"image":"x"}"#)
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("minority answers instead of hanging");
    let waited = started.elapsed();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(waited < Duration::from_secs(12), "minority write took {waited:?}");
}

#[tokio::test]
async fn foreign_data_dir_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("m1");
    std::fs::create_dir_all(data.join("manager")).unwrap();
    std::fs::write(data.join("manager/state.db"), b"this is not a database").unwrap();
    let mut m = Node::new(dir.path(), "m1");
    m.bootstrap(&[]);
    let p = m.proc();
    let status = eventually(Duration::from_secs(20), "refusal", || {
        let s = p.child.try_wait().ok().flatten();
        async move { s }
    })
    .await;
    assert!(!status.success());
    let log = m.log();
    assert!(log.contains("data directory"), "{log}");
    assert_eq!(std::fs::read(data.join("manager/state.db")).unwrap(), b"this is not a database");
}
