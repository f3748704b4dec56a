//! The manager's side of cluster trust (ARCHITECTURE.md "Trust"): token joins and
//! certificate renewals on the cluster port, join-token rotation and node revocation
//! on the API, seeding a new cluster's CA and tokens into replicated state, and keeping
//! the door's revocation list fresh.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tokio::sync::{broadcast, Semaphore};

use super::api::{write, ApiError};
use super::state::trust::{self as st, TrustCommand};
use super::state::Command;
use super::{now_ms, Manager};
use crate::net::door::{Revocations, JOIN_PATH, RENEW_PATH};
use crate::net::identity::{Bootstrapped, Issued, JoinRequest, RenewRequest};
use crate::net::pki::{self, Ca, JoinToken, Role};
use crate::net::tls::Peer;

/// Joins handled at once; more answer 503 (each one signs and commits).
const JOIN_CONCURRENCY: usize = 16;

/// What the trust endpoints share.
pub struct Trust {
    /// Life of the certificates this manager signs.
    pub lifetime: Duration,
    /// The door's revocation list.
    pub revocations: Revocations,
    /// The CA from the first manager's own files, until replicated state has it.
    pub local_ca: Option<Ca>,
    joins: Semaphore,
}

impl Trust {
    /// Settings for a manager signing leaves valid for `lifetime`.
    pub fn new(lifetime: Duration, revocations: Revocations, local_ca: Option<Ca>) -> Arc<Trust> {
        Arc::new(Trust { lifetime, revocations, local_ca, joins: Semaphore::new(JOIN_CONCURRENCY) })
    }
}

type St = State<(Arc<Manager>, Arc<Trust>)>;

/// `/cluster/v1/join` and `/cluster/v1/renew`, for the cluster port (behind the door).
pub fn cluster_router(m: Arc<Manager>, t: Arc<Trust>) -> Router {
    Router::new().route(JOIN_PATH, post(join)).route(RENEW_PATH, post(renew)).with_state((m, t))
}

/// `POST /v1/cluster/join-tokens` and `POST /v1/nodes/{id}/revoke`, for the API port.
pub fn api_router(m: Arc<Manager>, t: Arc<Trust>) -> Router {
    Router::new()
        .route("/v1/cluster/join-tokens", post(new_join_token))
        .route("/v1/nodes/{id}/revoke", post(revoke_node))
        .with_state((m, t))
}

/// The cluster CA (key included), from replicated state or the first manager's files.
pub async fn ca(m: &Manager, t: &Trust) -> Option<Ca> {
    match m.db.read_local(st::ca).await {
        Ok(Some((cert_pem, key_pem))) => Some(Ca { cert_pem, key_pem }),
        _ => t.local_ca.clone(),
    }
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_body", e.body_text()))
}

fn valid_node(node: &str) -> bool {
    !node.is_empty() && node.len() <= 64 && node.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

async fn join(State((m, t)): St, body_in: Result<Json<JoinRequest>, JsonRejection>) -> Result<Response, ApiError> {
    let req = body(body_in)?;
    let Ok(_slot) = t.joins.try_acquire() else {
        return Err(ApiError::unavailable("too many joins at once; retry shortly".into(), None));
    };
    if !valid_node(&req.node) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("{:?} is not a valid node name", req.node),
        )
        .field("node"));
    }
    let hash = pki::secret_hash(&req.secret);
    // Only a known token costs a Raft write: a stranger's guesses stay local.
    let h = hash.clone();
    let (known, seeded): (bool, bool) =
        m.db.read_local(move |c| {
            let known =
                c.query_row("SELECT COUNT(*) FROM join_tokens WHERE hash = ?1", [&h], |r| r.get::<_, i64>(0))?;
            let seeded = c.query_row("SELECT COUNT(*) FROM trust_ca", [], |r| r.get::<_, i64>(0))?;
            Ok((known > 0, seeded > 0))
        })
        .await?;
    if !known && !seeded {
        // A new cluster still recording its first tokens, or a member still catching up.
        return Err(ApiError::unavailable("this manager does not know the cluster's tokens yet; retry".into(), None));
    }
    let refuse = |code: &str, message: String| {
        tracing::warn!(node = %req.node, role = %req.role, code, "join refused: {message}");
        ApiError::new(StatusCode::FORBIDDEN, code, message)
    };
    if !known {
        return Err(refuse("token_unknown", "this join token is not known to the cluster".into()));
    }
    let cmd =
        TrustCommand::UseJoinToken { hash, role: req.role.as_str().into(), node: req.node.clone(), now_ms: now_ms() };
    if let Err(e) = write(&m, &Command::Trust(cmd)).await {
        return Err(if e.status == StatusCode::FORBIDDEN { refuse(&e.code, e.message) } else { e });
    }
    let ca = ca(&m, &t).await.ok_or_else(|| ApiError::unavailable("this manager has no CA yet".into(), None))?;
    let cert_pem = ca
        .sign_csr(&req.csr_pem, &req.node, req.role, t.lifetime)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_csr", e.to_string()).field("csr_pem"))?;
    tracing::info!(node = %req.node, role = %req.role, "admitted a node with a join token");
    Ok(Json(Issued { cert_pem, ca_pem: ca.cert_pem }).into_response())
}

