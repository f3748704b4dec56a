//! The worker's local SQLite ledger: accepted placements (written before acting), the
//! highest fence seen per task, the lease, and the durable outbox of status reports.
//! It is what lets a restarted worker carry on without any manager.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::model::sync::{Assignment, StatusReport};
use crate::model::{Desired, Observed, PlacementStatus, Story, TaskSpec};

/// Ledger failures.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite failed.
    #[error("worker ledger: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The ledger's directory could not be created (before SQLite is asked to open
    /// anything in it, so the cause is the filesystem's, not SQLite's "cannot open").
    #[error("worker ledger: cannot create the directory {}: {source}", dir.display())]
    CreateDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// What the filesystem said.
        source: std::io::Error,
    },
    /// A record could not be encoded for storage; nothing was written.
    #[error("worker ledger: cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
    /// The ledger belongs to another node name.
    #[error("worker ledger {path} belongs to node {found:?}, not {wanted:?}; use that node id or another --data-dir")]
    Foreign {
        /// Ledger path.
        path: String,
        /// Name stored in it.
        found: String,
        /// Name given now.
        wanted: String,
    },
}

/// A ledger read's value, or `T::default()` when the ledger cannot be read now: the
/// error is logged with `what` was being read and counted
/// (`holdfast_worker_ledger_read_failures_total`). Only for loops that read again next
/// round (reports, deadlines, log answers), never where an empty value would act.
pub fn or_logged<T: Default>(read: Result<T, LedgerError>, what: &'static str) -> T {
    read.unwrap_or_else(|error| {
        tracing::warn!(what, %error, "cannot read the worker ledger; trying again next round");
        metrics::counter!("holdfast_worker_ledger_read_failures_total").increment(1);
        T::default()
    })
}

/// A placement this worker holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Held {
    /// Placement id.
    pub id: String,
    /// Task id.
    pub task_id: String,
    /// Fence.
    pub fence: u64,
    /// Manager's intent as last received.
    pub desired: Desired,
    /// What to run.
    pub spec: TaskSpec,
    /// What this worker last recorded of it.
    pub status: PlacementStatus,
    /// Earliest time of the next restart (backoff), ms since the epoch.
    pub next_start_ms: Option<u64>,
    /// Stopped by this worker when its lease ran out (offline mode `exclusive`); started
    /// again once a manager renews the lease, without counting as a restart.
    pub suspended: bool,
}

/// An observed change to record (and report).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The new status (observed state, exit, reason, restarts, endpoints, container).
    pub status: PlacementStatus,
    /// Next restart time for `restarting`.
    pub next_start_ms: Option<u64>,
    /// Admission refused the placement on this node.
    pub refused: bool,
    /// Whether the placement is now suspended (see [`Held::suspended`]).
    pub suspended: bool,
    /// A story event for the manager's history, recorded even when the observed state
    /// does not change.
    pub story: Option<Story>,
}

impl Held {
    /// This placement as it stands once moved to `observed`, all else kept.
    pub fn in_state(&self, observed: Observed) -> Held {
        let mut h = self.clone();
        h.status.observed = observed;
        h
    }
}

impl Change {
    /// A change to `observed` that keeps everything else the placement already had
    /// (exit code, reason, restarts, endpoints, container) and clears the one-shot flags.
    pub fn carrying(h: &Held, observed: Observed) -> Change {
        Change {
            status: PlacementStatus { observed, ..h.status.clone() },
            next_start_ms: None,
            refused: false,
            suspended: false,
            story: None,
        }
    }
}

