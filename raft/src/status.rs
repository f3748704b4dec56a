//! Mapping openraft's metrics to [`ClusterStatus`] and publishing it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use openraft::{RaftMetrics, ServerState};
use tokio::sync::watch;

use crate::{ClusterStatus, Member, MemberStatus, NodeId, Role};

/// The current leader and its record, when known and present in the membership.
pub(crate) fn leader_of(m: &RaftMetrics<NodeId, Member>) -> Option<(NodeId, Member)> {
    let id = m.current_leader?;
    let member = m.membership_config.membership().get_node(&id)?.clone();
    Some((id, member))
}

/// Maps openraft's metrics to the crate's status view.
pub(crate) fn status_from(m: &RaftMetrics<NodeId, Member>, name: &str) -> ClusterStatus {
    let role = match (&m.running_state, m.state) {
        (Err(_), _) | (_, ServerState::Shutdown) => Role::Shutdown,
        (_, ServerState::Leader) => Role::Leader,
        (_, ServerState::Follower) => Role::Follower,
        (_, ServerState::Candidate) => Role::Candidate,
        (_, ServerState::Learner) => Role::Learner,
    };
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, member)| {
            let matched = if role == Role::Leader && *id == m.id {
                m.last_log_index
            } else {
                m.replication.as_ref().and_then(|r| r.get(id)).and_then(|l| l.map(|l| l.index))
            };
            MemberStatus { id: *id, member: member.clone(), voter: voters.contains(id), matched }
        })
        .collect();
    let last_applied = m.last_applied.map(|l| l.index);
    ClusterStatus {
        id: m.id,
        name: name.to_string(),
        role,
        term: m.current_term,
        leader: leader_of(m).map(|(_, member)| member),
        last_log_index: m.last_log_index,
        // openraft 0.9 metrics do not expose the commit index; applied trails it closely
        // and never exceeds it.
        commit_index: last_applied,
        last_applied,
        snapshot_index: m.snapshot.map(|l| l.index),
        millis_since_quorum_ack: m.millis_since_quorum_ack,
        members,
        fatal: match &m.running_state {
            Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
            Err(e) => Some(fatal_text(&e.to_string())),
        },
    }
}

/// Names the file behind a fatal storage error from openraft's subject text (openraft
/// 0.9 has no accessor for the subject).
fn fatal_text(err: &str) -> String {
    let file = if err.contains("Logs") || err.contains("Log(") || err.contains("LogIndex") || err.contains("Vote") {
        crate::datadir::LOG_FILE
    } else if err.contains("Snapshot") {
        crate::datadir::SNAPSHOT_FILE
    } else {
        crate::datadir::STATE_FILE
    };
    format!("{file}: {err}")
}

/// Republishes every metrics change as a [`ClusterStatus`]; ends when Raft stops.
pub(crate) async fn feed_status(
    mut rx: watch::Receiver<RaftMetrics<NodeId, Member>>,
    tx: watch::Sender<ClusterStatus>,
    last_leader: Arc<Mutex<Option<Member>>>,
    name: String,
) {
    loop {
        let status = status_from(&rx.borrow_and_update(), &name);
        if let Some(l) = &status.leader {
            *last_leader.lock().expect("last leader mutex poisoned") = Some(l.clone());
        }
        tx.send_if_modified(|cur| {
            if *cur == status {
                false
            } else {
                *cur = status;
                true
            }
        });
        if rx.changed().await.is_err() {
            tx.send_modify(|s| s.role = Role::Shutdown);
            return;
        }
    }
}
