//! Desired (the ledger) vs actual (the engine's containers) → actions. Pure: no I/O,
//! no clock (the time, the jitter source and the health verdicts are arguments), so
//! every rule is a table test.

use std::collections::HashMap;

use crate::model::spec::{OfflineMode, RestartMode};
use crate::model::{Desired, Observed, Story};

use super::ledger::{Change, Held};
use super::runtime::{labels, ContainerInfo, ContainerState};

/// One thing the worker should do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Obtain the image, create and start a container for the placement.
    Create {
        /// Placement id.
        placement_id: String,
    },
    /// Start the placement's existing container again (local restart).
    Start {
        /// Placement id.
        placement_id: String,
        /// Container to start.
        container_id: String,
    },
    /// Stop (not remove) a container its health probes judged unhealthy; its exit then
    /// goes through the restart policy like a crash.
    StopUnhealthy {
        /// Placement id.
        placement_id: String,
        /// Container to stop.
        container_id: String,
    },
    /// Lease expired on an `exclusive` task: stop (keep) its container until a manager
    /// renews the lease.
    Suspend {
        /// Placement id.
        placement_id: String,
        /// Container to stop.
        container_id: String,
    },
    /// Lease renewed: start a suspended placement's container again.
    Resume {
        /// Placement id.
        placement_id: String,
        /// Container to start.
        container_id: String,
    },
    /// Stop and remove the placement's container.
    StopRemove {
        /// Placement id.
        placement_id: String,
        /// Container to stop.
        container_id: String,
    },
    /// Record and report an observed change.
    Report {
        /// Placement id.
        placement_id: String,
        /// The change.
        change: Change,
    },
    /// Drop a finished placement from the ledger.
    Forget {
        /// Placement id.
        placement_id: String,
    },
    /// Remove a container of this node that no held placement owns (or a duplicate).
    RemoveOrphan {
        /// Container id.
        container_id: String,
    },
}

/// A health verdict: this container of the placement failed its probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unhealthy {
    /// The container judged; a verdict on an older container does not apply.
    pub container_id: String,
    /// Why, e.g. `health check failed 3 times: GET /health on 172.17.0.5:7777: 500`.
    pub reason: String,
}

/// Inputs besides the placements and containers.
pub struct Facts<'a> {
    /// Wall clock, ms since the epoch.
    pub now_ms: u64,
    /// Host part of published endpoints.
    pub advertise_host: &'a str,
    /// Full jitter: returns a value uniformly in `0..=max`.
    pub jitter: &'a mut dyn FnMut(u64) -> u64,
    /// Health verdicts by placement id, from the probers.
    pub unhealthy: &'a HashMap<String, Unhealthy>,
    /// Whether this worker holds a lease from a manager right now. Without one, each
    /// task's offline mode decides: `keep` carries on, `finish` lets running work end but
    /// starts nothing, `exclusive` stops.
    pub lease_valid: bool,
    /// Whether this worker process was not running (dead, restarted, or stopped) for a
    /// while before this round: a guard that fenced its task meanwhile is recorded as
    /// having done so while the worker was away.
    pub worker_was_away: bool,
    /// Whether the lease leaves a guard more than its stop budget (`worker::fence`): when
    /// not, a guarded task is not started, restarted or resumed this round (its guard
    /// would have to stop it at once); it waits for a renewal.
    pub guard_can_start: bool,
}

/// Whether `c` is a guarded placement's container that its guard stopped because the
/// deadline passed (exit code [`FENCED_EXIT`](crate::guard::FENCED_EXIT)).
fn fenced(h: &Held, c: &ContainerInfo) -> bool {
    h.spec.guarded() && c.state == (ContainerState::Exited { code: i64::from(crate::guard::FENCED_EXIT) })
}

