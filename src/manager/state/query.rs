//! Read-side queries on the replicated state database (any connection; no writes).

use std::collections::BTreeMap;

use super::cached::Cached;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::model::sync::Assignment;
use crate::model::{Desired, Observed, PlacementStatus, TaskSpec};

/// One placement as shown by the API.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PlacementView {
    /// Placement id.
    pub id: String,
    /// Node it was placed on.
    pub node: String,
    /// Fence (Raft index that created it).
    pub fence: u64,
    /// Manager's intent: `run` or `stop`.
    #[schema(value_type = String)]
    pub desired: Desired,
    /// Worker's last report: `observed` (`pending`, `pulling`, `starting`,
    /// `running`, ...), `exit_code`, `reason`, `restarts`, `endpoints`, `container_id`.
    #[serde(flatten)]
    #[schema(inline)]
    pub status: PlacementStatus,
    /// Whether this is the task's current placement (highest fence).
    pub current: bool,
    /// Liveness of its node as the leader last committed it; while it is not `ready`,
    /// `observed` is only the last thing the node said, and the task shows `unknown`.
    pub node_status: String,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Last change, ms since the epoch.
    pub updated_ms: u64,
    /// History (only on single-task reads).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventView>,
    /// Older history entries dropped by retention (only the newest are kept).
    #[serde(skip_serializing_if = "is_zero")]
    pub events_dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One entry of a placement's history.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct EventView {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// What happened (`placed`, an observed state, `stale-report`, ...).
    pub what: String,
    /// Detail, if any.
    pub detail: Option<String>,
}

/// One task as shown by the API.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TaskView {
    /// Task id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Derived state: pending, starting, running, restarting, completed, failed, stopping,
    /// stopped, or unknown (its node is silent; see the placement's `node_status`).
    #[schema(value_type = String)]
    pub state: &'static str,
    /// Manager's intent: `run` or `stop`.
    #[schema(value_type = String)]
    pub desired: Desired,
    /// Why it is pending or failed, when known.
    pub reason: Option<String>,
    /// Exit code of the current placement, when it exited.
    pub exit_code: Option<i64>,
    /// Restarts of the current placement.
    pub restarts: u32,
    /// Endpoints of the current placement.
    pub endpoints: Vec<String>,
    /// The submitted spec (README, "Task spec"); env values redacted for readers.
    #[schema(value_type = Object)]
    pub spec: TaskSpec,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Last change, ms since the epoch.
    pub updated_ms: u64,
    /// Every placement, newest first.
    pub placements: Vec<PlacementView>,
}

fn derive_state(desired: Desired, current: Option<&PlacementView>) -> &'static str {
    match (desired, current) {
        (Desired::Stop, None) => "stopped",
        (Desired::Stop, Some(p)) if p.status.observed == Observed::Stopped => "stopped",
        (Desired::Stop, Some(_)) => "stopping",
        (Desired::Run, None) => "pending",
        (Desired::Run, Some(p)) if p.node_status != "ready" && !p.status.observed.is_terminal() => "unknown",
        (Desired::Run, Some(p)) => match p.status.observed {
            Observed::Pending | Observed::Pulling | Observed::Starting => "starting",
            Observed::Running => "running",
            Observed::Restarting => "restarting",
            Observed::Exited if p.status.exit_code == Some(0) => "completed",
            Observed::Exited | Observed::Failed => "failed",
            Observed::Stopped => "stopped",
        },
    }
}

/// Columns of [`placement_row`]; `p.observed` to `p.container_id` are consecutive, as
/// [`PlacementStatus::from_row`] reads them.
const PLACEMENT_COLS: &str = "p.id, p.node, p.fence, p.desired, p.observed, p.exit_code, p.reason, p.restarts, p.endpoints, p.container_id, p.created_ms, p.updated_ms, p.task_id, COALESCE(n.status, 'down')";
const PLACEMENT_FROM: &str = "placements p LEFT JOIN nodes n ON n.name = p.node";

fn placement_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, PlacementView)> {
    let desired: String = r.get(3)?;
    Ok((
        r.get(12)?,
        PlacementView {
            id: r.get(0)?,
            node: r.get(1)?,
            fence: r.get::<_, i64>(2)? as u64,
            desired: Desired::from_stored(&desired),
            status: PlacementStatus::from_row(r, 4)?,
            current: false,
            node_status: r.get(13)?,
            created_ms: r.get::<_, i64>(10)? as u64,
            updated_ms: r.get::<_, i64>(11)? as u64,
            events: Vec::new(),
            events_dropped: 0,
        },
    ))
}

