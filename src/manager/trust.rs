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
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch, Semaphore};

use super::api::ApiError;
use super::state::trust::{self as st, TrustCommand};
use super::state::Command;
use super::write::{replicate_only, WriteError};
use super::{now_ms, Manager};
use crate::net::door::{Revocations, CA_PATH, JOIN_PATH, LIVENESS_PATH, RENEW_PATH};
use crate::net::identity::{Bootstrapped, CaSet, Issued, JoinRequest, NodeTls, RenewRequest};
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

/// `/cluster/v1/join`, `/cluster/v1/renew` and the leader's liveness, for the cluster
/// port (behind the door, which keeps the liveness route to managers).
pub fn cluster_router(m: Arc<Manager>, t: Arc<Trust>) -> Router {
    Router::new()
        .route(JOIN_PATH, post(join))
        .route(RENEW_PATH, post(renew))
        .route(LIVENESS_PATH, get(leader_liveness))
        .route(CA_PATH, get(trusted_cas))
        .with_state((m, t))
}

/// One worker's liveness as the leader saw it, for a follower.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveNode {
    /// Milliseconds since its last sync arrived at the leader.
    pub last_seen_ms_ago: u64,
    /// What it measured then.
    pub resources: crate::model::sync::NodeResources,
}

/// Answer of `GET /cluster/v1/leader/liveness`: node name → liveness.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LeaderLiveness {
    /// Every worker the leader has heard from.
    pub nodes: std::collections::HashMap<String, LiveNode>,
}

impl LeaderLiveness {
    /// The follower's copy, with `last_seen` placed on its own clock.
    pub fn into_liveness(self) -> std::collections::HashMap<String, super::Liveness> {
        let now = std::time::Instant::now();
        self.nodes
            .into_iter()
            .map(|(name, l)| {
                let ago = Duration::from_millis(l.last_seen_ms_ago);
                let last_seen = now.checked_sub(ago).unwrap_or(now);
                (name, super::Liveness { last_seen, resources: l.resources })
            })
            .collect()
    }
}

/// The leader's in-memory liveness; `421` from a manager that does not lead (its
/// memory has no liveness worth reading).
async fn leader_liveness(State((m, _)): St) -> Result<Response, ApiError> {
    if m.db.status().role != holdfast_raft::Role::Leader {
        return Err(ApiError::new(StatusCode::MISDIRECTED_REQUEST, "not_leader", "this manager does not lead"));
    }
    let nodes = super::lock(&m.liveness)
        .iter()
        .map(|(name, l)| {
            let ago = l.last_seen.elapsed().as_millis().min(u64::MAX as u128) as u64;
            (name.clone(), LiveNode { last_seen_ms_ago: ago, resources: l.resources.clone() })
        })
        .collect();
    Ok(Json(LeaderLiveness { nodes }).into_response())
}