/// The report of a guard's fence: the placement is suspended (as if this worker had
/// stopped it on expiry) and resumes only when a manager renews the lease and still
/// lists it; a replaced one is stopped and removed as usual.
fn fenced_change(h: &Held, c: &ContainerInfo, facts: &Facts<'_>) -> Change {
    let mut ch = Change::carrying(h, Observed::Restarting);
    ch.suspended = true;
    ch.status.exit_code = Some(i64::from(crate::guard::FENCED_EXIT));
    ch.status.container_id = Some(c.id.clone());
    ch.status.endpoints.clear();
    ch.story = Some(Story::Fenced);
    ch.status.reason = Some(if facts.worker_was_away {
        "fenced: lease expired while the worker was not running".into()
    } else {
        "fenced: lease expired; the guard stopped the task".into()
    });
    ch
}

/// Restart delay before attempt `restarts + 1`: exponential, capped, full jitter.
pub fn backoff_ms(delay_ms: u64, max_delay_ms: u64, restarts: u32, jitter: &mut dyn FnMut(u64) -> u64) -> u64 {
    let exp = delay_ms.saturating_mul(1u64 << restarts.min(32));
    jitter(exp.min(max_delay_ms))
}

/// `host:port` for each published port the engine has assigned.
pub fn endpoints(host: &str, c: &ContainerInfo) -> Vec<String> {
    c.ports.iter().filter(|(_, h)| *h != 0).map(|(_, h)| format!("{host}:{h}")).collect()
}

/// Computes the actions that move `actual` toward `held`.
pub fn reconcile(held: &[Held], containers: &[ContainerInfo], facts: &mut Facts<'_>) -> Vec<Action> {
    let mut actions = Vec::new();
    let owner = |c: &ContainerInfo| c.labels.get(labels::PLACEMENT).cloned().unwrap_or_default();

    for c in containers {
        if !held.iter().any(|h| h.id == owner(c)) {
            actions.push(Action::RemoveOrphan { container_id: c.id.clone() });
        }
    }

    for h in held {
        let mut mine: Vec<&ContainerInfo> = containers.iter().filter(|c| owner(c) == h.id).collect();
        // Never two containers for one placement: keep the running (or recorded) one.
        mine.sort_by_key(|c| {
            (c.state != ContainerState::Running, Some(&c.id) != h.status.container_id.as_ref(), c.id.clone())
        });
        for extra in mine.iter().skip(1) {
            actions.push(Action::RemoveOrphan { container_id: extra.id.clone() });
        }
        actions.extend(placement_action(h, mine.first().copied(), facts));
    }
    actions
}

/// The one action (if any) for placement `h`, whose container is `c`.
fn placement_action(h: &Held, c: Option<&ContainerInfo>, facts: &mut Facts<'_>) -> Option<Action> {
    let pid = h.id.clone();
    if h.desired == Desired::Stop {
        return Some(stop_action(h, c, facts));
    }
    if h.status.observed.is_terminal() {
        return None;
    }
    let mode = h.spec.offline_mode();
    // May this worker start or restart anything for the placement right now?
    let authority = facts.lease_valid || mode == OfflineMode::Keep;
    // And is there room for it to run? A guarded start with no more lease left than the
    // guard's stop budget would be refused when it comes to it, and tried again at once.
    let can_start = authority && (facts.guard_can_start || !h.spec.guarded());
    let Some(c) = c else {
        return can_start.then_some(Action::Create { placement_id: pid });
    };
    if h.suspended {
        return match &c.state {
            ContainerState::Running => Some(Action::Suspend { placement_id: pid, container_id: c.id.clone() }),
            _ if facts.lease_valid && can_start => {
                Some(Action::Resume { placement_id: pid, container_id: c.id.clone() })
            }
            _ => None,
        };
    }
    // A verdict only counts for the container it was made on.
    let verdict = facts.unhealthy.get(&h.id).filter(|v| v.container_id == c.id);
    match &c.state {
        ContainerState::Exited { .. } if fenced(h, c) => {
            Some(Action::Report { placement_id: pid, change: fenced_change(h, c, facts) })
        }
        ContainerState::Running if !facts.lease_valid && mode == OfflineMode::Exclusive => {
            Some(Action::Suspend { placement_id: pid, container_id: c.id.clone() })
        }
        ContainerState::Running if verdict.is_some() => {
            Some(Action::StopUnhealthy { placement_id: pid, container_id: c.id.clone() })
        }
        ContainerState::Running => running_report(h, c, facts),
        ContainerState::Created if can_start => Some(Action::Start { placement_id: pid, container_id: c.id.clone() }),
        ContainerState::Created => None,
        ContainerState::Exited { code } => {
            if h.status.observed == Observed::Restarting && authority {
                // Backoff over: start it again (once there is room for it to run).
                let due = h.next_start_ms.is_none_or(|t| facts.now_ms >= t);
                return (due && can_start).then(|| Action::Start { placement_id: pid, container_id: c.id.clone() });
            }
            let ch = exit_change(h, c, *code, verdict, authority, facts);
            Some(Action::Report { placement_id: pid, change: ch })
        }
        ContainerState::Other(_) => None,
    }
}

