//! The guard's deadline, derived from the worker's lease. Pure: clocks are arguments.
//!
//! The chain (ARCHITECTURE.md, "The fence inside the container"):
//! - the worker's lease ends at `sent + lease - margin` (its own clock, counted from the
//!   moment it *sent* the sync that granted it);
//! - the guard's deadline is `lease end - budget`, written as an absolute
//!   `CLOCK_BOOTTIME` instant, with `budget = grace + exit slack`: at the deadline the
//!   guard sends SIGTERM, `grace` later SIGKILL, and exits; `exit slack` covers the
//!   kill, the exit and the engine noticing. Both scale with the lease (a fifth and a
//!   tenth of it, at most 2 s and 0.5 s), so short test leases still leave run time;
//! - a manager replaces an `exclusive` placement no earlier than `lease + heartbeat TTL`
//!   after the node went silent, and the node was heard at or after `sent`.
//!
//! So the old copy is gone by the worker's own lease end, at least `heartbeat TTL +
//! margin` before any replacement may be placed, whenever the deadline was written:
//! a late write carries an absolute deadline, so it can only be *earlier* than the
//! lease end, never extend past it.

use std::time::Duration;

use crate::guard::Deadline;

/// The guard's stop budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceTiming {
    /// SIGTERM → SIGKILL grace the guard gives the app.
    pub grace: Duration,
    /// Time for the kill, the guard's exit and the engine to notice.
    pub exit_slack: Duration,
}

impl FenceTiming {
    /// The budget for a lease of `lease_ms`: grace a fifth of it (100 ms to 2 s), exit
    /// slack a tenth (50 to 500 ms); 2.5 s in all for leases of 10 s and more.
    pub fn for_lease(lease_ms: u64) -> FenceTiming {
        FenceTiming {
            grace: Duration::from_millis((lease_ms / 5).clamp(100, 2_000)),
            exit_slack: Duration::from_millis((lease_ms / 10).clamp(50, 500)),
        }
    }

    /// How long before the lease end the guard must begin to stop the app.
    pub fn budget_ms(&self) -> u64 {
        (self.grace + self.exit_slack).as_millis() as u64
    }
}

/// The guard deadline for a lease ending at `lease_until_ms` (wall clock), computed
/// when the wall clock read `now_ms` and the boot clock `now_boot_ms`. Read the boot
/// clock *first*: a pause between the two reads then only makes the deadline earlier.
/// `None` when no more than the budget is left: starting or extending the task then is
/// pointless, the guard would have to stop it at once.
pub fn guard_deadline(lease_until_ms: u64, now_ms: u64, now_boot_ms: u64, timing: FenceTiming) -> Option<Deadline> {
    let remaining = lease_until_ms.checked_sub(now_ms)?;
    let run_for = remaining.checked_sub(timing.budget_ms()).filter(|r| *r > 0)?;
    Some(Deadline { at_boot_ms: now_boot_ms + run_for, grace_ms: timing.grace.as_millis() as u64 })
}

/// Why a start reconcile decided on must not happen now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoStart {
    /// The ledger no longer wants the placement run here: stopped, superseded by a
    /// higher fence, or forgotten.
    NotWanted,
    /// No lease, and the task's offline mode starts nothing without one.
    NoLease,
    /// A guarded task with no more lease left than its guard's stop budget.
    TooLittleLease,
}

/// The check a start of a placement passes just before the engine is asked to run it,
/// whatever reconcile decided on its snapshot (a job may wait for a pool slot while a
/// sync renews the lease and supersedes the placement). `desired` is the ledger's row
/// read *after* the lease (`lease_until_ms`, `lease_ms`), so a renewed lease always comes
/// with the desired set it was granted with; `needs_lease` unless the task's offline
/// mode is `keep`. The guard's deadline for a guarded task, `None` for another.
pub fn start_permit(
    desired: Option<crate::model::Desired>,
    needs_lease: bool,
    guarded: bool,
    lease: (u64, u64),
    now_ms: u64,
    now_boot_ms: u64,
) -> Result<Option<Deadline>, NoStart> {
    let (lease_until_ms, lease_ms) = lease;
    if desired != Some(crate::model::Desired::Run) {
        return Err(NoStart::NotWanted);
    }
    if needs_lease && now_ms >= lease_until_ms {
        return Err(NoStart::NoLease);
    }
    if !guarded {
        return Ok(None);
    }
    guard_deadline(lease_until_ms, now_ms, now_boot_ms, FenceTiming::for_lease(lease_ms))
        .map(Some)
        .ok_or(NoStart::TooLittleLease)
}

