//! What `apply` answers for a command: a typed [`Answer`] per command kind, or a
//! [`Rejection`] whose [`RejectCode`] is an enum. Both travel back to the writer as the
//! Raft response bytes; their JSON is unchanged from when they were loose JSON values
//! (field names and code strings), which `tests` below pin.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a command was refused, as a machine-readable code. The API maps each to an
/// HTTP status in one `match` (`manager::api`); the audit stores [`RejectCode::as_str`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// It clashes with what exists (an id, an idempotency key, the last admin token).
    Conflict,
    /// Its subject (task, node, token) does not exist.
    NotFound,
    /// A field is out of range or malformed.
    Invalid,
    /// The bytes are no command this version knows.
    BadCommand,
    /// A CA that is not a PEM certificate and key.
    BadCa,
    /// A join token record that is malformed.
    BadToken,
    /// A node name that is malformed.
    BadNode,
    /// A join token the cluster does not know.
    TokenUnknown,
    /// A join token that was rotated or revoked.
    TokenRevoked,
    /// A join token past its expiry.
    TokenExpired,
    /// A join token with no uses left.
    TokenUsedUp,
    /// A join token of the other role.
    TokenRole,
    /// A command kind the cluster's feature level does not allow yet.
    FeatureLevel,
    /// A CA rotation with no CA to rotate.
    NoCa,
}

impl RejectCode {
    /// The code's text, as stored in the audit and sent in API errors.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Conflict => "conflict",
            RejectCode::NotFound => "not_found",
            RejectCode::Invalid => "invalid",
            RejectCode::BadCommand => "bad_command",
            RejectCode::BadCa => "bad_ca",
            RejectCode::BadToken => "bad_token",
            RejectCode::BadNode => "bad_node",
            RejectCode::TokenUnknown => "token_unknown",
            RejectCode::TokenRevoked => "token_revoked",
            RejectCode::TokenExpired => "token_expired",
            RejectCode::TokenUsedUp => "token_used_up",
            RejectCode::TokenRole => "token_role",
            RejectCode::FeatureLevel => "feature_level",
            RejectCode::NoCa => "no_ca",
        }
    }

    /// Whether this refuses a join token (the join endpoint answers these with 403).
    pub fn refuses_join(self) -> bool {
        matches!(
            self,
            RejectCode::TokenUnknown
                | RejectCode::TokenRevoked
                | RejectCode::TokenExpired
                | RejectCode::TokenUsedUp
                | RejectCode::TokenRole
        )
    }
}

impl std::fmt::Display for RejectCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why `apply` refused a command; travels back to the writer as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Rejection {
    /// Machine-readable code.
    pub code: RejectCode,
    /// Human message.
    pub message: String,
}

impl Rejection {
    /// A rejection with `code` and `message`.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Rejection {
        Rejection { code, message: message.into() }
    }
}

/// What `apply` answers, serialized as the Raft response bytes.
pub type Outcome = Result<Answer, Rejection>;

/// `SubmitTask`'s answer: the task's id (an earlier one's on an idempotent retry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSubmitted {
    /// The task's id.
    pub id: String,
    /// `false` when the idempotency key named an existing task with the same spec.
    pub created: bool,
}

/// One planned placement the re-check in `apply` refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRefused {
    /// The task it was for.
    pub task_id: String,
    /// Why.
    pub reason: String,
}

/// `ApplyPlan`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanApplied {
    /// Ids of the placements created.
    pub placed: Vec<String>,
    /// The planned placements refused.
    pub refused: Vec<PlacementRefused>,
    /// For each of `placed`, its position in the command's `placements` (not sent:
    /// `apply`'s events read it instead of parsing placement ids).
    #[serde(skip)]
    pub planned: Vec<usize>,
}

/// One node's batch, or one report of it, that `ReportStatus` did not apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportIgnored {
    /// The reporting node.
    pub node: String,
    /// The report's sequence number; absent when the whole batch was ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Why.
    pub reason: String,
}

/// `ReportStatus`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportsApplied {
    /// Per node, the highest sequence number now applied.
    pub acked: BTreeMap<String, u64>,
    /// What was not applied, and why.
    pub ignored: Vec<ReportIgnored>,
}

/// Whether `SetCa` stored the CA or found the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaChange {
    /// Stored.
    Set,
    /// Already there.
    Unchanged,
    /// A rotation started (`RotateCa`).
    Rotating,
    /// The previous CA was retired (`FinishCaRotation`).
    Rotated,
}