/// What to do for a placement the manager wants stopped.
fn stop_action(h: &Held, c: Option<&ContainerInfo>, facts: &Facts<'_>) -> Action {
    let pid = h.id.clone();
    match c {
        // Tell the story of a fence before removing its evidence.
        Some(c) if fenced(h, c) && !h.suspended => {
            Action::Report { placement_id: pid, change: fenced_change(h, c, facts) }
        }
        Some(c) => Action::StopRemove { placement_id: pid, container_id: c.id.clone() },
        None if h.status.observed != Observed::Stopped => {
            let mut ch = Change::carrying(h, Observed::Stopped);
            ch.status.endpoints.clear();
            Action::Report { placement_id: pid, change: ch }
        }
        None => Action::Forget { placement_id: pid },
    }
}

/// A report when a running container is not yet recorded as such (state, endpoints or
/// container id differ from the ledger's).
fn running_report(h: &Held, c: &ContainerInfo, facts: &Facts<'_>) -> Option<Action> {
    let eps = endpoints(facts.advertise_host, c);
    if h.status.observed == Observed::Running
        && h.status.endpoints == eps
        && h.status.container_id.as_deref() == Some(c.id.as_str())
    {
        return None;
    }
    let mut ch = Change::carrying(h, Observed::Running);
    ch.status.endpoints = eps;
    ch.status.container_id = Some(c.id.clone());
    ch.status.reason = None;
    Some(Action::Report { placement_id: h.id.clone(), change: ch })
}

/// The change an exit with `code` makes, through the restart policy: restart after a
/// backoff, give up, or stay exited (or failed).
fn exit_change(
    h: &Held,
    c: &ContainerInfo,
    code: i64,
    verdict: Option<&Unhealthy>,
    authority: bool,
    facts: &mut Facts<'_>,
) -> Change {
    let policy = h.spec.restart_policy();
    // A container stopped for failing its health checks failed, whatever code
    // its process chose on SIGTERM.
    let failed = code != 0 || verdict.is_some();
    let wants = match policy.policy {
        RestartMode::Always => true,
        RestartMode::OnFailure => failed,
        RestartMode::No => false,
    };
    let mut why = match verdict {
        Some(v) => v.reason.clone(),
        None => format!("exited with code {code}"),
    };
    // Without a lease, `finish` and `exclusive` start nothing: the exit is final.
    let held_back = wants && !authority;
    if held_back {
        why = format!("{why}; not restarted: lease expired (offline mode {})", h.spec.offline_mode().as_str());
    }
    let wants = wants && !held_back;
    let restarts = h.status.restarts;
    let mut ch = Change::carrying(h, Observed::Exited);
    ch.status.exit_code = Some(code);
    ch.status.container_id = Some(c.id.clone());
    ch.status.endpoints.clear();
    if wants && restarts < policy.max_attempts {
        let wait = backoff_ms(policy.delay_ms, policy.max_delay_ms, restarts, facts.jitter);
        ch.status.observed = Observed::Restarting;
        ch.status.reason = Some(format!("{why}; restart {} in {wait} ms", restarts + 1));
        ch.next_start_ms = Some(facts.now_ms + wait);
    } else if wants {
        ch.status.observed = Observed::Failed;
        ch.status.reason = Some(format!("{why}; gave up after {restarts} restarts"));
    } else {
        // Policy `no`: a clean exit is done; an unhealthy one is a failure. Held
        // back for want of a lease: a failed exit is a failure.
        ch.status.observed =
            if verdict.is_some() || (held_back && failed) { Observed::Failed } else { Observed::Exited };
        ch.status.reason = Some(why);
    }
    ch
}