fn build_task(r: &rusqlite::Row<'_>) -> rusqlite::Result<(TaskView, Option<String>)> {
    let spec: String = r.get(2)?;
    let desired: String = r.get(3)?;
    Ok((
        TaskView {
            id: r.get(0)?,
            name: r.get(1)?,
            state: "pending",
            desired: Desired::from_stored(&desired),
            reason: None,
            exit_code: None,
            restarts: 0,
            endpoints: Vec::new(),
            spec: serde_json::from_str(&spec)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e)))?,
            created_ms: r.get::<_, i64>(5)? as u64,
            updated_ms: r.get::<_, i64>(6)? as u64,
            placements: Vec::new(),
        },
        r.get(4)?,
    ))
}

fn finish(task: &mut TaskView, pending_reason: Option<String>) {
    task.placements.sort_by(|a, b| b.fence.cmp(&a.fence).then(b.id.cmp(&a.id)));
    if let Some(first) = task.placements.first_mut() {
        first.current = true;
    }
    let current = task.placements.first();
    task.state = derive_state(task.desired, current);
    if let Some(p) = current {
        task.exit_code = p.status.exit_code;
        task.restarts = p.status.restarts;
        task.endpoints = p.status.endpoints.clone();
        task.reason = p.status.reason.clone();
        task.updated_ms = task.updated_ms.max(p.updated_ms);
    } else {
        task.reason = pending_reason;
    }
}

const TASK_COLS: &str = "id, name, spec, desired, pending_reason, created_ms, updated_ms";

/// Which tasks a list page holds (`GET /v1/tasks?limit=&after=&state=&node=&name=`).
#[derive(Clone, Debug, Default)]
pub struct TaskFilter {
    /// Most tasks on the page.
    pub limit: usize,
    /// Only tasks created before this cursor (the `created_index` of the last task of
    /// the previous page); newest first, so tasks added meanwhile never shift a walk.
    pub after: Option<u64>,
    /// Only tasks in this derived state (`pending`, `running`, ...).
    pub state: Option<String>,
    /// Only tasks with a placement on this node.
    pub node: Option<String>,
    /// Only tasks with exactly this name.
    pub name: Option<String>,
}

/// One page of tasks and the cursor of the next page (`None` at the end).
#[derive(Debug)]
pub struct TaskPage {
    /// The tasks, newest first, with placements (no history).
    pub tasks: Vec<TaskView>,
    /// Where the next page starts.
    pub next: Option<u64>,
}

/// Most task rows one page request examines. A state filter is applied after the
/// state is derived, so a rare state can need many rows; past this the page ends
/// early (possibly empty) with a cursor and the client continues, instead of one
/// request scanning every task. A page is complete only when `next` is null.
const MAX_SCAN: usize = 2_000;

/// Placements of every task in `ids` (a JSON array of ids), by task: one query for the
/// whole page instead of one per task (`placements_task` index; `json_each` keeps the
/// statement cached whatever the page size).
fn placements_of(
    conn: &Connection,
    ids: &[&str],
) -> rusqlite::Result<std::collections::HashMap<String, Vec<PlacementView>>> {
    let mut out: std::collections::HashMap<String, Vec<PlacementView>> = std::collections::HashMap::new();
    if ids.is_empty() {
        return Ok(out);
    }
    let list = serde_json::to_string(ids).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {PLACEMENT_COLS} FROM {PLACEMENT_FROM} WHERE p.task_id IN (SELECT value FROM json_each(?1))"
    ))?;
    for row in stmt.query_map([list], placement_row)? {
        let (task, p) = row?;
        out.entry(task).or_default().push(p);
    }
    Ok(out)
}

