//! `apply` never fails on content: every `Command` variant fed hostile content gives a
//! rejection (or a per-item refusal inside an accepted batch), never an `Err`, and a
//! good command still applies afterwards. Real SQLite file, the real schema.

use std::collections::BTreeMap;

use holdfast_raft::Apply;
use rusqlite::Connection;
use serde_json::json;

use super::*;

/// An outcome read back loosely, so the table can look into any answer by key.
type Loose = Result<serde_json::Value, Rejection>;
use crate::model::sync::StatusReport;

fn variant(c: &Command) -> &'static str {
    // Exhaustive on purpose: a new variant fails to compile here until it is covered.
    match c {
        Command::SubmitTask { .. } => "SubmitTask",
        Command::StopTask { .. } => "StopTask",
        Command::RegisterNode { .. } => "RegisterNode",
        Command::ApplyPlan { .. } => "ApplyPlan",
        Command::ReportStatus { .. } => "ReportStatus",
        Command::SetNodeStatus { .. } => "SetNodeStatus",
        Command::DrainNode { .. } => "DrainNode",
        Command::Audited { .. } => "Audited",
        Command::StopPlacements { .. } => "StopPlacements",
        Command::SetEligibility { .. } => "SetEligibility",
        Command::CreateToken { .. } => "CreateToken",
        Command::RevokeToken { .. } => "RevokeToken",
        Command::Trust(_) => "Trust",
        Command::Image(_) => "Image",
        Command::Upgrade(_) => "Upgrade",
        Command::Retention(_) => "Retention",
    }
}
const VARIANTS: usize = 16;

struct Db {
    conn: Connection,
    state: Arc<DomainState>,
    index: u64,
    _dir: tempfile::TempDir,
}

impl Db {
    fn new() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("state.db")).unwrap();
        let (state, _) = DomainState::new();
        state.init_schema(&conn).unwrap();
        Db { conn, state, index: 0, _dir: dir }
    }

    /// Applies raw bytes in one transaction, as the Raft state machine does; panics on
    /// `Err` (which would be a fatal storage error).
    fn apply_bytes(&mut self, bytes: &[u8]) -> Loose {
        self.index += 1;
        let tx = self.conn.transaction().unwrap();
        let out = self.state.apply(&tx, self.index, bytes).unwrap_or_else(|e| panic!("apply failed: {e}"));
        tx.commit().unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    fn apply(&mut self, cmd: &Command) -> Loose {
        self.apply_bytes(&serde_json::to_vec(cmd).unwrap())
    }

    fn last_seq(&self, node: &str) -> i64 {
        self.conn.query_row("SELECT last_seq FROM nodes WHERE name = ?1", [node], |r| r.get(0)).unwrap()
    }
}

fn spec(v: serde_json::Value) -> Box<TaskSpec> {
    Box::new(serde_json::from_value(v).unwrap())
}

fn submit(id: &str) -> Command {
    Command::SubmitTask { id: id.into(), spec: spec(json!({"image": "a"})), idempotency_key: None, now_ms: 1 }
}

fn node(name: &str) -> Command {
    Command::RegisterNode {
        name: name.into(),
        address: "10.0.0.1".into(),
        labels: BTreeMap::new(),
        cpu_millis: 4_000,
        memory_mb: 4_096,
        disk_mb: 10_000,
        now_ms: 1,
    }
}

fn report(seq: u64, placement: &str, fence: u64) -> StatusReport {
    StatusReport {
        seq,
        placement_id: placement.into(),
        task_id: "t1".into(),
        fence,
        status: crate::model::PlacementStatus::new(crate::model::Observed::Running),
        at_ms: 1,
        refused: false,
        story: None,
    }
}

fn reports(node: &str, r: Vec<StatusReport>) -> Command {
    Command::ReportStatus { batches: vec![NodeReports { node: node.into(), reports: r }], now_ms: 2 }
}

fn image(reference: &str, layer: &str, size: u64) -> Command {
    Command::Image(images::ImageCommand::Put {
        entry: crate::model::sync::CatalogueEntry {
            reference: reference.into(),
            config_digest: format!("sha256:{}", "c".repeat(64)),
            config_size: 1,
            layers: vec![crate::model::sync::LayerRef { digest: layer.into(), size }],
        },
        now_ms: 3,
    })
}

