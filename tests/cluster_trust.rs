//! The cluster port's door, on real processes over real TLS: token joins and each
//! refusal, plain HTTP and missing or foreign certificates, roles and node identity,
//! revocation and removal, leaf rotation under writes, and a worker that comes back
//! after its certificate expired while it was cut off.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use holdfast::net::pki::{self, Ca, CertInfo, Role};
use holdfast::net::tls;
use serde_json::{json, Value};

/// Spawns `holdfast agent --worker` joined to `cluster`.
fn worker(dir: &Path, name: &str, cluster: &str, extra: &[&str]) -> Proc {
    let data = dir.join(name);
    let mut args =
        vec!["agent", "--worker", "--node-id", name, "--data-dir", data.to_str().unwrap(), "--join", cluster];
    args.extend_from_slice(extra);
    Proc::spawn(&args, &dir.join(format!("{name}.log")), &[])
}

/// Waits for a process to exit on its own; its exit status.
async fn exits(p: &mut Proc, within: Duration) -> std::process::ExitStatus {
    eventually(within, "the process to exit", || {
        let s = p.child.try_wait().ok().flatten();
        async move { s }
    })
    .await
}

/// An HTTP client over mutual TLS holding the certificate in `<data>/tls`.
fn client_of(data: &Path) -> reqwest::Client {
    let dir = data.join("tls");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("identity file");
    let (ca, cert, key) = (read("ca.pem"), read("node.pem"), read("node.key"));
    let resolver = tls::CertResolver::new(tls::certified_key(&cert, &key, &ca).expect("key"));
    let cfg = tls::client_config(&[pki::cert_der_from_pem(&ca).unwrap()], resolver).expect("client config");
    tls::http_client(cfg, Duration::from_secs(3))
}

/// A TLS client without a certificate that trusts anything: only the door decides.
fn anonymous() -> reqwest::Client {
    reqwest::Client::builder().danger_accept_invalid_certs(true).timeout(Duration::from_secs(5)).build().unwrap()
}

async fn node_status(m: &Node, name: &str) -> Option<String> {
    let v = get_json(&api_client(&m.data).await, &m.url(&format!("/v1/nodes/{name}"))).await?;
    v["status"].as_str().map(String::from)
}