/// One page of tasks, newest first, with placements (no history). Reads task rows
/// from the cursor on in index order (`tasks_created`, or `tasks_name` with a name
/// filter), so the cost follows the page, not the table; the placements of a batch of
/// rows come from one query.
pub fn list_tasks(conn: &Connection, f: &TaskFilter) -> rusqlite::Result<TaskPage> {
    let limit = f.limit.max(1);
    let mut sql = format!("SELECT {TASK_COLS}, created_index FROM tasks t WHERE created_index < ?1");
    if f.name.is_some() {
        sql.push_str(" AND name = ?2");
    }
    if f.node.is_some() {
        sql.push_str(" AND EXISTS (SELECT 1 FROM placements p WHERE p.task_id = t.id AND p.node = ?3)");
    }
    sql.push_str(" ORDER BY created_index DESC LIMIT ?4");
    let mut stmt = conn.prepare_cached(&sql)?;
    let mut cursor = f.after.map_or(i64::MAX, |a| i64::try_from(a).unwrap_or(i64::MAX));
    let mut tasks = Vec::new();
    let mut scanned = 0usize;
    // With no state filter one batch of `limit + 1` rows decides the page; with one,
    // batches continue until the page is full, the table ends, or MAX_SCAN is reached.
    let batch = if f.state.is_some() { (limit * 2).clamp(64, 1_000) } else { limit + 1 };
    loop {
        let rows: Vec<((TaskView, Option<String>), i64)> = stmt
            .query_map(
                rusqlite::params![
                    cursor,
                    f.name.as_deref().unwrap_or(""),
                    f.node.as_deref().unwrap_or(""),
                    batch as i64
                ],
                |r| Ok((build_task(r)?, r.get::<_, i64>(7)?)),
            )?
            .collect::<Result<_, _>>()?;
        let exhausted = rows.len() < batch;
        // Only the rows this page can still take need their placements.
        let wanted = if f.state.is_some() { rows.len() } else { rows.len().min(limit - tasks.len()) };
        let ids: Vec<&str> = rows.iter().take(wanted).map(|((t, _), _)| t.id.as_str()).collect();
        let mut placements = placements_of(conn, &ids)?;
        for ((mut task, reason), index) in rows {
            if tasks.len() == limit {
                // A further matching row may exist: the page ends at the last one taken.
                return Ok(TaskPage { next: Some(cursor as u64), tasks });
            }
            scanned += 1;
            task.placements = placements.remove(&task.id).unwrap_or_default();
            finish(&mut task, reason);
            cursor = index;
            if f.state.as_deref().is_none_or(|s| s == task.state) {
                tasks.push(task);
            }
        }
        if exhausted {
            return Ok(TaskPage { tasks, next: None });
        }
        if tasks.len() == limit || scanned >= MAX_SCAN {
            return Ok(TaskPage { next: Some(cursor as u64), tasks });
        }
    }
}

/// One task with placements and their history.
pub fn get_task(conn: &Connection, id: &str) -> rusqlite::Result<Option<TaskView>> {
    let Some((mut task, reason)) =
        conn.query_row_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"), [id], build_task).optional()?
    else {
        return Ok(None);
    };
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {PLACEMENT_COLS} FROM {PLACEMENT_FROM} WHERE p.task_id = ?1"))?;
    task.placements = stmt.query_map([id], placement_row)?.map(|r| r.map(|(_, p)| p)).collect::<Result<_, _>>()?;
    let mut ev = conn
        .prepare_cached("SELECT at_ms, observed, detail FROM placement_events WHERE placement_id = ?1 ORDER BY id")?;
    for p in &mut task.placements {
        p.events = ev
            .query_map([&p.id], |r| {
                Ok(EventView { at_ms: r.get::<_, i64>(0)? as u64, what: r.get(1)?, detail: r.get(2)? })
            })?
            .collect::<Result<_, _>>()?;
        p.events_dropped = super::retention::dropped(conn, "placement", &p.id)?;
    }
    finish(&mut task, reason);
    Ok(Some(task))
}

/// A task waiting for a placement, as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct PendingTask {
    /// Task id.
    pub id: String,
    /// Its spec.
    pub spec: TaskSpec,
    /// Its pending reason as last recorded (to avoid rewriting an unchanged one).
    pub reason: Option<String>,
}

