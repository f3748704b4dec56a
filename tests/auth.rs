//! API access on real processes: each role against each route, 401s that say what is
//! wrong without echoing the secret, env values hidden from readers, an audit `who`
//! that cannot be spoofed, revocation seen by a follower within a second, and a
//! duplicate-id command through the forwarding path rejected while the cluster serves.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

async fn make_token(
    admin: &reqwest::Client,
    api: &str,
    name: &str,
    role: &str,
    ttl_ms: Option<u64>,
) -> (String, String) {
    let mut body = json!({ "name": name, "role": role });
    if let Some(t) = ttl_ms {
        body["ttl_ms"] = json!(t);
    }
    let r = admin.post(format!("{api}/v1/tokens")).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let v: Value = r.json().await.unwrap();
    (v["id"].as_str().unwrap().to_string(), v["token"].as_str().unwrap().to_string())
}

async fn call(client: &reqwest::Client, method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client.request(m, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_against_each_route() {
    let c = Cluster::builder().start().await;
    let (m, admin, api) = (&c.managers[0], c.client.clone(), c.url(""));
    // Private files: the data dir 0700; the token and the databases 0600.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&m.data), 0o700);
        assert_eq!(mode(&m.data.join("manager")), 0o700);
        for f in ["admin.token", "manager/state.db", "manager/raft-log.db"] {
            assert_eq!(mode(&m.data.join(f)), 0o600, "{f}");
        }
    }
    let (_, op) = make_token(&admin, &api, "ops", "operator", None).await;
    let (_, rd) = make_token(&admin, &api, "viewer", "reader", None).await;
    let clients = [("admin", admin.clone()), ("operator", client_with_token(&op)), ("reader", client_with_token(&rd))];
    let r = admin.post(format!("{api}/v1/tasks")).json(&json!({"image": "a"})).send().await.unwrap();
    let task = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    // (method, path, body, lowest role allowed). Allowed calls may still fail for other
    // reasons (404 for a node that does not exist, 409 for the last admin token...),
    // but never with 401/403; refused ones get exactly 403.
    let task_path = format!("/v1/tasks/{task}");
    let routes: Vec<(&str, String, Option<Value>, usize)> = vec![
        ("GET", "/v1/tasks".into(), None, 0),
        ("GET", task_path.clone(), None, 0),
        ("GET", "/v1/nodes".into(), None, 0),
        ("GET", "/v1/cluster".into(), None, 0),
        ("GET", "/v1/cluster/ca".into(), None, 0),
        ("GET", "/v1/health".into(), None, 0),
        ("GET", "/metrics".into(), None, 0),
        ("POST", "/v1/tasks".into(), Some(json!({"image": "a"})), 1),
        ("POST", "/v1/nodes/none/drain".into(), Some(json!({})), 1),
        ("POST", "/v1/nodes/none/eligibility".into(), Some(json!({"eligible": false})), 1),
        ("DELETE", task_path.clone(), None, 1),
        ("GET", "/v1/audit".into(), None, 2),
        ("GET", "/v1/tokens".into(), None, 2),
        ("POST", "/v1/tokens".into(), Some(json!({"name": "x", "role": "reader"})), 2),
        ("DELETE", "/v1/tokens/0000000000000000".into(), None, 2),
        ("DELETE", "/v1/cluster/members/nobody".into(), None, 2),
        // No rotation under way: 409 for an admin, 403 below.
        ("POST", "/v1/cluster/ca/finish".into(), Some(json!({})), 2),
        ("DELETE", "/v1/nodes/nobody".into(), None, 2),
    ];
    let rank = |role: &str| ["reader", "operator", "admin"].iter().position(|r| *r == role).unwrap();
    for (method, path, body, lowest) in &routes {
        for (role, client) in &clients {
            let (s, b) = call(client, method, &format!("{api}{path}"), body.clone()).await;
            if rank(role) >= *lowest {
                assert!(s != 401 && s != 403, "{role} {method} {path}: {s} {b}");
            } else {
                assert_eq!(s, 403, "{role} {method} {path}: {b}");
                let msg = b["error"]["message"].as_str().unwrap();
                let needed = ["reader", "operator", "admin"][*lowest];
                assert!(msg.contains(needed), "names the role needed: {msg}");
            }
        }
        // No token at all: 401 in the error shape.
        let (s, b) = call(&http(), method, &format!("{api}{path}"), body.clone()).await;
        assert_eq!(s, 401, "anonymous {method} {path}: {b}");
        assert_eq!(b["error"]["code"], "unauthorized");
    }
    // Open without a token: probes, and the UI's GETs outside /v1.
    for path in ["/health/live", "/health/ready"] {
        assert_eq!(http().get(format!("{api}{path}")).send().await.unwrap().status().as_u16(), 200, "{path}");
    }
    assert_ne!(http().get(format!("{api}/")).send().await.unwrap().status().as_u16(), 401);

    // 401s name what is wrong and never echo the secret.
    let secret_like = format!("hf_0123456789abcdef_{}", "9".repeat(64));
    let cases: Vec<(String, &str)> = vec![
        ("Basic abc".into(), "Bearer"),
        ("Bearer not-a-token".into(), "malformed"),
        (format!("Bearer {secret_like}"), "unknown"),
        // The reader's token with its last digit changed (to one it is not).
        (format!("Bearer {}{}", &rd[..rd.len() - 1], if rd.ends_with('0') { '1' } else { '0' }), "does not match"),
    ];
    for (header, says) in cases {
        let r = http().get(format!("{api}/v1/tasks")).header("authorization", &header).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{header}");
        assert!(r.headers().contains_key("www-authenticate"));
        let text = r.text().await.unwrap();
        assert!(text.contains(says), "{header}: {text}");
        let secret = header.rsplit('_').next().unwrap();
        assert!(secret.len() < 64 || !text.contains(secret), "echoed the secret: {text}");
    }
    // Expired.
    let (_, short) = make_token(&admin, &api, "brief", "reader", Some(1)).await;
    let r = client_with_token(&short).get(format!("{api}/v1/tasks")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.unwrap().contains("expired"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_see_env_keys_not_values_and_the_audit_names_the_token() {
    let c = Cluster::builder().start().await;
    let (admin, api) = (c.client.clone(), c.url(""));
    let (op_id, op) = make_token(&admin, &api, "deployer", "operator", None).await;
    let (_, rd) = make_token(&admin, &api, "viewer", "reader", None).await;
    let (op, rd) = (client_with_token(&op), client_with_token(&rd));

    // The operator submits, claiming to be the admin in the actor header.
    let spec = json!({"image": "a", "env": {"DB_PASSWORD": "hunter2", "MODE": "x"}});
    let r = op
        .post(format!("{api}/v1/tasks"))
        .header("X-Holdfast-Actor", "admin (pretend)")
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();

    for url in [format!("{api}/v1/tasks/{id}"), format!("{api}/v1/tasks")] {
        let text = rd.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(text.contains("DB_PASSWORD") && text.contains("MODE"), "reader sees the keys: {text}");
        assert!(!text.contains("hunter2"), "reader must not see env values: {text}");
        assert!(text.contains("<redacted>"), "{text}");
        let text = op.get(&url).send().await.unwrap().text().await.unwrap();
        assert!(text.contains("hunter2"), "operator sees values: {text}");
    }
    let audit = get_json(&admin, &format!("{api}/v1/audit")).await.unwrap();
    let entry = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "POST /v1/tasks" && e["subject"] == json!(id))
        .cloned()
        .unwrap_or_else(|| panic!("no audit entry for {id}: {audit}"));
    assert_eq!(entry["who"], json!(format!("deployer ({op_id})")), "{entry}");
    assert_eq!(entry["on_behalf_of"], "admin (pretend)", "{entry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_by_a_follower_within_a_second() {
    // The followers join the cluster port (mutual TLS) with the manager join token.
    let c = Cluster::builder().managers(3).start().await;
    let admin = c.client.clone();
    let ms = &c.managers;
    let leader = get_json(&admin, &c.url("/v1/cluster")).await.unwrap()["leader"]["id"].clone();
    let li = ["m1", "m2", "m3"].iter().position(|n| json!(n) == leader).unwrap();
    let (leader_api, follower_api) = (ms[li].url(""), ms[(li + 1) % 3].url(""));

    // A token made on the leader works on a follower at once (it confirms with the leader).
    let (id, secret) = make_token(&admin, &leader_api, "temp", "operator", None).await;
    let user = client_with_token(&secret);
    let r = user.get(format!("{follower_api}/v1/tasks")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let r = admin.delete(format!("{leader_api}/v1/tokens/{id}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let revoked = Instant::now();
    let r = user.get(format!("{leader_api}/v1/tasks")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "the manager that revoked refuses at once");
    let refused_after = eventually(Duration::from_secs(5), "follower refuses the revoked token", || {
        let (user, url) = (user.clone(), format!("{follower_api}/v1/tasks"));
        async move {
            let r = user.get(&url).send().await.ok()?;
            (r.status().as_u16() == 401).then(|| revoked.elapsed())
        }
    })
    .await;
    assert!(refused_after < Duration::from_secs(1), "follower accepted a revoked token for {refused_after:?}");
    let text = user.get(format!("{follower_api}/v1/tasks")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("revoked"), "{text}");
    eprintln!("revocation refused on the follower after {refused_after:?}");

    // The cluster still serves writes through the follower.
    let r = admin.post(format!("{follower_api}/v1/tasks")).json(&json!({"image": "a"})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    drop(c);
}

/// A duplicate task id sent through a follower (forwarded to the leader) is a
/// `conflict` rejection on every replica; Raft keeps going and the next write applies
/// everywhere. (Before, the UNIQUE constraint failed inside `apply` and stopped Raft on
/// every manager.) In-process members on real SQLite files and real HTTP transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_id_through_the_forwarding_path_is_a_rejection_and_the_cluster_serves() {
    use holdfast::manager::state::{Command, DomainState, Outcome, RejectCode};
    let dir = tempfile::tempdir().unwrap();
    let mut dbs = Vec::new();
    let mut stops = Vec::new();
    let (client_tls, server_tls) = manager_tls();
    for i in 1..=3 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (domain, _) = DomainState::new();
        let mut cfg = holdfast_raft::Config::new(
            &format!("m{i}"),
            dir.path().join(format!("m{i}")),
            &addr,
            "127.0.0.1:9",
            client_tls.clone(),
        );
        cfg.op_timeout = Duration::from_secs(5);
        let db = holdfast_raft::ReplicatedDb::open(cfg, domain).await.unwrap();
        let (tx, rx) = tokio::sync::broadcast::channel::<()>(1);
        let router = db.cluster_router();
        drop(holdfast::net::tls::serve(listener, server_tls.clone(), router, Default::default(), rx));
        stops.push(tx);
        dbs.push((db, addr));
    }
    dbs[0].0.bootstrap().await.unwrap();
    let seed = vec![dbs[0].1.clone()];
    for (db, _) in &dbs[1..] {
        db.join(&seed).await.unwrap();
    }
    let spec: holdfast::model::TaskSpec = serde_json::from_value(json!({"image": "a"})).unwrap();
    let cmd = |id: &str| Command::SubmitTask {
        id: id.into(),
        spec: Box::new(spec.clone()),
        idempotency_key: None,
        now_ms: 1,
    };
    let write = |i: usize, c: Command| {
        let db = dbs[i].0.clone();
        async move {
            let out = db.write(serde_json::to_vec(&c).unwrap()).await.expect("a write, not a storage error");
            serde_json::from_slice::<Outcome>(&out).unwrap()
        }
    };
    let leader = dbs.iter().position(|(db, _)| db.status().role == holdfast_raft::Role::Leader).unwrap();
    let follower = (leader + 1) % 3;
    assert!(write(leader, cmd("dup")).await.is_ok());
    let out = write(follower, cmd("dup")).await;
    assert!(matches!(&out, Err(r) if r.code == RejectCode::Conflict), "{out:?}");
    let out = write(follower, cmd("next")).await;
    assert!(out.is_ok(), "{out:?}");
    for (db, _) in &dbs {
        let n: i64 = eventually(Duration::from_secs(10), "every replica applied both tasks", || {
            let db = db.clone();
            async move {
                let n = db
                    .read_local(|c| c.query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get::<_, i64>(0)))
                    .await
                    .ok()?;
                (n == 2).then_some(n)
            }
        })
        .await;
        assert_eq!(n, 2);
        assert_ne!(db.status().role, holdfast_raft::Role::Shutdown, "Raft still runs");
    }
    for (db, _) in &dbs {
        db.shutdown().await;
    }
    drop(stops);
}
