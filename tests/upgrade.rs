//! A rolling upgrade on real processes, with the test hook that makes a build claim
//! the next feature level and know a command kind the normal build does not
//! (`HOLDFAST_TEST_NEXT_LEVEL=1`): the cluster level waits for the last old voter;
//! a member downgraded after the level rose stops at the first new-kind entry and
//! says "upgrade me" (health critical, clear log) instead of skipping it, then
//! catches up once upgraded, with no divergence.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

const NEXT: (&str, &str) = ("HOLDFAST_TEST_NEXT_LEVEL", "1");

struct Manager {
    name: String,
    api: String,
    cluster: String,
    proc: Option<Proc>,
}

impl Manager {
    fn new(name: &str) -> Manager {
        Manager {
            name: name.into(),
            api: format!("127.0.0.1:{}", free_port()),
            cluster: format!("127.0.0.1:{}", free_port()),
            proc: None,
        }
    }

    /// Starts the manager; `next` makes it the newer build.
    fn start(&mut self, root: &Path, extra: &[&str], next: bool) {
        let data = root.join(&self.name);
        let mut args = vec!["agent", "--manager", "--node-id", &self.name, "--data-dir"];
        let data = data.to_str().expect("utf-8 path");
        args.extend([data, "--api", &self.api, "--cluster", &self.cluster, "--heartbeat-ttl", "2s", "--lease", "20s"]);
        args.extend_from_slice(extra);
        let envs: &[(&str, &str)] = if next { &[NEXT] } else { &[] };
        self.proc = Some(Proc::spawn(&args, &root.join(format!("{}.log", self.name)), envs));
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            if p.terminate(Duration::from_secs(30)).is_none() {
                panic!("{} did not stop on SIGTERM:\n{}", self.name, p.log_text());
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }
}

async fn cluster(c: &reqwest::Client, m: &Manager) -> Option<Value> {
    get_json(c, &m.url("/v1/cluster")).await
}

/// Each member's advertised level, as the cluster view of `m` shows it.
fn member_levels(v: &Value) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = v["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| (m["id"].as_str().unwrap_or("").to_string(), m["feature_level"].as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

async fn probe(c: &reqwest::Client, m: &Manager) -> (u16, Value) {
    let resp = c.post(m.url("/v1/cluster/probe")).send().await.expect("probe request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_level_waits_for_every_voter_and_an_old_member_stops_instead_of_diverging() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let mut ms: Vec<Manager> = ["m1", "m2", "m3"].iter().map(|n| Manager::new(n)).collect();
    let data = |n: &str| -> PathBuf { r.join(n) };
    // m1 (bootstrapped) runs the old build, m2 and m3 the new one.
    ms[0].start(r, &["--bootstrap"], false);
    let mtoken = join_token(&data("m1"), "manager");
    let seed = ms[0].cluster.clone();
    ms[1].start(r, &["--join", &seed, "--token", &mtoken], true);
    ms[2].start(r, &["--join", &seed, "--token", &mtoken], true);
    let c = &api_client(&data("m1")).await;
    let levels = |l: [u64; 3]| vec![("m1".to_string(), l[0]), ("m2".to_string(), l[1]), ("m3".to_string(), l[2])];
    eventually(Duration::from_secs(60), "three voters advertising levels 1, 2, 2 at cluster level 1", || async {
        let v = cluster(c, &ms[0]).await?;
        let voters = v["members"].as_array()?.iter().filter(|m| m["voter"] == true).count();
        (voters == 3 && member_levels(&v) == levels([1, 2, 2]) && v["feature_level"]["cluster"] == 1).then_some(())
    })
    .await;

    // The gate holds while the old voter is there: the new kind is refused, clearly.
    for _ in 0..3 {
        let (status, body) = probe(c, &ms[1]).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "feature_level", "{body}");
        assert!(body["error"]["message"].as_str().unwrap_or("").contains("level 2"), "{body}");
        // Writes go on meanwhile (each one a full round through the old leader).
        let resp = c.post(ms[1].url("/v1/tasks")).json(&serde_json::json!({"image": "x"})).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 201);
    }
    let v = cluster(c, &ms[1]).await.expect("cluster view");
    assert_eq!(v["feature_level"]["cluster"], 1, "the level rose with an old voter present: {v}");

    // The bootstrapped member is upgraded: its record shows the new level (and
    // version) after the restart, and the level rises to 2.
    ms[0].stop();
    ms[0].start(r, &[], true);
    let v = eventually(Duration::from_secs(60), "m1's record refreshed and the cluster at level 2", || async {
        let v = cluster(c, &ms[1]).await?;
        (member_levels(&v) == levels([2, 2, 2]) && v["feature_level"]["cluster"] == 2).then_some(v)
    })
    .await;
    for m in v["members"].as_array().unwrap() {
        assert!(m["version"].as_str().is_some_and(|s| !s.is_empty()), "member without version: {v}");
    }
    let (status, body) = probe(c, &ms[1]).await;
    assert_eq!(status, 201, "{body}");
    for m in &ms {
        eventually(Duration::from_secs(30), "the first probe applied everywhere", || async {
            (cluster(c, m).await?["feature_level"]["probes_applied"] == 1).then_some(())
        })
        .await;
    }

    // m3 is rolled back to the old build. The level never falls; the next new-kind
    // entry stops m3, which says so, and does not skip it.
    ms[2].stop();
    ms[2].start(r, &[], false);
    eventually(Duration::from_secs(60), "m3's record shows the old level; the cluster stays at 2", || async {
        let v = cluster(c, &ms[0]).await?;
        (member_levels(&v) == levels([2, 2, 1]) && v["feature_level"]["cluster"] == 2).then_some(())
    })
    .await;
    let (status, body) = probe(c, &ms[0]).await;
    assert_eq!(status, 201, "two new members are a quorum: {body}");
    let health = eventually(Duration::from_secs(30), "m3 health critical with upgrade_required", || async {
        let resp = c.get(ms[2].url("/v1/health")).send().await.ok()?;
        let code = resp.status().as_u16();
        let v: Value = resp.json().await.ok()?;
        (code == 503 && v["status"] == "critical" && v["upgrade_required"].is_string()).then_some(v)
    })
    .await;
    let why = health["upgrade_required"].as_str().unwrap();
    assert!(why.contains("UPGRADE ME") && why.contains("feature level 2"), "{why}");
    let log = ms[2].proc.as_ref().unwrap().log_text();
    assert!(log.contains("UPGRADE ME") && log.contains("supports up to 1"), "no clear log line:\n{log}");
    assert!(ms[2].proc.as_mut().unwrap().child.try_wait().expect("wait").is_none(), "m3 stays up to say what it needs");
    // The others carry on.
    let resp = c.post(ms[0].url("/v1/tasks")).json(&serde_json::json!({"image": "x"})).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);

    // Upgraded again, m3 applies the entry it stopped at: same state as the others.
    ms[2].stop();
    ms[2].start(r, &[], true);
    eventually(Duration::from_secs(60), "m3 caught up with both probes and healthy", || async {
        let v = cluster(c, &ms[2]).await?;
        let h = get_json(c, &ms[2].url("/v1/health")).await?;
        (v["feature_level"]["probes_applied"] == 2 && h["upgrade_required"].is_null()).then_some(())
    })
    .await;
    let tasks = |m: usize| {
        let url = ms[m].url("/v1/tasks");
        async move { get_json(c, &url).await.and_then(|v| v["tasks"].as_array().map(|a| a.len())) }
    };
    eventually(Duration::from_secs(30), "the same tasks on every member", || async {
        let (a, b, d) = (tasks(0).await?, tasks(1).await?, tasks(2).await?);
        (a == 4 && a == b && b == d).then_some(())
    })
    .await;
    for m in &mut ms {
        m.stop();
    }
}