/// Tasks that want to run and have never been placed; with `only_new`, just those the
/// planner has not looked at yet (no reason recorded).
pub fn pending_tasks(conn: &Connection, limit: usize, only_new: bool) -> rusqlite::Result<Vec<PendingTask>> {
    let mut stmt = conn.prepare_cached(if only_new {
        "SELECT t.id, t.spec, t.pending_reason FROM tasks t
         WHERE t.desired = 'run' AND t.pending_reason IS NULL
           AND NOT EXISTS (SELECT 1 FROM placements p WHERE p.task_id = t.id)
         ORDER BY t.created_index LIMIT ?1"
    } else {
        "SELECT t.id, t.spec, t.pending_reason FROM tasks t
         WHERE t.desired = 'run' AND NOT EXISTS (SELECT 1 FROM placements p WHERE p.task_id = t.id)
         ORDER BY t.created_index LIMIT ?1"
    })?;
    let rows = stmt.query_map(params![limit as i64], |r| {
        let spec: String = r.get(1)?;
        Ok((r.get::<_, String>(0)?, spec, r.get::<_, Option<String>>(2)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, spec, reason) = row?;
        if let Ok(spec) = serde_json::from_str(&spec) {
            out.push(PendingTask { id, spec, reason });
        }
    }
    Ok(out)
}

/// A registered node with what holdfast has reserved on it.
#[derive(Clone, Debug, Serialize)]
pub struct NodeRow {
    /// Node name.
    pub name: String,
    /// Advertised address.
    pub address: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Liveness as last committed by the leader: ready, disconnected, down.
    pub status: String,
    /// Last move between ready and not ready, ms since the epoch.
    pub status_since_ms: u64,
    /// Whether it is being drained.
    pub draining: bool,
    /// When a drain stops whatever is left, if set.
    pub drain_deadline_ms: Option<u64>,
    /// Whether it takes new placements.
    pub eligible: bool,
    /// Total CPU, millicores.
    pub cpu_millis: u64,
    /// Total memory, MiB.
    pub memory_mb: u64,
    /// Total disk, MiB.
    pub disk_mb: u64,
    /// CPU reserved by live placements.
    pub reserved_cpu_millis: u64,
    /// Memory reserved by live placements.
    pub reserved_memory_mb: u64,
    /// Disk reserved by live placements.
    pub reserved_disk_mb: u64,
    /// Live placements.
    pub placements: u64,
    /// Registration time.
    pub registered_ms: u64,
}

/// Nodes after `?1` by name, at most `?2`, each with what its live placements reserve.
/// Every column it reads of `placements` is in `placements_node_load`, so the sums are
/// an index-only scan: the planner runs this every round, over every placement, and
/// the table lookups were most of its cost at 100,000 placements (`COUNT(p.node)`,
/// not `COUNT(p.id)`: the id is not in that index).
const NODES_PAGE_SQL: &str = "SELECT n.name, n.address, n.labels, n.status, n.cpu_millis, n.memory_mb, n.disk_mb,
       n.registered_ms, COALESCE(SUM(p.cpu_millis),0), COALESCE(SUM(p.memory_mb),0), COALESCE(SUM(p.disk_mb),0),
       COUNT(p.node), n.status_since_ms, n.draining, n.drain_deadline_ms, n.eligible
     FROM nodes n LEFT JOIN placements p
       ON p.node = n.name AND p.desired = 'run' AND p.observed NOT IN ('failed','stopped','exited')
     WHERE n.name > ?1
     GROUP BY n.name ORDER BY n.name LIMIT ?2";

/// Every registered node with reservations.
pub fn nodes(conn: &Connection) -> rusqlite::Result<Vec<NodeRow>> {
    Ok(nodes_page(conn, None, usize::MAX)?.0)
}

/// At most `limit` nodes named after `after`, by name, and the cursor of the next
/// page (the last name) when more may follow.
pub fn nodes_page(
    conn: &Connection,
    after: Option<&str>,
    limit: usize,
) -> rusqlite::Result<(Vec<NodeRow>, Option<String>)> {
    let mut stmt = conn.prepare_cached(NODES_PAGE_SQL)?;
    let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![after.unwrap_or(""), fetch], |r| {
        let labels: String = r.get(2)?;
        Ok(NodeRow {
            name: r.get(0)?,
            address: r.get(1)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            status: r.get(3)?,
            cpu_millis: r.get::<_, i64>(4)? as u64,
            memory_mb: r.get::<_, i64>(5)? as u64,
            disk_mb: r.get::<_, i64>(6)? as u64,
            registered_ms: r.get::<_, i64>(7)? as u64,
            reserved_cpu_millis: r.get::<_, i64>(8)? as u64,
            reserved_memory_mb: r.get::<_, i64>(9)? as u64,
            reserved_disk_mb: r.get::<_, i64>(10)? as u64,
            placements: r.get::<_, i64>(11)? as u64,
            status_since_ms: r.get::<_, i64>(12)? as u64,
            draining: r.get(13)?,
            drain_deadline_ms: r.get::<_, Option<i64>>(14)?.map(|v| v as u64),
            eligible: r.get(15)?,
        })
    })?;
    let mut rows: Vec<NodeRow> = rows.collect::<Result<_, _>>()?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|n| n.name.clone())
    } else {
        None
    };
    Ok((rows, next))
}

