//! Leader-only housekeeping: raising the cluster feature level once every voter
//! supports it, garbage-collecting finished work in bounded rounds, and pruning the
//! in-memory liveness map. Each decision is a Raft command that `apply` re-checks
//! (`state::upgrade`, `state::retention`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::manager::state::retention::{self, CollectRound, Policy, RetentionCommand};
use crate::manager::state::upgrade::{self, UpgradeCommand};
use crate::manager::state::{Answer, Command, RejectCode};
use crate::manager::write::{replicate, replicate_only, WriteError};
use crate::manager::{lock, now_ms, Manager};

/// Pause between rounds when there is nothing left to do; a round that filled a batch
/// runs again at once.
fn round_pause(retain: Duration) -> Duration {
    (retain / 4).clamp(Duration::from_millis(200), Duration::from_secs(30))
}

/// Runs until shutdown: level gate, then garbage collection, on the leader only.
pub async fn run(m: Arc<Manager>, mut shutdown: broadcast::Receiver<()>) {
    let pause = round_pause(m.settings.retention.retain);
    let mut last_collect: Option<std::time::Instant> = None;
    loop {
        let mut busy = false;
        if m.db.status().role == holdfast_raft::Role::Leader {
            if let Err(e) = raise_level(&m).await {
                tracing::warn!(error = %e, "feature level round failed; retrying");
            }
            prune_liveness(&m);
            if last_collect.is_none_or(|t| t.elapsed() >= pause) {
                match collect(&m).await {
                    Ok(full) => busy = full,
                    Err(e) => tracing::warn!(error = %e, "retention round failed; retrying"),
                }
                last_collect = Some(std::time::Instant::now());
            }
        }
        // The level gate looks every second; a full batch goes on at once.
        let wait = if busy { Duration::from_millis(10) } else { Duration::from_secs(1).min(pause) };
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Raises the cluster's feature level to the lowest level every voter advertises in
/// its member record, when that is above the current one.
async fn raise_level(m: &Manager) -> Result<(), WriteError> {
    let s = m.db.status();
    let voters: Vec<(String, u32)> =
        s.members.iter().filter(|mm| mm.voter).map(|mm| (mm.member.name.clone(), mm.member.feature_level)).collect();
    let current = m.db.read_local(upgrade::cluster_level).await?;
    let Some(level) = upgrade::next_level(current, &voters) else {
        return Ok(());
    };
    tracing::info!(from = current, to = level, ?voters, "every voter supports a higher feature level; raising it");
    let cmd = Command::Upgrade(UpgradeCommand::SetLevel { level, voters, now_ms: now_ms() });
    match replicate_only(&m.db, &cmd).await {
        // Raised meanwhile (a previous leader's write): nothing to do.
        Err(WriteError::Rejected(r)) if r.code == RejectCode::Conflict => Ok(()),
        done => done,
    }
}

/// The policy of this manager's settings.
pub fn policy(m: &Manager) -> Policy {
    let r = &m.settings.retention;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).min(i64::MAX as u64);
    Policy {
        retain_ms: ms(r.retain),
        node_gc_ms: ms(r.node_gc),
        history_cap: retention::HISTORY_CAP,
        audit_retain_ms: ms(r.audit_retain),
        audit_max_rows: r.audit_max_rows.min(i64::MAX as u64),
    }
}

/// One collect round; `true` when a batch was full (more may be due).
async fn collect(m: &Manager) -> Result<bool, WriteError> {
    let level = m.db.read_local(upgrade::cluster_level).await?;
    if level < retention::LEVEL {
        // An older manager is still a voter: it could not decode the command.
        return Ok(false);
    }
    let policy = policy(m);
    let now = now_ms();
    let p = policy.clone();
    let c = m.db.read_local(move |c| retention::candidates(c, &p, now)).await?;
    if c.is_empty() {
        return Ok(false);
    }
    let full =
        [c.tasks.len(), c.nodes.len(), c.placement_histories.len(), c.node_histories.len(), c.placement_lists.len()]
            .iter()
            .any(|n| *n >= retention::BATCH);
    let cmd = Command::Retention(RetentionCommand::Collect(CollectRound {
        tasks: c.tasks,
        nodes: c.nodes,
        placement_histories: c.placement_histories,
        node_histories: c.node_histories,
        placement_lists: c.placement_lists,
        policy,
        now_ms: now,
    }));
    let out: Answer = replicate(&m.db, &cmd).await?;
    tracing::debug!(?out, "retention round");
    Ok(full)
}

/// Forgets liveness of nodes that are no longer registered or have been silent for
/// longer than twice the down threshold (the committed status already says `down`).
fn prune_liveness(m: &Manager) {
    let horizon = m.settings.down_after.saturating_mul(2).max(m.settings.heartbeat_ttl * 4);
    lock(&m.liveness).retain(|_, l| l.last_seen.elapsed() < horizon);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_pause_in_proportion_to_the_window_within_bounds() {
        assert_eq!(round_pause(Duration::from_secs(24 * 3_600)), Duration::from_secs(30));
        assert_eq!(round_pause(Duration::from_secs(2)), Duration::from_millis(500));
        assert_eq!(round_pause(Duration::ZERO), Duration::from_millis(200));
    }
}
