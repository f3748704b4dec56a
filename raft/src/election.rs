//! When a member campaigns: openraft's own election timer is off (`enable_elect: false`)
//! and this loop decides, with a **pre-vote** round first (Raft thesis §9.6).
//!
//! openraft 0.9 campaigns as soon as a follower's timer runs out. A member whose log is
//! behind, or that is cut off from the others, then takes a new term it cannot win:
//! - after a leader dies, a survivor that missed the leader's last entry campaigns,
//!   votes for itself, and so refuses the up-to-date survivor's request in that term;
//!   the cluster needs one more election timeout (ARCHITECTURE.md, "Decisions");
//! - a member cut off for a while comes back with a higher term and unseats a healthy
//!   leader.
//!
//! Here a member whose timer runs out first asks every voter "would you vote for me?"
//! (`POST /raft/pre-vote`). A voter says yes only if it has not heard from a leader
//! within the leader lease, is not the leader, and the candidate's log is at least as
//! up to date as its own: the same tests as a real vote, without changing anything.
//! Only with a yes from a majority of every configuration, and only if its own vote
//! did not move while it asked (another member won, or got this member's vote), does
//! the member call openraft's election. Safety is openraft's real vote, unchanged; the
//! pre-vote only decides when to ask for it.
//!
//! Each round draws a new random timeout (openraft draws one per process), so two
//! members that tie once do not tie again.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::{ServerState, Vote};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::network::CallError;
use crate::node::Inner;
use crate::types::LogId;
use crate::{Member, NodeId};

/// `POST /raft/pre-vote`: would the receiver vote for this candidate now?
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PreVoteRequest {
    /// The candidate's Raft id.
    pub candidate: NodeId,
    /// The candidate's current vote; it would campaign in the next term.
    pub vote: Vote<NodeId>,
    /// The last entry of the candidate's log.
    pub last_log_id: Option<LogId>,
}

/// Answer to a [`PreVoteRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct PreVoteResponse {
    /// Whether the receiver would grant a real vote now.
    pub granted: bool,
    /// Why not, for the candidate's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// What the loop and the pre-vote handler read from openraft's state in one call.
#[derive(Clone, Debug)]
pub(crate) struct View {
    state: ServerState,
    vote: Vote<NodeId>,
    /// When the vote last changed or a leader last refreshed it (openraft's lease clock).
    vote_touched: Option<Instant>,
    /// The configurations of the effective membership (two during a joint change).
    configs: Vec<BTreeSet<NodeId>>,
    /// Voters other than this member, with their addresses.
    peers: Vec<(NodeId, Member)>,
    is_voter: bool,
}

impl View {
    /// Reads the view from openraft's core; `None` once Raft has stopped.
    pub(crate) async fn read(inner: &Inner) -> Option<View> {
        let me = inner.id;
        inner
            .raft
            .with_raft_state(move |st| {
                let eff = st.membership_state.effective();
                let configs: Vec<BTreeSet<NodeId>> =
                    eff.get_joint_config().iter().map(|c| c.iter().copied().collect()).collect();
                let voters: BTreeSet<NodeId> = eff.voter_ids().collect();
                let peers = voters
                    .iter()
                    .filter(|id| **id != me)
                    .filter_map(|id| eff.get_node(id).map(|m| (*id, m.clone())))
                    .collect();
                View {
                    state: st.server_state,
                    vote: *st.vote_ref(),
                    vote_touched: st.vote_last_modified(),
                    configs,
                    peers,
                    is_voter: voters.contains(&me),
                }
            })
            .await
            .ok()
    }

    /// [`View::read`], given up after `op_timeout`: `Err` when the core did not answer
    /// in time, `Ok(None)` once Raft has stopped.
    async fn read_in_time(inner: &Inner) -> Result<Option<View>, tokio::time::error::Elapsed> {
        tokio::time::timeout(inner.config.op_timeout, View::read(inner)).await
    }

    /// Whether a leader refreshed this member's vote within `lease` of `now`; openraft
    /// refuses real votes then, so a pre-vote is refused too.
    fn leader_heard_within(&self, lease: Duration, now: Instant) -> bool {
        self.vote.is_committed() && self.vote_touched.is_some_and(|t| now <= t + lease)
    }
}

/// The timing of elections, from the member's configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    /// Random election timeout range, drawn anew for each round.
    pub min: Duration,
    pub max: Duration,
    /// openraft's leader lease (`election_timeout_max`): no vote is granted within it.
    pub lease: Duration,
}

impl Timing {
    pub(crate) fn new(election_timeout: Duration) -> Timing {
        let min = election_timeout.max(Duration::from_millis(1));
        let max = min + min / 2;
        Timing { min, max, lease: max }
    }

    fn draw(&self) -> Duration {
        rand::thread_rng().gen_range(self.min..=self.max)
    }

    /// How often the loop looks at the state: fine enough to add little to a timeout.
    fn tick(&self) -> Duration {
        (self.min / 10).clamp(Duration::from_millis(5), Duration::from_millis(50))
    }
}

