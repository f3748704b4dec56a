//! In-process clusters on temp dirs, each member serving its `/raft/` routes on a real
//! loopback port, with a tiny key/value application.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_raft::{Apply, ClusterStatus, Config, DbError, ReplicatedDb, Role};
use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

// ---- the test application ------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct Put {
    k: String,
    v: String,
}

/// `kv(k, v)`; a command sets one key and answers the previous value as JSON.
struct Kv;

impl Apply for Kv {
    fn init_schema(&self, conn: &rusqlite::Connection) -> rusqlite::Result<()> {
        conn.execute_batch("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    }

    fn apply(&self, tx: &rusqlite::Transaction<'_>, _index: u64, command: &[u8]) -> rusqlite::Result<Vec<u8>> {
        let Ok(put) = serde_json::from_slice::<Put>(command) else {
            return Ok(b"\"rejected\"".to_vec());
        };
        let prev: Option<String> = tx.query_row("SELECT v FROM kv WHERE k = ?1", [&put.k], |r| r.get(0)).optional()?;
        tx.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)", [&put.k, &put.v])?;
        Ok(serde_json::to_vec(&prev).unwrap_or_default())
    }
}

fn put(k: &str, v: &str) -> Vec<u8> {
    serde_json::to_vec(&Put { k: k.into(), v: v.into() }).expect("serialize put")
}

fn prev(resp: &[u8]) -> Option<String> {
    serde_json::from_slice(resp).expect("response is JSON")
}

fn get_sql(k: String) -> impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<Option<String>> {
    move |c| c.query_row("SELECT v FROM kv WHERE k = ?1", [k], |r| r.get(0)).optional()
}

fn count_sql(c: &rusqlite::Connection) -> rusqlite::Result<i64> {
    c.query_row("SELECT COUNT(*) FROM kv", [], |r| r.get(0))
}

// ---- cluster helper ------------------------------------------------------------------

struct Member {
    name: String,
    dir: PathBuf,
    addr: String,
    db: ReplicatedDb,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Member {
    /// Shuts Raft down and closes the listener and every open connection, as a dead
    /// process would.
    async fn kill(mut self) -> (String, PathBuf, String) {
        self.db.shutdown().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(3), &mut self.server).await.is_err() {
            self.server.abort();
        }
        (self.name, self.dir, self.addr)
    }
}

// ---- mutual TLS with a throwaway CA ----------------------------------------------------

/// One CA and one leaf (for 127.0.0.1) per test process: every member presents it as
/// server and as client, and trusts only that CA.
struct TestTls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn test_tls() -> &'static TestTls {
    static TLS: std::sync::OnceLock<TestTls> = std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("leaf params")
            .signed_by(&key, &ca, &ca_key)
            .expect("leaf");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        let roots = Arc::new(roots);
        let chain: Vec<CertificateDer<'static>> = vec![leaf.der().clone(), ca.der().clone()];
        let key_der = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key_der())
            .expect("client config");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .expect("client verifier");
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key_der())
            .expect("server config");
        TestTls { client: Arc::new(client), server: Arc::new(server) }
    })
}

/// Serves `router` over mutual TLS until `stopped`; then every open connection is cut.
async fn serve_tls(listener: TcpListener, router: axum::Router, mut stopped: oneshot::Receiver<()>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(test_tls().server.clone());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stopped => break,
            r = listener.accept() => match r { Ok(v) => v, Err(_) => continue },
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        conns.spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else { return };
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                use tower::ServiceExt;
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
    // Dropping the set aborts every connection, as a dead process would.
    drop(conns);
}

/// Timers for tests: the defaults, with shorter operation timeouts so failures
/// surface quickly.
fn test_config(name: &str, dir: &Path, addr: &str) -> Config {
    let mut c = Config::new(name, dir.to_path_buf(), addr, &format!("api-of-{name}"), test_tls().client.clone());
    c.rpc_timeout = Duration::from_secs(1);
    c.op_timeout = Duration::from_secs(4);
    c
}

async fn start_member(name: &str, dir: &Path, addr: Option<&str>, tweak: &dyn Fn(&mut Config)) -> Member {
    let listener = TcpListener::bind(addr.unwrap_or("127.0.0.1:0")).await.expect("bind cluster port");
    let addr = listener.local_addr().expect("local addr").to_string();
    let mut config = test_config(name, dir, &addr);
    tweak(&mut config);
    let db = ReplicatedDb::open(config, Arc::new(Kv)).await.expect("open member");
    let router = db.cluster_router();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve_tls(listener, router, stopped));
    Member { name: name.to_string(), dir: dir.to_path_buf(), addr, db, stop: Some(stop), server }
}