/// `POST /v1/cluster/join-tokens`, `POST /v1/nodes/{id}/revoke` and the CA rotation
/// (`GET /v1/cluster/ca`, `POST /v1/cluster/ca/rotate`, `POST /v1/cluster/ca/finish`),
/// for the API port.
pub fn api_router(m: Arc<Manager>, t: Arc<Trust>) -> Router {
    Router::new()
        .route("/v1/cluster/join-tokens", post(new_join_token))
        .route("/v1/cluster/ca", get(ca_status_route))
        .route("/v1/cluster/ca/rotate", post(rotate_ca))
        .route("/v1/cluster/ca/finish", post(finish_ca))
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

/// Every CA the cluster trusts now, from replicated state (or the first manager's
/// files until state has it).
pub async fn cas(m: &Manager, t: &Trust) -> Option<CaSet> {
    let current = ca(m, t).await?.cert_pem;
    let previous = m.db.read_local(st::previous_ca).await.ok().flatten();
    Some(match previous {
        Some((prev, cross)) => CaSet { current, previous: Some(prev), cross: Some(cross) },
        None => CaSet::single(&current),
    })
}

/// Records (replicated, best effort) that `node` holds a certificate of `ca_digest`:
/// what tells a CA rotation which nodes are on the new CA.
pub fn record_held(m: Arc<Manager>, node: String, ca_digest: String) {
    tokio::spawn(async move {
        let cmd = TrustCommand::CaHeld { node: node.clone(), ca_digest, now_ms: now_ms() };
        if let Err(error) = replicate_only(&m.db, &Command::Trust(cmd)).await {
            tracing::warn!(%node, %error, "cannot record which CA the node's certificate is from");
        }
    });
}

async fn issued(m: &Arc<Manager>, t: &Trust, node: &str, cert_pem: String, ca: Ca) -> Response {
    let digest = ca.digest().unwrap_or_default();
    record_held(m.clone(), node.to_string(), digest);
    let cas = cas(m, t).await;
    Json(Issued { cert_pem, ca_pem: ca.cert_pem, cas }).into_response()
}

/// `GET /cluster/v1/ca`: the CAs to trust (any node of the cluster, as itself).
async fn trusted_cas(State((m, t)): St) -> Result<Response, ApiError> {
    let cas = cas(&m, &t).await.ok_or_else(|| ApiError::unavailable("this manager has no CA yet".into(), None))?;
    Ok(Json(cas).into_response())
}

/// Where a CA rotation stands: digests of the current and previous CA, and which nodes
/// (workers and managers, revoked ones left out) hold a certificate of the current CA.
pub async fn ca_status(m: &Manager) -> Result<serde_json::Value, ApiError> {
    let (current, previous, holders, nodes, revoked) =
        m.db.read_local(|c| {
            let current = st::ca(c)?.map(|(cert, _)| cert);
            let previous = st::previous_ca(c)?.map(|(cert, _)| cert);
            let mut stmt = c.prepare("SELECT name FROM nodes")?;
            let nodes = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((current, previous, st::ca_holders(c)?, nodes, st::revocations(c)?))
        })
        .await?;
    let digest =
        |pem: &Option<String>| pem.as_deref().and_then(|p| pki::cert_der_from_pem(p).ok()).map(|d| pki::digest(&d));
    let (current, previous) = (digest(&current), digest(&previous));
    let mut all: std::collections::BTreeSet<String> = nodes.into_iter().collect();
    all.extend(m.db.status().members.iter().map(|mm| mm.member.name.clone()));
    all.retain(|n| !revoked.contains_key(n));
    let (on_new, pending): (Vec<String>, Vec<String>) =
        all.into_iter().partition(|n| current.is_some() && holders.get(n) == current.as_ref());
    Ok(serde_json::json!({
        "current": current,
        "previous": previous,
        "rotating": previous.is_some(),
        "nodes_total": on_new.len() + pending.len(),
        "nodes_on_new": on_new.len(),
        "pending": pending,
    }))
}

async fn ca_status_route(State((m, _)): St) -> Result<Response, ApiError> {
    Ok(Json(ca_status(&m).await?).into_response())
}

/// `POST /v1/cluster/ca/rotate` (admin): a new CA signs from now on; the old one stays
/// trusted (nodes verify new leaves through a cross certificate) until the rotation
/// is finished. Every node renews onto the new CA over its running connection. Join
/// tokens are re-pinned: new ones for both roles are made and returned, and every
/// older join token is refused from now on (nodes already joined are not affected).
async fn rotate_ca(State((m, t)): St) -> Result<Response, ApiError> {
    let old = ca(&m, &t).await.ok_or_else(|| ApiError::unavailable("this manager has no CA yet".into(), None))?;
    let next = Ca::generate().map_err(|e| ApiError::internal(e.to_string()))?;
    let cross_pem = old.cross_sign(&next).map_err(|e| ApiError::internal(e.to_string()))?;
    let now = now_ms();
    let cmd = TrustCommand::RotateCa {
        cert_pem: next.cert_pem.clone(),
        key_pem: next.key_pem.clone(),
        cross_pem,
        now_ms: now,
    };
    replicate_only(&m.db, &Command::Trust(cmd)).await?;
    let digest = next.digest().map_err(|e| ApiError::internal(e.to_string()))?;
    tracing::warn!(new_ca = %digest, "cluster CA rotation started; both CAs are trusted until it is finished");
    let mut tokens = serde_json::Map::new();
    for role in [Role::Worker, Role::Manager] {
        let token = JoinToken::generate(&digest);
        let cmd = TrustCommand::AddJoinToken {
            hash: token.hash(),
            role: role.as_str().into(),
            expires_at_ms: None,
            uses: None,
            replace: true,
            now_ms: now,
        };
        replicate_only(&m.db, &Command::Trust(cmd)).await?;
        tokens.insert(role.as_str().into(), token.encode().into());
    }
    let status = ca_status(&m).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "ca": status, "join_tokens": tokens }))).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Finish {
    #[serde(default)]
    force: bool,
}

