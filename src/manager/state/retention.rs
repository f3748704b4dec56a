//! Bounded state (README "Retention"): finished tasks and their placements leave after
//! the retention window, histories keep their newest entries, the audit is kept by age
//! and size, long-down nodes are removed, and an admin can remove a node.
//!
//! The leader decides what to collect (`leader::housekeeping`) and writes it as one
//! bounded [`RetentionCommand::Collect`]; `apply` re-checks every item against the
//! state and the command's own clock, never the replica's, so every member deletes
//! exactly the same rows.

use super::cached::Cached;
use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::{reject, valid_id, Answer, NodeStatus, Outcome, RejectCode, Rejection};

/// Feature level that brought these commands (`state::upgrade`).
pub const LEVEL: u32 = 1;

/// Most items of each kind one collect command carries.
pub const BATCH: usize = 500;

/// Newest history entries kept per placement and per node.
pub const HISTORY_CAP: u32 = 100;

/// Newest placements kept per task; older ones that have ended (a task rescheduled
/// again and again) leave with their history.
pub const PLACEMENTS_CAP: i64 = 20;

/// The retention settings a collect round used (travel with the command, so `apply`
/// re-checks with the leader's numbers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Finished tasks older than this (since their last change) are removed.
    pub retain_ms: u64,
    /// Nodes `down` for longer than this are removed (0: never).
    pub node_gc_ms: u64,
    /// Newest history entries kept per placement and per node.
    pub history_cap: u32,
    /// Audit rows older than this are removed.
    pub audit_retain_ms: u64,
    /// At most this many audit rows are kept (newest).
    pub audit_max_rows: u64,
}

/// Retention commands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RetentionCommand {
    /// One bounded garbage-collection round (in the log exactly as the struct variant
    /// it was: a newtype variant of a struct serializes the same).
    Collect(CollectRound),
    /// Remove a decommissioned node (`DELETE /v1/nodes/{id}`); its certificates are
    /// revoked in the same command.
    RemoveNode {
        /// Node name.
        name: String,
        /// Remove even while it holds live placements (they are then replaced like
        /// those of a lost node).
        force: bool,
        /// Leader wall clock.
        now_ms: u64,
    },
}

/// What one collect round removes, as the leader found it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CollectRound {
    /// Finished tasks the leader found past the window.
    pub tasks: Vec<String>,
    /// Nodes the leader found down past `node_gc_ms`.
    pub nodes: Vec<String>,
    /// Placements whose history is over the cap.
    pub placement_histories: Vec<String>,
    /// Nodes whose history is over the cap.
    pub node_histories: Vec<String>,
    /// Tasks with more than [`PLACEMENTS_CAP`] placements.
    #[serde(default)]
    pub placement_lists: Vec<String>,
    /// The settings.
    pub policy: Policy,
    /// Leader wall clock; the only clock `apply` uses.
    pub now_ms: u64,
}

/// Table of dropped-history counts, shown next to the kept entries.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS history_dropped (
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    dropped INTEGER NOT NULL,
    PRIMARY KEY (kind, subject)
);
"#;

/// SQL: a task that is finished, i.e. stopped (no placement still alive) or
/// completed/failed (its current placement exited or failed).
const FINISHED: &str = "(
  (t.desired = 'stop' AND NOT EXISTS (SELECT 1 FROM placements p WHERE p.task_id = t.id
      AND p.observed NOT IN ('stopped','exited','failed')))
  OR (t.desired = 'run' AND (SELECT p.observed FROM placements p WHERE p.task_id = t.id
      ORDER BY p.fence DESC, p.id DESC LIMIT 1) IN ('exited','failed'))
)";

/// SQL: when the task last changed, itself or any of its placements.
const LAST_CHANGE: &str =
    "MAX(t.updated_ms, COALESCE((SELECT MAX(p.updated_ms) FROM placements p WHERE p.task_id = t.id), 0))";

