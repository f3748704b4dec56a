//! The replicated domain state: the one `Command` enum, the SQLite schema, and the one
//! `apply` match. Only this module writes the replicated database, and only in `apply`.

use std::collections::BTreeMap;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::model::sync::StatusReport;
use crate::model::{transition, Observed, TaskSpec};
use cached::Cached;

mod cached;
pub mod images;
pub mod outcome;
pub mod query;
pub mod retention;
pub mod tokens;
pub mod upgrade;

pub use outcome::{
    Answer, CaChange, Outcome, PlacementRefused, PlanApplied, RejectCode, Rejection, ReportIgnored, ReportsApplied,
    TaskSubmitted,
};

#[cfg(test)]
mod hostile;
pub mod trust;

/// Every replicated write.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// A new task (or a retry of one, under the same idempotency key).
    SubmitTask {
        /// Id chosen by the API handler.
        id: String,
        /// The validated spec.
        spec: Box<TaskSpec>,
        /// `Idempotency-Key` header, if given.
        idempotency_key: Option<String>,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Desired → stop for a task and all its placements.
    StopTask {
        /// Task id.
        id: String,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// A worker joined or changed its labels or capacity.
    RegisterNode {
        /// Node name.
        name: String,
        /// Advertised address.
        address: String,
        /// Labels.
        labels: BTreeMap<String, String>,
        /// Total CPU, millicores.
        cpu_millis: u64,
        /// Total memory, MiB.
        memory_mb: u64,
        /// Total disk on Docker's data root, MiB.
        disk_mb: u64,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// The scheduler's plan; re-checked here against the newest state.
    ApplyPlan {
        /// New placements.
        placements: Vec<PlannedPlacement>,
        /// Why each task the scheduler could not place stays pending.
        unplaced: Vec<(String, String)>,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Observed-state changes from many workers, batched by the leader.
    ReportStatus {
        /// Per node, its changes oldest first.
        batches: Vec<NodeReports>,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// The leader's liveness judgement changed (heartbeats themselves are not written).
    SetNodeStatus {
        /// Node name.
        name: String,
        /// `ready`, `disconnected` or `down`.
        status: String,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Start or end draining a node: no new placements; existing ones move away.
    DrainNode {
        /// Node name.
        name: String,
        /// `true` to drain, `false` to end draining.
        enable: bool,
        /// Placements still on the node at this time are stopped regardless.
        deadline_ms: Option<u64>,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// A mutating API call, recorded in the audit table with its result; `inner` is the
    /// command it made (none for calls that are not commands, e.g. membership changes).
    Audited {
        /// Caller: the authenticated token's name and id (`name (id)`).
        who: String,
        /// Free text from the `X-Holdfast-Actor` header: whom the caller says it acts
        /// for. Recorded as such, never as the actor.
        #[serde(default)]
        on_behalf_of: Option<String>,
        /// What was asked (`POST /v1/tasks`, ...).
        action: String,
        /// Task, node or member concerned.
        subject: String,
        /// Leader wall clock.
        at_ms: u64,
        /// The command, applied first; its outcome is the call's.
        inner: Option<Box<Command>>,
    },
    /// Tell placements to stop (a drain deadline passed with no room elsewhere).
    StopPlacements {
        /// Placement ids.
        ids: Vec<String>,
        /// Why, recorded in their history.
        reason: String,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Mark a node eligible or not for new placements (existing ones stay).
    SetEligibility {
        /// Node name.
        name: String,
        /// Eligibility.
        eligible: bool,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// A new API bearer token (only the digest of its secret travels and is stored).
    CreateToken {
        /// Token id, chosen by the API handler.
        id: String,
        /// Human name; the audit names callers by it.
        name: String,
        /// `admin`, `operator` or `reader`.
        role: String,
        /// Hex SHA-256 of the secret.
        secret_sha256: String,
        /// Expiry, ms since the epoch; `None` never expires.
        expires_ms: Option<u64>,
        /// Who created it (token name and id), or `bootstrap`.
        created_by: String,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Revoke an API token; every manager refuses it once applied.
    RevokeToken {
        /// Token id.
        id: String,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Join tokens, the cluster CA and revocations (`state::trust`).
    Trust(trust::TrustCommand),
    /// The image catalogue (`state::images`).
    Image(images::ImageCommand),
    /// The cluster feature level and gated commands (`state::upgrade`).
    Upgrade(upgrade::UpgradeCommand),
    /// Garbage collection and node removal (`state::retention`).
    Retention(retention::RetentionCommand),
}

/// Whether `s` follows the id rules shared by task, node, placement and token ids:
/// 1–64 characters of ASCII letters, digits, `-`, `_` and `.`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A report sequence number more than this far beyond the node's last applied one is
/// refused, not stored: a worker numbers its changes one by one, so such a jump can
/// only come from a corrupt or hostile report and would silence the node's real ones.
pub const MAX_SEQ_JUMP: u64 = 1_000_000;

/// One worker's reports inside a batch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeReports {
    /// Reporting node.
    pub node: String,
    /// Changes, oldest first.
    pub reports: Vec<StatusReport>,
}

/// A node's liveness, as the leader commits it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Heard from within the heartbeat TTL.
    Ready,
    /// Silent past the heartbeat TTL; its placements are unknown.
    Disconnected,
    /// Silent past the down threshold.
    Down,
}

impl NodeStatus {
    /// Its text, as stored in `nodes.status` and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Disconnected => "disconnected",
            NodeStatus::Down => "down",
        }
    }

    /// The status its stored text names, if any.
    pub fn parse(s: &str) -> Option<NodeStatus> {
        [NodeStatus::Ready, NodeStatus::Disconnected, NodeStatus::Down].into_iter().find(|n| n.as_str() == s)
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One placement in a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedPlacement {
    /// Task to place.
    pub task_id: String,
    /// Chosen node.
    pub node: String,
    /// Placement this one replaces (rescheduled, lost or drained); it is told to stop.
    #[serde(default)]
    pub replaces: Option<String>,
}

/// The manager's state machine, plugged into `holdfast-raft`.
pub struct DomainState {
    applied: watch::Sender<u64>,
    events: broadcast::Sender<DomainEvent>,
    /// Set when `apply` met an entry this build cannot apply (see `upgrade::NeedsUpgrade`).
    upgrade_required: std::sync::OnceLock<upgrade::NeedsUpgrade>,
    /// Events of applied commands whose transaction has not committed yet; sent by
    /// `committed`, so a listener never reads state older than an event it got.
    unsent: std::sync::Mutex<Vec<DomainEvent>>,
}

/// What a [`DomainEvent`] is about; its text is the SSE event name and the JSON `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// A task was created.
    #[serde(rename = "task.submitted")]
    TaskSubmitted,
    /// A task was told to stop.
    #[serde(rename = "task.stopped")]
    TaskStopped,
    /// A placement was made.
    #[serde(rename = "placement.created")]
    PlacementCreated,
    /// A worker reported a placement's state.
    #[serde(rename = "placement.observed")]
    PlacementObserved,
    /// A placement was told to stop (drain deadline).
    #[serde(rename = "placement.stop")]
    PlacementStop,
    /// A node registered or changed its labels or capacity.
    #[serde(rename = "node.registered")]
    NodeRegistered,
    /// A node's liveness changed.
    #[serde(rename = "node.status")]
    NodeStatus,
    /// A node's draining started or ended.
    #[serde(rename = "node.drain")]
    NodeDrain,
    /// A node's eligibility changed.
    #[serde(rename = "node.eligibility")]
    NodeEligibility,
    /// A node was removed from the cluster (`DELETE /v1/nodes/{id}`).
    #[serde(rename = "node.removed")]
    NodeRemoved,
    /// An image entered the catalogue.
    #[serde(rename = "image.pushed")]
    ImagePushed,
    /// An image left the catalogue.
    #[serde(rename = "image.removed")]
    ImageRemoved,
}

impl EventKind {
    /// Its text, e.g. `task.submitted`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TaskSubmitted => "task.submitted",
            EventKind::TaskStopped => "task.stopped",
            EventKind::PlacementCreated => "placement.created",
            EventKind::PlacementObserved => "placement.observed",
            EventKind::PlacementStop => "placement.stop",
            EventKind::NodeRegistered => "node.registered",
            EventKind::NodeStatus => "node.status",
            EventKind::NodeDrain => "node.drain",
            EventKind::NodeEligibility => "node.eligibility",
            EventKind::NodeRemoved => "node.removed",
            EventKind::ImagePushed => "image.pushed",
            EventKind::ImageRemoved => "image.removed",
        }
    }
}

/// Something that happened to the domain state, emitted by `apply` on every manager
/// after a command took effect (at least once: a retried report may repeat).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DomainEvent {
    /// Raft index of the command.
    pub index: u64,
    /// Wall clock of the command (leader's), ms since the epoch.
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// Id of the task, placement or node concerned.
    pub subject: String,
    /// Details, by kind.
    pub detail: serde_json::Value,
}

/// Events kept for slow subscribers before they start missing some.
pub const EVENT_BUFFER: usize = 4_096;

fn events_for(index: u64, cmd: &Command, out: &Answer) -> Vec<DomainEvent> {
    let ev = |at_ms: u64, kind: EventKind, subject: &str, detail: serde_json::Value| DomainEvent {
        index,
        at_ms,
        kind,
        subject: subject.to_string(),
        detail,
    };
    match (cmd, out) {
        (Command::SubmitTask { spec, now_ms, .. }, Answer::Submitted(TaskSubmitted { id, created: true })) => {
            vec![ev(
                *now_ms,
                EventKind::TaskSubmitted,
                id,
                serde_json::json!({ "name": spec.display_name(), "image": spec.image }),
            )]
        }
        (Command::SubmitTask { .. }, _) => Vec::new(),
        (Command::StopTask { id, now_ms }, _) => vec![ev(*now_ms, EventKind::TaskStopped, id, serde_json::Value::Null)],
        (Command::RegisterNode { name, address, now_ms, .. }, _) => {
            vec![ev(*now_ms, EventKind::NodeRegistered, name, serde_json::json!({ "address": address }))]
        }
        (Command::ApplyPlan { placements, now_ms, .. }, Answer::Planned(plan)) => plan
            .placed
            .iter()
            .zip(&plan.planned)
            .filter_map(|(pid, &i)| {
                placements.get(i).map(|p| {
                    ev(
                        *now_ms,
                        EventKind::PlacementCreated,
                        pid,
                        serde_json::json!({
                            "task_id": p.task_id, "node": p.node, "fence": index, "replaces": p.replaces,
                        }),
                    )
                })
            })
            .collect(),
        (Command::ApplyPlan { .. }, _) => Vec::new(),
        (Command::ReportStatus { batches, now_ms }, _) => batches
            .iter()
            .flat_map(|b| {
                b.reports.iter().map(move |r| {
                    ev(
                        *now_ms,
                        EventKind::PlacementObserved,
                        &r.placement_id,
                        serde_json::json!({
                            "task_id": r.task_id, "node": b.node, "observed": r.status.observed, "exit_code": r.status.exit_code,
                            "reason": r.status.reason, "restarts": r.status.restarts, "story": r.story,
                        }),
                    )
                })
            })
            .collect(),
        (Command::SetNodeStatus { name, status, now_ms }, _) => {
            vec![ev(*now_ms, EventKind::NodeStatus, name, serde_json::json!({ "status": status }))]
        }
        (Command::DrainNode { name, enable, deadline_ms, now_ms }, _) => {
            vec![ev(
                *now_ms,
                EventKind::NodeDrain,
                name,
                serde_json::json!({ "enable": enable, "deadline_ms": deadline_ms }),
            )]
        }
        (Command::SetEligibility { name, eligible, now_ms }, _) => {
            vec![ev(*now_ms, EventKind::NodeEligibility, name, serde_json::json!({ "eligible": eligible }))]
        }
        (Command::StopPlacements { ids, reason, now_ms }, _) => ids
            .iter()
            .map(|id| ev(*now_ms, EventKind::PlacementStop, id, serde_json::json!({ "reason": reason })))
            .collect(),
        // Its inner command emits its own events.
        (Command::Audited { .. } | Command::Trust(_), _) => Vec::new(),
        (Command::Image(c), out) => images::events_for(c, out)
            .into_iter()
            .map(|(at, kind, subject, detail)| ev(at, kind, &subject, detail))
            .collect(),
        (Command::Retention(retention::RetentionCommand::RemoveNode { name, force, now_ms }), _) => {
            vec![ev(*now_ms, EventKind::NodeRemoved, name, serde_json::json!({ "force": force }))]
        }
        (Command::Upgrade(_) | Command::Retention(_), _) => Vec::new(),
        // Not domain events, and readers (who may follow the stream) may not list
        // tokens; the audit log records them for admins.
        (Command::CreateToken { .. } | Command::RevokeToken { .. }, _) => Vec::new(),
    }
}

impl DomainState {
    /// A state machine and a receiver that sees the index of every applied command
    /// (long-polls and leader loops wait on it).
    pub fn new() -> (Arc<Self>, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let state = DomainState {
            applied: tx,
            events,
            upgrade_required: std::sync::OnceLock::new(),
            unsent: std::sync::Mutex::new(Vec::new()),
        };
        (Arc::new(state), rx)
    }

    /// Why this member stopped applying, when it met an entry that needs a feature level
    /// this build does not support (Raft has stopped; a new binary is the way on).
    pub fn upgrade_required(&self) -> Option<&upgrade::NeedsUpgrade> {
        self.upgrade_required.get()
    }

    /// The sender of domain events; subscribe to it for the event stream and sinks.
    pub fn events(&self) -> broadcast::Sender<DomainEvent> {
        self.events.clone()
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    desired TEXT NOT NULL,
    idem_key TEXT UNIQUE,
    digest TEXT NOT NULL,
    pending_reason TEXT,
    created_index INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    id TEXT PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES tasks(id),
    node TEXT NOT NULL,
    fence INTEGER NOT NULL,
    desired TEXT NOT NULL,
    observed TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    endpoints TEXT NOT NULL DEFAULT '[]',
    container_id TEXT,
    refused INTEGER NOT NULL DEFAULT 0,
    cpu_millis INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_mb INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS placements_task ON placements(task_id);
CREATE INDEX IF NOT EXISTS placements_observed ON placements(observed);
CREATE INDEX IF NOT EXISTS tasks_unplanned ON tasks(created_index) WHERE pending_reason IS NULL AND desired = 'run';
-- List pages (query::list_tasks): newest first from a cursor, by name, by node.
CREATE INDEX IF NOT EXISTS tasks_created ON tasks(created_index);
CREATE INDEX IF NOT EXISTS tasks_name ON tasks(name, created_index);
CREATE INDEX IF NOT EXISTS placements_node_task ON placements(node, task_id);
-- What a node's live placements reserve, read without the table (query::NODES_PAGE_SQL).
CREATE INDEX IF NOT EXISTS placements_node_load ON placements(node, desired, observed, cpu_millis, memory_mb, disk_mb);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    labels TEXT NOT NULL,
    cpu_millis INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_mb INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_since_ms INTEGER NOT NULL DEFAULT 0,
    draining INTEGER NOT NULL DEFAULT 0,
    drain_deadline_ms INTEGER,
    eligible INTEGER NOT NULL DEFAULT 1,
    last_seq INTEGER NOT NULL DEFAULT 0,
    registered_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS placement_events (
    id INTEGER PRIMARY KEY,
    placement_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    observed TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS placement_events_p ON placement_events(placement_id);
CREATE TABLE IF NOT EXISTS node_events (
    id INTEGER PRIMARY KEY,
    node TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    what TEXT NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS node_events_n ON node_events(node);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    log_index INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    result TEXT NOT NULL,
    on_behalf_of TEXT
);
"#;

impl DomainState {
    /// Applies one command inside its own savepoint and emits its events.
    fn apply_one(&self, tx: &Transaction<'_>, index: u64, cmd: Command) -> rusqlite::Result<Outcome> {
        // Rejections roll back this command's partial writes but still consume it.
        tx.execute_cached("SAVEPOINT cmd", [])?;
        // Cheap next to the SQLite work, and only needed when someone listens.
        let listening = self.events.receiver_count() > 0;
        let kept = listening.then(|| cmd.clone());
        let out = match check_command(&cmd) {
            Some(r) => Err(r),
            None => match apply_command(tx, index, cmd) {
                Ok(out) => out,
                // Belt and braces: a constraint the checks above missed is still the
                // command's content at fault, never the storage's, so it is a rejection.
                Err(e) if is_content_error(&e) => Err(Rejection::new(RejectCode::Conflict, e.to_string())),
                Err(e) => {
                    if let rusqlite::Error::UserFunctionError(inner) = &e {
                        if let Some(stop) = inner.downcast_ref::<upgrade::NeedsUpgrade>() {
                            let _ = self.upgrade_required.set(stop.clone());
                        }
                    }
                    return Err(e);
                }
            },
        };
        if out.is_err() {
            tx.execute_cached("ROLLBACK TO cmd", [])?;
        }
        if let (Some(cmd), Ok(v)) = (kept, &out) {
            crate::lock(&self.unsent).extend(events_for(index, &cmd, v));
        }
        tx.execute_cached("RELEASE cmd", [])?;
        Ok(out)
    }
}

impl holdfast_raft::Apply for DomainState {
    fn init_schema(&self, conn: &rusqlite::Connection) -> rusqlite::Result<()> {
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(tokens::SCHEMA)?;
        conn.execute_batch(trust::SCHEMA)?;
        conn.execute_batch(images::SCHEMA)?;
        conn.execute_batch(upgrade::SCHEMA)?;
        conn.execute_batch(retention::SCHEMA)?;
        // Added after the first release: a store from before gets the column on open.
        let has: bool = conn.query_row_cached(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('audit') WHERE name = 'on_behalf_of'",
            [],
            |r| r.get(0),
        )?;
        if !has {
            conn.execute_batch("ALTER TABLE audit ADD COLUMN on_behalf_of TEXT")?;
        }
        // `placements_node (node)` until this release: `placements_node_task` and
        // `placements_node_load` lead with `node` too and serve every lookup by node,
        // so it only cost a B-tree write per placement (ARCHITECTURE.md, "Decisions").
        // Local storage only: a member that still has it writes the same rows, since
        // every apply-path query whose row order shows says `ORDER BY`.
        conn.execute_batch("DROP INDEX IF EXISTS placements_node")?;
        Ok(())
    }

    fn apply(&self, tx: &Transaction<'_>, index: u64, command: &[u8]) -> rusqlite::Result<Vec<u8>> {
        let outcome: Outcome = match serde_json::from_slice::<Command>(command) {
            Err(e) => Err(Rejection::new(RejectCode::BadCommand, e.to_string())),
            // The envelope's own fields are checked before anything is written.
            Ok(cmd @ Command::Audited { .. }) if check_command(&cmd).is_some() => {
                Err(check_command(&cmd).unwrap_or_else(|| Rejection::new(RejectCode::Invalid, "")))
            }
            Ok(Command::Audited { who, on_behalf_of, action, subject, at_ms, inner }) => {
                let out = match inner {
                    Some(cmd) => self.apply_one(tx, index, *cmd)?,
                    None => Ok(Answer::Nothing),
                };
                // Outside the command's savepoint: a rejected call is audited too.
                let result = match &out {
                    Ok(_) => "ok",
                    Err(r) => r.code.as_str(),
                };
                tx.execute_cached(
                    "INSERT INTO audit (log_index, at_ms, who, action, subject, result, on_behalf_of)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        index as i64,
                        at_ms.min(i64::MAX as u64) as i64,
                        who,
                        action,
                        subject,
                        result,
                        on_behalf_of
                    ],
                )?;
                out
            }
            Ok(cmd) => self.apply_one(tx, index, cmd)?,
        };
        Ok(serde_json::to_vec(&outcome).unwrap_or_default())
    }

    fn committed(&self, index: u64) {
        // Taken out of the lock before sending: a send never waits, but keep it short.
        let unsent = std::mem::take(&mut *crate::lock(&self.unsent));
        for e in unsent {
            let _ = self.events.send(e);
        }
        self.applied.send_replace(index);
    }
}

fn reject(code: RejectCode, message: impl Into<String>) -> rusqlite::Result<Outcome> {
    Ok(Err(Rejection::new(code, message)))
}

/// SQLite errors that a command's content can cause (a UNIQUE or CHECK constraint, a
/// value too big); anything else is the storage failing.
fn is_content_error(e: &rusqlite::Error) -> bool {
    use rusqlite::ffi::ErrorCode;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => matches!(f.code, ErrorCode::ConstraintViolation | ErrorCode::TooBig),
        rusqlite::Error::ToSqlConversionFailure(_) | rusqlite::Error::IntegralValueOutOfRange(..) => true,
        _ => false,
    }
}

/// Longest free text (reasons, addresses, audit fields) a command may carry.
const MAX_TEXT: usize = 4_096;
/// Most items (placements, reports, ids, labels) one command may carry.
const MAX_ITEMS: usize = 100_000;
/// Largest number stored in an INTEGER column (SQLite integers are signed 64-bit).
const MAX_INT: u64 = i64::MAX as u64;

fn invalid(message: impl Into<String>) -> Option<Rejection> {
    Some(Rejection::new(RejectCode::Invalid, message))
}

/// Checks of a command's content that need no database: ids, sizes, numbers, and the
/// task spec validated again (whatever path the command came by). `None` when sound.
fn check_command(cmd: &Command) -> Option<Rejection> {
    let id = |what: &str, v: &str| (!valid_id(v)).then(|| invalid(format!("{what} {v:?} is not a valid id"))).flatten();
    let text = |what: &str, v: &str| {
        (v.len() > MAX_TEXT).then(|| invalid(format!("{what} is longer than {MAX_TEXT} bytes"))).flatten()
    };
    let num = |what: &str, v: u64| (v > MAX_INT).then(|| invalid(format!("{what} {v} is out of range"))).flatten();
    let many =
        |what: &str, n: usize| (n > MAX_ITEMS).then(|| invalid(format!("more than {MAX_ITEMS} {what}"))).flatten();
    match cmd {
        Command::SubmitTask { id: tid, spec, idempotency_key, now_ms } => id("task id", tid)
            .or_else(|| num("now_ms", *now_ms))
            .or_else(|| {
                idempotency_key
                    .as_ref()
                    .filter(|k| k.is_empty() || k.len() > 128)
                    .and_then(|_| invalid("Idempotency-Key must be 1–128 characters"))
            })
            .or_else(|| spec.validate().err().and_then(|e| invalid(format!("{}: {}", e.field, e.message)))),
        Command::StopTask { id: tid, now_ms } => id("task id", tid).or_else(|| num("now_ms", *now_ms)),
        Command::RegisterNode { name, address, labels, cpu_millis, memory_mb, disk_mb, now_ms } => {
            id("node name", name)
                .or_else(|| text("address", address))
                .or_else(|| many("labels", labels.len()))
                .or_else(|| labels.iter().find_map(|(k, v)| text("label", k).or_else(|| text("label", v))))
                .or_else(|| num("cpu_millis", *cpu_millis))
                .or_else(|| num("memory_mb", *memory_mb))
                .or_else(|| num("disk_mb", *disk_mb))
                .or_else(|| num("now_ms", *now_ms))
        }
        Command::ApplyPlan { placements, unplaced, now_ms } => many("placements", placements.len())
            .or_else(|| many("unplaced tasks", unplaced.len()))
            .or_else(|| {
                placements.iter().find_map(|p| {
                    id("task id", &p.task_id)
                        .or_else(|| id("node name", &p.node))
                        .or_else(|| p.replaces.as_deref().and_then(|r| id("placement id", r)))
                })
            })
            .or_else(|| unplaced.iter().find_map(|(t, why)| text("task id", t).or_else(|| text("reason", why))))
            .or_else(|| num("now_ms", *now_ms)),
        // Reports are checked one by one in `apply`: one bad report must not cost the
        // other nodes' reports batched with it.
        Command::ReportStatus { batches, now_ms } => many("batches", batches.len()).or_else(|| num("now_ms", *now_ms)),
        Command::SetNodeStatus { name, status, now_ms } => {
            id("node name", name).or_else(|| text("status", status)).or_else(|| num("now_ms", *now_ms))
        }
        Command::DrainNode { name, deadline_ms, now_ms, .. } => id("node name", name)
            .or_else(|| deadline_ms.and_then(|d| num("deadline_ms", d)))
            .or_else(|| num("now_ms", *now_ms)),
        Command::Audited { who, on_behalf_of, action, subject, at_ms, .. } => text("who", who)
            .or_else(|| text("action", action))
            .or_else(|| text("subject", subject))
            .or_else(|| on_behalf_of.as_deref().and_then(|o| text("on_behalf_of", o)))
            .or_else(|| num("at_ms", *at_ms)),
        Command::StopPlacements { ids, reason, now_ms } => many("placement ids", ids.len())
            .or_else(|| ids.iter().find_map(|p| id("placement id", p)))
            .or_else(|| text("reason", reason))
            .or_else(|| num("now_ms", *now_ms)),
        Command::SetEligibility { name, now_ms, .. } => id("node name", name).or_else(|| num("now_ms", *now_ms)),
        Command::CreateToken { created_by, now_ms, .. } => {
            text("created_by", created_by).or_else(|| num("now_ms", *now_ms))
        }
        Command::RevokeToken { id: tid, now_ms } => id("token id", tid).or_else(|| num("now_ms", *now_ms)),
        // Hashes, roles and PEM are checked by `trust::apply` itself; names and clocks here.
        Command::Trust(trust::TrustCommand::SetCa { .. }) => None,
        Command::Trust(trust::TrustCommand::AddJoinToken { now_ms, expires_at_ms, .. }) => {
            num("now_ms", *now_ms).or_else(|| expires_at_ms.and_then(|e| num("expires_at_ms", e)))
        }
        Command::Trust(trust::TrustCommand::UseJoinToken { node, now_ms, .. }) => {
            id("node name", node).or_else(|| num("now_ms", *now_ms))
        }
        Command::Trust(trust::TrustCommand::RotateCa { now_ms, .. }) => num("now_ms", *now_ms),
        Command::Trust(trust::TrustCommand::FinishCaRotation { now_ms }) => num("now_ms", *now_ms),
        Command::Trust(trust::TrustCommand::CaHeld { node, now_ms, .. }) => {
            id("node name", node).or_else(|| num("now_ms", *now_ms))
        }
        Command::Trust(trust::TrustCommand::RevokeNode { node, reason, now_ms }) => {
            id("node name", node).or_else(|| text("reason", reason)).or_else(|| num("now_ms", *now_ms))
        }
        // References, digests and sizes are checked by `images::apply` itself.
        Command::Image(_) => None,
        Command::Upgrade(u) => upgrade::check(u),
        Command::Retention(r) => retention::check(r),
    }
}

/// Why one report cannot be applied, judged on its content alone.
fn check_report(r: &StatusReport, last_seq: u64) -> Option<String> {
    if r.seq > last_seq.saturating_add(MAX_SEQ_JUMP) || r.seq > MAX_INT {
        return Some(format!("seq {} is far beyond the node's last one ({last_seq}); refused", r.seq));
    }
    if !valid_id(&r.placement_id) || !valid_id(&r.task_id) {
        return Some("report names an invalid placement or task id".into());
    }
    if r.fence > MAX_INT || r.at_ms > MAX_INT {
        return Some("report fence or time out of range".into());
    }
    let long = |s: &Option<String>| s.as_ref().is_some_and(|s| s.len() > MAX_TEXT);
    if long(&r.status.reason)
        || long(&r.status.container_id)
        || r.story.as_ref().is_some_and(|s| s.as_str().len() > MAX_TEXT)
        || r.status.endpoints.len() > 64
    {
        return Some("report text too long".into());
    }
    None
}

/// The one `match`: each command kind to its function.
fn apply_command(tx: &Transaction<'_>, index: u64, cmd: Command) -> rusqlite::Result<Outcome> {
    match cmd {
        Command::SubmitTask { id, spec, idempotency_key, now_ms } => {
            submit_task(tx, index, id, &spec, idempotency_key, now_ms)
        }
        Command::StopTask { id, now_ms } => stop_task(tx, id, now_ms),
        Command::RegisterNode { name, address, labels, cpu_millis, memory_mb, disk_mb, now_ms } => {
            let capacity = (cpu_millis, memory_mb, disk_mb);
            register_node(tx, name, &address, &labels, capacity, now_ms)
        }
        Command::ApplyPlan { placements, unplaced, now_ms } => apply_plan(tx, index, placements, unplaced, now_ms),
        Command::ReportStatus { batches, now_ms } => report_status(tx, batches, now_ms),
        Command::SetNodeStatus { name, status, now_ms } => set_status(tx, name, status, now_ms),
        Command::DrainNode { name, enable, deadline_ms, now_ms } => drain_node(tx, name, enable, deadline_ms, now_ms),
        Command::Audited { .. } => reject(RejectCode::BadCommand, "an audited command cannot be nested"),
        Command::CreateToken { id, name, role, secret_sha256, expires_ms, created_by, now_ms } => {
            tokens::create(tx, &id, &name, &role, &secret_sha256, &created_by, expires_ms, now_ms)
        }
        Command::RevokeToken { id, now_ms } => tokens::revoke(tx, &id, now_ms),
        Command::Trust(t) => trust::apply(tx, t),
        Command::Image(c) => images::apply(tx, c),
        Command::Upgrade(u) => upgrade::apply(tx, index, u, upgrade::build_level()),
        Command::Retention(r) => retention::apply(tx, r),
        Command::StopPlacements { ids, reason, now_ms } => stop_placements(tx, ids, &reason, now_ms),
        Command::SetEligibility { name, eligible, now_ms } => set_eligibility(tx, name, eligible, now_ms),
    }
}

fn submit_task(
    tx: &Transaction<'_>,
    index: u64,
    id: String,
    spec: &TaskSpec,
    idempotency_key: Option<String>,
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    // One serialization serves the stored spec and its digest.
    let spec_json = serde_json::to_string(spec).unwrap_or_default();
    let digest = TaskSpec::digest_of_json(spec_json.as_bytes());
    if let Some(key) = &idempotency_key {
        let existing: Option<(String, String)> = tx
            .query_row_cached("SELECT id, digest FROM tasks WHERE idem_key = ?1", [key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((existing_id, existing_digest)) = existing {
            if existing_digest == digest {
                return Ok(Ok(Answer::Submitted(TaskSubmitted { id: existing_id, created: false })));
            }
            return reject(
                RejectCode::Conflict,
                format!("Idempotency-Key {key:?} was already used for task {existing_id} with a different spec"),
            );
        }
    }
    let exists: bool = tx.query_row_cached("SELECT EXISTS(SELECT 1 FROM tasks WHERE id = ?1)", [&id], |r| r.get(0))?;
    if exists {
        return reject(RejectCode::Conflict, format!("a task with id {id} already exists"));
    }
    tx.execute_cached(
        "INSERT INTO tasks (id, name, spec, desired, idem_key, digest, pending_reason, created_index, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, 'run', ?4, ?5, NULL, ?6, ?7, ?7)",
        params![id, spec.display_name(), spec_json, idempotency_key, digest, index as i64, now_ms as i64],
    )?;
    Ok(Ok(Answer::Submitted(TaskSubmitted { id, created: true })))
}

fn stop_task(tx: &Transaction<'_>, id: String, now_ms: u64) -> rusqlite::Result<Outcome> {
    let n = tx.execute_cached(
        "UPDATE tasks SET desired = 'stop', updated_ms = ?2 WHERE id = ?1",
        params![id, now_ms as i64],
    )?;
    if n == 0 {
        return reject(RejectCode::NotFound, format!("no task with id {id}"));
    }
    tx.execute_cached(
        "UPDATE placements SET desired = 'stop', updated_ms = ?2 WHERE task_id = ?1 AND desired = 'run'",
        params![id, now_ms as i64],
    )?;
    Ok(Ok(Answer::TaskStopped { id }))
}

/// `capacity` is (CPU millicores, memory MiB, disk MiB).
fn register_node(
    tx: &Transaction<'_>,
    name: String,
    address: &str,
    labels: &BTreeMap<String, String>,
    (cpu_millis, memory_mb, disk_mb): (u64, u64, u64),
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    let labels = serde_json::to_string(labels).unwrap_or_default();
    tx.execute_cached(
        "INSERT INTO nodes (name, address, labels, cpu_millis, memory_mb, disk_mb, status, status_since_ms, registered_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'ready', ?7, ?7, ?7)
         ON CONFLICT(name) DO UPDATE SET address = ?2, labels = ?3, cpu_millis = ?4, memory_mb = ?5,
           disk_mb = ?6, updated_ms = ?7",
        params![name, address, labels, cpu_millis as i64, memory_mb as i64, disk_mb as i64, now_ms as i64],
    )?;
    set_node_status(tx, &name, NodeStatus::Ready, now_ms)?;
    Ok(Ok(Answer::NodeRegistered { name }))
}

fn apply_plan(
    tx: &Transaction<'_>,
    index: u64,
    placements: Vec<PlannedPlacement>,
    unplaced: Vec<(String, String)>,
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    let mut answer = PlanApplied { placed: Vec::new(), refused: Vec::new(), planned: Vec::new() };
    for (i, p) in placements.into_iter().enumerate() {
        match recheck_placement(tx, &p)? {
            Err(reason) => answer.refused.push(PlacementRefused { task_id: p.task_id, reason }),
            Ok(spec) => {
                answer.placed.push(create_placement(tx, index, i, &p, &spec, now_ms)?);
                answer.planned.push(i);
            }
        }
    }
    for (task_id, reason) in unplaced {
        tx.execute_cached(
            "UPDATE tasks SET pending_reason = ?2 WHERE id = ?1 AND desired = 'run'",
            params![task_id, reason],
        )?;
    }
    Ok(Ok(Answer::Planned(answer)))
}

/// Writes the `i`th placement of the plan at `index` (re-checked already) and tells the
/// placement it replaces to stop; its id.
fn create_placement(
    tx: &Transaction<'_>,
    index: u64,
    i: usize,
    p: &PlannedPlacement,
    spec: &TaskSpec,
    now_ms: u64,
) -> rusqlite::Result<String> {
    // One command may place many tasks; the fence is this command's index for all of
    // them (it only has to grow per task).
    let pid = format!("{}.{}.{}", p.task_id, index, i);
    tx.execute_cached(
        "INSERT INTO placements (id, task_id, node, fence, desired, observed, cpu_millis, memory_mb, disk_mb, created_ms, updated_ms)
         VALUES (?1, ?2, ?3, ?4, 'run', 'pending', ?5, ?6, ?7, ?8, ?8)",
        params![
            pid,
            p.task_id,
            p.node,
            index as i64,
            spec.resources.cpu_millis as i64,
            spec.resources.memory_mb as i64,
            spec.resources.disk_mb as i64,
            now_ms as i64
        ],
    )?;
    tx.execute_cached(
        "UPDATE tasks SET pending_reason = NULL, updated_ms = ?2 WHERE id = ?1",
        params![p.task_id, now_ms as i64],
    )?;
    event(tx, &pid, now_ms, "placed", Some(&format!("on {} with fence {index}", p.node)))?;
    if let Some(old) = &p.replaces {
        tx.execute_cached(
            "UPDATE placements SET desired = 'stop', updated_ms = ?2 WHERE id = ?1",
            params![old, now_ms as i64],
        )?;
        event(tx, old, now_ms, "replaced", Some(&format!("by {pid} on {}", p.node)))?;
    }
    Ok(pid)
}

fn report_status(tx: &Transaction<'_>, batches: Vec<NodeReports>, now_ms: u64) -> rusqlite::Result<Outcome> {
    let mut answer = ReportsApplied { acked: BTreeMap::new(), ignored: Vec::new() };
    for NodeReports { node, reports } in batches {
        let last_seq: Option<i64> =
            tx.query_row_cached("SELECT last_seq FROM nodes WHERE name = ?1", [&node], |r| r.get(0)).optional()?;
        let Some(last_seq) = last_seq.map(|s| s as u64) else {
            answer.ignored.push(ReportIgnored { node, seq: None, reason: "node is not registered".into() });
            continue;
        };
        if !valid_id(&node) || reports.len() > MAX_ITEMS {
            let reason = "invalid node name or too many reports".into();
            answer.ignored.push(ReportIgnored { node, seq: None, reason });
            continue;
        }
        let last_seq = apply_node_reports(tx, &node, reports, last_seq, now_ms, &mut answer.ignored)?;
        tx.execute_cached("UPDATE nodes SET last_seq = ?2 WHERE name = ?1", params![node, last_seq as i64])?;
        answer.acked.insert(node, last_seq);
    }
    Ok(Ok(Answer::Reported(answer)))
}

/// Applies one node's reports after `last_seq`, at most once each; the new last
/// sequence number. What it cannot apply goes to `ignored`.
fn apply_node_reports(
    tx: &Transaction<'_>,
    node: &str,
    reports: Vec<StatusReport>,
    mut last_seq: u64,
    now_ms: u64,
    ignored: &mut Vec<ReportIgnored>,
) -> rusqlite::Result<u64> {
    for r in reports {
        if r.seq <= last_seq {
            continue; // delivered before: exactly-once effect
        }
        let ignore = |reason: String| ReportIgnored { node: node.to_string(), seq: Some(r.seq), reason };
        if let Some(why) = check_report(&r, last_seq) {
            // Not stored and `last_seq` does not move: the node's real reports still apply.
            ignored.push(ignore(why));
            continue;
        }
        last_seq = r.seq;
        if let Err(why) = apply_report(tx, node, &r, now_ms)? {
            ignored.push(ignore(why));
        }
    }
    Ok(last_seq)
}

fn set_status(tx: &Transaction<'_>, name: String, status: String, now_ms: u64) -> rusqlite::Result<Outcome> {
    let Some(parsed) = NodeStatus::parse(&status) else {
        return reject(RejectCode::Invalid, format!("unknown node status {status:?}"));
    };
    if !set_node_status(tx, &name, parsed, now_ms)? {
        return reject(RejectCode::NotFound, format!("no node named {name}"));
    }
    Ok(Ok(Answer::NodeStatusSet { name, status }))
}

fn drain_node(
    tx: &Transaction<'_>,
    name: String,
    enable: bool,
    deadline_ms: Option<u64>,
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    let n = tx.execute_cached(
        "UPDATE nodes SET draining = ?2, drain_deadline_ms = ?3, updated_ms = ?4 WHERE name = ?1",
        params![name, enable, deadline_ms.map(|d| d as i64), now_ms as i64],
    )?;
    if n == 0 {
        return reject(RejectCode::NotFound, format!("no node named {name}"));
    }
    node_event(tx, &name, now_ms, if enable { "drain-started" } else { "drain-ended" }, None)?;
    Ok(Ok(Answer::Drain { name, draining: enable }))
}

fn stop_placements(tx: &Transaction<'_>, ids: Vec<String>, reason: &str, now_ms: u64) -> rusqlite::Result<Outcome> {
    for id in &ids {
        let n = tx.execute_cached(
            "UPDATE placements SET desired = 'stop', updated_ms = ?2 WHERE id = ?1 AND desired = 'run'",
            params![id, now_ms as i64],
        )?;
        if n > 0 {
            event(tx, id, now_ms, "stop-requested", Some(reason))?;
        }
    }
    Ok(Ok(Answer::PlacementsStopped { stopped: ids }))
}

fn set_eligibility(tx: &Transaction<'_>, name: String, eligible: bool, now_ms: u64) -> rusqlite::Result<Outcome> {
    let n = tx.execute_cached(
        "UPDATE nodes SET eligible = ?2, updated_ms = ?3 WHERE name = ?1",
        params![name, eligible, now_ms as i64],
    )?;
    if n == 0 {
        return reject(RejectCode::NotFound, format!("no node named {name}"));
    }
    node_event(tx, &name, now_ms, if eligible { "eligible" } else { "ineligible" }, None)?;
    Ok(Ok(Answer::Eligibility { name, eligible }))
}

/// The plan applier's re-check, on the freshest state there is: task still wants to
/// run and has no live placement; node registered, not draining or down; reservations
/// plus this request fit the node's capacity.
fn recheck_placement(tx: &Transaction<'_>, p: &PlannedPlacement) -> rusqlite::Result<Result<TaskSpec, String>> {
    let task: Option<(String, String)> = tx
        .query_row_cached("SELECT spec, desired FROM tasks WHERE id = ?1", [&p.task_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((spec_json, desired)) = task else {
        return Ok(Err("task no longer exists".into()));
    };
    if desired != "run" {
        return Ok(Err("task was stopped".into()));
    }
    let Ok(spec) = serde_json::from_str::<TaskSpec>(&spec_json) else {
        return Ok(Err("stored spec unreadable".into()));
    };
    let live: i64 = tx.query_row_cached(
        "SELECT COUNT(*) FROM placements WHERE task_id = ?1 AND desired = 'run'
           AND observed NOT IN ('failed','stopped','exited') AND id IS NOT ?2",
        params![p.task_id, p.replaces],
        |r| r.get(0),
    )?;
    if live > 0 {
        return Ok(Err("task already has a live placement".into()));
    }
    if let Some(old) = &p.replaces {
        // Only the task's current placement can be replaced; anything older means the
        // plan was made on stale state.
        let current: Option<i64> =
            tx.query_row_cached("SELECT MAX(fence) FROM placements WHERE task_id = ?1", [&p.task_id], |r| r.get(0))?;
        let old_fence: Option<i64> =
            tx.query_row_cached("SELECT fence FROM placements WHERE id = ?1", [old], |r| r.get(0)).optional()?;
        if old_fence.is_none() || old_fence != current {
            return Ok(Err(format!("placement {old} is no longer the task's current one")));
        }
    }
    let node: Option<(String, bool, bool, i64, i64, i64)> = tx
        .query_row_cached(
            "SELECT status, draining, eligible, cpu_millis, memory_mb, disk_mb FROM nodes WHERE name = ?1",
            [&p.node],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?;
    let Some((status, draining, eligible, cpu, mem, disk)) = node else {
        return Ok(Err(format!("node {} is not registered", p.node)));
    };
    if status != NodeStatus::Ready.as_str() || draining || !eligible {
        return Ok(Err(format!("node {} is {status}, draining {draining}, eligible {eligible}", p.node)));
    }
    let (rc, rm, rd): (i64, i64, i64) = tx.query_row_cached(
        "SELECT COALESCE(SUM(cpu_millis),0), COALESCE(SUM(memory_mb),0), COALESCE(SUM(disk_mb),0)
         FROM placements WHERE node = ?1 AND desired = 'run' AND observed NOT IN ('failed','stopped','exited')",
        [&p.node],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let r = &spec.resources;
    if rc + r.cpu_millis as i64 > cpu || rm + r.memory_mb as i64 > mem || rd + r.disk_mb as i64 > disk {
        return Ok(Err(format!("node {} no longer has room", p.node)));
    }
    Ok(Ok(spec))
}

fn apply_report(
    tx: &Transaction<'_>,
    node: &str,
    r: &StatusReport,
    now_ms: u64,
) -> rusqlite::Result<Result<(), String>> {
    let row: Option<(String, i64, String)> = tx
        .query_row_cached("SELECT node, fence, observed FROM placements WHERE id = ?1", [&r.placement_id], |x| {
            Ok((x.get(0)?, x.get(1)?, x.get(2)?))
        })
        .optional()?;
    let Some((owner, fence, observed)) = row else {
        return Ok(Err(format!("unknown placement {}", r.placement_id)));
    };
    if owner != node || fence as u64 != r.fence {
        // Kept as history, never allowed to change the current owner's state.
        event(tx, &r.placement_id, now_ms, "stale-report", Some(&format!("from {node} fence {}", r.fence)))?;
        return Ok(Err("report does not match the placement's node or fence".into()));
    }
    let from = Observed::parse(&observed).unwrap_or(Observed::Pending);
    if let Err(e) = transition(from, r.status.observed) {
        event(tx, &r.placement_id, now_ms, "invalid-report", Some(&e.to_string()))?;
        return Ok(Err(e.to_string()));
    }
    tx.execute_cached(
        "UPDATE placements SET observed = ?2, exit_code = ?3, reason = ?4, restarts = ?5, endpoints = ?6,
           container_id = COALESCE(?7, container_id), updated_ms = ?8, refused = ?9 WHERE id = ?1",
        params![
            r.placement_id,
            r.status.observed.as_str(),
            r.status.exit_code,
            r.status.reason,
            r.status.restarts,
            r.status.endpoints_json(),
            r.status.container_id,
            now_ms as i64,
            r.refused
        ],
    )?;
    if let Some(story) = &r.story {
        // Authority changes (cached, stopped on expiry, renewed) are history even when
        // the observed state stays the same.
        event(tx, &r.placement_id, r.at_ms, story.as_str(), r.status.reason.as_deref())?;
    } else if from != r.status.observed {
        event(tx, &r.placement_id, r.at_ms, r.status.observed.as_str(), r.status.reason.as_deref())?;
    }
    Ok(Ok(()))
}

/// Sets a node's liveness status, recording the change; `false` when no such node.
fn set_node_status(tx: &Transaction<'_>, name: &str, status: NodeStatus, now_ms: u64) -> rusqlite::Result<bool> {
    let status_text = status.as_str();
    let old: Option<(String, i64)> = tx
        .query_row_cached("SELECT status, status_since_ms FROM nodes WHERE name = ?1", [name], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((old, since)) = old else { return Ok(false) };
    let away_ms = (now_ms as i64).saturating_sub(since);
    if old != status_text {
        // `status_since_ms` marks the last move between ready and not ready, so
        // disconnected → down keeps the time the node went silent.
        let crosses = (old == NodeStatus::Ready.as_str()) != (status == NodeStatus::Ready);
        tx.execute_cached(
            "UPDATE nodes SET status = ?2, status_since_ms = CASE WHEN ?4 THEN ?3 ELSE status_since_ms END,
               updated_ms = ?3 WHERE name = ?1",
            params![name, status_text, now_ms as i64, crosses],
        )?;
        node_event(tx, name, now_ms, status_text, Some(&format!("was {old}")))?;
        if status == NodeStatus::Ready {
            // The node is back: every placement it still holds is reconciled now; those
            // replaced meanwhile were already told to stop (the highest fence wins).
            let mut stmt = tx.prepare_cached(
                // In row order, explicitly: the events' ids follow this order, and
                // every member must write them alike whatever index its SQLite picks.
                "SELECT id, desired FROM placements WHERE node = ?1 AND observed NOT IN ('stopped') ORDER BY rowid",
            )?;
            let rows: Vec<(String, String)> =
                stmt.query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?;
            drop(stmt);
            for (id, desired) in rows {
                let detail = format!("node {name} back after {away_ms} ms; desired {desired}");
                event(tx, &id, now_ms, "reconciled", Some(&detail))?;
            }
        }
    }
    Ok(true)
}

fn node_event(tx: &Transaction<'_>, node: &str, at_ms: u64, what: &str, detail: Option<&str>) -> rusqlite::Result<()> {
    tx.execute_cached(
        "INSERT INTO node_events (node, at_ms, what, detail) VALUES (?1, ?2, ?3, ?4)",
        params![node, at_ms as i64, what, detail],
    )?;
    Ok(())
}

fn event(tx: &Transaction<'_>, placement: &str, at_ms: u64, what: &str, detail: Option<&str>) -> rusqlite::Result<()> {
    tx.execute_cached(
        "INSERT INTO placement_events (placement_id, at_ms, observed, detail) VALUES (?1, ?2, ?3, ?4)",
        params![placement, at_ms as i64, what, detail],
    )?;
    Ok(())
}