/// The full desired set of one node: every placement it must run, or still stop.
pub fn assignments_for(conn: &Connection, node: &str) -> rusqlite::Result<Vec<Assignment>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.id, p.task_id, p.fence, p.desired, t.spec FROM placements p JOIN tasks t ON t.id = p.task_id
         WHERE p.node = ?1 AND p.observed != 'stopped' ORDER BY p.fence, p.id",
    )?;
    let rows = stmt.query_map([node], |r| {
        let desired: String = r.get(3)?;
        let spec: String = r.get(4)?;
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, desired, spec))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (placement_id, task_id, fence, desired, spec) = row?;
        match serde_json::from_str(&spec) {
            Ok(spec) => out.push(Assignment {
                placement_id,
                task_id,
                fence: fence as u64,
                desired: Desired::from_stored(&desired),
                spec,
            }),
            // Not sent, so the worker never acts on a spec nobody can read; said loudly.
            Err(error) => {
                tracing::error!(%placement_id, %task_id, %error, "stored spec unreadable; placement not sent");
                metrics::counter!("holdfast_unreadable_specs_total").increment(1);
            }
        }
    }
    Ok(out)
}

/// What the replicated state holds about a node's registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Highest report sequence applied for it.
    pub last_seq: u64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Advertised address.
    pub address: String,
    /// Total CPU, millicores.
    pub cpu_millis: u64,
    /// Total memory, MiB.
    pub memory_mb: u64,
    /// Total disk, MiB.
    pub disk_mb: u64,
    /// Liveness status.
    pub status: String,
}

/// A node's registration, if it is registered.
pub fn node_registration(conn: &Connection, name: &str) -> rusqlite::Result<Option<Registration>> {
    conn.query_row_cached(
        "SELECT last_seq, labels, address, cpu_millis, memory_mb, disk_mb, status FROM nodes WHERE name = ?1",
        [name],
        |r| {
            let labels: String = r.get(1)?;
            Ok(Registration {
                last_seq: r.get::<_, i64>(0)? as u64,
                labels: serde_json::from_str(&labels).unwrap_or_default(),
                address: r.get(2)?,
                cpu_millis: r.get::<_, i64>(3)? as u64,
                memory_mb: r.get::<_, i64>(4)? as u64,
                disk_mb: r.get::<_, i64>(5)? as u64,
                status: r.get(6)?,
            })
        },
    )
    .optional()
}

/// A task whose current placement may need a replacement.
#[derive(Clone, Debug)]
pub struct ReplaceCandidate {
    /// Task id.
    pub task_id: String,
    /// Its spec.
    pub spec: TaskSpec,
    /// Its recorded pending reason.
    pub reason: Option<String>,
    /// The current placement.
    pub placement_id: String,
    /// Node of the current placement.
    pub node: String,
    /// Observed state of the current placement.
    pub observed: Observed,
    /// Exit code of the current placement.
    pub exit_code: Option<i64>,
    /// Last change of the current placement, ms since the epoch.
    pub updated_ms: u64,
    /// Node liveness status (`down` when the node is gone from the state).
    pub node_status: String,
    /// Since when the node has had that status.
    pub node_status_since_ms: u64,
    /// Whether the node is draining.
    pub node_draining: bool,
    /// The node's drain deadline, if any.
    pub drain_deadline_ms: Option<u64>,
    /// Placements the task has had so far.
    pub placements: u32,
    /// Nodes where earlier placements of the task failed.
    pub failed_on: Vec<String>,
    /// The current placement was refused by its worker's admission check.
    pub refused: bool,
}