/// Checks that need no database.
pub fn check(cmd: &RetentionCommand) -> Option<Rejection> {
    let invalid = |m: String| Some(Rejection::new(RejectCode::Invalid, m));
    let max = i64::MAX as u64;
    match cmd {
        RetentionCommand::Collect(CollectRound {
            tasks,
            nodes,
            placement_histories,
            node_histories,
            placement_lists,
            policy,
            now_ms,
        }) => {
            for (what, list) in [
                ("tasks", tasks),
                ("nodes", nodes),
                ("placements", placement_histories),
                ("nodes", node_histories),
                ("tasks", placement_lists),
            ] {
                if list.len() > BATCH {
                    return invalid(format!("more than {BATCH} {what} in one collect"));
                }
                if let Some(bad) = list.iter().find(|s| !valid_id(s)) {
                    return invalid(format!("{bad:?} is not a valid id"));
                }
            }
            if *now_ms > max
                || policy.retain_ms > max
                || policy.node_gc_ms > max
                || policy.audit_retain_ms > max
                || policy.audit_max_rows > max
            {
                return invalid("a time or count is out of range".into());
            }
            if policy.history_cap == 0 {
                return invalid("history_cap must be at least 1".into());
            }
            None
        }
        RetentionCommand::RemoveNode { name, now_ms, .. } => {
            if !valid_id(name) {
                return invalid(format!("node name {name:?} is not a valid id"));
            }
            (*now_ms > max).then(|| invalid(format!("now_ms {now_ms} is out of range"))).flatten()
        }
    }
}

/// Applies a retention command (one-line arm in `state::apply_command`).
pub fn apply(tx: &Transaction<'_>, cmd: RetentionCommand) -> rusqlite::Result<Outcome> {
    if let Some(r) = super::upgrade::require(tx, LEVEL)? {
        return Ok(Err(r));
    }
    match cmd {
        RetentionCommand::Collect(round) => {
            let trimmed = trim_placements(tx, &round.placement_lists)?;
            let mut out = collect(tx, &round)?;
            if let Ok(Answer::Collected { removed_placements, .. }) = &mut out {
                *removed_placements = trimmed;
            }
            Ok(out)
        }
        RetentionCommand::RemoveNode { name, force, now_ms } => remove_node(tx, &name, force, now_ms),
    }
}

/// One collect round: finished tasks, down nodes, history over the cap, then the audit.
fn collect(tx: &Transaction<'_>, round: &CollectRound) -> rusqlite::Result<Outcome> {
    let (policy, now_ms) = (&round.policy, round.now_ms);
    let (removed_tasks, kept) =
        remove_finished_tasks(tx, &round.tasks, now_ms.saturating_sub(policy.retain_ms) as i64)?;
    let removed_nodes = if policy.node_gc_ms > 0 {
        remove_down_nodes(tx, &round.nodes, now_ms.saturating_sub(policy.node_gc_ms) as i64)?
    } else {
        Vec::new()
    };
    let trimmed = trim_histories(tx, &round.placement_histories, &round.node_histories, policy.history_cap as i64)?;
    let audit = trim_audit(tx, policy, now_ms)?;
    Ok(Ok(Answer::Collected {
        removed_tasks,
        kept_tasks: kept,
        removed_nodes,
        trimmed_history: trimmed,
        removed_audit: audit,
        removed_placements: 0,
    }))
}

/// Removes each of `tasks` that is finished and unchanged since `cutoff`, with its
/// placements and their history; `(removed, kept)`.
fn remove_finished_tasks(tx: &Transaction<'_>, tasks: &[String], cutoff: i64) -> rusqlite::Result<(u64, u64)> {
    let mut removed_tasks = 0u64;
    let mut kept = 0u64;
    let finished_before = format!("SELECT 1 FROM tasks t WHERE t.id = ?1 AND {FINISHED} AND {LAST_CHANGE} <= ?2");
    for id in tasks {
        // Re-checked here with the command's clock: a task that changed since the
        // leader looked (restarted, stopped later) stays.
        let due = tx.query_row_cached(&finished_before, params![id, cutoff], |_| Ok(())).optional()?.is_some();
        if !due {
            kept += 1;
            continue;
        }
        tx.execute_cached(
            "DELETE FROM placement_events WHERE placement_id IN (SELECT id FROM placements WHERE task_id = ?1)",
            [id],
        )?;
        tx.execute_cached(
            "DELETE FROM history_dropped WHERE kind = 'placement'
               AND subject IN (SELECT id FROM placements WHERE task_id = ?1)",
            [id],
        )?;
        tx.execute_cached("DELETE FROM placements WHERE task_id = ?1", [id])?;
        tx.execute_cached("DELETE FROM tasks WHERE id = ?1", [id])?;
        removed_tasks += 1;
    }
    Ok((removed_tasks, kept))
}