async fn post_json(c: &reqwest::Client, url: &str, body: Value) -> Result<(u16, Value), String> {
    let r = c.post(url).json(&body).send().await.map_err(|e| holdfast::net::identity::chain(&e))?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// Starts worker `name` with `token` and asserts it exits unsuccessfully within 30 s,
/// its log naming `why` (the joining side says why it was refused).
async fn refused_worker(dir: &Path, m1: &Node, name: &str, token: &str, why: &str) {
    let mut w = worker(dir, name, &m1.cluster, &["--token", token]);
    assert!(!exits(&mut w, Duration::from_secs(30)).await.success());
    assert!(w.log_text().contains(why), "{}", w.log_text());
}

/// A new join token from `POST /v1/cluster/join-tokens` with `body`.
async fn mint_token(m1: &Node, body: Value) -> String {
    let (s, v) = post_json(&api_client(&m1.data).await, &m1.url("/v1/cluster/join-tokens"), body).await.unwrap();
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// Starts Docker worker `name` joining `m1` with `token`, waits until it is ready, and
/// submits one `keep` task (lost only after ten minutes) for it to run.
async fn worker_with_a_keep_task(dir: &Path, m1: &Node, name: &str, token: &str) -> Proc {
    let w = worker(dir, name, &m1.cluster, &["--token", token]);
    eventually(Duration::from_secs(60), "worker ready", || async {
        (node_status(m1, name).await? == "ready").then_some(())
    })
    .await;
    let spec = json!({"image":"holdfast/echo:latest","ports":[{"container":7777}],"offline":{"mode":"keep","lost_after_ms":600000}});
    let (s, v) = post_json(&api_client(&m1.data).await, &m1.url("/v1/tasks"), spec).await.unwrap();
    assert_eq!(s, 201, "{v}");
    w
}

/// The running containers of node `name`, via the docker CLI; `None` if it failed.
fn running_containers(name: &str) -> Option<Vec<String>> {
    let out = std::process::Command::new("docker")
        .args(["ps", "-q", "--no-trunc", "--filter", &format!("label=holdfast.node={name}")])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect())
}

const ROUTES: [&str; 12] = [
    "/raft/append",
    "/raft/vote",
    "/raft/pre-vote",
    "/raft/snapshot",
    "/raft/write",
    "/raft/read-index",
    "/raft/join",
    "/raft/remove",
    "/raft/status",
    "/cluster/v1/sync",
    "/cluster/v1/logs",
    "/cluster/v1/renew",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_admit_and_the_door_refuses_each_bad_caller() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut m1 = Node::new(d, "m1");
    m1.manager(&["--bootstrap"]);
    let worker_token = join_token(&m1.data, "worker");
    let manager_token = join_token(&m1.data, "manager");
    assert!(worker_token.starts_with("HFTKN-1-") && worker_token != manager_token);
    let ca_pem = std::fs::read_to_string(m1.data.join("tls/ca.pem")).unwrap();
    let digest = pki::digest(&pki::cert_der_from_pem(&ca_pem).unwrap());
    assert!(worker_token.contains(&digest), "the token pins the CA");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["join-worker.token", "join-manager.token", "tls/node.key", "tls/ca.key"] {
            let mode = std::fs::metadata(m1.data.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
    }

    // The right token admits; the worker's certificate names it as a worker.
    let token_file = m1.data.join("join-worker.token");
    let _w1 = worker(d, "w1", &m1.cluster, &["--token-file", token_file.to_str().unwrap()]);
    eventually(Duration::from_secs(30), "w1 ready", || async {
        (node_status(&m1, "w1").await? == "ready").then_some(())
    })
    .await;
    let w1_cert = std::fs::read_to_string(d.join("w1/tls/node.pem")).unwrap();
    let info = CertInfo::from_der(&pki::cert_der_from_pem(&w1_cert).unwrap()).unwrap();
    assert_eq!((info.node.as_str(), info.role), ("w1", Role::Worker));
    assert!(!d.join("w1/tls/ca.key").exists(), "the CA key never reaches a worker");

    // A second manager joins with the manager token.
    let mut m2 = Node::new(d, "m2");
    m2.manager(&["--join", &m1.cluster, "--token", &manager_token]);
    eventually(Duration::from_secs(30), "two voters", || async {
        let v = get_json(&api_client(&m1.data).await, &m1.url("/v1/cluster")).await?;
        (v["members"].as_array()?.iter().filter(|m| m["voter"] == true).count() == 2).then_some(())
    })
    .await;

    // Refusals, each with the reason on the joining side.
    let secret_guess = format!("HFTKN-1-{digest}-0123456789abcdef0123456789abcdef");
    refused_worker(d, &m1, "w-guess", &secret_guess, "token_unknown").await;

    let other_ca = Ca::generate().unwrap();
    let foreign = format!("HFTKN-1-{}-0123456789abcdef0123456789abcdef", other_ca.digest().unwrap());
    refused_worker(d, &m1, "w-foreign", &foreign, "not the CA").await;
    assert!(!m1.log().contains("w-foreign"), "the secret was never sent to the manager");

    refused_worker(d, &m1, "w-role", &manager_token, "token_role").await;

    // Rotation: a one-use token admits once; the old one stops working.
    let one_use = mint_token(&m1, json!({"role":"worker","uses":1})).await;
    let _w2 = worker(d, "w2", &m1.cluster, &["--token", &one_use]);
    eventually(Duration::from_secs(30), "w2 ready", || async {
        (node_status(&m1, "w2").await? == "ready").then_some(())
    })
    .await;
    refused_worker(d, &m1, "w3", &one_use, "token_used_up").await;
    refused_worker(d, &m1, "w4", &worker_token, "token_revoked").await;
    let expired = mint_token(&m1, json!({"role":"worker","ttl_ms":1})).await;
    refused_worker(d, &m1, "w5", &expired, "token_expired").await;
    // Nodes already joined are not affected by rotation.
    assert_eq!(node_status(&m1, "w1").await.as_deref(), Some("ready"));

    // Plain HTTP never reaches a route; TLS without a certificate reaches none but join.
    for route in ROUTES {
        let plain = http().post(format!("http://{}{route}", m1.cluster)).body("{}").send().await;
        assert!(plain.is_err(), "plain HTTP got an answer on {route}: {plain:?}");
        let (s, v) = post_json(&anonymous(), &format!("https://{}{route}", m1.cluster), json!({})).await.unwrap();
        assert_eq!((s, v["error"]["code"].as_str()), (401, Some("certificate_required")), "{route}: {v}");
    }
    // A certificate of another CA fails the handshake.
    let (cert, key) = other_ca.issue("w1", Role::Manager, Duration::from_secs(60)).unwrap();
    let fake = d.join("fake");
    holdfast::net::identity::write_private(&fake.join("tls/ca.pem"), &ca_pem).unwrap();
    holdfast::net::identity::write_private(&fake.join("tls/node.pem"), &cert).unwrap();
    holdfast::net::identity::write_private(&fake.join("tls/node.key"), &key).unwrap();
    let r = post_json(&client_of(&fake), &format!("https://{}/raft/status", m1.cluster), json!({})).await;
    assert!(r.is_err(), "a foreign certificate got an answer: {r:?}");

    // A worker certificate: no Raft, and no speaking for another node.
    let w1c = client_of(&d.join("w1"));
    for route in ["/raft/append", "/raft/vote", "/raft/pre-vote", "/raft/write", "/raft/join"] {
        let (s, v) = post_json(&w1c, &format!("https://{}{route}", m1.cluster), json!({})).await.unwrap();
        assert_eq!((s, v["error"]["code"].as_str()), (403, Some("manager_only")), "{route}: {v}");
    }
    let sync_as = |node: &str| {
        json!({"node": node, "address": "127.0.0.1", "labels": {}, "resources": {"cpus":1,"cpu_millis":1000,"load1":0.0,"memory_total_mb":64,"memory_free_mb":64,"disk_total_mb":64,"disk_free_mb":64,"engine_ok":true},
               "wait_ms": 0, "reports": [], "have_version": 0})
    };
    let (s, v) = post_json(&w1c, &format!("https://{}/cluster/v1/sync", m1.cluster), sync_as("w2")).await.unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("wrong_node")), "{v}");

    // Revocation: w2 is refused at once, w1 is not.
    let (s, v) = post_json(&api_client(&m1.data).await, &m1.url("/v1/nodes/w2/revoke"), json!({})).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let w2c = client_of(&d.join("w2"));
    let (s, v) = post_json(&w2c, &format!("https://{}/cluster/v1/sync", m1.cluster), sync_as("w2")).await.unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("revoked")), "{v}");
    eventually(Duration::from_secs(10), "the revocation on m2 too", || {
        let (w2c, url) = (w2c.clone(), format!("https://{}/cluster/v1/renew", m2.cluster));
        async move {
            let (s, _) = post_json(&w2c, &url, json!({"csr_pem":""})).await.ok()?;
            (s == 403).then_some(())
        }
    })
    .await;
    assert_eq!(node_status(&m1, "w1").await.as_deref(), Some("ready"));

    // The listener's limits, as a manager: a snapshot chunk far past the bytes received
    // is refused before it can allocate; an oversized vote is refused; both as JSON.
    let m1c = client_of(&m1.data);
    let chunk = json!({
        "vote": {"leader_id": {"term": 1, "node_id": 1}, "committed": false},
        "meta": {"last_log_id": null, "last_membership": {"log_id": null, "membership": {"configs": [], "nodes": {}}},
                 "snapshot_id": "evil"},
        "offset": 1u64 << 40, "data": "AAAA", "done": false,
    });
    let (s, v) = post_json(&m1c, &format!("https://{}/raft/snapshot", m1.cluster), chunk).await.unwrap();
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_chunk")), "{v}");
    // Just over the 64 KiB limit: the server answers before reading the body and closes,
    // so a client still writing may see a broken pipe or a reset instead of the answer
    // (HTTP/1's lingering-close race). A transport error is asked again; any answer
    // must be the 413.
    let big = json!({"padding": "x".repeat(66 * 1024)});
    let url = format!("https://{}/raft/vote", m1.cluster);
    let v = eventually(Duration::from_secs(10), "an oversized vote answered 413", || {
        let (m1c, url, big) = (m1c.clone(), url.clone(), big.clone());
        async move {
            match post_json(&m1c, &url, big).await {
                Ok((s, v)) => {
                    assert_eq!((s, v["error"]["code"].as_str()), (413, Some("too_large")), "{v}");
                    Ok(v)
                }
                Err(transport) => Err(transport),
            }
        }
    })
    .await;
    assert_eq!(v["error"]["code"], "too_large");

    // A removed manager is refused on its next call.
    let resp = api_client(&m1.data).await.delete(m1.url("/v1/cluster/members/m2")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);
    let m2c = client_of(&m2.data);
    eventually(Duration::from_secs(2), "m2 refused at m1's door", || {
        let (m2c, url) = (m2c.clone(), format!("https://{}/raft/vote", m1.cluster));
        async move {
            let (s, v) = post_json(&m2c, &url, json!({})).await.ok()?;
            (s == 403 && v["error"]["code"] == "revoked").then_some(())
        }
    })
    .await;
    // The cluster kept serving throughout.
    let (s, v) = post_json(&api_client(&m1.data).await, &m1.url("/v1/tasks"), json!({"image":"holdfast/echo:latest"}))
        .await
        .unwrap();
    assert_eq!(s, 201, "{v}");
    assert!(m1.log().contains("refused"), "the manager logs its refusals");
    assert!(!m1.log().contains(worker_token.rsplit('-').next().unwrap()), "a secret reached a log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaf_rotation_under_steady_writes_loses_nothing_and_fails_no_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Three-second leaves: every node renews every two seconds.
    let life = ["--cert-lifetime", "3s"];
    let mut m1 = Node::new(d, "m1");
    m1.manager(&[&["--bootstrap"][..], &life[..]].concat());
    let token = join_token(&m1.data, "manager");
    let mut m2 = Node::new(d, "m2");
    m2.manager(&[&["--join", &m1.cluster, "--token", &token][..], &life[..]].concat());
    let wt = join_token(&m1.data, "worker");
    let w1 = worker(d, "w1", &format!("{},{}", m1.cluster, m2.cluster), &["--token", &wt]);
    eventually(Duration::from_secs(30), "two voters and w1 ready", || async {
        let v = get_json(&api_client(&m1.data).await, &m1.url("/v1/cluster")).await?;
        let voters = v["members"].as_array()?.iter().filter(|m| m["voter"] == true).count();
        (voters == 2 && node_status(&m1, "w1").await? == "ready").then_some(())
    })
    .await;

    // What the logs held before the writes start (joining may log a retry or two).
    let base = (m1.log().len(), m2.log().len(), w1.log_text().len());
    // Steady writes on both managers (followers forward over the cluster port) across
    // several rotations of every certificate.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    let admin = api_client(&m1.data).await;
    for (i, api) in [m1.api.clone(), m2.api.clone()].into_iter().enumerate() {
        let (stop, ok, admin) = (stop.clone(), ok.clone(), admin.clone());
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"image":"holdfast/echo:latest","name":format!("r{i}-{n}"),"constraints":{"labels":{"zone":"nowhere"}}});
                let r = post_json(&admin, &format!("http://{api}/v1/tasks"), body).await;
                match r {
                    Ok((201, v)) => {
                        ids.push(v["id"].as_str().unwrap().to_string());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("write {i}-{n} failed during rotation: {other:?}"),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        }));
    }
    let renewals = |log: &str| log.matches("cluster certificate renewed").count();
    eventually(Duration::from_secs(40), "three renewals on every node", || {
        let (a, b, c) = (renewals(&m1.log()), renewals(&m2.log()), renewals(&w1.log_text()));
        async move { (a >= 3 && b >= 3 && c >= 3).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.expect("writer"));
    }
    assert!(acked.len() > 20, "only {} writes", acked.len());
    let v = get_json(&api_client(&m1.data).await, &m2.url("/v1/tasks")).await.expect("tasks");
    let have: std::collections::HashSet<&str> =
        v["tasks"].as_array().unwrap().iter().filter_map(|t| t["id"].as_str()).collect();
    for id in &acked {
        assert!(have.contains(id.as_str()), "acknowledged write {id} lost");
    }
    // No RPC failed: no refused handshake or door refusal, no failed sync.
    let logs = [
        ("m1", m1.log()[base.0..].to_string()),
        ("m2", m2.log()[base.1..].to_string()),
        ("w1", w1.log_text()[base.2..].to_string()),
    ];
    for (name, log) in logs {
        for bad in ["handshake refused", "refused:", "sync failed", "certificate_expired"] {
            assert!(!log.contains(bad), "{name} logged {bad:?} during rotation:\n{log}");
        }
    }
    assert_eq!(node_status(&m1, "w1").await.as_deref(), Some("ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_past_its_certificate_keeps_its_keep_task_and_renews_on_return() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut m1 = Node::new(d, "m1");
    let start = |m1: &mut Node| m1.manager(&["--bootstrap", "--cert-lifetime", "3s"]);
    start(&mut m1);
    let wt = join_token(&m1.data, "worker");
    let name = format!("wcut-{}", std::process::id());
    let _cleanup = NodeContainers(name.clone());
    let w = worker_with_a_keep_task(d, &m1, &name, &wt).await;
    let running = || async {
        let ids = containers_with_label("holdfast.node", &name);
        let up = running_containers(&name)?;
        (ids.len() == 1 && up.len() == 1).then(|| up[0].clone())
    };
    let container = eventually(Duration::from_secs(90), "the keep task running", || async {
        running().await.ok_or_else(|| format!("\n--- worker\n{}\n--- m1\n{}", w.log_text(), m1.log()))
    })
    .await;

    // Cut off: the only manager is gone until the worker's certificate has expired.
    m1.proc.as_mut().unwrap().kill();
    let cert_path = d.join(&name).join("tls/node.pem");
    eventually(Duration::from_secs(30), "the worker certificate to expire", || {
        let pem = std::fs::read_to_string(&cert_path).unwrap_or_default();
        let after = pki::cert_der_from_pem(&pem).ok().and_then(|c| CertInfo::from_der(&c).ok()).map(|i| i.not_after_ms);
        async move { after.filter(|a| pki::now_ms() > *a + 1_000).map(|_| ()) }
    })
    .await;
    assert_eq!(running().await.as_deref(), Some(container.as_str()), "the keep task ran on while cut off");

    // Back: the worker renews by itself and is ready again, same container.
    start(&mut m1);
    // Synced again (the leader's liveness is in memory: fresh after the restart) with a
    // fresh certificate it got by itself.
    let tail = |t: String| t.chars().rev().take(3_000).collect::<String>().chars().rev().collect::<String>();
    eventually(Duration::from_secs(60), "the worker back, ready, with a fresh certificate", || async {
        let v = get_json(&api_client(&m1.data).await, &m1.url(&format!("/v1/nodes/{name}"))).await.unwrap_or_default();
        let seen = v["last_seen_ms_ago"].as_u64().is_some_and(|ms| ms < 1_500);
        let pem = std::fs::read_to_string(&cert_path).unwrap_or_default();
        let fresh = pki::cert_der_from_pem(&pem)
            .ok()
            .and_then(|c| CertInfo::from_der(&c).ok())
            .is_some_and(|i| i.not_after_ms > pki::now_ms());
        if seen && fresh && v["status"] == "ready" {
            Ok(())
        } else {
            Err(format!("{v}\n--- worker\n{}\n--- m1\n{}", tail(w.log_text()), tail(m1.log())))
        }
    })
    .await;
    assert!(w.log_text().contains("cluster certificate renewed"), "{}", w.log_text());
    assert_eq!(running().await.as_deref(), Some(container.as_str()), "the same container");
}

#[tokio::test]
async fn past_the_grace_window_a_node_says_which_token_and_command_to_use() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate().unwrap();
    // Already expired, and no grace at all.
    let (cert, key) = ca.issue("w9", Role::Worker, Duration::ZERO).unwrap();
    let tlsdir = dir.path().join("tls");
    holdfast::net::identity::write_private(&tlsdir.join("ca.pem"), &ca.cert_pem).unwrap();
    holdfast::net::identity::write_private(&tlsdir.join("node.pem"), &cert).unwrap();
    holdfast::net::identity::write_private(&tlsdir.join("node.key"), &key).unwrap();
    let settings = holdfast::net::identity::IdentitySettings {
        node: "w9".into(),
        role: Role::Worker,
        data_dir: dir.path().to_path_buf(),
        bootstrap: false,
        token: None,
        seeds: vec!["127.0.0.1:1".into()],
        lifetime: Duration::from_secs(60),
        grace: Duration::ZERO,
    };
    let err = holdfast::net::identity::NodeTls::establish(&settings).await.expect_err("past the grace window");
    let text = err.to_string();
    assert!(text.contains("holdfast token join --role worker") && text.contains("--token-file"), "{text}");
}

#[tokio::test]
async fn a_node_dials_only_servers_proving_a_manager_certificate_of_its_ca() {
    // The client every node uses (sync, redirects, Raft) against three servers of the
    // same CA: one with a manager certificate, one with a worker certificate (a worker
    // posing as a manager in a 421 hint), and one of another CA.
    let ca = Ca::generate().unwrap();
    let other = Ca::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_identity(&ca, &dir.path().join("me"), "me", Role::Worker);
    let client = client_of(&dir.path().join("me"));
    let serve_as = |issuer: &Ca, role: Role| {
        let (cert, key) = issuer.issue("srv", role, Duration::from_secs(60)).unwrap();
        let resolver = tls::CertResolver::new(tls::certified_key(&cert, &key, &issuer.cert_pem).unwrap());
        let cfg = tls::server_config(&[ca.cert_der().unwrap()], resolver, Duration::ZERO).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let router = axum::Router::new().route("/cluster/v1/sync", axum::routing::post(|| async { "hello" }));
        let (stop, rx) = tokio::sync::broadcast::channel(1);
        std::mem::forget(stop);
        tls::serve(listener, cfg, router, Default::default(), rx);
        format!("https://{addr}/cluster/v1/sync")
    };
    let good = serve_as(&ca, Role::Manager);
    let posing = serve_as(&ca, Role::Worker);
    let foreign = serve_as(&other, Role::Manager);
    let answer = client.post(&good).send().await.expect("a manager of the CA answers");
    assert_eq!(answer.text().await.unwrap(), "hello");
    for url in [posing, foreign] {
        let r = client.post(&url).send().await;
        assert!(r.is_err(), "{url} was trusted: {r:?}");
    }
}

/// An API client trusting only the CA file in `data/tls/ca.pem` (what the CLI does),
/// with the admin token of `admin_data`; it reports the server's leaf.
async fn https_client(data: &Path, admin_data: &Path) -> reqwest::Client {
    let bearer = format!("Bearer {}", admin_token(admin_data).await);
    let path = data.join("tls/ca.pem");
    let pem = eventually(Duration::from_secs(30), "tls/ca.pem", || {
        let path = path.clone();
        async move { std::fs::read(&path).ok() }
    })
    .await;
    let mut b = reqwest::Client::builder().tls_built_in_root_certs(false).tls_info(true);
    for c in reqwest::Certificate::from_pem_bundle(&pem).unwrap() {
        b = b.add_root_certificate(c);
    }
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, bearer.parse().unwrap());
    b.default_headers(headers).timeout(Duration::from_secs(5)).build().unwrap()
}