struct Cluster {
    _root: TempDir,
    root: PathBuf,
    members: Vec<Option<Member>>,
}

impl Cluster {
    /// Starts `n` members: the first bootstraps, the others join through it.
    async fn start(n: usize, tweak: &dyn Fn(&mut Config)) -> Cluster {
        let root_dir = tempfile::tempdir().expect("tempdir");
        let root = root_dir.path().to_path_buf();
        let mut c = Cluster { _root: root_dir, root, members: Vec::new() };
        let first = c.add(tweak).await;
        c.m(first).db.bootstrap().await.expect("bootstrap");
        wait_until(Duration::from_secs(5), "first member leads", || c.m(first).db.status().role == Role::Leader).await;
        for _ in 1..n {
            let i = c.add(tweak).await;
            let seeds = vec![c.m(first).addr.clone()];
            c.m(i).db.join(&seeds).await.expect("join");
        }
        c
    }

    async fn add(&mut self, tweak: &dyn Fn(&mut Config)) -> usize {
        let i = self.members.len();
        let name = format!("m{i}");
        let dir = self.root.join(&name);
        let m = start_member(&name, &dir, None, tweak).await;
        self.members.push(Some(m));
        i
    }

    fn m(&self, i: usize) -> &Member {
        self.members[i].as_ref().expect("member is running")
    }

    fn alive(&self) -> impl Iterator<Item = (usize, &Member)> {
        self.members.iter().enumerate().filter_map(|(i, m)| m.as_ref().map(|m| (i, m)))
    }

    /// Index of the member every live member agrees leads.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut leaders = self.alive().filter(|(_, m)| m.db.status().role == Role::Leader);
            if let (Some((i, lm)), None) = (leaders.next(), leaders.next()) {
                let lname = lm.name.clone();
                let agreed = self.alive().all(|(_, m)| m.db.status().leader.map(|l| l.name) == Some(lname.clone()));
                if agreed {
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader within 5 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn follower_of(&self, leader: usize) -> usize {
        self.alive().map(|(i, _)| i).find(|i| *i != leader).expect("a follower is alive")
    }

    async fn kill(&mut self, i: usize) -> (String, PathBuf, String) {
        self.members[i].take().expect("member is running").kill().await
    }

    async fn shutdown(mut self) {
        for m in self.members.iter_mut() {
            if let Some(m) = m.take() {
                m.kill().await;
            }
        }
    }
}

/// Polls `cond` every 20 ms until it holds, failing the test after `within`.
async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_applied(db: &ReplicatedDb, index: u64, within: Duration) -> ClusterStatus {
    let mut rx = db.watch_status();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let st = rx.borrow_and_update().clone();
        if st.last_applied >= Some(index) {
            return st;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("status channel closed while waiting for index {index}"),
            Err(_) => panic!("last_applied {:?} never reached {index}", st.last_applied),
        }
    }
}

/// The leader's applied index covering every write acknowledged so far.
///
/// A write is acknowledged as soon as it is applied, but the metrics behind `status()`
/// are published a moment later; a linearizable read waits for them to catch up.
async fn settled_applied(db: &ReplicatedDb) -> u64 {
    db.read(|_| Ok(())).await.expect("linearizable read on the leader");
    db.status().last_applied.expect("applied")
}

fn no_tweak(_: &mut Config) {}

// ---- tests ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_commit_and_follower_writes_are_forwarded() {
    let c = Cluster::start(3, &no_tweak).await;
    let leader = c.leader().await;
    let follower = c.follower_of(leader);

    let st = c.m(leader).db.status();
    assert_eq!(st.members.iter().filter(|m| m.voter).count(), 3, "{st:?}");
    assert_eq!(st.leader.as_ref().map(|l| l.api_addr.clone()), Some(format!("api-of-{}", c.m(leader).name)));

    let r = c.m(leader).db.write(put("a", "1")).await.expect("write on leader");
    assert_eq!(prev(&r), None);
    // Through a follower: forwarded to the leader, answered with the previous value.
    let r = c.m(follower).db.write(put("a", "2")).await.expect("write via follower");
    assert_eq!(prev(&r), Some("1".to_string()));