fn token(id: &str, role: &str, hash: &str) -> Command {
    Command::CreateToken {
        id: id.into(),
        name: "n".into(),
        role: role.into(),
        secret_sha256: hash.into(),
        expires_ms: None,
        created_by: "test".into(),
        now_ms: 1,
    }
}

/// What a hostile command must produce.
enum Expect {
    /// A rejection with this code.
    Rejected(&'static str),
    /// An accepted batch that refused or ignored the bad item (plans, reports).
    ItemRefused(&'static str),
}

#[test]
fn every_command_with_hostile_content_is_a_rejection_never_an_error() {
    let mut db = Db::new();
    // Seed: a node, a task placed on it (placement t1.<index>.0), an admin token.
    assert!(db.apply(&node("n1")).is_ok());
    assert!(db.apply(&submit("t1")).is_ok());
    let placed = db
        .apply(&Command::ApplyPlan {
            placements: vec![PlannedPlacement { task_id: "t1".into(), node: "n1".into(), replaces: None }],
            unplaced: Vec::new(),
            now_ms: 2,
        })
        .unwrap();
    let pid = placed["placed"][0].as_str().unwrap().to_string();
    let fence: u64 = pid.split('.').nth(1).unwrap().parse().unwrap();
    let hash = "a".repeat(64);
    assert!(db.apply(&token("k1", "admin", &hash)).is_ok());
    // An image that task t1 (image "a") uses.
    assert!(db.apply(&image("a:latest", &format!("sha256:{}", "d".repeat(64)), 10)).is_ok());

    let bad_spec = |v| Command::SubmitTask { id: "t9".into(), spec: spec(v), idempotency_key: None, now_ms: 1 };
    let huge = "x".repeat(10_000);
    use Expect::*;
    let mut table: Vec<(&str, Command, Expect)> = vec![
        ("duplicate task id", submit("t1"), Rejected("conflict")),
        ("task id with a slash", submit("../t"), Rejected("invalid")),
        ("empty task id", submit(""), Rejected("invalid")),
        ("spec failing validation: empty image", bad_spec(json!({"image": ""})), Rejected("invalid")),
        (
            "spec failing validation: absurd memory",
            bad_spec(json!({"image": "a", "resources": {"memory_mb": u64::MAX}})),
            Rejected("invalid"),
        ),
        (
            "empty idempotency key",
            Command::SubmitTask {
                id: "t8".into(),
                spec: spec(json!({"image": "a"})),
                idempotency_key: Some(String::new()),
                now_ms: 1,
            },
            Rejected("invalid"),
        ),
        ("time beyond i64", Command::StopTask { id: "t1".into(), now_ms: u64::MAX }, Rejected("invalid")),
        ("stop of an unknown task", Command::StopTask { id: "nope".into(), now_ms: 1 }, Rejected("not_found")),
        ("node name with a space", node("bad name"), Rejected("invalid")),
        ("node name too long", node(&"n".repeat(65)), Rejected("invalid")),
        ("node capacity beyond i64", node_with("n2", "10.0.0.2", u64::MAX), Rejected("invalid")),
        ("node address of 10 kB", node_with("n2", &huge, 1_000), Rejected("invalid")),
        (
            "plan on an unknown node",
            Command::ApplyPlan {
                placements: vec![PlannedPlacement { task_id: "t1".into(), node: "ghost".into(), replaces: None }],
                unplaced: Vec::new(),
                now_ms: 3,
            },
            ItemRefused("refused"),
        ),
        (
            "plan replacing a stale placement",
            Command::ApplyPlan {
                placements: vec![PlannedPlacement {
                    task_id: "t1".into(),
                    node: "n1".into(),
                    replaces: Some("t1.1.0".into()),
                }],
                unplaced: Vec::new(),
                now_ms: 3,
            },
            ItemRefused("refused"),
        ),
        (
            "plan with an invalid node name",
            Command::ApplyPlan {
                placements: vec![PlannedPlacement { task_id: "t1".into(), node: "a b".into(), replaces: None }],
                unplaced: Vec::new(),
                now_ms: 3,
            },
            Rejected("invalid"),
        ),
        ("report from an unknown node", reports("ghost", vec![report(1, &pid, fence)]), ItemRefused("ignored")),
        ("report with a stale fence", reports("n1", vec![report(1, &pid, fence - 1)]), ItemRefused("ignored")),
        (
            "report seq far beyond the last",
            reports("n1", vec![report(u64::MAX / 2, &pid, fence)]),
            ItemRefused("ignored"),
        ),
        (
            "report naming an invalid placement",
            reports("n1", vec![report(2, "no such/thing", fence)]),
            ItemRefused("ignored"),
        ),
        (
            "unknown node status",
            Command::SetNodeStatus { name: "n1".into(), status: "sleepy".into(), now_ms: 3 },
            Rejected("invalid"),
        ),
        (
            "status of an unknown node",
            Command::SetNodeStatus { name: "ghost".into(), status: "down".into(), now_ms: 3 },
            Rejected("not_found"),
        ),
        (
            "drain of an unknown node",
            Command::DrainNode { name: "ghost".into(), enable: true, deadline_ms: None, now_ms: 3 },
            Rejected("not_found"),
        ),
        (
            "drain deadline beyond i64",
            Command::DrainNode { name: "n1".into(), enable: true, deadline_ms: Some(u64::MAX), now_ms: 3 },
            Rejected("invalid"),
        ),
        (
            "nested audit",
            Command::Audited {
                who: "x".into(),
                on_behalf_of: None,
                action: "a".into(),
                subject: "s".into(),
                at_ms: 1,
                inner: Some(Box::new(Command::Audited {
                    who: "y".into(),
                    on_behalf_of: None,
                    action: "a".into(),
                    subject: "s".into(),
                    at_ms: 1,
                    inner: None,
                })),
            },
            Rejected("bad_command"),
        ),
        (
            "audit with 10 kB of on_behalf_of",
            Command::Audited {
                who: "x".into(),
                on_behalf_of: Some(huge.clone()),
                action: "a".into(),
                subject: "s".into(),
                at_ms: 1,
                inner: None,
            },
            Rejected("invalid"),
        ),
        (
            "stop of an invalid placement id",
            Command::StopPlacements { ids: vec!["a b".into()], reason: "r".into(), now_ms: 3 },
            Rejected("invalid"),
        ),
        (
            "eligibility of an unknown node",
            Command::SetEligibility { name: "ghost".into(), eligible: false, now_ms: 3 },
            Rejected("not_found"),
        ),
        ("duplicate token id", token("k1", "admin", &hash), Rejected("conflict")),
        ("unknown role", token("k2", "root", &hash), Rejected("invalid")),
        ("digest that is not hex", token("k3", "reader", "zz"), Rejected("invalid")),
        ("revoke of an unknown token", Command::RevokeToken { id: "nope".into(), now_ms: 3 }, Rejected("not_found")),
        ("revoke of the last admin token", Command::RevokeToken { id: "k1".into(), now_ms: 3 }, Rejected("conflict")),
        (
            "CA that is not PEM",
            Command::Trust(trust::TrustCommand::SetCa { cert_pem: huge.clone(), key_pem: "k".into() }),
            Rejected("bad_ca"),
        ),
        (
            "join token with a non-hex hash",
            Command::Trust(trust::TrustCommand::AddJoinToken {
                hash: "zz".into(),
                role: "worker".into(),
                expires_at_ms: None,
                uses: None,
                replace: false,
                now_ms: 3,
            }),
            Rejected("bad_token"),
        ),
        (
            "join by an invalid node name",
            Command::Trust(trust::TrustCommand::UseJoinToken {
                hash: hash.clone(),
                role: "worker".into(),
                node: "../x".into(),
                now_ms: 3,
            }),
            Rejected("invalid"),
        ),
        (
            "CA rotation with a certificate that is not PEM",
            Command::Trust(trust::TrustCommand::RotateCa {
                cert_pem: huge.clone(),
                key_pem: "k".into(),
                cross_pem: "c".into(),
                now_ms: 3,
            }),
            Rejected("bad_ca"),
        ),
        (
            "finishing a CA rotation that never started",
            Command::Trust(trust::TrustCommand::FinishCaRotation { now_ms: 3 }),
            Rejected("not_found"),
        ),
        (
            "CA holder with a digest that is not hex",
            Command::Trust(trust::TrustCommand::CaHeld { node: "n1".into(), ca_digest: "zz".into(), now_ms: 3 }),
            Rejected("bad_ca"),
        ),
        (
            "CA holder with an invalid node name",
            Command::Trust(trust::TrustCommand::CaHeld { node: "../x".into(), ca_digest: "ab".repeat(32), now_ms: 3 }),
            Rejected("invalid"),
        ),
        (
            "revocation with 10 kB of reason",
            Command::Trust(trust::TrustCommand::RevokeNode { node: "n1".into(), reason: huge.clone(), now_ms: 3 }),
            Rejected("invalid"),
        ),
        ("image with a bad digest", image("app:1", "sha256:zz", 1), Rejected("invalid")),
        (
            "image with a size beyond i64",
            image("app:1", &format!("sha256:{}", "b".repeat(64)), u64::MAX),
            Rejected("invalid"),
        ),
        ("image reference with a space", image("app 1", &format!("sha256:{}", "b".repeat(64)), 1), Rejected("invalid")),
        (
            "image with no layers",
            Command::Image(images::ImageCommand::Put {
                entry: crate::model::sync::CatalogueEntry {
                    reference: "app:1".into(),
                    config_digest: format!("sha256:{}", "c".repeat(64)),
                    config_size: 1,
                    layers: Vec::new(),
                },
                now_ms: 3,
            }),
            Rejected("invalid"),
        ),
        (
            "removal of an unknown image",
            Command::Image(images::ImageCommand::Remove {
                reference: "ghost:1".into(),
                force: false,
                unused_since_ms: None,
                now_ms: 3,
            }),
            Rejected("not_found"),
        ),
        (
            "removal of an image a task uses",
            Command::Image(images::ImageCommand::Remove {
                reference: "a:latest".into(),
                force: false,
                unused_since_ms: None,
                now_ms: 3,
            }),
            Rejected("conflict"),
        ),
    ];

    let policy = retention::Policy {
        retain_ms: 1,
        node_gc_ms: 1,
        history_cap: 10,
        audit_retain_ms: u64::MAX / 4,
        audit_max_rows: 1_000_000,
    };
    let collect = |tasks: Vec<String>, policy: retention::Policy, now_ms: u64| {
        Command::Retention(retention::RetentionCommand::Collect(retention::CollectRound {
            tasks,
            nodes: Vec::new(),
            placement_histories: Vec::new(),
            node_histories: Vec::new(),
            placement_lists: Vec::new(),
            policy,
            now_ms,
        }))
    };
    let gated = |level: u32, body: serde_json::Value| Command::Upgrade(upgrade::UpgradeCommand::Gated { level, body });
    let set_level =
        |level: u32| Command::Upgrade(upgrade::UpgradeCommand::SetLevel { level, voters: vec![], now_ms: 3 });
    table.extend([
        ("feature level 0", set_level(0), Rejected("invalid")),
        ("feature level beyond any", set_level(u32::MAX), Rejected("invalid")),
        ("feature level not above the current", set_level(1), Rejected("conflict")),
        ("gated command at level 1", gated(1, json!({"Probe": {"note": "x"}})), Rejected("invalid")),
        (
            "gated command above the cluster's level",
            gated(upgrade::PROBE_LEVEL, json!({"Probe": {"note": "x"}})),
            Rejected("feature_level"),
        ),
        ("collect with an invalid task id", collect(vec!["a b".into()], policy.clone(), 3), Rejected("invalid")),
        (
            "collect of too many tasks",
            collect(vec!["t".into(); retention::BATCH + 1], policy.clone(), 3),
            Rejected("invalid"),
        ),
        ("collect with a clock beyond i64", collect(vec![], policy.clone(), u64::MAX), Rejected("invalid")),
        (
            "collect with history cap 0",
            collect(vec![], retention::Policy { history_cap: 0, ..policy.clone() }, 3),
            Rejected("invalid"),
        ),
        (
            "removal of an unknown node",
            Command::Retention(retention::RetentionCommand::RemoveNode {
                name: "ghost".into(),
                force: false,
                now_ms: 3,
            }),
            Rejected("not_found"),
        ),
        (
            "removal of a node with a live placement",
            Command::Retention(retention::RetentionCommand::RemoveNode { name: "n1".into(), force: false, now_ms: 3 }),
            Rejected("conflict"),
        ),
    ]);
    // The cluster is at level 1 (as a new cluster's leader makes it).
    assert!(db.apply(&set_level(upgrade::FEATURE_LEVEL)).is_ok());

    let covered: std::collections::BTreeSet<&str> = table.iter().map(|(_, c, _)| variant(c)).collect();
    assert_eq!(covered.len(), VARIANTS, "every Command variant has a hostile case; covered {covered:?}");

    let applied_before: i64 = db.conn.query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get(0)).unwrap();
    for (what, cmd, expect) in table {
        let out = db.apply(&cmd);
        match (expect, &out) {
            (Rejected(code), Err(r)) => assert_eq!(r.code.as_str(), code, "{what}: {r}"),
            (ItemRefused(key), Ok(v)) => {
                assert!(v[key].as_array().is_some_and(|a| !a.is_empty()), "{what}: nothing {key} in {v}")
            }
            (_, other) => panic!("{what}: unexpected outcome {other:?}"),
        }
    }
    // The far-beyond seq was not stored; nothing hostile added a task.
    // (The stale-fence report, seq 1, is consumed as history; the refused ones after it
    // are not stored.)
    assert_eq!(db.last_seq("n1"), 1, "a refused report must not move last_seq");
    let after: i64 = db.conn.query_row("SELECT COUNT(*) FROM tasks", [], |r| r.get(0)).unwrap();
    assert_eq!(after, applied_before);

    // Bytes that are no command at all, or name an unknown variant or enum text.
    for bytes in [
        &b"not json"[..],
        br#"{"Frobnicate":{}}"#,
        br#"{"ReportStatus":{"batches":[{"node":"n1","reports":[{"seq":1,"placement_id":"p","task_id":"t1","fence":1,"observed":"dancing","exit_code":null,"reason":null,"restarts":0,"endpoints":[],"container_id":null,"at_ms":1}]}],"now_ms":1}}"#,
        br#"{"SubmitTask":{"id":"t5","spec":{"image":"a","kind":"forever"},"idempotency_key":null,"now_ms":1}}"#,
        br#"{"RegisterNode":{"name":"n3","address":"a","labels":{},"cpu_millis":-1,"memory_mb":1,"disk_mb":1,"now_ms":1}}"#,
    ] {
        let out = db.apply_bytes(bytes);
        assert!(matches!(&out, Err(r) if r.code == RejectCode::BadCommand), "{}: {out:?}", String::from_utf8_lossy(bytes));
    }

    // A good command still applies, and the good report after the refused one too.
    let out = db.apply(&submit("t2")).expect("a good command applies");
    assert_eq!(out["created"], true);
    let out = db.apply(&reports("n1", vec![report(2, &pid, fence)])).unwrap();
    assert_eq!(out["acked"]["n1"], 2, "{out}");
    assert!(out["ignored"].as_array().is_some_and(|a| a.is_empty()), "{out}");
}

fn node_with(name: &str, address: &str, cpu_millis: u64) -> Command {
    Command::RegisterNode {
        name: name.into(),
        address: address.into(),
        labels: BTreeMap::new(),
        cpu_millis,
        memory_mb: 1_024,
        disk_mb: 1_024,
        now_ms: 1,
    }
}

/// A store from before tokens and `on_behalf_of` gets them on open, so the first
/// audited write after an upgrade applies instead of stopping Raft.
#[test]
fn an_older_store_is_brought_up_to_date_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let conn = Connection::open(dir.path().join("state.db")).unwrap();
    conn.execute_batch(
        "CREATE TABLE audit (id INTEGER PRIMARY KEY, log_index INTEGER NOT NULL, at_ms INTEGER NOT NULL,
           who TEXT NOT NULL, action TEXT NOT NULL, subject TEXT NOT NULL, result TEXT NOT NULL);",
    )
    .unwrap();
    let (state, _) = DomainState::new();
    state.init_schema(&conn).unwrap();
    state.init_schema(&conn).unwrap(); // idempotent: it runs on every open
    let mut db = Db { conn, state, index: 0, _dir: dir };
    let cmd = Command::Audited {
        who: "admin (k1)".into(),
        on_behalf_of: Some("alice".into()),
        action: "POST /v1/tokens".into(),
        subject: "k2".into(),
        at_ms: 1,
        inner: Some(Box::new(token("k2", "reader", &"b".repeat(64)))),
    };
    assert!(db.apply(&cmd).is_ok());
    let who: String = db.conn.query_row("SELECT on_behalf_of FROM audit", [], |r| r.get(0)).unwrap();
    assert_eq!(who, "alice");
}
