//! Leader-only loops.
//!
//! - The **planner** takes a view of the state, calls the pure scheduler, and commits
//!   the plan as one command; `apply` re-checks it against the newest state (Nomad's
//!   optimistic plan/apply split). Its work: tasks never placed, failed placements due
//!   for a reschedule, placements lost with a silent node, placements on draining nodes.
//! - The **liveness** loop judges nodes from the in-memory heartbeats and commits only
//!   transitions (ready → disconnected → down), after a grace period when this manager
//!   has just become leader.

pub mod housekeeping;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::scheduler::{self, ClusterView, NodeView, Pending};
use super::state::images::ImageRow;
use super::state::query::{self, ReplaceCandidate};
use super::state::{Command, NodeStatus, PlanApplied};
use super::write::{replicate, replicate_only, WriteError};
use super::{lock, now_ms, Liveness, Manager};

/// Most tasks considered in one planning round.
const PLAN_BATCH: usize = 2_000;
/// Shortest pause between planning rounds.
const PLAN_DEBOUNCE: Duration = Duration::from_millis(10);

/// A task already judged unplaceable is planned again only when the nodes changed
/// (membership, status, eligibility, reservations) or after this long.
const FULL_REPLAN_EVERY: Duration = Duration::from_secs(5);

/// What the planner saw in its last full round.
#[derive(Debug, Default)]
pub struct PlannerMemo {
    nodes_fingerprint: u64,
    last_full: Option<Instant>,
}

fn fingerprint(nodes: &[query::NodeRow], fresh: impl Fn(&str) -> bool) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for n in nodes {
        (&n.name, &n.status, n.draining, n.eligible, fresh(&n.name)).hash(&mut h);
        (n.reserved_cpu_millis, n.reserved_memory_mb, n.reserved_disk_mb).hash(&mut h);
    }
    h.finish()
}