/// The receiver's decision on a pre-vote (module docs). `my_last` is its last log id.
pub(crate) fn decide(
    view: &View,
    my_last: Option<&LogId>,
    req: &PreVoteRequest,
    lease: Duration,
    now: Instant,
) -> Result<(), String> {
    if view.state == ServerState::Leader {
        return Err("the receiver is the leader".into());
    }
    if view.leader_heard_within(lease, now) {
        return Err(format!("the receiver heard from leader {} within the lease", view.vote.leader_id()));
    }
    // openraft's own rule for a real vote: the candidate's log is at least as new.
    if req.last_log_id.as_ref() >= my_last {
        Ok(())
    } else {
        Err(format!("the candidate's log ends at {:?}, before the receiver's {:?}", req.last_log_id, my_last))
    }
}

/// Whether `granted` (this member included) is a majority of every configuration.
fn is_quorum(configs: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !configs.is_empty() && configs.iter().all(|c| c.iter().filter(|id| granted.contains(id)).count() * 2 > c.len())
}

impl Inner {
    /// Answers a pre-vote; never changes any state.
    pub(crate) async fn serve_pre_vote(&self, req: PreVoteRequest) -> PreVoteResponse {
        let Some(view) = View::read(self).await else {
            return PreVoteResponse { granted: false, refused: Some("Raft has stopped".into()) };
        };
        let my_last = match self.log.last_log_id().await {
            Ok(l) => l,
            Err(e) => return PreVoteResponse { granted: false, refused: Some(format!("cannot read the log: {e}")) },
        };
        let timing = Timing::new(self.config.election_timeout);
        match decide(&view, my_last.as_ref(), &req, timing.lease, Instant::now()) {
            Ok(()) => PreVoteResponse { granted: true, refused: None },
            Err(why) => {
                tracing::debug!(candidate = req.candidate, "refused a pre-vote: {why}");
                PreVoteResponse { granted: false, refused: Some(why) }
            }
        }
    }

    /// Asks every other voter for a pre-vote; true when a majority of every
    /// configuration (this member included) would vote for it.
    async fn pre_vote_round(&self, view: &View, timing: Timing) -> bool {
        let last_log_id = match self.log.last_log_id().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("cannot read the log's end for a pre-vote: {e}");
                return false;
            }
        };
        let req = PreVoteRequest { candidate: self.id, vote: view.vote, last_log_id };
        // One round must end well within a timeout, or it delays the next one.
        let limit = self.config.rpc_timeout.min(timing.min);
        let asks = view.peers.iter().map(|(id, m)| {
            let req = &req;
            async move {
                let answer: Result<PreVoteResponse, CallError> =
                    self.client.post(&m.cluster_addr, "/pre-vote", req, limit).await;
                let yes = match answer {
                    Ok(a) => {
                        if let Some(why) = &a.refused {
                            tracing::debug!(peer = %m.name, "pre-vote refused: {why}");
                        }
                        a.granted
                    }
                    // A member of an earlier version has no pre-vote: it votes by
                    // Raft's rules alone, so its real vote decides.
                    Err(CallError::NotFound) => true,
                    Err(e) => {
                        tracing::debug!(peer = %m.name, "no pre-vote answer: {e}");
                        false
                    }
                };
                (*id, yes)
            }
        });
        let mut granted: BTreeSet<NodeId> =
            futures::future::join_all(asks).await.into_iter().filter(|(_, yes)| *yes).map(|(id, _)| id).collect();
        granted.insert(self.id);
        is_quorum(&view.configs, &granted)
    }
}

/// The election loop of one member (module docs); ends when the member stops.
pub(crate) async fn run(inner: Weak<Inner>, timing: Timing) {
    // A member that just started has heard from no one: it waits a full timeout first,
    // as openraft's timer did.
    let mut not_before = Instant::now() + timing.draw();
    let mut timeout = timing.draw();
    loop {
        tokio::time::sleep(timing.tick()).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.is_stopped() {
            return;
        }
        // A core too busy to answer in time cannot campaign either: look again later.
        let view = match View::read_in_time(&inner).await {
            Err(_) => continue,
            Ok(None) => return,
            Ok(Some(v)) => v,
        };
        if !view.is_voter || matches!(view.state, ServerState::Leader | ServerState::Shutdown) {
            continue;
        }
        if view.peers.is_empty() {
            // The only voter: nobody to ask, and nobody else can lead.
            if view.state != ServerState::Candidate {
                elect(&inner).await;
            }
            continue;
        }
        let now = Instant::now();
        // openraft's rule: after a leader, wait out its lease as well as a timeout.
        let quiet = if view.vote.is_committed() { timing.lease + timeout } else { timeout };
        if now < not_before || view.vote_touched.is_some_and(|t| now < t + quiet) {
            continue;
        }
        if inner.pre_vote_round(&view, timing).await {
            // The round took a network round trip, in which another member may have
            // won, or asked for this member's vote and got it. Campaigning now would
            // take a higher term and unseat that winner (its followers refuse the
            // leader's appends from then on), so campaign only if nothing moved.
            if still_unchanged(&inner, &view).await {
                tracing::info!(node = %inner.me.name, term = view.vote.leader_id().term + 1, "pre-vote won; campaigning");
                elect(&inner).await;
            } else {
                tracing::debug!(node = %inner.me.name, "pre-vote won, but the vote moved meanwhile; not campaigning");
            }
        } else {
            tracing::debug!(node = %inner.me.name, "pre-vote lost; not campaigning");
        }
        timeout = timing.draw();
        not_before = Instant::now() + timeout;
    }
}