/// The API leaf a fresh connection is served, and the JSON of `url`.
async fn https_get(c: &reqwest::Client, url: String) -> Option<(Vec<u8>, Value)> {
    let r = c.get(&url).send().await.ok()?;
    let leaf = r.extensions().get::<reqwest::tls::TlsInfo>()?.peer_certificate()?.to_vec();
    r.status().is_success().then_some(())?;
    Some((leaf, r.json().await.ok()?))
}

/// Runs the CLI and returns (success, stdout + stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(holdfast_bin()).args(args).output().expect("run holdfast");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Off loopback the API serves a certificate the manager issued from the cluster CA,
/// naming loopback too, and renews it in place; the CLI trusts the CA in the data dir
/// (or --ca-file) and says which flag to use when it has none; a follower shows the
/// leader's live fields, read over the cluster port with its manager certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_api_uses_the_cluster_ca_and_a_follower_shows_live_fields() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (p1, p2) = (free_port(), free_port());
    let mut m1 = Node::new(d, "m1");
    m1.api = format!("0.0.0.0:{p1}");
    m1.manager(&["--bootstrap", "--cert-lifetime", "6s"]);
    let url1 = |path: &str| format!("https://127.0.0.1:{p1}{path}");
    let c1 = https_client(&m1.data, &m1.data).await;
    let (leaf, _) = eventually(Duration::from_secs(30), "m1's HTTPS API", || https_get(&c1, url1("/v1/cluster"))).await;
    let info = CertInfo::from_der(&leaf).unwrap();
    assert_eq!((info.node.as_str(), info.role), ("m1", Role::Manager));
    assert!(!m1.data.join("api-cert.pem").exists(), "no self-signed stand-in");
    let plain = http().get(format!("http://127.0.0.1:{p1}/v1/cluster")).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success(), "plain HTTP is not served off loopback");

    // Renewed in place at two thirds of its life: a later connection gets a new leaf.
    eventually(Duration::from_secs(20), "a renewed API certificate", || {
        let (c, leaf, url) = (https_client(&m1.data, &m1.data), leaf.clone(), url1("/v1/cluster"));
        async move {
            let (now, _) = https_get(&c.await, url).await?;
            (now != leaf).then_some(())
        }
    })
    .await;

    // A second manager (HTTPS too) and a worker.
    let mut m2 = Node::new(d, "m2");
    m2.api = format!("0.0.0.0:{p2}");
    let manager_token = join_token(&m1.data, "manager");
    m2.manager(&["--join", &m1.cluster, "--token", &manager_token]);
    let worker_token = join_token(&m1.data, "worker");
    let _w1 = worker(d, "w1", &m1.cluster, &["--token", &worker_token]);
    let _containers = NodeContainers("w1".into());
    let url2 = |path: &str| format!("https://127.0.0.1:{p2}{path}");
    let c2 = https_client(&m2.data, &m1.data).await;
    let nodes = eventually(Duration::from_secs(45), "w1 live as seen by the follower m2", || async {
        let (_, cluster) = https_get(&c2, url2("/v1/cluster")).await?;
        // Only a follower's answer counts.
        (cluster["id"] == "m2" && cluster["leader"]["id"] == "m1").then_some(())?;
        let (_, v) = https_get(&c2, url2("/v1/nodes")).await?;
        let w1 = v["nodes"].as_array()?.iter().find(|n| n["id"] == "w1")?.clone();
        (w1["last_seen_ms_ago"].is_u64() && w1["free"].is_object()).then_some(v)
    })
    .await;
    assert!(nodes["nodes"].as_array().unwrap().iter().any(|n| n["id"] == "w1"));
    let (_, one) = https_get(&c2, url2("/v1/nodes/w1")).await.expect("GET /v1/nodes/w1 on the follower");
    assert!(one["last_seen_ms_ago"].is_u64(), "{one}");

    // The CLI trusts <data-dir>/tls/ca.pem by default, or --ca-file.
    let data1 = m1.data.to_str().unwrap();
    let (ok, out) = cli(&["node", "--api-url", &url2(""), "--data-dir", data1]);
    assert!(ok && out.contains("w1"), "{out}");
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let token = admin_token(&m1.data).await;
    let (ok, out) = cli(&["node", "--api-url", &url2(""), "--data-dir", empty.to_str().unwrap(), "--token", &token]);
    assert!(!ok && out.contains("--ca-file"), "{out}");
    let ca_file = m1.data.join("tls/ca.pem");
    let with_flag = ["node", "--api-url", &url2(""), "--data-dir", empty.to_str().unwrap(), "--token", &token];
    let (ok, out) = cli(&[&with_flag[..], &["--ca-file", ca_file.to_str().unwrap()]].concat());
    assert!(ok && out.contains("w1"), "{out}");
    // A CA of another cluster does not verify the server.
    let foreign = d.join("foreign.pem");
    std::fs::write(&foreign, Ca::generate().unwrap().cert_pem).unwrap();
    let (ok, out) = cli(&[&with_flag[..], &["--ca-file", foreign.to_str().unwrap()]].concat());
    assert!(!ok, "{out}");
}

