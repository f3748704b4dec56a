//! The cluster feature level for rolling upgrades (ARCHITECTURE.md, "Upgrades").
//!
//! Every build supports feature levels up to [`build_level`] and advertises it in its
//! Raft member record. The cluster's level lives in replicated state (`cluster_meta`)
//! and only goes up: the leader raises it with [`UpgradeCommand::SetLevel`] once every
//! voter advertises support. A command kind added at level N is written only when the
//! cluster is at N or above; from level 2 on it travels in the [`UpgradeCommand::Gated`]
//! envelope, which every level-aware build decodes, so a member that meets a level it
//! does not support stops applying ("upgrade me") instead of skipping the entry.

use std::sync::OnceLock;

use super::cached::Cached;
use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::{reject, Answer, Outcome, RejectCode, Rejection};

/// The highest feature level this build knows. Level 1 brought the feature level
/// itself, retention (`state::retention`) and node removal.
pub const FEATURE_LEVEL: u32 = 1;

/// Test hook: set to `1` to make this build claim level [`FEATURE_LEVEL`]` + 1` and
/// know the [`Gated::Probe`] kind that exists only at that level, so an upgrade from
/// this build to the next can be tested on real processes with one binary.
pub const TEST_NEXT_LEVEL_ENV: &str = "HOLDFAST_TEST_NEXT_LEVEL";

/// The level of the command kind only the test hook's "next" build knows.
pub const PROBE_LEVEL: u32 = FEATURE_LEVEL + 1;

/// Levels above this are not levels but hostile numbers.
const MAX_LEVEL: u32 = 1_000_000;

/// What the leader writes and what gated commands travel in.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum UpgradeCommand {
    /// Raise the cluster's feature level; never lowers it.
    SetLevel {
        /// The new level.
        level: u32,
        /// The voters and the level each advertised when the leader decided, for the
        /// record (history, not re-checked: membership is not domain state).
        voters: Vec<(String, u32)>,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// A command of a kind added at `level` (2 and up). Every level-aware build decodes
    /// this envelope; only builds supporting `level` decode `body`.
    Gated {
        /// Level the body's kind needs.
        level: u32,
        /// The command itself, as a [`Gated`] value in JSON.
        body: serde_json::Value,
    },
}

/// Command kinds that need a feature level above 1 (the body of a gated envelope).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Gated {
    /// Test hook only ([`TEST_NEXT_LEVEL_ENV`]): counts itself in `cluster_meta`; it
    /// stands for any future command kind an older build cannot decode.
    Probe {
        /// Free text, at most 256 bytes.
        note: String,
    },
}

impl Gated {
    /// The level the kind was added at.
    pub fn level(&self) -> u32 {
        match self {
            Gated::Probe { .. } => PROBE_LEVEL,
        }
    }
}

/// Table of cluster-wide numbers (`feature_level`, `probes`).
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS cluster_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"#;

/// Prefix of the apply error a member stops with when it meets a level it does not
/// support, for the operator reading logs and health.
pub const UPGRADE_ME: &str = "UPGRADE ME";

/// Why `apply` stopped on this member: a committed entry needs a feature level this
/// build does not support. Carried inside the `rusqlite::Error` that stops Raft (as
/// `UserFunctionError`) and kept by the state machine
/// ([`super::DomainState::upgrade_required`]), so `node` and the health endpoint know
/// it by type, not by the fatal text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{UPGRADE_ME}: log entry {index} needs feature level {level} but this build ({version}) supports up to \
     {supported}; it stopped applying rather than skip the entry. Install a build that supports level {level} on \
     this manager and start it again"
)]
pub struct NeedsUpgrade {
    /// The entry's Raft log index.
    pub index: u64,
    /// The level it needs.
    pub level: u32,
    /// The highest level this build supports.
    pub supported: u32,
    /// This build's version.
    pub version: &'static str,
}

/// The highest level this build supports: [`FEATURE_LEVEL`], or one more under the
/// test hook. Read once per process.
pub fn build_level() -> u32 {
    static LEVEL: OnceLock<u32> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let next = std::env::var(TEST_NEXT_LEVEL_ENV).is_ok_and(|v| v == "1");
        if next {
            PROBE_LEVEL
        } else {
            FEATURE_LEVEL
        }
    })
}

/// The cluster's feature level (0 for a store from before levels).
pub fn cluster_level(conn: &rusqlite::Connection) -> rusqlite::Result<u32> {
    let v: Option<i64> = conn
        .query_row_cached("SELECT value FROM cluster_meta WHERE key = 'feature_level'", [], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0).clamp(0, MAX_LEVEL as i64) as u32)
}

/// How many probes the test hook's next build applied (0 otherwise).
pub fn probes(conn: &rusqlite::Connection) -> rusqlite::Result<u64> {
    let v: Option<i64> =
        conn.query_row_cached("SELECT value FROM cluster_meta WHERE key = 'probes'", [], |r| r.get(0)).optional()?;
    Ok(v.unwrap_or(0).max(0) as u64)
}