/// Removes each of `nodes` that has been down since `cutoff` or earlier; the removed.
fn remove_down_nodes(tx: &Transaction<'_>, nodes: &[String], cutoff: i64) -> rusqlite::Result<Vec<String>> {
    let mut removed_nodes = Vec::new();
    for name in nodes {
        let due = tx
            .query_row_cached(
                "SELECT 1 FROM nodes WHERE name = ?1 AND status = ?2 AND status_since_ms <= ?3",
                params![name, NodeStatus::Down.as_str(), cutoff],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if due {
            delete_node(tx, name)?;
            removed_nodes.push(name.clone());
        }
    }
    Ok(removed_nodes)
}

/// Keeps the newest `cap` history entries of each placement and node named, counting
/// the dropped ones in `history_dropped`; how many were dropped.
fn trim_histories(
    tx: &Transaction<'_>,
    placement_histories: &[String],
    node_histories: &[String],
    cap: i64,
) -> rusqlite::Result<u64> {
    let mut trimmed = 0u64;
    for (kind, table, col, list) in [
        ("placement", "placement_events", "placement_id", placement_histories),
        ("node", "node_events", "node", node_histories),
    ] {
        for subject in list {
            let n = tx.execute_cached(
                &format!(
                    "DELETE FROM {table} WHERE {col} = ?1 AND id NOT IN
                       (SELECT id FROM {table} WHERE {col} = ?1 ORDER BY id DESC LIMIT ?2)"
                ),
                params![subject, cap],
            )?;
            if n > 0 {
                tx.execute_cached(
                    "INSERT INTO history_dropped (kind, subject, dropped) VALUES (?1, ?2, ?3)
                     ON CONFLICT(kind, subject) DO UPDATE SET dropped = dropped + ?3",
                    params![kind, subject, n as i64],
                )?;
                trimmed += n as u64;
            }
        }
    }
    Ok(trimmed)
}

/// The audit by age, then by size, at most one batch of rows per round each; how many
/// rows it removed.
fn trim_audit(tx: &Transaction<'_>, policy: &Policy, now_ms: u64) -> rusqlite::Result<u64> {
    let audit_cutoff = now_ms.saturating_sub(policy.audit_retain_ms) as i64;
    let mut audit = tx.execute_cached(
        "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_ms < ?1 ORDER BY id LIMIT ?2)",
        params![audit_cutoff, (BATCH * 10) as i64],
    )? as u64;
    let rows: i64 = tx.query_row_cached("SELECT COUNT(*) FROM audit", [], |r| r.get(0))?;
    let over = rows.saturating_sub(policy.audit_max_rows as i64).clamp(0, (BATCH * 10) as i64);
    if over > 0 {
        audit += tx
            .execute_cached("DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY id LIMIT ?1)", [over])?
            as u64;
    }
    Ok(audit)
}

/// Removes the ended placements of each task beyond its newest [`PLACEMENTS_CAP`]
/// (by fence); the current placement and any that may still run are kept.
fn trim_placements(tx: &Transaction<'_>, tasks: &[String]) -> rusqlite::Result<u64> {
    let mut removed = 0u64;
    for task in tasks {
        let old = "SELECT id FROM placements WHERE task_id = ?1 AND observed IN ('stopped','exited','failed')
                     AND id NOT IN (SELECT id FROM placements WHERE task_id = ?1 ORDER BY fence DESC, id DESC LIMIT ?2)";
        tx.execute_cached(
            &format!("DELETE FROM placement_events WHERE placement_id IN ({old})"),
            params![task, PLACEMENTS_CAP],
        )?;
        tx.execute_cached(
            &format!("DELETE FROM history_dropped WHERE kind = 'placement' AND subject IN ({old})"),
            params![task, PLACEMENTS_CAP],
        )?;
        removed += tx
            .execute_cached(&format!("DELETE FROM placements WHERE id IN ({old})"), params![task, PLACEMENTS_CAP])?
            as u64;
    }
    Ok(removed)
}

fn delete_node(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<()> {
    tx.execute_cached("DELETE FROM node_events WHERE node = ?1", [name])?;
    tx.execute_cached("DELETE FROM history_dropped WHERE kind = 'node' AND subject = ?1", [name])?;
    tx.execute_cached("DELETE FROM nodes WHERE name = ?1", [name])?;
    Ok(())
}

fn remove_node(tx: &Transaction<'_>, name: &str, force: bool, now_ms: u64) -> rusqlite::Result<Outcome> {
    let exists = tx.query_row_cached("SELECT 1 FROM nodes WHERE name = ?1", [name], |_| Ok(())).optional()?.is_some();
    if !exists {
        return reject(RejectCode::NotFound, format!("no node named {name}"));
    }
    let live: i64 = tx.query_row_cached(
        "SELECT COUNT(*) FROM placements WHERE node = ?1 AND desired = 'run'
           AND observed NOT IN ('failed','stopped','exited')",
        [name],
        |r| r.get(0),
    )?;
    if live > 0 && !force {
        return reject(
            RejectCode::Conflict,
            format!(
                "node {name} still holds {live} running placement(s); drain it first, or remove it with \
                 ?force=true (its placements are then replaced like those of a lost node)"
            ),
        );
    }
    delete_node(tx, name)?;
    // Its certificates are refused from now on, by every manager's door.
    tx.execute_cached(
        "INSERT INTO revocations (node, at_ms, reason) VALUES (?1, ?2, 'removed')
         ON CONFLICT(node) DO UPDATE SET at_ms = excluded.at_ms, reason = excluded.reason",
        params![name, now_ms as i64],
    )?;
    Ok(Ok(Answer::NodeRemoved {
        removed: name.to_string(),
        live_placements: live.max(0) as u64,
        revoked_at_ms: now_ms,
    }))
}

/// What a collect round would take, read by the leader (bounded by [`BATCH`] each).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    /// Finished tasks past the window.
    pub tasks: Vec<String>,
    /// Nodes down past `node_gc_ms`.
    pub nodes: Vec<String>,
    /// Placements whose history is over the cap.
    pub placement_histories: Vec<String>,
    /// Nodes whose history is over the cap.
    pub node_histories: Vec<String>,
    /// Tasks with more than [`PLACEMENTS_CAP`] placements.
    pub placement_lists: Vec<String>,
    /// Audit rows past their age or beyond the size cap.
    pub audit_due: bool,
}

impl Candidates {
    /// Whether a round has anything to do.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
            && self.nodes.is_empty()
            && self.placement_histories.is_empty()
            && self.node_histories.is_empty()
            && self.placement_lists.is_empty()
            && !self.audit_due
    }
}