/// Current placements that failed, sit on a silent node, or sit on a draining node.
pub fn replace_candidates(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<ReplaceCandidate>> {
    let mut stmt = conn.prepare_cached(
        "SELECT p.task_id, t.spec, t.pending_reason, p.id, p.node, p.observed, p.exit_code, p.updated_ms,
                COALESCE(n.status, 'down'), COALESCE(n.status_since_ms, 0), COALESCE(n.draining, 0), n.drain_deadline_ms,
                (SELECT COUNT(*) FROM placements q WHERE q.task_id = p.task_id),
                (SELECT group_concat(DISTINCT q.node) FROM placements q WHERE q.task_id = p.task_id AND q.observed = 'failed'),
                p.refused
         FROM placements p
         JOIN tasks t ON t.id = p.task_id
         LEFT JOIN nodes n ON n.name = p.node
         WHERE p.desired = 'run'
           AND (p.observed IN ('failed', 'exited')
                OR p.node IN (SELECT name FROM nodes WHERE status != 'ready' OR draining = 1))
           AND t.desired = 'run'
           AND NOT (p.observed = 'exited' AND COALESCE(p.exit_code, 1) = 0 AND COALESCE(n.status, '') = 'ready'
                    AND COALESCE(n.draining, 0) = 0)
           AND p.fence = (SELECT MAX(q.fence) FROM placements q WHERE q.task_id = p.task_id)
         LIMIT ?1",
    )?;
    let rows = stmt.query_map(params![limit as i64], |r| {
        let spec: String = r.get(1)?;
        let observed: String = r.get(5)?;
        let failed_on: Option<String> = r.get(13)?;
        let Ok(spec) = serde_json::from_str::<TaskSpec>(&spec) else {
            return Ok(None);
        };
        Ok(Some(ReplaceCandidate {
            task_id: r.get(0)?,
            spec,
            reason: r.get(2)?,
            placement_id: r.get(3)?,
            node: r.get(4)?,
            observed: Observed::parse(&observed).unwrap_or(Observed::Pending),
            exit_code: r.get(6)?,
            updated_ms: r.get::<_, i64>(7)? as u64,
            node_status: r.get(8)?,
            node_status_since_ms: r.get::<_, i64>(9)? as u64,
            node_draining: r.get(10)?,
            drain_deadline_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
            placements: r.get::<_, i64>(12)? as u32,
            failed_on: failed_on.map(|s| s.split(',').map(String::from).collect()).unwrap_or_default(),
            refused: r.get(14)?,
        }))
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.extend(row?);
    }
    Ok(out)
}

/// A node's history of status changes, oldest first.
pub fn node_events(conn: &Connection, node: &str) -> rusqlite::Result<Vec<EventView>> {
    let mut stmt = conn.prepare_cached("SELECT at_ms, what, detail FROM node_events WHERE node = ?1 ORDER BY id")?;
    let rows = stmt.query_map([node], |r| {
        Ok(EventView { at_ms: r.get::<_, i64>(0)? as u64, what: r.get(1)?, detail: r.get(2)? })
    })?;
    rows.collect()
}

/// One audited API call.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Raft index of the entry that recorded it.
    pub index: u64,
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// Caller.
    pub who: String,
    /// Method and route.
    pub action: String,
    /// Task, node or member concerned.
    pub subject: String,
    /// `ok` or the rejection code.
    pub result: String,
    /// Whom the caller said it acted for (`X-Holdfast-Actor`), as free text.
    pub on_behalf_of: Option<String>,
}

/// At most `limit` audit entries older than the cursor `after`, newest first, and the
/// cursor of the next page when more may follow (the row id of the last entry).
pub fn audit(conn: &Connection, after: Option<u64>, limit: usize) -> rusqlite::Result<(Vec<AuditEntry>, Option<u64>)> {
    let mut stmt = conn.prepare_cached(
        "SELECT log_index, at_ms, who, action, subject, result, on_behalf_of, id FROM audit
         WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
    )?;
    let cursor = after.map_or(i64::MAX, |a| i64::try_from(a).unwrap_or(i64::MAX));
    let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
    let rows = stmt.query_map(params![cursor, fetch], |r| {
        Ok((
            AuditEntry {
                index: r.get::<_, i64>(0)? as u64,
                at_ms: r.get::<_, i64>(1)? as u64,
                who: r.get(2)?,
                action: r.get(3)?,
                subject: r.get(4)?,
                result: r.get(5)?,
                on_behalf_of: r.get(6)?,
            },
            r.get::<_, i64>(7)? as u64,
        ))
    })?;
    let mut rows: Vec<(AuditEntry, u64)> = rows.collect::<Result<_, _>>()?;
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(_, id)| *id)
    } else {
        None
    };
    Ok((rows.into_iter().map(|(e, _)| e).collect(), next))
}