/// The ledger; all methods are blocking and short.
pub struct Ledger {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS placements (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL,
    fence INTEGER NOT NULL,
    desired TEXT NOT NULL,
    spec TEXT NOT NULL,
    observed TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    endpoints TEXT NOT NULL DEFAULT '[]',
    container_id TEXT,
    next_start_ms INTEGER,
    suspended INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS task_fences (task_id TEXT PRIMARY KEY, fence INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, report TEXT NOT NULL);
"#;

impl Ledger {
    /// Opens or creates `ledger.db` in `dir` for node `node`.
    pub fn open(dir: &Path, node: &str) -> Result<Ledger, LedgerError> {
        std::fs::create_dir_all(dir).map_err(|source| LedgerError::CreateDir { dir: dir.to_path_buf(), source })?;
        let path = dir.join("ledger.db");
        let conn = Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let found: Option<String> =
            conn.query_row("SELECT value FROM meta WHERE key = 'node'", [], |r| r.get(0)).optional()?;
        match found {
            Some(found) if found != node => {
                return Err(LedgerError::Foreign { path: path.display().to_string(), found, wanted: node.to_string() })
            }
            Some(_) => {}
            None => {
                conn.execute("INSERT INTO meta (key, value) VALUES ('node', ?1)", [node])?;
            }
        }
        Ok(Ledger { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        crate::lock(&self.conn)
    }

    /// Reads a numeric meta value.
    pub fn meta_u64(&self, key: &str) -> Result<u64, LedgerError> {
        let v: Option<String> =
            self.conn().query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?;
        let Some(v) = v else { return Ok(0) };
        Ok(v.parse().unwrap_or_else(|error| {
            // 0 is the safe reading: a lease that ended, a sequence not yet acked.
            tracing::warn!(key, value = %v, %error, "unreadable number in worker ledger; read as 0");
            metrics::counter!("holdfast_worker_ledger_unreadable_total").increment(1);
            0
        }))
    }

    /// Writes a numeric meta value.
    pub fn set_meta_u64(&self, key: &str, value: u64) -> Result<(), LedgerError> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            params![key, value.to_string()],
        )?;
        Ok(())
    }

    /// Takes the manager's full desired set. New placements are written before anything
    /// acts on them; a placement with a fence below the highest seen for its task is
    /// refused (returned). Held placements the manager no longer lists are marked to stop.
    pub fn accept(&self, assignments: &[Assignment]) -> Result<Vec<String>, LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut refused = Vec::new();
        for a in assignments {
            let max: Option<i64> = tx
                .query_row("SELECT fence FROM task_fences WHERE task_id = ?1", [&a.task_id], |r| r.get(0))
                .optional()?;
            let exists: bool = tx
                .query_row("SELECT 1 FROM placements WHERE id = ?1", [&a.placement_id], |_| Ok(()))
                .optional()?
                .is_some();
            if !exists && max.is_some_and(|m| (m as u64) > a.fence) {
                refused.push(a.placement_id.clone());
                continue;
            }
            let desired = a.desired.as_str();
            if exists {
                tx.execute("UPDATE placements SET desired = ?2 WHERE id = ?1", params![a.placement_id, desired])?;
            } else {
                let spec = serde_json::to_string(&a.spec)?;
                tx.execute(
                    "INSERT INTO placements (id, task_id, fence, desired, spec, observed) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
                    params![a.placement_id, a.task_id, a.fence as i64, desired, spec],
                )?;
            }
            tx.execute(
                "INSERT INTO task_fences (task_id, fence) VALUES (?1, ?2)
                 ON CONFLICT(task_id) DO UPDATE SET fence = MAX(fence, ?2)",
                params![a.task_id, a.fence as i64],
            )?;
        }
        // Anything held but no longer listed: the manager is done with it (stopped,
        // or superseded by a higher fence). Stop it.
        let listed: Vec<&str> = assignments.iter().map(|a| a.placement_id.as_str()).collect();
        let held: Vec<String> = {
            let mut stmt = tx.prepare("SELECT id FROM placements WHERE desired = 'run'")?;
            let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
            ids
        };
        for id in held.iter().filter(|id| !listed.contains(&id.as_str())) {
            tx.execute("UPDATE placements SET desired = 'stop' WHERE id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(refused)
    }

    /// Every held placement.
    pub fn all(&self) -> Result<Vec<Held>, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, task_id, fence, desired, spec, observed, exit_code, reason, restarts, endpoints, container_id, next_start_ms, suspended
             FROM placements ORDER BY fence, id",
        )?;
        let rows = stmt.query_map([], |r| {
            let id: String = r.get(0)?;
            let desired: String = r.get(3)?;
            let spec: String = r.get(4)?;
            let spec = match serde_json::from_str::<TaskSpec>(&spec) {
                Ok(spec) => spec,
                Err(error) => {
                    tracing::error!(placement = %id, %error, "unreadable spec in worker ledger; skipping it");
                    metrics::counter!("holdfast_worker_ledger_unreadable_total").increment(1);
                    return Ok(None);
                }
            };
            Ok(Some(Held {
                id,
                task_id: r.get(1)?,
                fence: r.get::<_, i64>(2)? as u64,
                desired: Desired::from_stored(&desired),
                spec,
                // Columns 5 to 10, in the order `PlacementStatus::from_row` reads.
                status: PlacementStatus::from_row(r, 5)?,
                next_start_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
                suspended: r.get(12)?,
            }))
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.extend(row?);
        }
        Ok(out)
    }

    /// Records an observed change and queues it in the outbox, in one transaction.
    pub fn record(&self, held: &Held, change: &Change, at_ms: u64) -> Result<u64, LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let seq: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM outbox", [], |r| r.get(0))?;
        let floor: Option<String> =
            tx.query_row("SELECT value FROM meta WHERE key = 'acked_seq'", [], |r| r.get(0)).optional()?;
        let floor: i64 = floor.and_then(|v| v.parse().ok()).unwrap_or(0);
        let seq = seq.max(floor) + 1;
        tx.execute(
            "UPDATE placements SET observed = ?2, exit_code = ?3, reason = ?4, restarts = ?5, endpoints = ?6,
               container_id = COALESCE(?7, container_id), next_start_ms = ?8, suspended = ?9 WHERE id = ?1",
            params![
                held.id,
                change.status.observed.as_str(),
                change.status.exit_code,
                change.status.reason,
                change.status.restarts,
                change.status.endpoints_json(),
                change.status.container_id,
                change.next_start_ms.map(|v| v as i64),
                change.suspended
            ],
        )?;
        let report = StatusReport {
            seq: seq as u64,
            placement_id: held.id.clone(),
            task_id: held.task_id.clone(),
            fence: held.fence,
            // A change that names no container keeps the one the placement has.
            status: PlacementStatus {
                container_id: change.status.container_id.clone().or_else(|| held.status.container_id.clone()),
                ..change.status.clone()
            },
            at_ms,
            refused: change.refused,
            story: change.story.clone(),
        };
        tx.execute("INSERT INTO outbox (seq, report) VALUES (?1, ?2)", params![seq, serde_json::to_string(&report)?])?;
        tx.commit()?;
        Ok(seq as u64)
    }

    /// Reports not yet acknowledged, oldest first, at most `limit`.
    pub fn outbox(&self, limit: usize) -> Result<Vec<StatusReport>, LedgerError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT report FROM outbox ORDER BY seq LIMIT ?1")?;
        let rows = stmt.query_map([limit as i64], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            match serde_json::from_str(&row?) {
                Ok(r) => out.push(r),
                // Skipped (a later ack deletes it), never silently.
                Err(error) => {
                    tracing::error!(%error, "unreadable report in the outbox; skipped");
                    metrics::counter!("holdfast_worker_outbox_unreadable_total").increment(1);
                }
            }
        }
        Ok(out)
    }