/// An HTTP client presenting the identity in `<data>/tls` and trusting `roots`.
fn client_with_roots(data: &Path, roots: &[&str]) -> reqwest::Client {
    let dir = data.join("tls");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("identity file");
    let (cert, key) = (read("node.pem"), read("node.key"));
    let chain = read("ca.pem");
    let resolver = tls::CertResolver::new(tls::certified_key(&cert, &key, &chain).expect("key"));
    let ders: Vec<_> = roots.iter().map(|p| pki::cert_der_from_pem(p).unwrap()).collect();
    tls::http_client(tls::client_config(&ders, resolver).expect("client config"), Duration::from_secs(3))
}

fn leaf_from(data: &Path, ca_pem: &str) -> bool {
    let leaf = std::fs::read_to_string(data.join("tls/node.pem")).unwrap_or_default();
    match (pki::cert_der_from_pem(&leaf), pki::cert_der_from_pem(ca_pem)) {
        (Ok(l), Ok(c)) => pki::issued_by(&l, &c),
        _ => false,
    }
}

/// `holdfast cluster ca rotate` with a manager and a worker online: the worker renews
/// onto the new CA by itself and its `keep` task runs on in the same container, old
/// join tokens are refused and a new worker joins with one pinned to the new CA, the
/// old CA is retired only when every node is on the new one (a worker that was offline
/// holds it up until it is back and has renewed by itself), and a certificate of the
/// old CA is refused from then on (it was accepted during the overlap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_moves_every_node_to_the_new_ca_and_then_refuses_the_old_one() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut m1 = Node::new(d, "m1");
    m1.manager(&["--bootstrap", "--cert-lifetime", "60s"]);
    let old_token = join_token(&m1.data, "worker");
    let name = format!("wrot-{}", std::process::id());
    let _cleanup = NodeContainers(name.clone());
    let w = worker_with_a_keep_task(d, &m1, &name, &old_token).await;
    let running = || async {
        let up = running_containers(&name)?;
        (up.len() == 1).then(|| up[0].clone())
    };
    let container = eventually(Duration::from_secs(90), "the keep task running", running).await;
    // A second worker that is offline during the rotation: it holds up the finish.
    let mut off = worker(d, "w-off", &m1.cluster, &["--token", &old_token]);
    let _off_containers = NodeContainers("w-off".into());
    eventually(Duration::from_secs(60), "w-off ready", || async {
        (node_status(&m1, "w-off").await? == "ready").then_some(())
    })
    .await;
    off.kill();
    let old_ca = std::fs::read_to_string(m1.data.join("tls/ca.pem")).unwrap();
    // The worker's identity of the old CA, kept aside to knock with later.
    let old_id = d.join("old-id");
    std::fs::create_dir_all(old_id.join("tls")).unwrap();
    for f in ["node.pem", "node.key", "ca.pem"] {
        std::fs::copy(d.join(&name).join("tls").join(f), old_id.join("tls").join(f)).unwrap();
    }

    // Rotate through the CLI: new join tokens come back and replace the files.
    let data1 = m1.data.to_str().unwrap();
    let rotated_at = std::time::Instant::now();
    let (ok, out) = cli(&["cluster", "--api-url", &m1.url(""), "--data-dir", data1, "ca", "rotate"]);
    assert!(ok, "{out}");
    let json_start = out.find('{').expect("JSON answer");
    let answer: Value = serde_json::Deserializer::from_str(&out[json_start..])
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON in {out}"));
    let new_token = answer["join_tokens"]["worker"].as_str().expect("new worker token").to_string();
    assert_eq!(join_token(&m1.data, "worker"), new_token, "join-worker.token rewritten");
    let status = get_json(&api_client(&m1.data).await, &m1.url("/v1/cluster")).await.unwrap();
    assert_eq!(status["ca"]["rotating"], true, "{status}");
    let new_digest = status["ca"]["current"].as_str().unwrap().to_string();
    assert!(new_token.contains(&new_digest), "the new token pins the new CA");
    assert_ne!(Some(new_digest.as_str()), Some(pki::digest(&pki::cert_der_from_pem(&old_ca).unwrap()).as_str()));

    // Both CAs are trusted during the overlap: the old certificate still gets in.
    let new_ca = eventually(Duration::from_secs(10), "m1 trusting the new CA", || async {
        let text = std::fs::read_to_string(m1.data.join("tls/ca.pem")).ok()?;
        let first = holdfast::net::identity::split_pems(&text).first()?.clone();
        (pki::digest(&pki::cert_der_from_pem(&first).ok()?) == new_digest).then_some(first)
    })
    .await;
    let both = [old_ca.as_str(), new_ca.as_str()];
    let knock = |c: reqwest::Client| {
        let url = format!("https://{}/cluster/v1/ca", m1.cluster);
        async move { c.get(url).send().await.map(|r| r.status().as_u16()).map_err(|e| holdfast::net::identity::chain(&e)) }
    };
    assert_eq!(knock(client_with_roots(&old_id, &both)).await, Ok(200), "old certificate during the overlap");

    // The worker and the manager renew onto the new CA by themselves.
    eventually(Duration::from_secs(60), "the worker and m1 on the new CA", || async {
        (leaf_from(&d.join(&name), &new_ca) && leaf_from(&m1.data, &new_ca)).then_some(())
    })
    .await;
    println!("FIGURES ca-rotation: online worker and manager on the new CA {:?} after rotate", rotated_at.elapsed());
    assert_eq!(running().await.as_deref(), Some(container.as_str()), "the keep task ran on");

    // Old join tokens are refused; a new worker joins with the new one.
    // The old CA is still trusted during the overlap, so the pin holds; the token does not.
    refused_worker(d, &m1, "w-old-token", &old_token, "token_revoked").await;
    let _w2 = worker(d, "w2", &m1.cluster, &["--token", &new_token]);
    let _w2_containers = NodeContainers("w2".into());
    eventually(Duration::from_secs(60), "w2 ready", || async {
        (node_status(&m1, "w2").await? == "ready").then_some(())
    })
    .await;
    assert!(leaf_from(&d.join("w2"), &new_ca));

    // Not finished while a node still holds a certificate of the old CA; that node
    // catches up by itself when it is back.
    let (st, v) = post_json(&api_client(&m1.data).await, &m1.url("/v1/cluster/ca/finish"), json!({})).await.unwrap();
    assert_eq!((st, v["error"]["code"].as_str()), (409, Some("rotation_incomplete")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("w-off"), "{v}");
    let _off = worker(d, "w-off", &m1.cluster, &[]);
    eventually(Duration::from_secs(60), "w-off back on the new CA", || async {
        leaf_from(&d.join("w-off"), &new_ca).then_some(())
    })
    .await;

    // Finished once every node is on the new CA.
    let ca_status = || async {
        let v = get_json(&api_client(&m1.data).await, &m1.url("/v1/cluster/ca")).await?;
        (v["nodes_on_new"] == v["nodes_total"] && v["nodes_total"].as_u64()? >= 4).then_some(v)
    };
    eventually(Duration::from_secs(30), "every node recorded on the new CA", ca_status).await;
    let (ok, out) = cli(&["cluster", "--api-url", &m1.url(""), "--data-dir", data1, "ca", "rotate", "--finish"]);
    assert!(ok, "{out}");
    let status = get_json(&api_client(&m1.data).await, &m1.url("/v1/cluster")).await.unwrap();
    assert_eq!(status["ca"]["rotating"], false, "{status}");
    assert!(status["ca"]["previous"].is_null(), "{status}");

    // The old CA is retired: its certificate is refused at the handshake.
    eventually(Duration::from_secs(10), "the old certificate refused", || {
        let c = client_with_roots(&old_id, &both);
        let k = knock(c);
        async move { k.await.is_err().then_some(()) }
    })
    .await;
    // The worker still syncs (with its new certificate) and its task runs on.
    eventually(Duration::from_secs(30), "the worker syncing after the old CA is retired", || async {
        let v = get_json(&api_client(&m1.data).await, &m1.url(&format!("/v1/nodes/{name}"))).await?;
        (v["status"] == "ready" && v["last_seen_ms_ago"].as_u64()? < 1_500).then_some(())
    })
    .await;
    assert_eq!(running().await.as_deref(), Some(container.as_str()), "the same container throughout");
    assert!(w.log_text().contains("cluster certificate renewed"), "{}", w.log_text());
}