/// One lease's worst case on a single time line (the worker's boot clock taken equal to
/// its wall clock): when the guard's copy is gone at the latest, when the worker's own
/// lease ends, and when a manager may place a replacement at the earliest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeline {
    /// The worker's lease end.
    pub lease_end_ms: u64,
    /// The guard's app is gone by then (deadline + grace + exit slack); `None` when no
    /// deadline was written (the guard keeps its older, earlier one).
    pub guard_gone_ms: Option<u64>,
    /// Earliest time a manager may place a replacement.
    pub earliest_replacement_ms: u64,
}

/// Builds the [`Timeline`] of a sync sent at `sent_ms` granting `lease_ms`, with the
/// worker's drift `margin_ms`, the managers' `heartbeat_ttl_ms`, and the deadline
/// written at `written_ms` (any time: engine calls may be late).
pub fn timeline(sent_ms: u64, lease_ms: u64, margin_ms: u64, heartbeat_ttl_ms: u64, written_ms: u64) -> Timeline {
    let timing = FenceTiming::for_lease(lease_ms);
    let lease_end_ms = sent_ms + lease_ms.saturating_sub(margin_ms);
    let deadline = guard_deadline(lease_end_ms, written_ms, written_ms, timing);
    Timeline {
        lease_end_ms,
        guard_gone_ms: deadline.map(|d| d.at_boot_ms + d.grace_ms + timing.exit_slack.as_millis() as u64),
        // The manager heard the node no earlier than `sent`, and waits lease + TTL
        // after it went silent (which is itself at least a TTL after it was heard).
        earliest_replacement_ms: sent_ms + lease_ms + heartbeat_ttl_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The invariant of ARCHITECTURE.md: the guarded copy is gone by the worker's lease
    /// end, and at least `heartbeat TTL + margin` before a replacement may be placed,
    /// for every lease, TTL, margin and write delay, including writes that arrive late
    /// (a long-poll sync, a slow engine) or after the lease has ended.
    #[test]
    fn the_guard_is_gone_before_the_lease_ends_and_before_any_replacement() {
        // (lease, margin, ttl, write delay after the send)
        let rows: &[(u64, u64, u64, u64)] = &[
            (30_000, 1_000, 5_000, 0),
            (30_000, 1_000, 5_000, 2_500),  // long-poll answered after TTL/2
            (30_000, 1_000, 5_000, 25_000), // engine slow: written near the end
            (30_000, 1_000, 5_000, 26_499), // just inside the budget
            (30_000, 1_000, 5_000, 26_500), // exactly the budget left: no extension
            (30_000, 1_000, 5_000, 60_000), // written long after the lease ended
            (10_000, 1_000, 3_000, 0),      // the settings
            (10_000, 1_000, 3_000, 1_500),
            (10_000, 1_000, 3_000, 6_400),
            (3_000, 500, 500, 0),     // short test leases still leave run time
            (3_000, 500, 500, 1_599), // ... until no more than the budget is left
            (3_000, 500, 500, 1_600),
            (1_000, 1_000, 500, 0), // the margin eats the lease: never runs
            (600_000, 5_000, 60_000, 300_000),
        ];
        for &(lease, margin, ttl, delay) in rows {
            let sent = 1_000_000;
            let t = timeline(sent, lease, margin, ttl, sent + delay);
            let case = format!("lease {lease} margin {margin} ttl {ttl} delay {delay}: {t:?}");
            if let Some(gone) = t.guard_gone_ms {
                assert!(gone <= t.lease_end_ms, "guard outlives the lease: {case}");
                assert!(gone + ttl + margin <= t.earliest_replacement_ms, "margin too small: {case}");
                assert!(gone > sent + delay, "a deadline is only written while it is ahead: {case}");
            }
            // No deadline is written when the budget does not fit in what is left.
            let left = t.lease_end_ms.saturating_sub(sent + delay);
            let budget = FenceTiming::for_lease(lease).budget_ms();
            assert_eq!(t.guard_gone_ms.is_some(), left > budget, "{case}");
        }
    }

    #[test]
    fn a_pause_between_the_clock_reads_only_makes_the_deadline_earlier() {
        let timing = FenceTiming::for_lease(30_000);
        // Boot clock read at 100 (boot) = 5_000 (wall); a 700 ms pause before the wall read.
        let prompt = guard_deadline(20_000, 5_000, 100, timing).unwrap();
        let paused = guard_deadline(20_000, 5_700, 100, timing).unwrap();
        assert!(paused.at_boot_ms < prompt.at_boot_ms);
        assert_eq!(prompt, Deadline { at_boot_ms: 100 + 15_000 - 2_500, grace_ms: 2_000 });
        assert_eq!(guard_deadline(20_000, 25_000, 100, timing), None, "expired lease");
    }

    /// A start decided on a snapshot happens only if the ledger, read after the lease,
    /// still wants the placement here, and the lease (or the offline mode) allows it.
    #[test]
    fn a_start_needs_the_placement_still_wanted_and_the_lease_it_came_with() {
        use crate::model::Desired::{Run, Stop};
        let (lease, now, boot) = ((50_000, 30_000), 20_000, 7_000);
        let d = |run_for: u64| Ok(Some(Deadline { at_boot_ms: boot + run_for, grace_ms: 2_000 }));
        type Permit = Result<Option<Deadline>, NoStart>;
        type Row = (Option<crate::model::Desired>, bool, bool, (u64, u64), u64, Permit);
        // (desired, needs a lease, guarded, lease (end, length), now) → permit
        let rows: &[Row] = &[
            (Some(Run), true, true, lease, now, d(30_000 - 2_500)),
            (Some(Run), true, false, lease, now, Ok(None)),
            (Some(Run), false, false, (0, 0), now, Ok(None)), // keep: runs on cached authority
            // Superseded or stopped (the sync that renewed the lease said so): never,
            // however fresh the lease.
            (Some(Stop), true, true, lease, now, Err(NoStart::NotWanted)),
            (Some(Stop), false, false, lease, now, Err(NoStart::NotWanted)),
            (None, true, true, lease, now, Err(NoStart::NotWanted)),
            // The lease ran out while the job waited.
            (Some(Run), true, true, lease, 50_000, Err(NoStart::NoLease)),
            (Some(Run), true, false, lease, 60_000, Err(NoStart::NoLease)),
            // A guarded keep task still needs a deadline, so a lease.
            (Some(Run), false, true, lease, 60_000, Err(NoStart::TooLittleLease)),
            (Some(Run), true, true, lease, 47_500, Err(NoStart::TooLittleLease)),
            (Some(Run), true, true, lease, 47_499, d(1)),
        ];
        for (desired, needs_lease, guarded, lease, now, want) in rows {
            let got = start_permit(*desired, *needs_lease, *guarded, *lease, *now, boot);
            assert_eq!(&got, want, "{desired:?} needs_lease {needs_lease} guarded {guarded} lease {lease:?} now {now}");
        }
    }

    #[test]
    fn the_budget_scales_with_the_lease() {
        let check = |lease: u64, grace: u64, slack: u64| {
            let t = FenceTiming::for_lease(lease);
            assert_eq!((t.grace.as_millis() as u64, t.exit_slack.as_millis() as u64), (grace, slack), "{lease}");
        };
        check(30_000, 2_000, 500);
        check(10_000, 2_000, 500);
        check(6_000, 1_200, 500);
        check(3_000, 600, 300);
        check(500, 100, 50);
    }
}
