//! `/v1/tokens`: create (the secret is shown once), list (never a secret), revoke.
//! Admin only (see [`auth::needed_role`](super::auth::needed_role)).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

pub use crate::manager::state::tokens::Role;

use super::{auth, check_id, json_body, write_audited, ApiError, Who};
use crate::manager::state::{tokens, Command};
use crate::manager::{now_ms, Manager};

/// Longest TTL a token may be given: ten years.
const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3_600_000;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: Option<String>,
    role: Option<String>,
    ttl_ms: Option<u64>,
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", message).field(field)
}

/// `POST /v1/tokens {"name","role","ttl_ms"?}` → `{"id","name","role","token"}`.
pub(super) async fn create(State(m): State<Arc<Manager>>, who: Who, body: Bytes) -> Result<Response, ApiError> {
    let b: CreateBody = json_body(&body)?;
    let name = b.name.ok_or_else(|| invalid("name", "name is required"))?;
    if name.is_empty() || name.len() > tokens::MAX_NAME || name.chars().any(char::is_control) {
        return Err(invalid("name", format!("name must be 1–{} printable characters", tokens::MAX_NAME)));
    }
    let role_text = b.role.ok_or_else(|| invalid("role", "role is required: admin, operator or reader"))?;
    let role = Role::parse(&role_text)
        .ok_or_else(|| invalid("role", format!("unknown role {role_text:?}; use admin, operator or reader")))?;
    let now = now_ms();
    let expires_ms = match b.ttl_ms {
        None => None,
        Some(t) if t == 0 || t > MAX_TTL_MS => {
            return Err(invalid("ttl_ms", format!("ttl_ms must be between 1 and {MAX_TTL_MS}")))
        }
        Some(t) => Some(now + t),
    };
    let (id, secret, bearer) = auth::new_token();
    let cmd = Command::CreateToken {
        id: id.clone(),
        name: name.clone(),
        role: role.as_str().into(),
        secret_sha256: tokens::digest(&secret),
        expires_ms,
        created_by: who.actor.clone(),
        now_ms: now,
    };
    write_audited(&m, who, "POST /v1/tokens", &id, Some(cmd)).await?;
    let body = serde_json::json!({
        "id": id, "name": name, "role": role.as_str(), "expires_ms": expires_ms, "token": bearer,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /v1/tokens`: every token without its secret.
pub(super) async fn list(State(m): State<Arc<Manager>>) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = m.db.read(tokens::list).await?;
    Ok(Json(serde_json::json!({ "tokens": rows })))
}

/// `DELETE /v1/tokens/{id}`: revoked on every manager once applied.
pub(super) async fn revoke(
    State(m): State<Arc<Manager>>,
    who: Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let cmd = Command::RevokeToken { id: id.clone(), now_ms: now_ms() };
    write_audited(&m, who, "DELETE /v1/tokens/{id}", &id, Some(cmd)).await?;
    m.tokens.forget(&id);
    Ok(Json(serde_json::json!({ "id": id, "revoked": true })).into_response())
}