/// Finds what a collect round at `now_ms` would remove.
pub fn candidates(conn: &rusqlite::Connection, policy: &Policy, now_ms: u64) -> rusqlite::Result<Candidates> {
    let strings = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map(p, |r| r.get(0))?;
        rows.collect()
    };
    let cutoff = now_ms.saturating_sub(policy.retain_ms) as i64;
    let batch = BATCH as i64;
    // Oldest first by creation: a steady trickle of old tasks leaves in order.
    let tasks = strings(
        &format!(
            "SELECT t.id FROM tasks t WHERE t.updated_ms <= ?1 AND {FINISHED} AND {LAST_CHANGE} <= ?1
             ORDER BY t.created_index LIMIT ?2"
        ),
        &[&cutoff, &batch],
    )?;
    let nodes = if policy.node_gc_ms > 0 {
        let node_cutoff = now_ms.saturating_sub(policy.node_gc_ms) as i64;
        strings(
            "SELECT name FROM nodes WHERE status = 'down' AND status_since_ms <= ?1 ORDER BY name LIMIT ?2",
            &[&node_cutoff, &batch],
        )?
    } else {
        Vec::new()
    };
    let cap = policy.history_cap as i64;
    let placement_histories = strings(
        "SELECT placement_id FROM placement_events GROUP BY placement_id HAVING COUNT(*) > ?1 LIMIT ?2",
        &[&cap, &batch],
    )?;
    let node_histories =
        strings("SELECT node FROM node_events GROUP BY node HAVING COUNT(*) > ?1 LIMIT ?2", &[&cap, &batch])?;
    let placement_lists = strings(
        "SELECT task_id FROM placements WHERE observed IN ('stopped','exited','failed')
         GROUP BY task_id HAVING COUNT(*) > ?1 LIMIT ?2",
        &[&PLACEMENTS_CAP, &batch],
    )?;
    let audit_cutoff = now_ms.saturating_sub(policy.audit_retain_ms) as i64;
    let (oldest, rows): (Option<i64>, i64) =
        conn.query_row_cached("SELECT MIN(at_ms), COUNT(*) FROM audit", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let audit_due = oldest.is_some_and(|o| o < audit_cutoff) || rows as u64 > policy.audit_max_rows;
    Ok(Candidates { tasks, nodes, placement_histories, node_histories, placement_lists, audit_due })
}

