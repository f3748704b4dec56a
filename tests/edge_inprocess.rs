//! Cached, fenced, time-bounded authority, in process: a real manager (Raft on SQLite)
//! and a worker agent on the in-memory runtime. The manager goes away; when the worker's
//! lease runs out each offline mode does what it promises; the manager comes back from
//! its data dir and the story is in the history. The multi-host suite does the same
//! with real containers and real network cuts.

mod common;

use std::time::Duration;

use common::*;
use holdfast::worker::runtime::fake::FakeRuntime;
use holdfast::worker::runtime::ContainerState;
use serde_json::{json, Value};

fn container_state(fake: &FakeRuntime, task_id: &str) -> Option<ContainerState> {
    fake.containers()
        .into_iter()
        .find(|c| c.labels.get("holdfast.task").map(String::as_str) == Some(task_id))
        .map(|c| c.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_modes_hold_when_the_manager_is_gone() {
    let mut c = InProcess::builder().lease(Duration::from_secs(3), Duration::from_secs(1)).start().await;
    let fake = c
        .add_worker("edge-1", |wc| {
            wc.sync_wait = Duration::from_millis(300);
            wc.lease_margin = Duration::from_millis(500);
            wc.resources_override = Some(resources(4000, 8192));
        })
        .await
        .fake()
        .clone();
    let mut ids = Vec::new();
    for mode in ["keep", "finish", "exclusive"] {
        let spec = json!({"image": "holdfast/echo:latest", "name": mode, "offline": {"mode": mode}});
        ids.push(c.submit(&spec).await);
    }
    for id in &ids {
        eventually(Duration::from_secs(20), "running", || async {
            (c.task(id).await?["state"] == "running").then_some(())
        })
        .await;
    }
    let (keep, finish, exclusive) = (&ids[0], &ids[1], &ids[2]);

    // The manager goes away. Within the lease (3 s, counted from the last sync's send)
    // everything runs; after it, exclusive stops and the others carry on.
    c.stop_manager().await;
    eventually(Duration::from_secs(10), "exclusive stopped on lease expiry", || async {
        matches!(container_state(&fake, exclusive), Some(ContainerState::Exited { .. })).then_some(())
    })
    .await;
    assert_eq!(container_state(&fake, keep), Some(ContainerState::Running));
    assert_eq!(container_state(&fake, finish), Some(ContainerState::Running));

    // Without a lease, a crash of the `finish` task is final; `keep` restarts.
    let cid = |t: &str| {
        fake.containers().into_iter().find(|c| c.labels.get("holdfast.task").map(String::as_str) == Some(t)).unwrap().id
    };
    fake.exit(&cid(finish), 1);
    fake.exit(&cid(keep), 1);
    eventually(Duration::from_secs(10), "keep restarted locally", || async {
        (container_state(&fake, keep) == Some(ContainerState::Running)).then_some(())
    })
    .await;
    assert!(matches!(container_state(&fake, finish), Some(ContainerState::Exited { code: 1 })));

    // The manager returns from its data dir; the lease is renewed and exclusive resumes
    // (same container), and the buffered story reaches the history.
    c.start_manager().await;
    eventually(Duration::from_secs(20), "exclusive resumed", || async {
        (container_state(&fake, exclusive) == Some(ContainerState::Running)).then_some(())
    })
    .await;
    let story = |t: Value| -> Vec<String> {
        t["placements"][0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["what"].as_str().unwrap().to_string())
            .collect()
    };
    let ex = eventually(Duration::from_secs(20), "exclusive story", || async {
        let t = c.task(exclusive).await?;
        let s = story(t.clone());
        (s.contains(&"stopped-on-expiry".to_string()) && s.contains(&"resumed".to_string()) && t["state"] == "running")
            .then_some(t)
    })
    .await;
    assert_eq!(ex["restarts"], 0, "a suspension is not a restart: {ex}");
    let fin = eventually(Duration::from_secs(20), "finish failed for good", || async {
        let t = c.task(finish).await?;
        (t["state"] == "failed").then_some(t)
    })
    .await;
    assert!(fin["reason"].as_str().unwrap().contains("lease expired (offline mode finish)"), "{fin}");
    let kp = eventually(Duration::from_secs(20), "keep story", || async {
        let t = c.task(keep).await?;
        let s = story(t.clone());
        (s.contains(&"cached-authority".to_string()) && t["state"] == "running" && t["restarts"] == 1).then_some(t)
    })
    .await;
    let events = story(kp);
    assert_eq!(events.iter().filter(|e| *e == "restarting").count(), 1, "each report once: {events:?}");
    c.worker("edge-1").stop().await;
    c.stop_manager().await;
}
