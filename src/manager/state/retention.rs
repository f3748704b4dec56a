//! Bounded state (README "Retention"): finished tasks and their placements leave after
//! the retention window, histories keep their newest entries, the audit is kept by age
//! and size, long-down nodes are removed, and an admin can remove a node.
//!
//! The leader decides what to collect (`leader::housekeeping`) and writes it as one
//! bounded [`RetentionCommand::Collect`]; `apply` re-checks every item against the
//! state and the command's own clock, never the replica's, so every member deletes
//! exactly the same rows.

use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::{node_status, reject, valid_id, Outcome, Rejection};

/// Feature level that brought these commands (`state::upgrade`).
pub const LEVEL: u32 = 1;

/// Most items of each kind one collect command carries.
pub const BATCH: usize = 500;

/// Newest history entries kept per placement and per node.
pub const HISTORY_CAP: u32 = 100;

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
    /// One bounded garbage-collection round.
    Collect {
        /// Finished tasks the leader found past the window.
        tasks: Vec<String>,
        /// Nodes the leader found down past `node_gc_ms`.
        nodes: Vec<String>,
        /// Placements whose history is over the cap.
        placement_histories: Vec<String>,
        /// Nodes whose history is over the cap.
        node_histories: Vec<String>,
        /// The settings.
        policy: Policy,
        /// Leader wall clock; the only clock `apply` uses.
        now_ms: u64,
    },
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
    let invalid = |m: String| Some(Rejection { code: "invalid".into(), message: m });
    let max = i64::MAX as u64;
    match cmd {
        RetentionCommand::Collect { tasks, nodes, placement_histories, node_histories, policy, now_ms } => {
            for (what, list) in
                [("tasks", tasks), ("nodes", nodes), ("placements", placement_histories), ("nodes", node_histories)]
            {
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
        RetentionCommand::Collect { tasks, nodes, placement_histories, node_histories, policy, now_ms } => {
            collect(tx, &tasks, &nodes, &placement_histories, &node_histories, &policy, now_ms)
        }
        RetentionCommand::RemoveNode { name, force, now_ms } => remove_node(tx, &name, force, now_ms),
    }
}

fn collect(
    tx: &Transaction<'_>,
    tasks: &[String],
    nodes: &[String],
    placement_histories: &[String],
    node_histories: &[String],
    policy: &Policy,
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    let cutoff = now_ms.saturating_sub(policy.retain_ms) as i64;
    let mut removed_tasks = 0u64;
    let mut kept = 0u64;
    let finished_before = format!("SELECT 1 FROM tasks t WHERE t.id = ?1 AND {FINISHED} AND {LAST_CHANGE} <= ?2");
    for id in tasks {
        // Re-checked here with the command's clock: a task that changed since the
        // leader looked (restarted, stopped later) stays.
        let due = tx.query_row(&finished_before, params![id, cutoff], |_| Ok(())).optional()?.is_some();
        if !due {
            kept += 1;
            continue;
        }
        tx.execute(
            "DELETE FROM placement_events WHERE placement_id IN (SELECT id FROM placements WHERE task_id = ?1)",
            [id],
        )?;
        tx.execute(
            "DELETE FROM history_dropped WHERE kind = 'placement'
               AND subject IN (SELECT id FROM placements WHERE task_id = ?1)",
            [id],
        )?;
        tx.execute("DELETE FROM placements WHERE task_id = ?1", [id])?;
        tx.execute("DELETE FROM tasks WHERE id = ?1", [id])?;
        removed_tasks += 1;
    }
    let mut removed_nodes = Vec::new();
    if policy.node_gc_ms > 0 {
        let node_cutoff = now_ms.saturating_sub(policy.node_gc_ms) as i64;
        for name in nodes {
            let due = tx
                .query_row(
                    "SELECT 1 FROM nodes WHERE name = ?1 AND status = ?2 AND status_since_ms <= ?3",
                    params![name, node_status::DOWN, node_cutoff],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if due {
                delete_node(tx, name)?;
                removed_nodes.push(name.clone());
            }
        }
    }
    let cap = policy.history_cap as i64;
    let mut trimmed = 0u64;
    for (kind, table, col, list) in [
        ("placement", "placement_events", "placement_id", placement_histories),
        ("node", "node_events", "node", node_histories),
    ] {
        for subject in list {
            let n = tx.execute(
                &format!(
                    "DELETE FROM {table} WHERE {col} = ?1 AND id NOT IN
                       (SELECT id FROM {table} WHERE {col} = ?1 ORDER BY id DESC LIMIT ?2)"
                ),
                params![subject, cap],
            )?;
            if n > 0 {
                tx.execute(
                    "INSERT INTO history_dropped (kind, subject, dropped) VALUES (?1, ?2, ?3)
                     ON CONFLICT(kind, subject) DO UPDATE SET dropped = dropped + ?3",
                    params![kind, subject, n as i64],
                )?;
                trimmed += n as u64;
            }
        }
    }
    // The audit by age, then by size, at most one batch of rows per round each.
    let audit_cutoff = now_ms.saturating_sub(policy.audit_retain_ms) as i64;
    let mut audit = tx.execute(
        "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at_ms < ?1 ORDER BY id LIMIT ?2)",
        params![audit_cutoff, (BATCH * 10) as i64],
    )? as u64;
    let rows: i64 = tx.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))?;
    let over = rows.saturating_sub(policy.audit_max_rows as i64).clamp(0, (BATCH * 10) as i64);
    if over > 0 {
        audit +=
            tx.execute("DELETE FROM audit WHERE id IN (SELECT id FROM audit ORDER BY id LIMIT ?1)", [over])? as u64;
    }
    Ok(Ok(serde_json::json!({
        "removed_tasks": removed_tasks,
        "kept_tasks": kept,
        "removed_nodes": removed_nodes,
        "trimmed_history": trimmed,
        "removed_audit": audit,
    })))
}