/// Dropped-history count of a placement or node (`kind` = `placement` | `node`).
pub fn dropped(conn: &rusqlite::Connection, kind: &str, subject: &str) -> rusqlite::Result<u64> {
    let n: Option<i64> = conn
        .query_row_cached(
            "SELECT dropped FROM history_dropped WHERE kind = ?1 AND subject = ?2",
            [kind, subject],
            |r| r.get(0),
        )
        .optional()?;
    Ok(n.unwrap_or(0).max(0) as u64)
}

/// Row counts of the tables retention bounds (for the churn test and `/metrics`).
pub fn table_rows(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::new();
    for t in ["tasks", "placements", "placement_events", "nodes", "node_events", "audit"] {
        let n: i64 = conn.query_row_cached(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?;
        out.push((t, n as u64));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use holdfast_raft::Apply;
    use rusqlite::Connection;

    use super::super::{upgrade, Command, DomainState, NodeReports, PlannedPlacement};
    use super::*;
    use crate::model::sync::StatusReport;
    use crate::model::{Observed, PlacementStatus, Story};

    struct Db {
        conn: Connection,
        state: std::sync::Arc<DomainState>,
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

        fn apply(&mut self, cmd: &Command) -> rusqlite::Result<Outcome> {
            self.index += 1;
            let tx = self.conn.transaction().unwrap();
            let out = self.state.apply(&tx, self.index, &serde_json::to_vec(cmd).unwrap())?;
            tx.commit().unwrap();
            Ok(serde_json::from_slice(&out).unwrap())
        }

        fn ok(&mut self, cmd: &Command) -> serde_json::Value {
            serde_json::to_value(self.apply(cmd).unwrap().unwrap_or_else(|r| panic!("{cmd:?}: {r}"))).unwrap()
        }

        fn count(&self, sql: &str) -> i64 {
            self.conn.query_row(sql, [], |r| r.get(0)).unwrap()
        }

        /// A node, and a task on it that ran and exited (`code`) at `at`.
        fn finished_task(&mut self, id: &str, at: u64, seq: u64, events: usize) -> String {
            let spec = Box::new(serde_json::from_value(serde_json::json!({"image": "a"})).unwrap());
            self.ok(&Command::SubmitTask { id: id.into(), spec, idempotency_key: Some(format!("k-{id}")), now_ms: at });
            let out = self.ok(&Command::ApplyPlan {
                placements: vec![PlannedPlacement { task_id: id.into(), node: "n1".into(), replaces: None }],
                unplaced: Vec::new(),
                now_ms: at,
            });
            let pid = out["placed"][0].as_str().unwrap().to_string();
            let fence: u64 = pid.split('.').nth(1).unwrap().parse().unwrap();
            let report = |seq: u64, observed: Observed, story: Option<Story>| StatusReport {
                seq,
                placement_id: pid.clone(),
                task_id: id.into(),
                fence,
                status: PlacementStatus {
                    exit_code: (observed == Observed::Exited).then_some(0),
                    ..PlacementStatus::new(observed)
                },
                at_ms: at,
                refused: false,
                story,
            };
            let mut reports = vec![report(seq, Observed::Running, None)];
            for i in 0..events {
                reports.push(report(seq + 1 + i as u64, Observed::Running, Some(Story::Other(format!("tick {i}")))));
            }
            reports.push(report(seq + 1 + events as u64, Observed::Exited, None));
            self.ok(&Command::ReportStatus { batches: vec![NodeReports { node: "n1".into(), reports }], now_ms: at });
            pid
        }
    }

    fn seeded() -> Db {
        let mut db = Db::new();
        db.ok(&Command::Upgrade(upgrade::UpgradeCommand::SetLevel { level: 1, voters: vec![], now_ms: 1 }));
        db.ok(&Command::RegisterNode {
            name: "n1".into(),
            address: "a".into(),
            labels: BTreeMap::new(),
            cpu_millis: 100_000,
            memory_mb: 100_000,
            disk_mb: 100_000,
            now_ms: 1,
        });
        db
    }

    /// `Collect` became a newtype variant of [`CollectRound`]; Raft log entries written
    /// by the struct variant it was must read back, and new ones must read the same.
    #[test]
    fn a_collect_command_keeps_its_log_form() {
        let logged = r#"{"Retention":{"Collect":{"tasks":["t1"],"nodes":["n1"],"placement_histories":["p1"],"node_histories":[],"placement_lists":["t2"],"policy":{"retain_ms":1,"node_gc_ms":2,"history_cap":3,"audit_retain_ms":4,"audit_max_rows":5},"now_ms":6}}}"#;
        let cmd: Command = serde_json::from_str(logged).unwrap();
        assert_eq!(serde_json::to_string(&cmd).unwrap(), logged);
        // Entries from before `placement_lists` existed still read.
        let older = r#"{"Retention":{"Collect":{"tasks":[],"nodes":[],"placement_histories":[],"node_histories":[],"policy":{"retain_ms":1,"node_gc_ms":2,"history_cap":3,"audit_retain_ms":4,"audit_max_rows":5},"now_ms":6}}}"#;
        let Command::Retention(RetentionCommand::Collect(round)) = serde_json::from_str(older).unwrap() else {
            panic!("not a collect")
        };
        assert!(round.placement_lists.is_empty());
    }

    fn policy(retain_ms: u64) -> Policy {
        Policy { retain_ms, node_gc_ms: 0, history_cap: 5, audit_retain_ms: 1_000_000, audit_max_rows: 1_000 }
    }

    fn round(db: &mut Db, p: &Policy, now: u64) -> serde_json::Value {
        let c = candidates(&db.conn, p, now).unwrap();
        db.ok(&Command::Retention(RetentionCommand::Collect(CollectRound {
            tasks: c.tasks,
            nodes: c.nodes,
            placement_histories: c.placement_histories,
            node_histories: c.node_histories,
            placement_lists: c.placement_lists,
            policy: p.clone(),
            now_ms: now,
        })))
    }

    #[test]
    fn finished_tasks_leave_after_the_window_measured_by_the_commands_clock() {
        let mut db = seeded();
        db.finished_task("old", 1_000, 1, 0);
        db.finished_task("new", 5_000, 10, 0);
        let p = policy(2_000);
        // At 6 000 only `old` (last change 1 000) is past 2 s.
        let c = candidates(&db.conn, &p, 6_000).unwrap();
        assert_eq!(c.tasks, vec!["old".to_string()]);
        // The same command re-checked later is decided by its own clock: a collect
        // naming `new` at 6 000 keeps it.
        let out = db.ok(&Command::Retention(RetentionCommand::Collect(CollectRound {
            tasks: vec!["old".into(), "new".into()],
            nodes: vec![],
            placement_histories: vec![],
            node_histories: vec![],
            placement_lists: vec![],
            policy: p.clone(),
            now_ms: 6_000,
        })));
        assert_eq!(out["removed_tasks"], 1, "{out}");
        assert_eq!(out["kept_tasks"], 1, "{out}");
        assert_eq!(db.count("SELECT COUNT(*) FROM tasks"), 1);
        assert_eq!(db.count("SELECT COUNT(*) FROM placements WHERE task_id = 'old'"), 0);
        assert_eq!(db.count("SELECT COUNT(*) FROM placement_events WHERE placement_id LIKE 'old.%'"), 0);
        // The idempotency key of `new` still answers.
        assert_eq!(db.count("SELECT COUNT(*) FROM tasks WHERE idem_key = 'k-new'"), 1);
        round(&mut db, &p, 8_000);
        assert_eq!(db.count("SELECT COUNT(*) FROM tasks"), 0);
    }

    #[test]
    fn a_running_task_is_never_collected() {
        let mut db = seeded();
        let spec = Box::new(serde_json::from_value(serde_json::json!({"image": "a"})).unwrap());
        db.ok(&Command::SubmitTask { id: "live".into(), spec, idempotency_key: None, now_ms: 1 });
        let out = db.ok(&Command::Retention(RetentionCommand::Collect(CollectRound {
            tasks: vec!["live".into()],
            nodes: vec![],
            placement_histories: vec![],
            node_histories: vec![],
            placement_lists: vec![],
            policy: policy(0),
            now_ms: 1_000_000,
        })));
        assert_eq!(out["removed_tasks"], 0, "{out}");
        assert!(candidates(&db.conn, &policy(0), 1_000_000).unwrap().tasks.is_empty());
    }

    #[test]
    fn histories_keep_their_newest_entries_and_count_the_dropped() {
        let mut db = seeded();
        let pid = db.finished_task("t", 1_000, 1, 20);
        let p = policy(u64::MAX / 4);
        let before = db.count(&format!("SELECT COUNT(*) FROM placement_events WHERE placement_id = '{pid}'"));
        assert!(before > 5, "{before}");
        let newest: i64 = db.count(&format!("SELECT MAX(id) FROM placement_events WHERE placement_id = '{pid}'"));
        round(&mut db, &p, 2_000);
        assert_eq!(db.count(&format!("SELECT COUNT(*) FROM placement_events WHERE placement_id = '{pid}'")), 5);
        assert_eq!(db.count(&format!("SELECT MAX(id) FROM placement_events WHERE placement_id = '{pid}'")), newest);
        assert_eq!(dropped(&db.conn, "placement", &pid).unwrap(), before as u64 - 5);
    }

    #[test]
    fn the_audit_is_kept_by_age_and_size() {
        let mut db = seeded();
        for at in 0..30u64 {
            db.ok(&Command::Audited {
                who: "w".into(),
                on_behalf_of: None,
                action: "a".into(),
                subject: "s".into(),
                at_ms: at * 100,
                inner: None,
            });
        }
        let p = Policy { audit_retain_ms: 1_000, audit_max_rows: 10, ..policy(u64::MAX / 4) };
        // At 3 000 rows before 2 000 are too old (20 of them); 10 remain, the cap holds.
        round(&mut db, &p, 3_000);
        assert_eq!(db.count("SELECT COUNT(*) FROM audit"), 10);
        assert_eq!(db.count("SELECT MIN(at_ms) FROM audit"), 2_000);
        let p = Policy { audit_max_rows: 4, ..p };
        round(&mut db, &p, 3_000);
        assert_eq!(db.count("SELECT COUNT(*) FROM audit"), 4);
        assert_eq!(db.count("SELECT MIN(at_ms) FROM audit"), 2_600, "the newest are kept");
    }

    #[test]
    fn long_down_nodes_go_and_removal_revokes_and_refuses_live_nodes() {
        let mut db = seeded();
        db.ok(&Command::SetNodeStatus { name: "n1".into(), status: "down".into(), now_ms: 1_000 });
        let p = Policy { node_gc_ms: 5_000, ..policy(u64::MAX / 4) };
        assert!(candidates(&db.conn, &p, 4_000).unwrap().nodes.is_empty());
        let out = round(&mut db, &p, 7_000);
        assert_eq!(out["removed_nodes"][0], "n1", "{out}");
        assert_eq!(db.count("SELECT COUNT(*) FROM nodes"), 0);

        // A node with a live placement: refused unless forced; revoked when removed.
        let mut db = seeded();
        let spec = Box::new(serde_json::from_value(serde_json::json!({"image": "a"})).unwrap());
        db.ok(&Command::SubmitTask { id: "t".into(), spec, idempotency_key: None, now_ms: 1 });
        db.ok(&Command::ApplyPlan {
            placements: vec![PlannedPlacement { task_id: "t".into(), node: "n1".into(), replaces: None }],
            unplaced: Vec::new(),
            now_ms: 2,
        });
        let remove = |force| Command::Retention(RetentionCommand::RemoveNode { name: "n1".into(), force, now_ms: 9 });
        let refused = db.apply(&remove(false)).unwrap().unwrap_err();
        assert_eq!(refused.code.as_str(), "conflict");
        assert!(refused.message.contains("force=true"), "{refused}");
        db.ok(&remove(true));
        assert_eq!(db.count("SELECT COUNT(*) FROM nodes"), 0);
        assert_eq!(db.count("SELECT at_ms FROM revocations WHERE node = 'n1'"), 9);
    }

    #[test]
    fn a_task_keeps_its_newest_placements_and_every_one_that_may_run() {
        let mut db = seeded();
        let spec = Box::new(serde_json::from_value(serde_json::json!({"image": "a"})).unwrap());
        db.ok(&Command::SubmitTask { id: "t".into(), spec, idempotency_key: None, now_ms: 1 });
        // 30 ended placements (a crash-looping service rescheduled again and again)
        // and a running current one, written as the plan and reports would leave them.
        for fence in 1..=31i64 {
            let observed = if fence == 31 { "running" } else { "failed" };
            db.conn
                .execute(
                    "INSERT INTO placements (id, task_id, node, fence, desired, observed, cpu_millis, memory_mb,
                       disk_mb, created_ms, updated_ms) VALUES (?1, 't', 'n1', ?2, 'run', ?3, 1, 4, 0, 1, 1)",
                    params![format!("t.{fence}.0"), fence, observed],
                )
                .unwrap();
            db.conn
                .execute(
                    "INSERT INTO placement_events (placement_id, at_ms, observed) VALUES (?1, 1, 'x')",
                    [format!("t.{fence}.0")],
                )
                .unwrap();
        }
        let p = policy(u64::MAX / 4);
        assert_eq!(candidates(&db.conn, &p, 2).unwrap().placement_lists, vec!["t".to_string()]);
        let out = round(&mut db, &p, 2);
        assert_eq!(out["removed_placements"], 11, "{out}");
        assert_eq!(db.count("SELECT COUNT(*) FROM placements"), PLACEMENTS_CAP);
        assert_eq!(db.count("SELECT MIN(fence) FROM placements"), 31 - PLACEMENTS_CAP + 1, "the newest are kept");
        assert_eq!(db.count("SELECT COUNT(*) FROM placements WHERE observed = 'running'"), 1);
        assert_eq!(db.count("SELECT COUNT(*) FROM placement_events"), PLACEMENTS_CAP);
        assert!(candidates(&db.conn, &p, 2).unwrap().placement_lists.is_empty());
    }

    #[test]
    fn retention_waits_for_feature_level_1() {
        let mut db = Db::new();
        let out =
            db.apply(&Command::Retention(RetentionCommand::RemoveNode { name: "n1".into(), force: false, now_ms: 9 }));
        assert_eq!(out.unwrap().unwrap_err().code.as_str(), "feature_level");
    }

    #[test]
    fn a_gated_command_above_this_build_stops_apply_and_says_upgrade_me() {
        let mut db = seeded();
        db.ok(&Command::Upgrade(upgrade::UpgradeCommand::SetLevel {
            level: upgrade::PROBE_LEVEL,
            voters: vec![],
            now_ms: 2,
        }));
        let body = serde_json::to_value(upgrade::Gated::Probe { note: "x".into() }).unwrap();
        let cmd = upgrade::UpgradeCommand::Gated { level: upgrade::PROBE_LEVEL, body };
        // A build that supports the level applies it...
        let tx = db.conn.transaction().unwrap();
        let out = upgrade::apply(&tx, 7, cmd.clone(), upgrade::PROBE_LEVEL).unwrap();
        assert!(out.is_ok(), "{out:?}");
        drop(tx);
        // ...one that does not stops with a message naming the level, never skips it.
        let tx = db.conn.transaction().unwrap();
        let err = upgrade::apply(&tx, 7, cmd, upgrade::FEATURE_LEVEL).unwrap_err().to_string();
        assert!(err.contains(upgrade::UPGRADE_ME) && err.contains("level 2") && err.contains("entry 7"), "{err}");
        // A body this level does not define is hostile content, not an upgrade.
        let bad = upgrade::UpgradeCommand::Gated { level: upgrade::PROBE_LEVEL, body: serde_json::json!({"Nope": {}}) };
        let out = upgrade::apply(&tx, 8, bad, upgrade::PROBE_LEVEL).unwrap();
        assert_eq!(out.unwrap_err().code.as_str(), "bad_command");
        drop(tx);
        // Through the state machine, the stop is kept by type for `node` and health.
        assert!(db.state.upgrade_required().is_none());
        let body = serde_json::to_value(upgrade::Gated::Probe { note: "y".into() }).unwrap();
        let gated = Command::Upgrade(upgrade::UpgradeCommand::Gated { level: upgrade::PROBE_LEVEL, body });
        let err = db.apply(&gated).expect_err("this build cannot apply the entry");
        let stop = db.state.upgrade_required().expect("the state machine keeps why it stopped");
        assert_eq!((stop.index, stop.level, stop.supported), (db.index, upgrade::PROBE_LEVEL, upgrade::FEATURE_LEVEL));
        assert_eq!(err.to_string(), stop.to_string());
    }
}