async fn renew(
    State((m, t)): St,
    Extension(peer): Extension<Peer>,
    body_in: Result<Json<RenewRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(body_in)?;
    // The door only lets certified, unrevoked peers here.
    let Peer::Node { info, expired } = peer else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "certificate_required", "renewal needs a certificate"));
    };
    let ca = ca(&m, &t).await.ok_or_else(|| ApiError::unavailable("this manager has no CA yet".into(), None))?;
    let cert_pem = ca
        .sign_csr(&req.csr_pem, &info.node, info.role, t.lifetime)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_csr", e.to_string()).field("csr_pem"))?;
    tracing::info!(node = %info.node, role = %info.role, expired, "renewed a node certificate");
    Ok(Json(Issued { cert_pem, ca_pem: ca.cert_pem }).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    role: Role,
    #[serde(default)]
    ttl_ms: Option<u64>,
    #[serde(default)]
    uses: Option<u64>,
}

/// Rotates the join token of a role: a new one is made and every older one of that
/// role stops working; nodes already joined keep their certificates.
async fn new_join_token(
    State((m, t)): St,
    body_in: Result<Json<NewToken>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(body_in)?;
    if req.uses == Some(0) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", "uses must be at least 1").field("uses"));
    }
    let ca = ca(&m, &t).await.ok_or_else(|| ApiError::unavailable("this manager has no CA yet".into(), None))?;
    let digest = ca.digest().map_err(|e| ApiError::internal(e.to_string()))?;
    let token = JoinToken::generate(&digest);
    let now = now_ms();
    let expires_at_ms = req.ttl_ms.map(|ttl| now.saturating_add(ttl));
    let cmd = TrustCommand::AddJoinToken {
        hash: token.hash(),
        role: req.role.as_str().into(),
        expires_at_ms,
        uses: req.uses,
        replace: true,
        now_ms: now,
    };
    write(&m, &Command::Trust(cmd)).await?;
    tracing::info!(role = %req.role, ?expires_at_ms, uses = ?req.uses, "join token rotated");
    let out = serde_json::json!({
        "role": req.role, "token": token.encode(), "expires_at_ms": expires_at_ms, "uses": req.uses,
    });
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn revoke_node(State((m, t)): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    if !valid_node(&id) {
        return Err(
            ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("{id:?} is not a valid node name")).field("id")
        );
    }
    revoke(&m, &t.revocations, &id, "revoked by an operator").await?;
    Ok(Json(serde_json::json!({ "revoked": id })).into_response())
}

/// Revokes every certificate issued to `node` so far (replicated), and refuses it at
/// this manager's door at once.
pub async fn revoke(m: &Manager, revocations: &Revocations, node: &str, reason: &str) -> Result<(), ApiError> {
    let now = now_ms();
    let cmd = TrustCommand::RevokeNode { node: node.into(), reason: reason.into(), now_ms: now };
    write(m, &Command::Trust(cmd)).await?;
    revocations.insert(node, now);
    tracing::warn!(%node, reason, "node certificates revoked");
    Ok(())
}

/// Writes a new cluster's CA and join tokens into replicated state, retrying until
/// this manager leads and the writes commit.
pub fn seed(m: Arc<Manager>, boot: Bootstrapped, mut shutdown: broadcast::Receiver<()>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Tokens first, the CA last: a manager whose state has the CA also knows the
        // first tokens, so a join it does not recognize is really refused.
        let mut cmds = Vec::new();
        for (role, token) in &boot.tokens {
            cmds.push(TrustCommand::AddJoinToken {
                hash: token.hash(),
                role: role.as_str().into(),
                expires_at_ms: None,
                uses: None,
                replace: false,
                now_ms: now_ms(),
            });
        }
        cmds.push(TrustCommand::SetCa { cert_pem: boot.ca.cert_pem.clone(), key_pem: boot.ca.key_pem.clone() });
        for cmd in cmds {
            loop {
                match write(&m, &Command::Trust(cmd.clone())).await {
                    Ok(_) => break,
                    Err(e) if e.status.is_server_error() => {
                        tokio::select! {
                            _ = shutdown.recv() => return,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e.message, "cannot record the new cluster's trust state");
                        break;
                    }
                }
            }
        }
    })
}

/// Refreshes the door's revocation list from the local state after commands apply
/// (at most every 100 ms) and at least every second, so a revocation committed on any
/// manager closes every manager's door within about 100 ms.
pub fn refresh_revocations(
    m: Arc<Manager>,
    revocations: Revocations,
    mut shutdown: broadcast::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut applied = m.applied.clone();
        loop {
            if let Ok(all) = m.db.read_local(st::revocations).await {
                revocations.replace(all);
            }
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = applied.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}