    /// Drops reports up to `seq`, which the manager has applied.
    pub fn ack(&self, seq: u64) -> Result<(), LedgerError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM outbox WHERE seq <= ?1", [seq as i64])?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('acked_seq', ?1)
             ON CONFLICT(key) DO UPDATE SET value = MAX(CAST(value AS INTEGER), CAST(?1 AS INTEGER))",
            [seq.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// What the managers want of placement `id` now; `None` when it is not held.
    pub fn desired(&self, id: &str) -> Result<Option<Desired>, LedgerError> {
        let v: Option<String> =
            self.conn().query_row("SELECT desired FROM placements WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        Ok(v.as_deref().map(Desired::from_stored))
    }

    /// Forgets a placement that is stopped, removed and no longer listed.
    pub fn forget(&self, id: &str) -> Result<(), LedgerError> {
        self.conn().execute("DELETE FROM placements WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Highest fence seen for a task.
    pub fn max_fence(&self, task_id: &str) -> Result<u64, LedgerError> {
        let v: Option<i64> = self
            .conn()
            .query_row("SELECT fence FROM task_fences WHERE task_id = ?1", [task_id], |r| r.get(0))
            .optional()?;
        Ok(v.unwrap_or(0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_cannot_be_created_is_named_with_the_filesystem_cause() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A regular file where a parent directory should be: no mkdir can get past it,
        // whoever runs the test (root included).
        let file = tmp.path().join("plain-file");
        std::fs::write(&file, b"").expect("write");
        let dir = file.join("worker");
        let err = Ledger::open(&dir, "w1").err().expect("cannot open under a file");
        assert!(matches!(&err, LedgerError::CreateDir { dir: d, .. } if d == &dir), "{err:?}");
        assert!(err.to_string().contains(&dir.display().to_string()), "names the directory: {err}");
    }

    #[test]
    fn a_numeric_meta_value_round_trips_and_an_unreadable_one_reads_as_zero() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(tmp.path(), "w1").expect("open");
        assert_eq!(ledger.meta_u64("lease_ms").expect("absent"), 0);
        ledger.set_meta_u64("lease_ms", 30_000).expect("write");
        assert_eq!(ledger.meta_u64("lease_ms").expect("read"), 30_000);
        ledger.conn().execute("UPDATE meta SET value = 'soon' WHERE key = 'lease_ms'", []).expect("corrupt");
        assert_eq!(ledger.meta_u64("lease_ms").expect("unreadable is not an error"), 0);
    }

    #[test]
    fn a_ledger_belongs_to_the_node_that_made_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&tmp.path().join("worker"), "w1").expect("open");
        assert!(ledger.outbox(10).expect("outbox").is_empty());
        assert!(matches!(Ledger::open(&tmp.path().join("worker"), "w2"), Err(LedgerError::Foreign { .. })));
    }
}
