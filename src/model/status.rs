//! What a worker last observed of one placement, as one struct: the worker's ledger
//! (`Held`, `Change`), the sync report (`StatusReport`) and the API's `PlacementView`
//! all embed it, flattened, so their JSON keeps the six fields at the top level. And
//! the story events a worker tells about a placement besides its observed state.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Observed;

/// A placement's observed status as its worker last recorded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PlacementStatus {
    /// Worker's last report (`pending`, `pulling`, `starting`, `running`, ...).
    #[schema(value_type = String)]
    pub observed: Observed,
    /// Exit code of the last exit, if any.
    pub exit_code: Option<i64>,
    /// Reason of the last failure or exit.
    pub reason: Option<String>,
    /// Local restarts so far.
    pub restarts: u32,
    /// `host:port` endpoints of published ports.
    pub endpoints: Vec<String>,
    /// Engine container id, once created.
    pub container_id: Option<String>,
}

impl PlacementStatus {
    /// A status in `observed` with nothing else known yet (no exit, no restarts, no
    /// endpoints, no container): what a placement accepted into a ledger starts with.
    pub fn new(observed: Observed) -> PlacementStatus {
        PlacementStatus {
            observed,
            exit_code: None,
            reason: None,
            restarts: 0,
            endpoints: Vec::new(),
            container_id: None,
        }
    }

    /// The endpoints as both databases store them: a JSON array of strings.
    pub fn endpoints_json(&self) -> String {
        serde_json::to_string(&self.endpoints).unwrap_or_else(|_| "[]".into())
    }

    /// Reads the status from six consecutive columns of a row, starting at `first`:
    /// `observed, exit_code, reason, restarts, endpoints, container_id`, stored as the
    /// worker ledger and the replicated database both store them (an unreadable
    /// `observed` reads as `pending`, unreadable endpoints as none; either is logged and
    /// counted in `holdfast_unreadable_status_total`).
    pub fn from_row(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<PlacementStatus> {
        let observed: String = r.get(first)?;
        let endpoints: String = r.get(first + 4)?;
        let observed = Observed::parse(&observed).unwrap_or_else(|| {
            tracing::warn!(%observed, "unreadable stored observed state; read as pending");
            metrics::counter!("holdfast_unreadable_status_total").increment(1);
            Observed::Pending
        });
        let endpoints = serde_json::from_str(&endpoints).unwrap_or_else(|error| {
            tracing::warn!(%endpoints, %error, "unreadable stored endpoints; read as none");
            metrics::counter!("holdfast_unreadable_status_total").increment(1);
            Vec::new()
        });
        Ok(PlacementStatus {
            observed,
            exit_code: r.get(first + 1)?,
            reason: r.get(first + 2)?,
            restarts: r.get::<_, i64>(first + 3)? as u32,
            endpoints,
            container_id: r.get(first + 5)?,
        })
    }
}

/// A story event of a placement's history, told by its worker even when the observed
/// state does not change. Stored (worker outbox, Raft log, `placement_events.observed`)
/// and sent as its [`Story::as_str`] text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Story {
    /// The lease ran out; the placement runs on under the authority the worker cached.
    CachedAuthority,
    /// The lease ran out; the placement (offline mode `exclusive`) was stopped.
    StoppedOnExpiry,
    /// A manager renewed the lease of a worker that ran under cached authority.
    AuthorityRenewed,
    /// The placement's guard stopped it at its deadline.
    Fenced,
    /// A suspended placement was started again after a lease renewal.
    Resumed,
    /// A story this version does not know (a report of another worker version, or an
    /// old log entry): kept as sent, so decoding a report never fails on its story.
    Other(String),
}

impl Story {
    /// Every story this version tells, for table tests.
    pub const KNOWN: [Story; 5] =
        [Story::CachedAuthority, Story::StoppedOnExpiry, Story::AuthorityRenewed, Story::Fenced, Story::Resumed];

    /// The text stored and sent for it.
    pub fn as_str(&self) -> &str {
        match self {
            Story::CachedAuthority => "cached-authority",
            Story::StoppedOnExpiry => "stopped-on-expiry",
            Story::AuthorityRenewed => "authority-renewed",
            Story::Fenced => "fenced",
            Story::Resumed => "resumed",
            Story::Other(s) => s,
        }
    }

    /// The one parser of its text; any text is a story (see [`Story::Other`]).
    pub fn parse(s: &str) -> Story {
        Story::KNOWN.into_iter().find(|k| k.as_str() == s).unwrap_or_else(|| Story::Other(s.to_string()))
    }
}

impl Serialize for Story {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Story {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Story, D::Error> {
        Ok(Story::parse(&String::deserialize(deserializer)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stories_keep_their_stored_text() {
        let table = [
            (Story::CachedAuthority, "cached-authority"),
            (Story::StoppedOnExpiry, "stopped-on-expiry"),
            (Story::AuthorityRenewed, "authority-renewed"),
            (Story::Fenced, "fenced"),
            (Story::Resumed, "resumed"),
            (Story::Other("told-by-a-newer-worker".into()), "told-by-a-newer-worker"),
        ];
        assert_eq!(table.len(), Story::KNOWN.len() + 1, "a new story needs a row here");
        for (story, text) in table {
            assert_eq!(story.as_str(), text);
            assert_eq!(Story::parse(text), story);
            assert_eq!(serde_json::to_string(&story).unwrap(), format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<Story>(&format!("\"{text}\"")).unwrap(), story);
        }
    }

    #[test]
    fn a_new_status_knows_nothing_but_its_state() {
        let s = PlacementStatus::new(Observed::Pending);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"observed":"pending","exit_code":null,"reason":null,"restarts":0,"endpoints":[],"container_id":null}"#
        );
        assert_eq!(s.endpoints_json(), "[]");
    }
}
