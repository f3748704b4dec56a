//! Leader-only loops. The planner takes a view of the state, calls the pure
//! scheduler, and commits the plan as one command; `apply` re-checks it against the
//! newest state (Nomad's optimistic plan/apply split).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use super::scheduler::{self, ClusterView, NodeView, Pending};
use super::state::{query, Command};
use super::{lock, now_ms, Manager};

/// Most tasks considered in one planning round.
const PLAN_BATCH: usize = 2_000;
/// Shortest pause between planning rounds.
const PLAN_DEBOUNCE: Duration = Duration::from_millis(10);

/// Runs the planner until shutdown; it acts only while this manager leads.
pub async fn run_planner(m: Arc<Manager>, mut shutdown: broadcast::Receiver<()>) {
    let mut applied = m.applied.clone();
    let mut status = m.db.watch_status();
    loop {
        if m.db.status().role == holdfast_raft::Role::Leader {
            if let Err(e) = plan_once(&m).await {
                tracing::warn!(error = %e, "planning round failed; retrying");
            }
        }
        // Under a burst of submissions, plan in batches rather than once per command.
        tokio::time::sleep(PLAN_DEBOUNCE).await;
        // Wake on any applied command, a role change, or a tick (liveness moves nodes
        // in and out of eligibility without any write).
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = applied.changed() => {}
            _ = status.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One planning round; returns how many placements were committed.
pub async fn plan_once(m: &Manager) -> Result<usize, super::api::ApiError> {
    let (pending, nodes) = m.db.read_local(|c| Ok((query::pending_tasks(c, PLAN_BATCH)?, query::nodes(c)?))).await?;
    if pending.is_empty() {
        return Ok(0);
    }
    let live = lock(&m.liveness).clone();
    let view = ClusterView {
        nodes: nodes
            .into_iter()
            .map(|n| {
                let l = live.get(&n.name);
                let fresh = l.is_some_and(|l| l.last_seen.elapsed() < m.timers.heartbeat_ttl);
                NodeView {
                    eligible: n.status == "ready" && fresh && l.is_some_and(|l| l.resources.engine_ok),
                    status: if fresh { n.status.clone() } else { "not heard from".into() },
                    labels: n.labels,
                    cpu_millis: n.cpu_millis,
                    memory_mb: n.memory_mb,
                    disk_mb: n.disk_mb,
                    reserved_cpu_millis: n.reserved_cpu_millis,
                    reserved_memory_mb: n.reserved_memory_mb,
                    reserved_disk_mb: n.reserved_disk_mb,
                    measured_free_memory_mb: l.map(|l| l.resources.memory_free_mb),
                    measured_free_disk_mb: l.map(|l| l.resources.disk_free_mb),
                    name: n.name,
                }
            })
            .collect(),
        strategy: Default::default(),
    };
    let work: Vec<Pending> = pending
        .iter()
        .map(|t| Pending {
            task_id: t.id.clone(),
            resources: t.spec.resources.clone(),
            constraints: t.spec.constraints.clone(),
        })
        .collect();
    let plan = scheduler::plan(&view, &work);
    // Only record reasons that changed: an unchanged reason would be a write that
    // wakes this loop for nothing.
    let unplaced: Vec<(String, String)> = plan
        .unplaced
        .into_iter()
        .filter(|(id, why)| pending.iter().any(|t| &t.id == id && t.reason.as_deref() != Some(why)))
        .collect();
    if plan.placements.is_empty() && unplaced.is_empty() {
        return Ok(0);
    }
    let n = plan.placements.len();
    super::api::write(m, &Command::ApplyPlan { placements: plan.placements, unplaced, now_ms: now_ms() }).await?;
    Ok(n)
}
