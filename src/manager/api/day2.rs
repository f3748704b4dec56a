//! Day-2 routes of the API: the feature level in `GET /v1/cluster`, node removal
//! (`DELETE /v1/nodes/{id}`), and the upgrade test hook's probe.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{check_id, no_node, write_audited, ApiError, Who};
use crate::manager::state::retention::RetentionCommand;
use crate::manager::state::upgrade::{self, Gated, UpgradeCommand};
use crate::manager::state::Command;
use crate::manager::{now_ms, Manager};

/// Why this member stopped applying, when it met a level it does not support.
pub fn upgrade_required(m: &Manager) -> Option<String> {
    m.domain.upgrade_required().map(|stop| stop.to_string())
}

/// The feature-level part of `GET /v1/cluster`, from this member's state.
pub async fn level_json(m: &Manager) -> serde_json::Value {
    let read = m.db.read_local(|c| Ok((upgrade::cluster_level(c)?, upgrade::probes(c)?))).await;
    let (cluster, probes) = match read {
        Ok((l, p)) => (Some(l), Some(p)),
        Err(_) => (None, None),
    };
    let mut v = serde_json::json!({
        "cluster": cluster,
        "this_build": upgrade::build_level(),
        "upgrade_required": upgrade_required(m),
    });
    if upgrade::build_level() > upgrade::FEATURE_LEVEL {
        // Only under the test hook: how many probes this member applied.
        v["probes_applied"] = serde_json::json!(probes);
    }
    v
}

/// Query of `DELETE /v1/nodes/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    force: Option<bool>,
}

/// `DELETE /v1/nodes/{id}[?force=true]` (admin): removes a decommissioned node and
/// revokes its certificates; refused while it holds live placements unless forced.
pub async fn remove_node(
    State(m): State<Arc<Manager>>,
    who: Who,
    Path(id): Path<String>,
    q: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let Query(q) = q.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("{}; known parameter: force", e.body_text()))
            .field("force")
    })?;
    let cmd = Command::Retention(RetentionCommand::RemoveNode {
        name: id.clone(),
        force: q.force.unwrap_or(false),
        now_ms: now_ms(),
    });
    let out = write_audited(&m, who, "DELETE /v1/nodes/{id}", &id, Some(cmd)).await.map_err(|e| {
        if e.status == StatusCode::NOT_FOUND {
            no_node(&id)
        } else {
            e
        }
    })?;
    crate::manager::lock(&m.liveness).remove(&id);
    Ok((StatusCode::OK, Json(out)).into_response())
}

/// Routes that exist only under the upgrade test hook.
pub fn test_hook_routes() -> axum::Router<Arc<Manager>> {
    let r = axum::Router::new();
    if upgrade::build_level() > upgrade::FEATURE_LEVEL {
        r.route("/v1/cluster/probe", axum::routing::post(probe))
    } else {
        r
    }
}

/// `POST /v1/cluster/probe` (admin), mounted only under the upgrade test hook
/// (`HOLDFAST_TEST_NEXT_LEVEL=1`): writes a command of the next level's kind, gated,
/// refused with `feature_level` (409) until the cluster is at that level.
pub async fn probe(State(m): State<Arc<Manager>>, who: Who) -> Result<Response, ApiError> {
    let level = m.db.read_local(upgrade::cluster_level).await?;
    if level < upgrade::PROBE_LEVEL {
        // Refused before anything is written; `apply` would refuse it the same way.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "feature_level",
            format!(
                "this command needs cluster feature level {}; the cluster is at {level} (a manager runs a build \
                 that does not support it; see GET /v1/cluster)",
                upgrade::PROBE_LEVEL
            ),
        ));
    }
    let body =
        serde_json::to_value(Gated::Probe { note: "probe".into() }).map_err(|e| ApiError::internal(e.to_string()))?;
    let cmd = Command::Upgrade(UpgradeCommand::Gated { level: upgrade::PROBE_LEVEL, body });
    let out = write_audited(&m, who, "POST /v1/cluster/probe", "cluster", Some(cmd)).await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}