fn delete_node(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM node_events WHERE node = ?1", [name])?;
    tx.execute("DELETE FROM history_dropped WHERE kind = 'node' AND subject = ?1", [name])?;
    tx.execute("DELETE FROM nodes WHERE name = ?1", [name])?;
    Ok(())
}

fn remove_node(tx: &Transaction<'_>, name: &str, force: bool, now_ms: u64) -> rusqlite::Result<Outcome> {
    let exists = tx.query_row("SELECT 1 FROM nodes WHERE name = ?1", [name], |_| Ok(())).optional()?.is_some();
    if !exists {
        return reject("not_found", format!("no node named {name}"));
    }
    let live: i64 = tx.query_row(
        "SELECT COUNT(*) FROM placements WHERE node = ?1 AND desired = 'run'
           AND observed NOT IN ('failed','stopped','exited')",
        [name],
        |r| r.get(0),
    )?;
    if live > 0 && !force {
        return reject(
            "conflict",
            format!(
                "node {name} still holds {live} running placement(s); drain it first, or remove it with \
                 ?force=true (its placements are then replaced like those of a lost node)"
            ),
        );
    }
    delete_node(tx, name)?;
    // Its certificates are refused from now on, by every manager's door.
    tx.execute(
        "INSERT INTO revocations (node, at_ms, reason) VALUES (?1, ?2, 'removed')
         ON CONFLICT(node) DO UPDATE SET at_ms = excluded.at_ms, reason = excluded.reason",
        params![name, now_ms as i64],
    )?;
    Ok(Ok(serde_json::json!({ "removed": name, "live_placements": live, "revoked_at_ms": now_ms })))
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
            && !self.audit_due
    }
}

/// Finds what a collect round at `now_ms` would remove.
pub fn candidates(conn: &rusqlite::Connection, policy: &Policy, now_ms: u64) -> rusqlite::Result<Candidates> {
    let strings = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare(sql)?;
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
    let audit_cutoff = now_ms.saturating_sub(policy.audit_retain_ms) as i64;
    let (oldest, rows): (Option<i64>, i64) =
        conn.query_row("SELECT MIN(at_ms), COUNT(*) FROM audit", [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let audit_due = oldest.is_some_and(|o| o < audit_cutoff) || rows as u64 > policy.audit_max_rows;
    Ok(Candidates { tasks, nodes, placement_histories, node_histories, audit_due })
}

/// Dropped-history count of a placement or node (`kind` = `placement` | `node`).
pub fn dropped(conn: &rusqlite::Connection, kind: &str, subject: &str) -> rusqlite::Result<u64> {
    let n: Option<i64> = conn
        .query_row("SELECT dropped FROM history_dropped WHERE kind = ?1 AND subject = ?2", [kind, subject], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(n.unwrap_or(0).max(0) as u64)
}

/// Row counts of the tables retention bounds (for the churn test and `/metrics`).
pub fn table_rows(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::new();
    for t in ["tasks", "placements", "placement_events", "nodes", "node_events", "audit"] {
        let n: i64 = conn.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| r.get(0))?;
        out.push((t, n as u64));
    }
    Ok(out)
}