/// Runs the planner until shutdown; it acts only while this manager leads.
pub async fn run_planner(m: Arc<Manager>, mut shutdown: broadcast::Receiver<()>) {
    let mut applied = m.applied.clone();
    let mut status = m.db.watch_status();
    loop {
        if m.db.status().role == holdfast_raft::Role::Leader {
            match plan_round(&m).await {
                // Everything refused: state moved under the plan. Re-planning at once
                // would only be refused again; wait for the tick instead.
                Ok(r) if r.placed == 0 && r.refused > 0 => {
                    tokio::select! {
                        _ = shutdown.recv() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "planning round failed; retrying"),
            }
        }
        // Under a burst of submissions, plan in batches rather than once per command.
        tokio::time::sleep(PLAN_DEBOUNCE).await;
        // Wake on any applied command, a role change, or a tick (time alone makes
        // reschedules due and nodes lost).
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = applied.changed() => {}
            _ = status.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Why a current placement should be replaced now, if it should.
fn replacement_due(c: &ReplaceCandidate, now: u64, m: &Manager) -> Option<Vec<String>> {
    if c.node_draining {
        return Some(vec![c.node.clone()]);
    }
    if c.node_status != NodeStatus::Ready.as_str() {
        // Lost: silent for longer than the task tolerates. An exclusive task is only
        // replaced once the old worker's lease has surely run out, so two never overlap.
        let mut lost_after = c.spec.lost_after_ms();
        if c.spec.offline_mode() == crate::model::OfflineMode::Exclusive {
            lost_after =
                lost_after.max(m.settings.lease.as_millis() as u64 + m.settings.heartbeat_ttl.as_millis() as u64);
        }
        let silent_for = now.saturating_sub(c.node_status_since_ms);
        return (c.spec.replace_when_lost() && silent_for >= lost_after).then(|| vec![c.node.clone()]);
    }
    // Refused by the worker's admission check: not the task's fault, so place it
    // elsewhere at once, without spending a reschedule attempt.
    if c.refused {
        return Some(c.failed_on.clone());
    }
    // Failed on a ready node: reschedule with exponential delay, a limited number of times.
    let policy = c.spec.reschedule_policy();
    let used = c.placements.saturating_sub(1);
    if used >= policy.attempts {
        return None;
    }
    (now >= c.updated_ms + policy.delay_before(used)).then(|| c.failed_on.clone())
}

/// What one planning round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Placements committed.
    pub placed: usize,
    /// Placements the applier refused (re-planned later).
    pub refused: usize,
}

/// One planning round; returns how many placements were committed.
pub async fn plan_once(m: &Manager) -> Result<usize, WriteError> {
    plan_round(m).await.map(|r| r.placed)
}

/// One planning round, with what the applier refused.
pub async fn plan_round(m: &Manager) -> Result<Round, WriteError> {
    let live = lock(&m.liveness).clone();
    let is_fresh = |name: &str| live.get(name).is_some_and(|l| l.last_seen.elapsed() < m.settings.heartbeat_ttl);
    let nodes = m.db.read_local(query::nodes).await?;
    let only_new = only_new_tasks(m, fingerprint(&nodes, is_fresh));
    let (pending, candidates, images) =
        m.db.read_local(move |c| {
            Ok((
                query::pending_tasks(c, PLAN_BATCH, only_new)?,
                query::replace_candidates(c, PLAN_BATCH)?,
                super::state::images::list(c)?,
            ))
        })
        .await?;
    let images = image_needs(images);
    let need = |image: &str| images.get(&crate::model::sync::normalize_image_ref(image)).cloned();
    let held = super::images::held_snapshot(m);
    let now = now_ms();
    let mut work: Vec<Pending> = pending
        .iter()
        .map(|t| Pending {
            task_id: t.id.clone(),
            resources: t.spec.resources.clone(),
            constraints: t.spec.constraints.clone(),
            replaces: None,
            avoid: Vec::new(),
            image: need(&t.spec.image),
        })
        .collect();
    let mut reasons: Vec<(String, Option<String>)> = pending.iter().map(|t| (t.id.clone(), t.reason.clone())).collect();
    let mut expired_drains = Vec::new();
    tracing::debug!(pending = pending.len(), candidates = candidates.len(), only_new, "planning round");
    for c in &candidates {
        if let Some(avoid) = replacement_due(c, now, m) {
            work.push(Pending {
                task_id: c.task_id.clone(),
                resources: c.spec.resources.clone(),
                constraints: c.spec.constraints.clone(),
                replaces: Some(c.placement_id.clone()),
                avoid,
                image: need(&c.spec.image),
            });
            reasons.push((c.task_id.clone(), c.reason.clone()));
        }
        if c.node_draining && c.drain_deadline_ms.is_some_and(|d| now >= d) {
            expired_drains.push(c.placement_id.clone());
        }
    }
    stop_expired_drains(m, expired_drains, now).await?;
    if work.is_empty() {
        return Ok(Round::default());
    }
    let view = ClusterView {
        nodes: nodes
            .into_iter()
            .map(|n| {
                let (l, images) = (live.get(&n.name), held.get(&n.name).cloned().unwrap_or_default());
                node_view(n, l, m.settings.heartbeat_ttl, images)
            })
            .collect(),
        strategy: m.settings.strategy,
    };
    let plan = scheduler::plan(&view, &work);
    let unplaced = changed_reasons(plan.unplaced, &reasons);
    if plan.placements.is_empty() && unplaced.is_empty() {
        return Ok(Round::default());
    }
    let cmd = Command::ApplyPlan { placements: plan.placements, unplaced, now_ms: now };
    let out: PlanApplied = replicate(&m.db, &cmd).await?;
    let refused = out.refused.len();
    if refused > 0 {
        // Normal under races (state moved between plan and apply); the next round re-plans.
        tracing::info!(refused = ?out.refused, "plan applier refused placements");
    }
    Ok(Round { placed: out.placed.len(), refused })
}

/// The `(task, reason)` pairs of `unplaced` whose reason differs from the task's last
/// one in `reasons`: an unchanged reason would be a write that wakes the planner for
/// nothing.
fn changed_reasons(unplaced: Vec<(String, String)>, reasons: &[(String, Option<String>)]) -> Vec<(String, String)> {
    unplaced
        .into_iter()
        .filter(|(id, why)| reasons.iter().any(|(t, old)| t == id && old.as_deref() != Some(why)))
        .collect()
}

/// Whether this round may leave out the tasks it already found unplaceable: the nodes
/// look as they did at the last full round (by `print`), and that was less than
/// [`FULL_REPLAN_EVERY`] ago. Otherwise this round is a full one, and noted as such.
fn only_new_tasks(m: &Manager, print: u64) -> bool {
    let only_new = {
        let memo = lock(&m.planner_memo);
        memo.nodes_fingerprint == print && memo.last_full.is_some_and(|t| t.elapsed() < FULL_REPLAN_EVERY)
    };
    if !only_new {
        *lock(&m.planner_memo) = PlannerMemo { nodes_fingerprint: print, last_full: Some(Instant::now()) };
    }
    only_new
}

/// The catalogue's images by reference, for the scheduler's disk check.
fn image_needs(rows: Vec<ImageRow>) -> HashMap<String, scheduler::ImageNeed> {
    rows.into_iter()
        .map(|r| {
            (
                r.entry.reference.clone(),
                scheduler::ImageNeed { id: r.entry.config_digest, size_mb: r.size.div_ceil(1 << 20) },
            )
        })
        .collect()
}

/// Stops the placements whose node's drain deadline passed (they found no room
/// elsewhere in time).
async fn stop_expired_drains(m: &Manager, ids: Vec<String>, now: u64) -> Result<(), WriteError> {
    if ids.is_empty() {
        return Ok(());
    }
    let cmd =
        Command::StopPlacements { ids, reason: "drain deadline passed with no room elsewhere".into(), now_ms: now };
    replicate_only(&m.db, &cmd).await
}

/// The scheduler's view of node `n`: eligible only when ready, not draining, eligible,
/// heard from within `ttl` and with a working engine; the status says why not.
fn node_view(n: query::NodeRow, live: Option<&Liveness>, ttl: Duration, images: Arc<HashSet<String>>) -> NodeView {
    let fresh = live.is_some_and(|l| l.last_seen.elapsed() < ttl);
    let engine_ok = live.is_some_and(|l| l.resources.engine_ok);
    NodeView {
        eligible: n.status == NodeStatus::Ready.as_str() && !n.draining && n.eligible && fresh && engine_ok,
        status: if n.draining {
            "draining".into()
        } else if !n.eligible {
            "ineligible".into()
        } else if !fresh {
            "not heard from".into()
        } else {
            n.status.clone()
        },
        labels: n.labels,
        cpu_millis: n.cpu_millis,
        memory_mb: n.memory_mb,
        disk_mb: n.disk_mb,
        reserved_cpu_millis: n.reserved_cpu_millis,
        reserved_memory_mb: n.reserved_memory_mb,
        reserved_disk_mb: n.reserved_disk_mb,
        measured_free_memory_mb: live.map(|l| l.resources.memory_free_mb),
        measured_free_disk_mb: live.map(|l| l.resources.disk_free_mb),
        images,
        name: n.name,
    }
}

/// Judges node liveness until shutdown; commits only transitions, only while leading.
pub async fn run_liveness(m: Arc<Manager>, mut shutdown: broadcast::Receiver<()>) {
    let mut leading_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if m.db.status().role != holdfast_raft::Role::Leader {
            leading_since = None;
            continue;
        }
        // A new leader has no heartbeats yet: give every node one TTL to check in.
        let since = *leading_since.get_or_insert_with(Instant::now);
        if since.elapsed() < m.settings.heartbeat_ttl {
            continue;
        }
        if let Err(e) = judge_nodes(&m).await {
            tracing::warn!(error = %e, "liveness round failed; retrying");
        }
    }
}

async fn judge_nodes(m: &Manager) -> Result<(), WriteError> {
    let nodes = m.db.read_local(query::nodes).await?;
    let live = lock(&m.liveness).clone();
    let now = now_ms();
    for n in nodes {
        let fresh = live.get(&n.name).is_some_and(|l| l.last_seen.elapsed() < m.settings.heartbeat_ttl);
        let next = match NodeStatus::parse(&n.status) {
            Some(NodeStatus::Ready) if !fresh => Some(NodeStatus::Disconnected),
            Some(NodeStatus::Disconnected | NodeStatus::Down) if fresh => Some(NodeStatus::Ready),
            Some(NodeStatus::Disconnected)
                if now.saturating_sub(n.status_since_ms) >= m.settings.down_after.as_millis() as u64 =>
            {
                Some(NodeStatus::Down)
            }
            _ => None,
        };
        if let Some(status) = next {
            tracing::info!(node = %n.name, from = %n.status, to = %status, "node status");
            let cmd = Command::SetNodeStatus { name: n.name, status: status.as_str().into(), now_ms: now };
            replicate_only(&m.db, &cmd).await?;
        }
    }
    Ok(())
}