#[cfg(test)]
mod tests {
    use holdfast_raft::Apply;

    use super::*;
    use crate::manager::state::{Command, DomainState, PlannedPlacement};

    /// The API's placement JSON keeps the status fields at the top level, between
    /// `desired` and `current`, as before they were one struct; history is left out
    /// when empty and shown when present.
    #[test]
    fn a_placement_view_keeps_its_json() {
        let mut view = PlacementView {
            id: "p1.12".into(),
            node: "w1".into(),
            fence: 12,
            desired: Desired::Run,
            status: PlacementStatus {
                observed: Observed::Exited,
                exit_code: Some(0),
                reason: Some("exited with code 0".into()),
                restarts: 1,
                endpoints: vec!["10.0.0.5:32768".into()],
                container_id: Some("c0ffee".into()),
            },
            current: true,
            node_status: "ready".into(),
            created_ms: 10,
            updated_ms: 20,
            events: Vec::new(),
            events_dropped: 0,
        };
        let json = concat!(
            r#"{"id":"p1.12","node":"w1","fence":12,"desired":"run","observed":"exited","exit_code":0,"#,
            r#""reason":"exited with code 0","restarts":1,"endpoints":["10.0.0.5:32768"],"container_id":"c0ffee","#,
            r#""current":true,"node_status":"ready","created_ms":10,"updated_ms":20"#
        );
        assert_eq!(serde_json::to_string(&view).unwrap(), format!("{json}}}"));
        view.events.push(EventView { at_ms: 15, what: "fenced".into(), detail: None });
        view.events_dropped = 3;
        assert_eq!(
            serde_json::to_string(&view).unwrap(),
            format!(r#"{json},"events":[{{"at_ms":15,"what":"fenced","detail":null}}],"events_dropped":3}}"#)
        );
    }

    /// A state database filled through the real `apply`.
    fn state(cmds: &[Command]) -> Connection {
        let (domain, _applied) = DomainState::new();
        let mut conn = Connection::open_in_memory().expect("open");
        domain.init_schema(&conn).expect("schema");
        let tx = conn.transaction().expect("tx");
        for (i, c) in cmds.iter().enumerate() {
            domain.apply(&tx, i as u64 + 1, &serde_json::to_vec(c).expect("json")).expect("apply");
        }
        tx.commit().expect("commit");
        conn
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

    fn submit(id: &str) -> Command {
        Command::SubmitTask {
            id: id.into(),
            spec: Box::new(serde_json::from_str(r#"{"image":"holdfast/echo:latest"}"#).expect("spec")),
            idempotency_key: None,
            now_ms: 2,
        }
    }

    fn audited(subject: &str) -> Command {
        Command::Audited {
            who: "admin (t1)".into(),
            on_behalf_of: None,
            action: "POST /v1/tasks".into(),
            subject: subject.into(),
            at_ms: 3,
            inner: None,
        }
    }

    #[test]
    fn node_pages_walk_every_node_once_by_name() {
        let conn = state(&["n3", "n1", "n5", "n2", "n4"].map(node));
        let (first, next) = nodes_page(&conn, None, 2).expect("page");
        assert_eq!(first.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["n1", "n2"]);
        assert_eq!(next.as_deref(), Some("n2"));
        let (second, next) = nodes_page(&conn, next.as_deref(), 2).expect("page");
        assert_eq!(second.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["n3", "n4"]);
        let (last, next) = nodes_page(&conn, next.as_deref(), 2).expect("page");
        assert_eq!(last.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["n5"]);
        assert_eq!(next, None);
        // An exact fit ends with no cursor; the unpaged list still has everything.
        assert_eq!(nodes_page(&conn, None, 5).expect("page").1, None);
        assert_eq!(nodes(&conn).expect("all").len(), 5);
    }

    #[test]
    fn audit_pages_walk_newest_first_without_gap_or_repeat() {
        let cmds: Vec<Command> = (0..7).map(|i| audited(&format!("t{i}"))).collect();
        let conn = state(&cmds);
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, next) = audit(&conn, after, 3).expect("page");
            assert!(page.len() <= 3);
            seen.extend(page.into_iter().map(|e| e.subject));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, ["t6", "t5", "t4", "t3", "t2", "t1", "t0"]);
    }

    #[test]
    fn a_task_page_reads_placements_in_one_batch_and_filters_by_node() {
        let mut cmds = vec![node("a"), node("b")];
        for i in 0..6 {
            cmds.push(submit(&format!("t{i}")));
        }
        cmds.push(Command::ApplyPlan {
            placements: (0..4)
                .map(|i| PlannedPlacement {
                    task_id: format!("t{i}"),
                    node: if i % 2 == 0 { "a" } else { "b" }.into(),
                    replaces: None,
                })
                .collect(),
            unplaced: Vec::new(),
            now_ms: 4,
        });
        let conn = state(&cmds);
        let page = list_tasks(&conn, &TaskFilter { limit: 4, ..Default::default() }).expect("page");
        let got: Vec<(&str, usize, &str)> =
            page.tasks.iter().map(|t| (t.id.as_str(), t.placements.len(), t.state)).collect();
        assert_eq!(got, [("t5", 0, "pending"), ("t4", 0, "pending"), ("t3", 1, "starting"), ("t2", 1, "starting")]);
        assert!(page.tasks[2].placements[0].current && page.tasks[2].placements[0].node == "b");
        let rest = list_tasks(&conn, &TaskFilter { limit: 4, after: page.next, ..Default::default() }).expect("page");
        assert_eq!(rest.tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1", "t0"]);
        assert_eq!(rest.next, None);
        let on_a =
            list_tasks(&conn, &TaskFilter { limit: 10, node: Some("a".into()), ..Default::default() }).expect("page");
        assert_eq!(on_a.tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t2", "t0"]);
    }

    #[test]
    fn list_queries_use_their_indexes() {
        let conn = state(&[]);
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("plan");
            let rows: Vec<String> =
                stmt.query_map([], |r| r.get::<_, String>(3)).expect("rows").collect::<Result<_, _>>().expect("rows");
            rows.join("; ")
        };
        let page = plan(&format!(
            "SELECT {TASK_COLS} FROM tasks t WHERE created_index < 10 ORDER BY created_index DESC LIMIT 5"
        ));
        assert!(page.contains("tasks_created") && !page.contains("TEMP B-TREE"), "{page}");
        let named = plan(&format!(
            "SELECT {TASK_COLS} FROM tasks t WHERE created_index < 10 AND name = 'x' ORDER BY created_index DESC LIMIT 5"
        ));
        assert!(named.contains("tasks_name") && !named.contains("TEMP B-TREE"), "{named}");
        let batch = plan(&format!(
            "SELECT {PLACEMENT_COLS} FROM {PLACEMENT_FROM} WHERE p.task_id IN (SELECT value FROM json_each('[\"a\"]'))"
        ));
        assert!(batch.contains("placements_task") && !batch.contains("SCAN p"), "{batch}");
        let nodes = plan(&NODES_PAGE_SQL.replace("?1", "''").replace("?2", "10"));
        assert!(nodes.contains("COVERING INDEX placements_node_load"), "{nodes}");
        // Lookups by node go through an index that leads with it (there is no
        // `placements_node` of its own any more), never a scan of every placement.
        for sql in [
            "SELECT id, desired FROM placements WHERE node = 'a' AND observed NOT IN ('stopped') ORDER BY rowid",
            "SELECT id FROM placements WHERE node = 'a' AND desired = 'run' AND observed NOT IN ('failed','stopped','exited')",
            "SELECT p.id, t.spec FROM placements p JOIN tasks t ON t.id = p.task_id
             WHERE p.node = 'a' AND p.observed != 'stopped' ORDER BY p.fence, p.id",
        ] {
            let by_node = plan(sql);
            assert!(by_node.contains("USING") && by_node.contains("INDEX placements_node_"), "{sql}: {by_node}");
            assert!(!by_node.contains("SCAN p"), "{sql}: {by_node}");
        }
    }

    #[test]
    fn a_store_from_before_loses_the_redundant_node_index_on_open() {
        let (domain, _applied) = DomainState::new();
        let conn = Connection::open_in_memory().expect("open");
        domain.init_schema(&conn).expect("schema");
        conn.execute_batch("CREATE INDEX placements_node ON placements(node)").expect("the old index");
        domain.init_schema(&conn).expect("schema again");
        let left: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'placements_node'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(left, 0);
    }
}
