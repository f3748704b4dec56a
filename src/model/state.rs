//! Desired and observed states, and the one place that decides which observed-state
//! moves are allowed.

use serde::{Deserialize, Serialize};

/// What the managers want for a task or placement. Written only by managers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Keep it running (or run it to completion for batch).
    Run,
    /// Stop it and remove its container.
    Stop,
}

impl Desired {
    /// Lower-case name as used in the API and the databases.
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Run => "run",
            Desired::Stop => "stop",
        }
    }

    /// The one parser of its stored text: `stop` is [`Desired::Stop`], anything else
    /// [`Desired::Run`] (the databases only ever hold the two names).
    pub fn from_stored(s: &str) -> Desired {
        if s == Desired::Stop.as_str() {
            Desired::Stop
        } else {
            Desired::Run
        }
    }
}

/// What a worker reports about one placement. Written only by workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observed {
    /// Accepted into the worker's ledger, nothing done yet.
    Pending,
    /// Image being obtained.
    Pulling,
    /// Container being created and started.
    Starting,
    /// Process running.
    Running,
    /// Exited; waiting out the restart backoff.
    Restarting,
    /// Exited for good (batch done, or policy says no restart); see exit code.
    Exited,
    /// Gave up: could not start, or restart limit reached; see reason.
    Failed,
    /// Stopped on request and container removed.
    Stopped,
}

/// Every observed state, for table tests and iteration.
pub const ALL_OBSERVED: [Observed; 8] = [
    Observed::Pending,
    Observed::Pulling,
    Observed::Starting,
    Observed::Running,
    Observed::Restarting,
    Observed::Exited,
    Observed::Failed,
    Observed::Stopped,
];

/// A move the lifecycle does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid transition {from:?} -> {to:?}")]
pub struct InvalidTransition {
    /// State before.
    pub from: Observed,
    /// Requested state.
    pub to: Observed,
}

impl Observed {
    /// `true` once nothing more will happen to the placement on its own.
    pub fn is_terminal(self) -> bool {
        matches!(self, Observed::Exited | Observed::Failed | Observed::Stopped)
    }

    /// Lower-case name as used in the API and the databases.
    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Pending => "pending",
            Observed::Pulling => "pulling",
            Observed::Starting => "starting",
            Observed::Running => "running",
            Observed::Restarting => "restarting",
            Observed::Exited => "exited",
            Observed::Failed => "failed",
            Observed::Stopped => "stopped",
        }
    }

    /// Inverse of [`Observed::as_str`].
    pub fn parse(s: &str) -> Option<Observed> {
        ALL_OBSERVED.into_iter().find(|o| o.as_str() == s)
    }
}

/// The one function deciding every observed-state move. Staying in the same state is
/// allowed (a report may only change counters). A worker that adopts a running
/// container after a crash may jump from `pending` straight to `running`.
pub fn transition(from: Observed, to: Observed) -> Result<Observed, InvalidTransition> {
    use Observed::*;
    let ok = from == to
        || match from {
            Pending => matches!(to, Pulling | Starting | Running | Exited | Failed | Stopped),
            Pulling => matches!(to, Starting | Failed | Stopped),
            Starting => matches!(to, Running | Restarting | Exited | Failed | Stopped),
            Running => matches!(to, Restarting | Exited | Failed | Stopped),
            Restarting => matches!(to, Starting | Running | Exited | Failed | Stopped),
            // A finished container is still removed when the task is stopped.
            Exited | Failed => matches!(to, Stopped),
            Stopped => false,
        };
    if ok {
        Ok(to)
    } else {
        Err(InvalidTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observed::*;

    #[test]
    fn every_pair_is_decided_as_the_table_says() {
        // Rows: from; columns in ALL_OBSERVED order: to. 1 = allowed.
        let table: [(Observed, [u8; 8]); 8] = [
            //           Pe Pu St Ru Re Ex Fa So
            (Pending, [1, 1, 1, 1, 0, 1, 1, 1]),
            (Pulling, [0, 1, 1, 0, 0, 0, 1, 1]),
            (Starting, [0, 0, 1, 1, 1, 1, 1, 1]),
            (Running, [0, 0, 0, 1, 1, 1, 1, 1]),
            (Restarting, [0, 0, 1, 1, 1, 1, 1, 1]),
            (Exited, [0, 0, 0, 0, 0, 1, 0, 1]),
            (Failed, [0, 0, 0, 0, 0, 0, 1, 1]),
            (Stopped, [0, 0, 0, 0, 0, 0, 0, 1]),
        ];
        for (from, row) in table {
            for (to, allowed) in ALL_OBSERVED.into_iter().zip(row) {
                assert_eq!(transition(from, to).is_ok(), allowed == 1, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for o in ALL_OBSERVED {
            assert_eq!(Observed::parse(o.as_str()), Some(o));
        }
        assert_eq!(Observed::parse("bogus"), None);
    }
}