    let applied = settled_applied(&c.m(leader).db).await;
    for (_, m) in c.alive() {
        wait_applied(&m.db, applied, Duration::from_secs(3)).await;
        let v = m.db.read_local(get_sql("a".into())).await.expect("read_local");
        assert_eq!(v.as_deref(), Some("2"), "on {}", m.name);
    }
    // The leader reports how far each member got.
    let st = c.m(leader).db.status();
    assert!(st.members.iter().all(|m| m.matched.is_some()), "{st:?}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_linearizable_read_sees_acknowledged_write() {
    let c = Cluster::start(3, &no_tweak).await;
    let leader = c.leader().await;
    let follower = c.follower_of(leader);
    for i in 0..20 {
        let v = i.to_string();
        c.m(leader).db.write(put("x", &v)).await.expect("write");
        // No waiting: the read itself must catch up to the acknowledged write.
        let got = c.m(follower).db.read(get_sql("x".into())).await.expect("read");
        assert_eq!(got.as_deref(), Some(v.as_str()), "round {i}");
    }
    let got = c.m(leader).db.read(get_sql("x".into())).await.expect("read on leader");
    assert_eq!(got.as_deref(), Some("19"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_keeps_acknowledged_writes() {
    let mut c = Cluster::start(3, &no_tweak).await;
    let old = c.leader().await;
    let mut acked = Vec::new();
    for i in 0..10 {
        let k = format!("k{i}");
        c.m(old).db.write(put(&k, "v")).await.expect("write");
        acked.push(k);
    }
    c.kill(old).await;

    let survivor = c.alive().map(|(i, _)| i).next().expect("survivor");
    let started = Instant::now();
    // Retry until the new leader commits; each failed attempt is bounded by op_timeout.
    loop {
        match c.m(survivor).db.write(put("after", "failover")).await {
            Ok(_) => break,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(3), "no commit within 3 s after leader loss: {e}");
            }
        }
    }
    let failover = started.elapsed();
    eprintln!("failover: new leader committed {failover:?} after the leader was killed");
    assert!(failover < Duration::from_secs(3), "failover took {failover:?}");

    let new_leader = c.leader().await;
    assert_ne!(new_leader, old);
    // The member that lost the election must not campaign afterwards: a pre-vote won
    // while the other member was winning once led to a second election whose higher
    // term unseated the new leader, and reads answered "no leader" meanwhile.
    let term = c.m(new_leader).db.status().term;
    let settled = Instant::now();
    while settled.elapsed() < Duration::from_secs(1) {
        for (i, m) in c.alive() {
            let st = m.db.status();
            assert!(st.term <= term, "member {i} moved to term {} after the new leader's {term}", st.term);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (_, m) in c.alive() {
        for k in &acked {
            let v = m.db.read(get_sql(k.clone())).await.expect("read");
            assert_eq!(v.as_deref(), Some("v"), "{k} lost on {}", m.name);
        }
    }
    c.shutdown().await;
}

/// A member that nobody can reach (its cluster port closed; it can still call out) runs
/// out of leader lease and asks for pre-votes, which the others refuse while their
/// leader lives. So it never takes a term, and when it is reachable again the leader
/// stays. Without the pre-vote it would campaign every 0.3–0.45 s after the first
/// 0.75–0.9 s, and come back with a higher term that unseats the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_and_back_does_not_unseat_the_leader() {
    let mut c = Cluster::start(3, &no_tweak).await;
    let leader = c.leader().await;
    c.m(leader).db.write(put("a", "1")).await.expect("write");
    let term = c.m(leader).db.status().term;
    let cut = c.follower_of(leader);
    let addr = c.m(cut).addr.clone();
    {
        let m = c.members[cut].as_mut().expect("running");
        let _ = m.stop.take().expect("serving").send(());
        (&mut m.server).await.expect("server task");
    }

    // Long enough for the lease and several rounds; fails at the first new term.
    let window = Duration::from_secs(3);
    let started = Instant::now();
    while started.elapsed() < window {
        for (i, m) in c.alive() {
            let st = m.db.status();
            assert_eq!(st.term, term, "member {i} moved to a new term after {:?}", started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Meanwhile the other two commit as usual.
    c.m(leader).db.write(put("a", "2")).await.expect("write while one member is cut off");

    // Reachable again on the same port: it catches up under the same leader and term.
    let listener = TcpListener::bind(&addr).await.expect("rebind the cluster port");
    let (stop, stopped) = oneshot::channel::<()>();
    {
        let m = c.members[cut].as_mut().expect("running");
        m.server = tokio::spawn(serve_tls(listener, m.db.cluster_router(), stopped));
        m.stop = Some(stop);
    }
    let index = settled_applied(&c.m(leader).db).await;
    wait_applied(&c.m(cut).db, index, Duration::from_secs(5)).await;
    assert_eq!(c.leader().await, leader, "the leader was unseated");
    for (i, m) in c.alive() {
        assert_eq!(m.db.status().term, term, "member {i} changed term");
    }
    let v = c.m(cut).db.read_local(get_sql("a".into())).await.expect("read_local");
    assert_eq!(v.as_deref(), Some("2"));
    c.shutdown().await;
}

/// A bootstrapped member never re-joins, so before `refresh_record` its record kept the
/// version and feature level of its first start forever; a follower's the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_refreshes_its_version_and_level_in_the_membership() {
    let old = |c: &mut Config| {
        c.version = "1.0".into();
        c.feature_level = 1;
    };
    let new = |c: &mut Config| {
        c.version = "2.0".into();
        c.feature_level = 2;
    };
    let mut c = Cluster::start(3, &old).await;
    let record = |db: &ReplicatedDb, name: &str| {
        db.status()
            .members
            .iter()
            .find(|m| m.member.name == name)
            .map(|m| (m.member.version.clone(), m.member.feature_level))
    };
    for i in [0, 1] {
        let leader = c.leader().await;
        assert_eq!(record(&c.m(leader).db, &format!("m{i}")), Some(("1.0".to_string(), 1)));
        let (name, dir, addr) = c.kill(i).await;
        let m = start_member(&name, &dir, Some(&addr), &new).await;
        c.members[i] = Some(m);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.m(i).db.refresh_record().await.unwrap_or(false) {
            assert!(Instant::now() < deadline, "{name} never refreshed its record");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let leader = c.leader().await;
        wait_until(Duration::from_secs(5), "the new record everywhere", || {
            c.alive().all(|(_, m)| record(&m.db, &name) == Some(("2.0".to_string(), 2)))
        })
        .await;
        // Unchanged records are left alone, and the voter set is the same.
        assert!(c.m(i).db.refresh_record().await.expect("refresh"));
        assert_eq!(c.m(leader).db.status().members.iter().filter(|m| m.voter).count(), 3);
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_member_catches_up_from_its_dir() {
    let mut c = Cluster::start(3, &no_tweak).await;
    let leader = c.leader().await;
    let victim = c.follower_of(leader);
    c.m(leader).db.write(put("before", "1")).await.expect("write");
    let before_term = c.m(victim).db.status().term;
    let (name, dir, addr) = c.kill(victim).await;

    for i in 0..10 {
        c.m(leader).db.write(put(&format!("while-down-{i}"), "x")).await.expect("write with one member down");
    }
    let applied = settled_applied(&c.m(leader).db).await;

    // Same name, same dir, same address: a restarted process.
    let m = start_member(&name, &dir, Some(&addr), &no_tweak).await;
    let st = m.db.status();
    assert!(st.term >= before_term, "vote/term lost on restart: {st:?}");
    assert!(st.last_applied.is_some(), "state not resumed from disk: {st:?}");
    c.members[victim] = Some(m);
    wait_applied(&c.m(victim).db, applied, Duration::from_secs(5)).await;
    let n = c.m(victim).db.read_local(count_sql).await.expect("count");
    assert_eq!(n, 11);
    // And it takes part again: a write through it succeeds.
    c.m(victim).db.write(put("after", "1")).await.expect("write via restarted member");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_member_gets_snapshot_and_all_data() {
    let small_snapshots = |c: &mut Config| c.snapshot_every = 20;
    let mut c = Cluster::start(3, &small_snapshots).await;
    let leader = c.leader().await;
    for i in 0..120 {
        c.m(leader).db.write(put(&format!("s{i}"), &i.to_string())).await.expect("write");
    }
    let st = c.m(leader).db.status();
    let snap = st.snapshot_index.expect("leader built a snapshot");
    assert!(snap >= 60, "snapshots did not follow the writes: {st:?}");

    // The leader's log really shrank behind the snapshot (the writer deletes the
    // purged entries after the purge returns, so this polls).
    let first_index = || -> i64 {
        rusqlite::Connection::open_with_flags(
            c.m(leader).dir.join("raft-log.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|conn| conn.query_row("SELECT MIN(idx) FROM log", [], |r| r.get(0)))
        .expect("inspect leader log")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while first_index() <= 20 {
        assert!(std::time::Instant::now() < deadline, "leader log not purged: first index {}", first_index());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let fourth = c.add(&small_snapshots).await;
    // Track the first applied index the new member reports: a snapshot install jumps
    // straight past the leader's snapshot, log replication would start near 1.
    let mut rx = c.m(fourth).db.watch_status();
    let first_applied = tokio::spawn(async move {
        loop {
            if let Some(a) = rx.borrow_and_update().last_applied {
                return a;
            }
            if rx.changed().await.is_err() {
                return 0;
            }
        }
    });
    // Through a follower seed: the join is forwarded to the leader.
    let seeds = vec![c.m(c.follower_of(leader)).addr.clone()];
    c.m(fourth).db.join(&seeds).await.expect("join fourth");
    let applied = settled_applied(&c.m(leader).db).await;
    let st = wait_applied(&c.m(fourth).db, applied, Duration::from_secs(5)).await;
    assert!(st.snapshot_index >= Some(snap), "fourth member did not install a snapshot: {st:?}");
    let first = tokio::time::timeout(Duration::from_secs(1), first_applied)
        .await
        .expect("first applied reported")
        .expect("watch task");
    assert!(first >= snap, "fourth member applied {first} before the snapshot at {snap}");
    // The installed copy kept WAL mode and this member's identity.
    let mode: String = c
        .m(fourth)
        .db
        .read_local(|conn| conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)))
        .await
        .expect("journal mode");
    assert_eq!(mode.to_lowercase(), "wal");
    let n = c.m(fourth).db.read_local(count_sql).await.expect("count");
    assert_eq!(n, 120);
    let v = c.m(fourth).db.read(get_sql("s119".into())).await.expect("read");
    assert_eq!(v.as_deref(), Some("119"));
    let st = c.m(leader).db.status();
    assert_eq!(st.members.iter().filter(|m| m.voter).count(), 4, "{st:?}");

    // The installed database carries this member's name, so it reopens as itself.
    let (name, dir, addr) = c.kill(fourth).await;
    let m = start_member(&name, &dir, Some(&addr), &small_snapshots).await;
    let n = m.db.read_local(count_sql).await.expect("count after restart");
    assert_eq!(n, 120);
    c.members[fourth] = Some(m);
    c.shutdown().await;
}

/// Kills all but one member (the leader when `keep_leader`) and checks that the lone
/// member neither commits nor serves linearizable reads, and answers in bounded time.
async fn lone_member_cannot_commit(keep_leader: bool) {
    let quick = |c: &mut Config| c.op_timeout = Duration::from_millis(1500);
    let mut c = Cluster::start(3, &quick).await;
    let leader = c.leader().await;
    c.m(leader).db.write(put("a", "1")).await.expect("write with quorum");
    let leader_addr = c.m(leader).addr.clone();
    let keep = if keep_leader { leader } else { c.follower_of(leader) };
    let doomed: Vec<usize> = c.alive().map(|(i, _)| i).filter(|i| *i != keep).collect();
    for i in doomed {
        c.kill(i).await;
    }
    let bound = Duration::from_millis(1500 + 1000);

    let started = Instant::now();
    let err = c.m(keep).db.write(put("a", "2")).await.expect_err("minority write must fail");
    // A leader cut off from its quorum times out; a follower finds no leader to ask.
    if keep_leader {
        assert!(matches!(err, DbError::Timeout { .. }), "unexpected error: {err:?}");
    } else {
        // Network: the forward raced with the dead leader closing its pooled connection,
        // so delivery is unknown and the write is (rightly) not retried elsewhere.
        let ok = match &err {
            DbError::NoLeader { .. } => true,
            DbError::Network { addr, .. } => *addr == leader_addr,
            _ => false,
        };
        assert!(ok, "unexpected error: {err:?}");
    }
    assert!(started.elapsed() < bound, "write took {:?}", started.elapsed());

    let started = Instant::now();
    let err = c.m(keep).db.read(get_sql("a".into())).await.expect_err("minority read must fail");
    assert!(matches!(err, DbError::Timeout { .. } | DbError::NoLeader { .. }), "unexpected error: {err:?}");
    assert!(started.elapsed() < bound, "read took {:?}", started.elapsed());
    // The stale value is still there for local reads.
    let v = c.m(keep).db.read_local(get_sql("a".into())).await.expect("read_local");
    assert_eq!(v.as_deref(), Some("1"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_leader_cannot_commit() {
    lone_member_cannot_commit(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_follower_cannot_commit() {
    lone_member_cannot_commit(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_is_idempotent_and_remove_member_works() {
    let c = Cluster::start(3, &no_tweak).await;
    let leader = c.leader().await;
    let follower = c.follower_of(leader);
    // Membership only: `matched` moves with every heartbeat-driven commit.
    let membership = |st: ClusterStatus| st.members.into_iter().map(|m| (m.id, m.member, m.voter)).collect::<Vec<_>>();
    let before = membership(c.m(leader).db.status());
    let log_before = c.m(leader).db.status().last_log_index;

    // A voter joining again changes nothing.
    let seeds = vec![c.m(leader).addr.clone()];
    c.m(follower).db.join(&seeds).await.expect("repeated join");
    assert_eq!(membership(c.m(leader).db.status()), before);
    // Not even a no-op membership entry was written.
    assert_eq!(c.m(leader).db.status().last_log_index, log_before);

    // Remove the other follower, asked through a follower so it is forwarded.
    let other = c.alive().map(|(i, _)| i).find(|i| *i != leader && *i != follower).expect("third member");
    let gone = c.m(other).name.clone();
    c.m(follower).db.remove_member(&gone).await.expect("remove member");
    let st = c.m(leader).db.status();
    assert_eq!(st.members.len(), 2, "{st:?}");
    assert!(st.members.iter().all(|m| m.member.name != gone), "{st:?}");
    // Removing it again is harmless, and the smaller cluster still commits.
    c.m(leader).db.remove_member(&gone).await.expect("repeated remove");
    c.m(follower).db.write(put("z", "1")).await.expect("write after removal");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_restart_resumes_vote_log_and_state() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("solo");
    let m = start_member("solo", &dir, None, &no_tweak).await;
    m.db.bootstrap().await.expect("bootstrap");
    m.db.write(put("a", "1")).await.expect("write");
    let st = m.db.status();
    let (name, dir, addr) = m.kill().await;

    let m = start_member(&name, &dir, Some(&addr), &no_tweak).await;
    m.db.bootstrap().await.expect("bootstrap again is harmless");
    let again = m.db.status();
    assert!(again.term >= st.term);
    assert!(again.last_applied.is_some(), "{again:?}");
    let r = m.db.write(put("a", "2")).await.expect("write after restart");
    assert_eq!(prev(&r).as_deref(), Some("1"));
    m.db.shutdown().await;
    m.db.shutdown().await; // idempotent
    assert_eq!(m.db.status().role, Role::Shutdown);
    assert!(m.db.write(put("a", "3")).await.is_err());
    m.kill().await;
}

// ---- data directory safety -----------------------------------------------------------

async fn open_err(dir: &Path, name: &str) -> DbError {
    let config = test_config(name, dir, "127.0.0.1:1");
    match ReplicatedDb::open(config, Arc::new(Kv)).await {
        Ok(db) => {
            db.shutdown().await;
            panic!("opening {} as {name} should fail", dir.display())
        }
        Err(e) => e,
    }
}

fn assert_data_dir(e: &DbError, needle: &str) {
    match e {
        DbError::DataDir { reason, .. } => {
            assert!(reason.contains(needle), "reason {reason:?} lacks {needle:?}")
        }
        other => panic!("expected DataDir, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_files_are_refused_and_left_alone() {
    let root = tempfile::tempdir().expect("tempdir");

    // A text file named state.db.
    let d1 = root.path().join("text");
    std::fs::create_dir_all(&d1).expect("mkdir");
    std::fs::write(d1.join("state.db"), b"my notes").expect("write");
    assert_data_dir(&open_err(&d1, "m").await, "not a SQLite database");
    assert_eq!(std::fs::read(d1.join("state.db")).expect("read"), b"my notes");
    assert!(!d1.join("raft-log.db").exists(), "nothing may be created beside a foreign file");

    // An empty file is not an empty store either.
    let d2 = root.path().join("empty");
    std::fs::create_dir_all(&d2).expect("mkdir");
    std::fs::write(d2.join("raft-log.db"), b"").expect("write");
    assert_data_dir(&open_err(&d2, "m").await, "not a SQLite database");
    assert_eq!(std::fs::metadata(d2.join("raft-log.db")).expect("stat").len(), 0);

    // Somebody else's SQLite database.
    let d3 = root.path().join("sqlite");
    std::fs::create_dir_all(&d3).expect("mkdir");
    {
        let c = rusqlite::Connection::open(d3.join("raft-log.db")).expect("sqlite");
        c.execute_batch("CREATE TABLE accounts (id INTEGER); INSERT INTO accounts VALUES (7);")
            .expect("foreign schema");
    }
    let before = std::fs::read(d3.join("raft-log.db")).expect("read");
    assert_data_dir(&open_err(&d3, "m").await, "identity table");
    assert_eq!(std::fs::read(d3.join("raft-log.db")).expect("read"), before);
    assert!(!d3.join("raft-log.db-wal").exists(), "foreign db switched to WAL");

    // A data dir path that is a file.
    let f = root.path().join("file");
    std::fs::write(&f, b"x").expect("write");
    assert_data_dir(&open_err(&f, "m").await, "not a directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_name_is_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("m1");
    let m = start_member("m1", &dir, None, &no_tweak).await;
    m.db.bootstrap().await.expect("bootstrap");
    m.db.write(put("a", "1")).await.expect("write");
    m.kill().await;

    assert_data_dir(&open_err(&dir, "m2").await, "belongs to node \"m1\"");

    // The rightful owner still opens it, with its data.
    let m = start_member("m1", &dir, None, &no_tweak).await;
    let v = m.db.read_local(get_sql("a".into())).await.expect("read_local");
    assert_eq!(v.as_deref(), Some("1"));
    m.kill().await;
}

/// Compile-time check: the manager awaits these inside axum handlers and spawned
/// tasks, which need `Send` futures.
#[allow(dead_code)]
fn api_futures_are_send(db: ReplicatedDb) {
    fn send<T: Send>(_: T) {}
    send(db.write(Vec::new()));
    send(db.read(|_| Ok(())));
    send(db.read_local(|_| Ok(())));
    send(db.join(&[]));
    send(db.bootstrap());
    send(db.remove_member("x"));
    send(db.shutdown());
}

// ---- quorum-loss recovery and restore ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_on_a_lone_survivor_keeps_every_write() {
    let mut c = Cluster::start(3, &no_tweak).await;
    let leader = c.leader().await;
    for i in 0..20 {
        c.m(leader).db.write(put(&format!("k{i}"), "v")).await.expect("write while healthy");
    }
    let applied = settled_applied(&c.m(leader).db).await;
    // Keep a follower, lose the other two for good: the survivor cannot commit alone.
    let survivor = c.follower_of(leader);
    wait_applied(&c.m(survivor).db, applied, Duration::from_secs(5)).await;
    let others: Vec<usize> = c.alive().map(|(i, _)| i).filter(|i| *i != survivor).collect();
    for i in others {
        c.kill(i).await;
    }
    assert!(c.m(survivor).db.write(put("lost", "quorum")).await.is_err(), "a lone member of three must not commit");
    let (name, dir, addr) = c.kill(survivor).await;

    let forced = start_member(&name, &dir, Some(&addr), &|cfg: &mut Config| cfg.force_new_cluster = true).await;
    wait_until(Duration::from_secs(5), "the survivor leads alone", || forced.db.status().role == Role::Leader).await;
    let st = forced.db.status();
    assert_eq!(st.members.len(), 1, "one member left: {st:?}");
    assert_eq!(st.members[0].member.name, name);
    forced.db.write(put("after", "reset")).await.expect("writable after the reset");
    let n = forced.db.read(count_sql).await.expect("read");
    // 20 acknowledged writes + the new one; the refused write may or may not have been
    // appended before the loss (it was never acknowledged), like any unacknowledged write.
    assert!((21..=22).contains(&n), "every acknowledged write is kept: {n} keys");
    assert_eq!(forced.db.read(get_sql("after".into())).await.expect("read").as_deref(), Some("reset"));

    // Leaving the flag on is harmless while the member is still alone.
    let (name, dir, addr) = forced.kill().await;
    let again = start_member(&name, &dir, Some(&addr), &|cfg: &mut Config| cfg.force_new_cluster = true).await;
    wait_until(Duration::from_secs(5), "still leads", || again.db.status().role == Role::Leader).await;
    assert_eq!(again.db.read(count_sql).await.expect("read"), n);

    // A new member can join the reset cluster and gets all the data.
    let root = c.root.clone();
    let fresh = start_member("fresh", &root.join("fresh"), None, &no_tweak).await;
    fresh.db.join(std::slice::from_ref(&again.addr)).await.expect("join the reset cluster");
    let applied = settled_applied(&again.db).await;
    wait_applied(&fresh.db, applied, Duration::from_secs(10)).await;
    assert_eq!(fresh.db.read_local(count_sql).await.expect("read"), n);
    // Now that another member joined, forcing again would drop it: refused.
    let (name, dir, addr) = again.kill().await;
    let listener = TcpListener::bind(&addr).await.expect("rebind");
    drop(listener);
    let mut cfg = test_config(&name, &dir, &addr);
    cfg.force_new_cluster = true;
    let refused = ReplicatedDb::open(cfg, Arc::new(Kv)).await.err().expect("forcing twice is refused");
    assert_data_dir(&refused, "fresh");
    fresh.kill().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_new_cluster_refuses_a_directory_that_is_not_a_manager_store() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config("m9", &root.path().join("empty"), "127.0.0.1:1");
    cfg.force_new_cluster = true;
    let e = holdfast_raft::force_new_cluster(&cfg).expect_err("nothing to force");
    assert_data_dir(&e, "no manager store");
    assert!(!root.path().join("empty").exists(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_restores_into_a_new_one_member_cluster() {
    let c = Cluster::start(3, &no_tweak).await;
    let leader = c.leader().await;
    for i in 0..50 {
        c.m(leader).db.write(put(&format!("k{i}"), &format!("v{i}"))).await.expect("write");
    }
    // Taken on a follower: the read barrier makes it hold every acknowledged write.
    let follower = c.follower_of(leader);
    let copy = c.root.join("backup.db");
    let applied = c.m(follower).db.backup_to(&copy).await.expect("backup");
    assert!(applied >= 50, "applied {applied}");

    let target = c.root.join("restored");
    std::fs::create_dir_all(&target).expect("mkdir");
    std::fs::write(target.join("stray"), b"x").expect("stray file");
    let e = holdfast_raft::restore_snapshot(&copy, &target, "r1").expect_err("non-empty dir refused");
    assert_data_dir(&e, "not empty");
    std::fs::remove_file(target.join("stray")).expect("rm");
    let not_db = c.root.join("garbage.db");
    std::fs::write(&not_db, b"definitely not sqlite").expect("write");
    let e = holdfast_raft::restore_snapshot(&not_db, &target, "r1").expect_err("garbage refused");
    assert!(matches!(e, DbError::DataDir { .. }), "{e}");
    assert_eq!(std::fs::read_dir(&target).expect("ls").count(), 0, "a refused restore writes nothing");

    let restored = holdfast_raft::restore_snapshot(&copy, &target, "r1").expect("restore");
    assert_eq!(restored.last_applied, applied);
    assert_eq!(restored.old_members.len(), 3);
    let r = start_member("r1", &target, None, &no_tweak).await;
    wait_until(Duration::from_secs(5), "restored member leads", || r.db.status().role == Role::Leader).await;
    assert_eq!(r.db.read(count_sql).await.expect("read"), 50);
    assert_eq!(r.db.read(get_sql("k7".into())).await.expect("read").as_deref(), Some("v7"));
    let prev_v = r.db.write(put("k7", "new")).await.expect("write after restore");
    assert_eq!(prev(&prev_v).as_deref(), Some("v7"));
    // A member joining the restored cluster receives the restored state by snapshot.
    let j = start_member("r2", &c.root.join("r2"), None, &no_tweak).await;
    j.db.join(std::slice::from_ref(&r.addr)).await.expect("join restored cluster");
    let applied = settled_applied(&r.db).await;
    wait_applied(&j.db, applied, Duration::from_secs(10)).await;
    assert_eq!(j.db.read_local(count_sql).await.expect("read"), 50);
    j.kill().await;
    r.kill().await;
    c.shutdown().await;
}