/// A command's answer, one shape per command kind. Serialized untagged: each is the
/// JSON object its fields make (variants with more fields come first, so decoding an
/// answer picks the right one).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// `Retention::Collect`: what one collection round removed.
    Collected {
        /// Finished tasks removed.
        removed_tasks: u64,
        /// Candidates kept (no longer finished, or not old enough by the command's clock).
        kept_tasks: u64,
        /// Nodes removed after `--node-gc`.
        removed_nodes: Vec<String>,
        /// History rows trimmed beyond the caps.
        trimmed_history: u64,
        /// Audit rows removed by age or size.
        removed_audit: u64,
        /// Ended placements removed beyond a task's newest ones.
        removed_placements: u64,
    },
    /// `Retention::RemoveNode`.
    NodeRemoved {
        /// The node removed.
        removed: String,
        /// Placements it still held that may run (replaced like a lost node's).
        live_placements: u64,
        /// Its certificates issued up to this instant are revoked.
        revoked_at_ms: u64,
    },
    /// `Image::Put`.
    ImagePut {
        /// Image reference.
        reference: String,
        /// Config digest (the image id).
        id: String,
        /// Total bytes of config and layers.
        size: u64,
    },
    /// `Image::Remove`.
    ImageRemoved {
        /// Image reference.
        reference: String,
        /// Always true.
        removed: bool,
    },
    /// `Upgrade::SetLevel`.
    LevelSet {
        /// The cluster's new feature level.
        feature_level: u32,
        /// The level before.
        was: u32,
    },
    /// `Upgrade::Gated` carrying the test hook's probe: its log index.
    Probe {
        /// Raft index of the probe.
        probe: u64,
    },
    /// `CreateToken`.
    TokenCreated {
        /// Token id.
        id: String,
        /// Token name.
        name: String,
        /// Token role.
        role: String,
    },
    /// `SubmitTask`.
    Submitted(TaskSubmitted),
    /// `RevokeToken` (also when it was revoked before).
    TokenRevoked {
        /// Token id.
        id: String,
        /// Always `true`.
        revoked: bool,
    },
    /// `Trust(UseJoinToken)`: the node may join with the role.
    Joined {
        /// The joining node.
        node: String,
        /// Its role.
        role: String,
    },
    /// `Trust(RevokeNode)`.
    NodeRevoked {
        /// The node.
        revoked: String,
        /// When, ms since the epoch.
        at_ms: u64,
    },
    /// `SetNodeStatus`.
    NodeStatusSet {
        /// Node name.
        name: String,
        /// The new status.
        status: String,
    },
    /// `DrainNode`.
    Drain {
        /// Node name.
        name: String,
        /// Draining now.
        draining: bool,
    },
    /// `SetEligibility`.
    Eligibility {
        /// Node name.
        name: String,
        /// Eligible now.
        eligible: bool,
    },
    /// `ApplyPlan`.
    Planned(PlanApplied),
    /// `ReportStatus`.
    Reported(ReportsApplied),
    /// `StopPlacements`: the ids asked for.
    PlacementsStopped {
        /// Placement ids.
        stopped: Vec<String>,
    },
    /// `Trust(SetCa)`.
    Ca {
        /// Stored or unchanged.
        ca: CaChange,
    },
    /// `Trust(AddJoinToken)`.
    JoinTokenAdded {
        /// The token's role.
        role: String,
    },
    /// `StopTask`.
    TaskStopped {
        /// Task id.
        id: String,
    },
    /// `RegisterNode`.
    NodeRegistered {
        /// Node name.
        name: String,
    },
    /// `Trust::CaHeld`: the node now holds a leaf of the current CA.
    CaHeld {
        /// Node name.
        node: String,
    },
    /// An audited call that made no command (`null`).
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes every answer and rejection had as loose JSON: the writer (perhaps a
    /// manager of the previous version, through forwarding) reads these.
    #[test]
    fn answers_and_rejections_keep_their_json() {
        let cases: Vec<(Outcome, &str)> = vec![
            (
                Ok(Answer::Submitted(TaskSubmitted { id: "t1".into(), created: true })),
                r#"{"Ok":{"id":"t1","created":true}}"#,
            ),
            (Ok(Answer::TaskStopped { id: "t1".into() }), r#"{"Ok":{"id":"t1"}}"#),
            (Ok(Answer::NodeRegistered { name: "n1".into() }), r#"{"Ok":{"name":"n1"}}"#),
            (
                Ok(Answer::Planned(PlanApplied {
                    placed: vec!["t1.5.0".into()],
                    refused: vec![PlacementRefused { task_id: "t2".into(), reason: "full".into() }],
                    planned: vec![0],
                })),
                r#"{"Ok":{"placed":["t1.5.0"],"refused":[{"task_id":"t2","reason":"full"}]}}"#,
            ),
            (
                Ok(Answer::Reported(ReportsApplied {
                    acked: BTreeMap::from([("n1".into(), 3)]),
                    ignored: vec![
                        ReportIgnored { node: "n2".into(), seq: None, reason: "node is not registered".into() },
                        ReportIgnored { node: "n1".into(), seq: Some(4), reason: "bad".into() },
                    ],
                })),
                r#"{"Ok":{"acked":{"n1":3},"ignored":[{"node":"n2","reason":"node is not registered"},{"node":"n1","seq":4,"reason":"bad"}]}}"#,
            ),
            (
                Ok(Answer::NodeStatusSet { name: "n1".into(), status: "down".into() }),
                r#"{"Ok":{"name":"n1","status":"down"}}"#,
            ),
            (Ok(Answer::Drain { name: "n1".into(), draining: true }), r#"{"Ok":{"name":"n1","draining":true}}"#),
            (
                Ok(Answer::Eligibility { name: "n1".into(), eligible: false }),
                r#"{"Ok":{"name":"n1","eligible":false}}"#,
            ),
            (Ok(Answer::PlacementsStopped { stopped: vec!["p".into()] }), r#"{"Ok":{"stopped":["p"]}}"#),
            (
                Ok(Answer::TokenCreated { id: "a".into(), name: "b".into(), role: "reader".into() }),
                r#"{"Ok":{"id":"a","name":"b","role":"reader"}}"#,
            ),
            (Ok(Answer::TokenRevoked { id: "a".into(), revoked: true }), r#"{"Ok":{"id":"a","revoked":true}}"#),
            (Ok(Answer::Ca { ca: CaChange::Unchanged }), r#"{"Ok":{"ca":"unchanged"}}"#),
            (Ok(Answer::JoinTokenAdded { role: "worker".into() }), r#"{"Ok":{"role":"worker"}}"#),
            (Ok(Answer::Joined { node: "w".into(), role: "worker".into() }), r#"{"Ok":{"node":"w","role":"worker"}}"#),
            (Ok(Answer::NodeRevoked { revoked: "w".into(), at_ms: 7 }), r#"{"Ok":{"revoked":"w","at_ms":7}}"#),
            (Ok(Answer::CaHeld { node: "w".into() }), r#"{"Ok":{"node":"w"}}"#),
            (Ok(Answer::Ca { ca: CaChange::Rotating }), r#"{"Ok":{"ca":"rotating"}}"#),
            (
                Ok(Answer::ImagePut { reference: "a:1".into(), id: "sha256:c".into(), size: 9 }),
                r#"{"Ok":{"reference":"a:1","id":"sha256:c","size":9}}"#,
            ),
            (
                Ok(Answer::ImageRemoved { reference: "a:1".into(), removed: true }),
                r#"{"Ok":{"reference":"a:1","removed":true}}"#,
            ),
            (Ok(Answer::LevelSet { feature_level: 2, was: 1 }), r#"{"Ok":{"feature_level":2,"was":1}}"#),
            (Ok(Answer::Probe { probe: 5 }), r#"{"Ok":{"probe":5}}"#),
            (
                Ok(Answer::NodeRemoved { removed: "w".into(), live_placements: 1, revoked_at_ms: 3 }),
                r#"{"Ok":{"removed":"w","live_placements":1,"revoked_at_ms":3}}"#,
            ),
            (Ok(Answer::Nothing), r#"{"Ok":null}"#),
            (Err(Rejection::new(RejectCode::TokenUsedUp, "no")), r#"{"Err":{"code":"token_used_up","message":"no"}}"#),
            (Err(Rejection::new(RejectCode::NotFound, "no")), r#"{"Err":{"code":"not_found","message":"no"}}"#),
        ];
        for (outcome, json) in cases {
            assert_eq!(serde_json::to_string(&outcome).unwrap(), json);
            // Decoding picks the same shape back (`planned` is not sent).
            let mut back: Outcome = serde_json::from_str(json).unwrap();
            if let Ok(Answer::Planned(p)) = &mut back {
                p.planned = vec![0];
            }
            assert_eq!(back, outcome, "{json}");
        }
    }

    #[test]
    fn every_code_has_its_text() {
        for code in [
            RejectCode::Conflict,
            RejectCode::NotFound,
            RejectCode::Invalid,
            RejectCode::BadCommand,
            RejectCode::BadCa,
            RejectCode::BadToken,
            RejectCode::BadNode,
            RejectCode::TokenUnknown,
            RejectCode::TokenRevoked,
            RejectCode::TokenExpired,
            RejectCode::TokenUsedUp,
            RejectCode::TokenRole,
            RejectCode::FeatureLevel,
            RejectCode::NoCa,
        ] {
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{}\"", code.as_str()));
        }
    }

    /// Event kinds and node statuses keep the text the event stream, sinks and the
    /// `nodes.status` column have always had.
    #[test]
    fn event_kinds_and_node_statuses_keep_their_text() {
        use super::super::{EventKind, NodeStatus};
        let kinds = [
            (EventKind::TaskSubmitted, "task.submitted"),
            (EventKind::TaskStopped, "task.stopped"),
            (EventKind::PlacementCreated, "placement.created"),
            (EventKind::PlacementObserved, "placement.observed"),
            (EventKind::PlacementStop, "placement.stop"),
            (EventKind::NodeRegistered, "node.registered"),
            (EventKind::NodeStatus, "node.status"),
            (EventKind::NodeDrain, "node.drain"),
            (EventKind::NodeEligibility, "node.eligibility"),
        ];
        for (kind, text) in kinds {
            assert_eq!(kind.as_str(), text);
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{text}\""));
        }
        for (status, text) in
            [(NodeStatus::Ready, "ready"), (NodeStatus::Disconnected, "disconnected"), (NodeStatus::Down, "down")]
        {
            assert_eq!((status.as_str(), NodeStatus::parse(text)), (text, Some(status)));
            assert_eq!(serde_json::to_string(&status).unwrap(), format!("\"{text}\""));
        }
    }
}