/// `POST /v1/cluster/ca/finish` (admin): retires the previous CA once every node holds
/// a certificate of the new one (`409` naming the others unless `force`). From then on
/// a certificate of the old CA is refused at the handshake.
async fn finish_ca(State((m, _)): St, body_in: Option<Json<Finish>>) -> Result<Response, ApiError> {
    let req = body_in.map(|Json(f)| f).unwrap_or_default();
    let status = ca_status(&m).await?;
    if status["rotating"] != true {
        return Err(ApiError::new(StatusCode::CONFLICT, "not_rotating", "no CA rotation is under way"));
    }
    let pending = status["pending"].as_array().cloned().unwrap_or_default();
    if !pending.is_empty() && !req.force {
        let names: Vec<&str> = pending.iter().filter_map(|v| v.as_str()).collect();
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "rotation_incomplete",
            format!(
                "{} node(s) still hold a certificate of the old CA: {}; wait for them to renew (they do so \
                 on their own once they reach a manager) or finish with force (they then need a new join token)",
                names.len(),
                names.join(", ")
            ),
        ));
    }
    replicate_only(&m.db, &Command::Trust(TrustCommand::FinishCaRotation { now_ms: now_ms() })).await?;
    tracing::warn!(forced = req.force, "cluster CA rotation finished; the old CA is no longer trusted");
    Ok(Json(serde_json::json!({ "ca": ca_status(&m).await? })).into_response())
}

/// Keeps this manager's trusted CAs equal to replicated state's (checked after commands
/// apply, at most every 100 ms, and at least every second); when the signing CA
/// changed, the node's certificate is renewed from the new one at once.
pub fn watch_cas(
    m: Arc<Manager>,
    t: Arc<Trust>,
    tls: Arc<NodeTls>,
    mut shutdown: broadcast::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut applied = m.applied.clone();
        loop {
            if let Some(set) = cas(&m, &t).await {
                if let Err(e) = tls.set_cas(set) {
                    tracing::warn!(error = %e, "cannot trust the cluster's CAs");
                }
            }
            if !next_apply(&mut applied, &mut shutdown).await {
                return;
            }
        }
    })
}

/// Waits at least 100 ms, then until a command applies or a second has passed: the
/// pace of the loops that mirror replicated state ([`watch_cas`],
/// [`refresh_revocations`]). `false` once `shutdown` fires.
async fn next_apply(applied: &mut watch::Receiver<u64>, shutdown: &mut broadcast::Receiver<()>) -> bool {
    tokio::select! {
        _ = shutdown.recv() => return false,
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
    tokio::select! {
        _ = shutdown.recv() => false,
        _ = applied.changed() => true,
        _ = tokio::time::sleep(Duration::from_secs(1)) => true,
    }
}

/// A manager renews its own certificate with the current CA (managers hold it) and
/// records which CA it is from.
pub async fn renew_self(m: Arc<Manager>, t: Arc<Trust>, tls: Arc<NodeTls>, lifetime: Duration) -> Result<(), String> {
    let ca = ca(&m, &t).await.ok_or("no CA in replicated state yet")?;
    if let Some(set) = cas(&m, &t).await {
        tls.set_cas(set).map_err(|e| e.to_string())?;
    }
    tls.renew_with(&ca, lifetime).map_err(|e| e.to_string())?;
    record_held(m, tls.node().to_string(), ca.digest().map_err(|e| e.to_string())?);
    Ok(())
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
    match replicate_only(&m.db, &Command::Trust(cmd)).await {
        Err(WriteError::Rejected(r)) if r.code.refuses_join() => return Err(refuse(r.code.as_str(), r.message)),
        Err(e) => return Err(e.into()),
        Ok(()) => {}
    }
    let ca = ca(&m, &t).await.ok_or_else(|| ApiError::unavailable("this manager has no CA yet".into(), None))?;
    let cert_pem = ca
        .sign_csr(&req.csr_pem, &req.node, req.role, t.lifetime)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_csr", e.to_string()).field("csr_pem"))?;
    tracing::info!(node = %req.node, role = %req.role, "admitted a node with a join token");
    Ok(issued(&m, &t, &req.node, cert_pem, ca).await)
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
    Ok(issued(&m, &t, &info.node, cert_pem, ca).await)
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
    replicate_only(&m.db, &Command::Trust(cmd)).await?;
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
    replicate_only(&m.db, &Command::Trust(cmd)).await?;
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
                match replicate_only(&m.db, &Command::Trust(cmd.clone())).await {
                    Ok(()) => break,
                    // No leader yet, a timeout, a full disk: the write may succeed later.
                    Err(WriteError::Db(_)) => {
                        tokio::select! {
                            _ = shutdown.recv() => return,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record the new cluster's trust state");
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
            if !next_apply(&mut applied, &mut shutdown).await {
                return;
            }
        }
    })
}