/// Refuses a command of a kind added at `needed` while the cluster is below it, the
/// same way on every member (the level is replicated state).
pub fn require(tx: &Transaction<'_>, needed: u32) -> rusqlite::Result<Option<Rejection>> {
    let level = cluster_level(tx)?;
    Ok((level < needed).then(|| {
        Rejection::new(
            RejectCode::FeatureLevel,
            format!(
                "this command needs cluster feature level {needed}; the cluster is at {level} (every manager must run \
             a build that supports {needed}; see README \"Upgrade\")"
            ),
        )
    }))
}

/// Content checks that need no database.
pub fn check(cmd: &UpgradeCommand) -> Option<Rejection> {
    let invalid = |m: String| Some(Rejection::new(RejectCode::Invalid, m));
    match cmd {
        UpgradeCommand::SetLevel { level, voters, now_ms } => {
            if *level == 0 || *level > MAX_LEVEL {
                return invalid(format!("feature level {level} is out of range"));
            }
            if voters.len() > 1_000 || voters.iter().any(|(n, _)| !super::valid_id(n)) {
                return invalid("voters must be at most 1000 valid node names".into());
            }
            (*now_ms > i64::MAX as u64).then(|| invalid(format!("now_ms {now_ms} is out of range"))).flatten()
        }
        UpgradeCommand::Gated { level, .. } => (*level < 2 || *level > MAX_LEVEL)
            .then(|| invalid(format!("gated level {level} is out of range")))
            .flatten(),
    }
}

/// Applies an upgrade command. `supported` is this build's level ([`build_level`]);
/// a gated command above it is an `Err` that stops Raft on this member, never a
/// rejection that other members would not make.
pub fn apply(tx: &Transaction<'_>, index: u64, cmd: UpgradeCommand, supported: u32) -> rusqlite::Result<Outcome> {
    match cmd {
        UpgradeCommand::SetLevel { level, voters: _, now_ms: _ } => {
            let current = cluster_level(tx)?;
            if level <= current {
                return reject(RejectCode::Conflict, format!("the cluster is already at feature level {current}"));
            }
            tx.execute_cached(
                "INSERT INTO cluster_meta (key, value) VALUES ('feature_level', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = ?1",
                params![level as i64],
            )?;
            Ok(Ok(Answer::LevelSet { feature_level: level, was: current }))
        }
        UpgradeCommand::Gated { level, body } => {
            if let Some(r) = require(tx, level)? {
                return Ok(Err(r));
            }
            if level > supported {
                let stop = NeedsUpgrade { index, level, supported, version: env!("CARGO_PKG_VERSION") };
                tracing::error!(index, level, supported, "{stop}");
                // Not a content error (`is_content_error`): this stops Raft here, and only here.
                return Err(rusqlite::Error::UserFunctionError(Box::new(stop)));
            }
            let gated: Gated = match serde_json::from_value(body) {
                Ok(g) => g,
                Err(e) => return reject(RejectCode::BadCommand, format!("gated command at level {level}: {e}")),
            };
            if gated.level() != level {
                return reject(
                    RejectCode::Invalid,
                    format!("this kind needs feature level {}, not {level}", gated.level()),
                );
            }
            match gated {
                Gated::Probe { note } => {
                    if note.len() > 256 {
                        return reject(RejectCode::Invalid, "probe note is longer than 256 bytes");
                    }
                    tx.execute_cached(
                        "INSERT INTO cluster_meta (key, value) VALUES ('probes', 1)
                         ON CONFLICT(key) DO UPDATE SET value = value + 1",
                        [],
                    )?;
                    Ok(Ok(Answer::Probe { probe: index }))
                }
            }
        }
    }
}

/// The level the leader may raise the cluster to: the lowest level the voters
/// advertise, when it is above the current one. Pure; `voters` are (name, level).
pub fn next_level(current: u32, voters: &[(String, u32)]) -> Option<u32> {
    let lowest = voters.iter().map(|(_, l)| *l).min()?;
    (lowest > current).then_some(lowest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_level_follows_the_slowest_voter_and_never_falls() {
        let v = |l: &[u32]| l.iter().enumerate().map(|(i, l)| (format!("m{i}"), *l)).collect::<Vec<_>>();
        assert_eq!(next_level(0, &v(&[1, 1, 1])), Some(1));
        assert_eq!(next_level(1, &v(&[2, 1, 2])), None, "an old voter holds the level");
        assert_eq!(next_level(1, &v(&[2, 2, 2])), Some(2));
        assert_eq!(next_level(2, &v(&[1, 2, 2])), None, "a downgraded voter never lowers it");
        assert_eq!(next_level(0, &v(&[0, 1])), None, "a build from before levels holds it at 0");
        assert_eq!(next_level(3, &[]), None);
    }
}