#[cfg(test)]
#[allow(clippy::cloned_ref_to_slice_refs)] // `&[x.clone()]` reads better in tables
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{PlacementStatus, TaskSpec};

    fn held(id: &str, observed: Observed, spec: &str) -> Held {
        Held {
            id: id.into(),
            task_id: "t".into(),
            fence: 7,
            desired: Desired::Run,
            spec: TaskSpec::from_json(spec.as_bytes()).unwrap(),
            status: PlacementStatus::new(observed),
            next_start_ms: None,
            suspended: false,
        }
    }

    fn container(id: &str, placement: &str, state: ContainerState) -> ContainerInfo {
        let mut labels = BTreeMap::new();
        labels.insert(labels::PLACEMENT.to_string(), placement.to_string());
        ContainerInfo {
            id: id.into(),
            name: id.into(),
            labels,
            state,
            ports: vec![(7777, 32768)],
            error: None,
            ip: Some("172.17.0.5".into()),
        }
    }

    fn run(held: &[Held], containers: &[ContainerInfo]) -> Vec<Action> {
        run_judged(held, containers, &HashMap::new())
    }

    fn run_judged(held: &[Held], containers: &[ContainerInfo], unhealthy: &HashMap<String, Unhealthy>) -> Vec<Action> {
        run_with(held, containers, unhealthy, true)
    }

    fn run_with(
        held: &[Held],
        containers: &[ContainerInfo],
        unhealthy: &HashMap<String, Unhealthy>,
        lease_valid: bool,
    ) -> Vec<Action> {
        round(held, containers, unhealthy, Lease { valid: lease_valid, guard_can_start: lease_valid }, false)
    }

    /// What a round knows of the lease.
    #[derive(Clone, Copy)]
    struct Lease {
        valid: bool,
        guard_can_start: bool,
    }

    /// One reconcile round at `now_ms` 1,000 with half-way jitter.
    fn round(
        held: &[Held],
        containers: &[ContainerInfo],
        unhealthy: &HashMap<String, Unhealthy>,
        lease: Lease,
        worker_was_away: bool,
    ) -> Vec<Action> {
        let mut half = |m: u64| m / 2;
        reconcile(
            held,
            containers,
            &mut Facts {
                now_ms: 1_000,
                advertise_host: "10.0.0.1",
                jitter: &mut half,
                unhealthy,
                lease_valid: lease.valid,
                worker_was_away,
                guard_can_start: lease.guard_can_start,
            },
        )
    }

    fn offline(h: &[Held], c: &[ContainerInfo]) -> Vec<Action> {
        run_with(h, c, &HashMap::new(), false)
    }

    #[test]
    fn without_a_lease_each_offline_mode_decides() {
        let keep = r#"{"image":"i","offline":{"mode":"keep"}}"#;
        let finish = r#"{"image":"i","offline":{"mode":"finish"}}"#;
        let exclusive = r#"{"image":"i","offline":{"mode":"exclusive"}}"#;
        let running = |spec| {
            let mut h = held("p", Observed::Running, spec);
            h.status.container_id = Some("c".into());
            h.status.endpoints = vec!["10.0.0.1:32768".into()];
            h
        };
        let up = container("c", "p", ContainerState::Running);
        let crashed = container("c", "p", ContainerState::Exited { code: 1 });

        // keep: carries on, creates and restarts as if the lease were there.
        assert!(offline(&[running(keep)], &[up.clone()]).is_empty());
        assert_eq!(
            offline(&[held("p", Observed::Pending, keep)], &[]),
            vec![Action::Create { placement_id: "p".into() }]
        );
        let acts = offline(&[running(keep)], &[crashed.clone()]);
        assert!(
            matches!(&acts[0], Action::Report { change, .. } if change.status.observed == Observed::Restarting),
            "{acts:?}"
        );

        // finish: running work goes on, nothing new starts, an exit is final.
        assert!(offline(&[running(finish)], &[up.clone()]).is_empty());
        assert!(offline(&[held("p", Observed::Pending, finish)], &[]).is_empty());
        let acts = offline(&[running(finish)], &[crashed.clone()]);
        let Action::Report { change, .. } = &acts[0] else { panic!("{acts:?}") };
        assert_eq!(change.status.observed, Observed::Failed);
        assert!(change.status.reason.as_deref().unwrap().contains("lease expired (offline mode finish)"), "{change:?}");
        let mut waiting = running(finish);
        waiting.status.observed = Observed::Restarting;
        let acts = offline(&[waiting], &[crashed.clone()]);
        assert!(
            matches!(&acts[0], Action::Report { change, .. } if change.status.observed == Observed::Failed),
            "{acts:?}"
        );

        // exclusive: stops at expiry, stays stopped, resumes when the lease returns.
        assert_eq!(
            offline(&[running(exclusive)], &[up.clone()]),
            vec![Action::Suspend { placement_id: "p".into(), container_id: "c".into() }]
        );
        let mut suspended = running(exclusive);
        suspended.status.observed = Observed::Restarting;
        suspended.suspended = true;
        let stopped = container("c", "p", ContainerState::Exited { code: 0 });
        assert!(offline(&[suspended.clone()], &[stopped.clone()]).is_empty());
        assert_eq!(
            run(&[suspended.clone()], &[stopped]),
            vec![Action::Resume { placement_id: "p".into(), container_id: "c".into() }]
        );
        // A suspended placement the manager replaced meanwhile is stopped for good.
        suspended.desired = Desired::Stop;
        let acts = run(&[suspended], &[container("c", "p", ContainerState::Exited { code: 0 })]);
        assert_eq!(acts, vec![Action::StopRemove { placement_id: "p".into(), container_id: "c".into() }]);
    }

    /// In the last of a lease (no more left than a guard's stop budget) no guarded task
    /// is started, restarted or resumed: the start would be refused when it came to it
    /// and decided again at once, round after round, until the lease ended.
    #[test]
    fn the_last_of_a_lease_starts_no_guarded_task() {
        let exclusive = r#"{"image":"i","offline":{"mode":"exclusive"}}"#;
        let guarded_keep = r#"{"image":"i","offline":{"mode":"keep","guard":true}}"#;
        let plain = r#"{"image":"i","offline":{"mode":"finish"}}"#;
        let closing = |h: &[Held], c: &[ContainerInfo], guard_can_start: bool| {
            round(h, c, &HashMap::new(), Lease { valid: true, guard_can_start }, false)
        };
        let with_container = |spec, observed| {
            let mut h = held("p", observed, spec);
            h.status.container_id = Some("c".into());
            h
        };
        let mut suspended = with_container(exclusive, Observed::Restarting);
        suspended.suspended = true;
        let fenced = container("c", "p", ContainerState::Exited { code: i64::from(crate::guard::FENCED_EXIT) });
        let exited = container("c", "p", ContainerState::Exited { code: 0 });
        let created = container("c", "p", ContainerState::Created);
        let resume = Action::Resume { placement_id: "p".into(), container_id: "c".into() };
        let start = Action::Start { placement_id: "p".into(), container_id: "c".into() };
        let create = Action::Create { placement_id: "p".into() };
        // (placement, its container, actions with room to run, actions without)
        type Row = (Held, Option<ContainerInfo>, Vec<Action>, Vec<Action>);
        let rows: Vec<Row> = vec![
            (suspended.clone(), Some(fenced.clone()), vec![resume.clone()], vec![]),
            (suspended, Some(exited.clone()), vec![resume], vec![]),
            (held("p", Observed::Pending, exclusive), None, vec![create.clone()], vec![]),
            (with_container(exclusive, Observed::Starting), Some(created.clone()), vec![start.clone()], vec![]),
            (with_container(guarded_keep, Observed::Restarting), Some(exited.clone()), vec![start.clone()], vec![]),
            // Unguarded tasks are not held back by a guard's budget.
            (held("p", Observed::Pending, plain), None, vec![create.clone()], vec![create]),
            (with_container(plain, Observed::Starting), Some(created.clone()), vec![start.clone()], vec![start]),
        ];
        for (h, c, room, no_room) in rows {
            let cs: Vec<ContainerInfo> = c.into_iter().collect();
            assert_eq!(closing(&[h.clone()], &cs, true), room, "room to run: {h:?} {cs:?}");
            assert_eq!(closing(&[h.clone()], &cs, false), no_room, "no room to run: {h:?} {cs:?}");
        }
        // A guard's fence is still recorded, and a running guarded task left to its guard.
        let acts = closing(&[with_container(exclusive, Observed::Running)], &[fenced], false);
        assert!(
            matches!(&acts[..], [Action::Report { change, .. }] if change.story == Some(Story::Fenced)),
            "{acts:?}"
        );
        let up = container("c", "p", ContainerState::Running);
        let mut running = with_container(exclusive, Observed::Running);
        running.status.endpoints = vec!["10.0.0.1:32768".into()];
        assert!(closing(&[running], &[up], false).is_empty());
    }

    #[test]
    fn a_guard_fence_is_recorded_then_the_highest_fence_is_followed() {
        let exclusive = r#"{"image":"i","offline":{"mode":"exclusive"}}"#;
        let guarded_keep = r#"{"image":"i","offline":{"mode":"keep","guard":true}}"#;
        let plain_keep = r#"{"image":"i","offline":{"mode":"keep"}}"#;
        let fenced_exit = container("c", "p", ContainerState::Exited { code: i64::from(crate::guard::FENCED_EXIT) });
        let running = |spec| {
            let mut h = held("p", Observed::Running, spec);
            h.status.container_id = Some("c".into());
            h
        };
        let away = |h: &[Held], c: &[ContainerInfo], lease_valid: bool| {
            round(h, c, &HashMap::new(), Lease { valid: lease_valid, guard_can_start: lease_valid }, true)
        };
        for (spec, lease_valid) in [(exclusive, false), (exclusive, true), (guarded_keep, true)] {
            // Back from the dead, with or without a lease yet: the fence is the story.
            let acts = away(&[running(spec)], &[fenced_exit.clone()], lease_valid);
            let [Action::Report { change, .. }] = acts.as_slice() else { panic!("{spec}: {acts:?}") };
            assert_eq!(change.status.observed, Observed::Restarting, "{spec}");
            assert!(change.suspended, "{spec}");
            assert_eq!(change.story, Some(Story::Fenced));
            assert_eq!(change.status.reason.as_deref(), Some("fenced: lease expired while the worker was not running"));
            // A live worker that lost its managers says so differently.
            let acts = offline(&[running(spec)], &[fenced_exit.clone()]);
            let [Action::Report { change, .. }] = acts.as_slice() else { panic!("{spec}: {acts:?}") };
            assert_eq!(change.status.reason.as_deref(), Some("fenced: lease expired; the guard stopped the task"));
        }
        // Then the placement is a suspended one: resumed with a lease, kept without.
        let mut suspended = running(exclusive);
        suspended.status.observed = Observed::Restarting;
        suspended.suspended = true;
        assert!(offline(&[suspended.clone()], &[fenced_exit.clone()]).is_empty());
        assert_eq!(
            run(&[suspended.clone()], &[fenced_exit.clone()]),
            vec![Action::Resume { placement_id: "p".into(), container_id: "c".into() }]
        );
        // Replaced meanwhile: the fence is told first, then the container goes.
        let mut replaced = running(exclusive);
        replaced.desired = Desired::Stop;
        let acts = run(&[replaced.clone()], &[fenced_exit.clone()]);
        assert!(matches!(&acts[..], [Action::Report { change, .. }] if change.story == Some(Story::Fenced)));
        replaced.suspended = true;
        assert_eq!(
            run(&[replaced], &[fenced_exit.clone()]),
            vec![Action::StopRemove { placement_id: "p".into(), container_id: "c".into() }]
        );
        // Code 213 from an unguarded task is just an exit code.
        let acts = run(&[running(plain_keep)], &[fenced_exit]);
        let [Action::Report { change, .. }] = acts.as_slice() else { panic!("{acts:?}") };
        assert_eq!(change.story, None);
        assert!(!change.suspended);
    }

    const SVC: &str = r#"{"image":"i"}"#;
    const BATCH: &str = r#"{"image":"i","kind":"batch"}"#;

    #[test]
    fn new_placement_is_created_and_running_one_reported_once() {
        let h = held("p", Observed::Pending, SVC);
        assert_eq!(run(&[h.clone()], &[]), vec![Action::Create { placement_id: "p".into() }]);
        let c = container("c1", "p", ContainerState::Running);
        let acts = run(&[h.clone()], &[c.clone()]);
        let Action::Report { change, .. } = &acts[0] else { panic!("{acts:?}") };
        assert_eq!(change.status.observed, Observed::Running);
        assert_eq!(change.status.endpoints, vec!["10.0.0.1:32768".to_string()]);
        // Adopted and recorded: nothing more to do.
        let mut h2 = h;
        h2.status.observed = Observed::Running;
        h2.status.endpoints = change.status.endpoints.clone();
        h2.status.container_id = Some("c1".into());
        assert!(run(&[h2], &[c]).is_empty());
    }

    #[test]
    fn exits_follow_the_restart_policy() {
        // Batch exit 0: done.
        let acts =
            run(&[held("p", Observed::Running, BATCH)], &[container("c", "p", ContainerState::Exited { code: 0 })]);
        let Action::Report { change, .. } = &acts[0] else { panic!() };
        assert_eq!((change.status.observed, change.status.exit_code), (Observed::Exited, Some(0)));
        // Batch exit 3: restart with backoff (delay 1000, jitter halves it).
        let acts =
            run(&[held("p", Observed::Running, BATCH)], &[container("c", "p", ContainerState::Exited { code: 3 })]);
        let Action::Report { change, .. } = &acts[0] else { panic!() };
        assert_eq!(change.status.observed, Observed::Restarting);
        assert_eq!(change.next_start_ms, Some(1_500));
        // Restarts exhausted: failed with the code.
        let mut h = held("p", Observed::Running, BATCH);
        h.status.restarts = 3;
        let acts = run(&[h], &[container("c", "p", ContainerState::Exited { code: 3 })]);
        let Action::Report { change, .. } = &acts[0] else { panic!() };
        assert_eq!((change.status.observed, change.status.exit_code), (Observed::Failed, Some(3)));
        // Policy no: exited, not failed, reason names the code.
        let h = held("p", Observed::Running, r#"{"image":"i","restart":{"policy":"no"}}"#);
        let acts = run(&[h], &[container("c", "p", ContainerState::Exited { code: 2 })]);
        let Action::Report { change, .. } = &acts[0] else { panic!() };
        assert_eq!(change.status.observed, Observed::Exited);
    }

    #[test]
    fn restarting_waits_for_its_backoff() {
        let mut h = held("p", Observed::Restarting, SVC);
        h.next_start_ms = Some(5_000);
        let c = container("c", "p", ContainerState::Exited { code: 1 });
        assert!(run(&[h.clone()], &[c.clone()]).is_empty());
        h.next_start_ms = Some(900);
        assert_eq!(run(&[h], &[c]), vec![Action::Start { placement_id: "p".into(), container_id: "c".into() }]);
    }

    #[test]
    fn stop_orphans_and_duplicates() {
        let mut h = held("p", Observed::Running, SVC);
        h.desired = Desired::Stop;
        let acts = run(&[h.clone()], &[container("c", "p", ContainerState::Running)]);
        assert_eq!(acts, vec![Action::StopRemove { placement_id: "p".into(), container_id: "c".into() }]);
        let acts = run(&[h.clone()], &[]);
        assert!(matches!(&acts[0], Action::Report { change, .. } if change.status.observed == Observed::Stopped));
        h.status.observed = Observed::Stopped;
        assert_eq!(run(&[h], &[]), vec![Action::Forget { placement_id: "p".into() }]);

        let acts = run(&[], &[container("x", "gone", ContainerState::Running)]);
        assert_eq!(acts, vec![Action::RemoveOrphan { container_id: "x".into() }]);

        let mut h = held("p", Observed::Running, SVC);
        h.status.container_id = Some("b".into());
        h.status.endpoints = vec!["10.0.0.1:32768".into()];
        let acts =
            run(&[h], &[container("a", "p", ContainerState::Running), container("b", "p", ContainerState::Running)]);
        assert_eq!(acts, vec![Action::RemoveOrphan { container_id: "a".into() }]);
    }

    #[test]
    fn health_verdicts_stop_then_count_as_failures() {
        const REASON: &str = "health check failed 2 times: GET /health on 172.17.0.5:7777: 500";
        let verdict = |container: &str| {
            HashMap::from([("p".to_string(), Unhealthy { container_id: container.into(), reason: REASON.into() })])
        };
        let running = |restarts: u32, spec: &str| {
            let mut h = held("p", Observed::Running, spec);
            h.status.restarts = restarts;
            h.status.container_id = Some("c".into());
            h.status.endpoints = vec!["10.0.0.1:32768".into()];
            h
        };
        let always = r#"{"image":"i","restart":{"policy":"always","max_attempts":2,"delay_ms":200}}"#;
        let on_failure = r#"{"image":"i","restart":{"policy":"on-failure","max_attempts":2,"delay_ms":200}}"#;
        let no = r#"{"image":"i","restart":{"policy":"no"}}"#;
        let up = container("c", "p", ContainerState::Running);
        let down = |code| container("c", "p", ContainerState::Exited { code });
        let stop = vec![Action::StopUnhealthy { placement_id: "p".into(), container_id: "c".into() }];
        let report = |acts: Vec<Action>| match &acts[..] {
            [Action::Report { change, .. }] => {
                (change.status.observed, change.status.reason.clone().unwrap_or_default())
            }
            other => panic!("{other:?}"),
        };
        let restart_in_100 = format!("{REASON}; restart 1 in 100 ms");

        // (held, container, verdict on, expected) — one row per rule.
        type Expect = Result<(Observed, String), Vec<Action>>;
        let table: Vec<(Held, ContainerInfo, Option<&str>, Expect)> = vec![
            // No verdict: a healthy running container needs nothing.
            (running(0, always), up.clone(), None, Err(vec![])),
            // A verdict on the running container stops it (not remove: restarts reuse it).
            (running(0, always), up.clone(), Some("c"), Err(stop.clone())),
            // A verdict on an older container is ignored.
            (running(0, always), up.clone(), Some("old"), Err(vec![])),
            // Stopped by the verdict: restart with backoff, the reason names the probe,
            // even with exit code 0 under on-failure.
            (running(0, always), down(0), Some("c"), Ok((Observed::Restarting, restart_in_100.clone()))),
            (running(0, on_failure), down(0), Some("c"), Ok((Observed::Restarting, restart_in_100))),
            // Without a verdict, exit 0 under on-failure is a plain exit.
            (running(0, on_failure), down(0), None, Ok((Observed::Exited, "exited with code 0".into()))),
            // Restarts used up: failed, with the health reason.
            (
                running(2, always),
                down(143),
                Some("c"),
                Ok((Observed::Failed, format!("{REASON}; gave up after 2 restarts"))),
            ),
            // Policy no: an unhealthy stop is a failure, not a clean exit.
            (running(0, no), down(0), Some("c"), Ok((Observed::Failed, REASON.into()))),
        ];
        for (i, (h, c, on, want)) in table.into_iter().enumerate() {
            let unhealthy = on.map(verdict).unwrap_or_default();
            let acts = run_judged(&[h], &[c], &unhealthy);
            match want {
                Ok(expect) => assert_eq!(report(acts), expect, "row {i}"),
                Err(expect) => assert_eq!(acts, expect, "row {i}"),
            }
        }
    }

    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let mut max = |m: u64| m;
        assert_eq!(backoff_ms(1000, 60_000, 0, &mut max), 1000);
        assert_eq!(backoff_ms(1000, 60_000, 3, &mut max), 8000);
        assert_eq!(backoff_ms(1000, 60_000, 10, &mut max), 60_000);
        assert_eq!(backoff_ms(1000, 60_000, 200, &mut max), 60_000);
        let mut zero = |_| 0;
        assert_eq!(backoff_ms(1000, 60_000, 5, &mut zero), 0);
    }
}