/// Whether this member's vote and role are still those its pre-vote round started from
/// (a core that does not answer in time counts as moved). The core handles this read
/// and the election that follows in the order they are sent, so only a message that
/// arrives between the two can slip in.
async fn still_unchanged(inner: &Inner, before: &View) -> bool {
    match View::read_in_time(inner).await {
        Ok(Some(now)) => now.vote == before.vote && now.state == before.state,
        _ => false,
    }
}

async fn elect(inner: &Arc<Inner>) {
    if let Err(e) = inner.raft.trigger().elect().await {
        tracing::warn!(node = %inner.me.name, "cannot start an election: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn view(state: ServerState, vote: Vote<NodeId>, touched: Option<Instant>) -> View {
        View { state, vote, vote_touched: touched, configs: vec![[1, 2, 3].into()], peers: Vec::new(), is_voter: true }
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn req(last: Option<LogId>) -> PreVoteRequest {
        PreVoteRequest { candidate: 2, vote: Vote::new(3, 2), last_log_id: last }
    }

    #[test]
    fn a_pre_vote_is_granted_only_after_the_lease_and_for_a_log_at_least_as_new() {
        let lease = Duration::from_millis(450);
        let now = Instant::now();
        let leader_vote = Vote::new_committed(3, 1);
        let mine = log_id(3, 10);
        let heard = |ms: u64| Some(now - Duration::from_millis(ms));

        // A follower that heard from its leader 100 ms ago refuses anyone.
        let v = view(ServerState::Follower, leader_vote, heard(100));
        assert!(decide(&v, Some(&mine), &req(Some(log_id(3, 20))), lease, now)
            .unwrap_err()
            .contains("within the lease"));
        // The leader itself refuses.
        let v = view(ServerState::Leader, leader_vote, heard(1000));
        assert!(decide(&v, Some(&mine), &req(Some(log_id(3, 20))), lease, now).unwrap_err().contains("is the leader"));

        // Past the lease: the log decides, as in a real vote.
        let v = view(ServerState::Follower, leader_vote, heard(500));
        assert!(decide(&v, Some(&mine), &req(Some(log_id(3, 10))), lease, now).is_ok(), "an equal log");
        assert!(decide(&v, Some(&mine), &req(Some(log_id(3, 11))), lease, now).is_ok(), "a longer log");
        assert!(decide(&v, Some(&mine), &req(Some(log_id(4, 2))), lease, now).is_ok(), "a later term");
        let e = decide(&v, Some(&mine), &req(Some(log_id(3, 9))), lease, now).unwrap_err();
        assert!(e.contains("before the receiver's"), "{e}");
        assert!(decide(&v, Some(&mine), &req(Some(log_id(2, 50))), lease, now).is_err(), "an earlier term");
        assert!(decide(&v, Some(&mine), &req(None), lease, now).is_err(), "an empty log");

        // A vote that is not a leader's (a candidate's) holds no lease.
        let v = view(ServerState::Candidate, Vote::new(4, 3), heard(10));
        assert!(decide(&v, Some(&mine), &req(Some(mine)), lease, now).is_ok());
        // A member that never heard from anyone grants on the log alone.
        let v = view(ServerState::Follower, Vote::default(), None);
        assert!(decide(&v, None, &req(None), lease, now).is_ok());
    }

    #[test]
    fn a_quorum_is_a_majority_of_every_configuration() {
        let one: Vec<BTreeSet<NodeId>> = vec![[1, 2, 3].into()];
        assert!(is_quorum(&one, &[1, 2].into()));
        assert!(!is_quorum(&one, &[1].into()));
        assert!(!is_quorum(&one, &[1, 4, 5].into()), "outsiders do not count");
        // A joint change: old {1,2,3} and new {3,4,5}; both need a majority.
        let joint: Vec<BTreeSet<NodeId>> = vec![[1, 2, 3].into(), [3, 4, 5].into()];
        assert!(!is_quorum(&joint, &[1, 2].into()));
        assert!(is_quorum(&joint, &[2, 3, 4].into()));
        assert!(!is_quorum(&[], &[1].into()), "no configuration, no quorum");
    }

    #[test]
    fn each_round_draws_a_timeout_within_the_range() {
        let t = Timing::new(Duration::from_millis(300));
        assert_eq!((t.min, t.max, t.lease), (Duration::from_millis(300), Duration::from_millis(450), t.max));
        let draws: BTreeSet<Duration> = (0..200).map(|_| t.draw()).collect();
        assert!(draws.iter().all(|d| (t.min..=t.max).contains(d)));
        assert!(draws.len() > 20, "the draws vary: {}", draws.len());
        assert_eq!(t.tick(), Duration::from_millis(30));
    }
}
