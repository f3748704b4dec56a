//! The door of the cluster port: one layer, in front of both the Raft routes and the
//! worker gateway, that decides from the peer's proven identity what it may call
//! (ARCHITECTURE.md "Trust"). Handlers that act for a node (sync, log replies) then
//! check with [`Peer::speaks_for`] that the body names the certificate's node.
//!
//! - no client certificate: only `POST /cluster/v1/join` (which wants a join token);
//! - a revoked node (certificate issued at or before its revocation): nothing;
//! - a certificate that expired within the grace window: only `/cluster/v1/renew`;
//! - `/raft/*` (Raft RPCs, forwarded writes and reads, membership): managers only;
//! - the rest of `/cluster/v1/`: any node of the cluster, as itself.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::pki::Role;
use super::tls::Peer;

/// Path of the token join (the only call open to a peer without a certificate).
pub const JOIN_PATH: &str = "/cluster/v1/join";
/// Path of certificate renewal (the only call open to an expired certificate).
pub const RENEW_PATH: &str = "/cluster/v1/renew";

/// Path a follower manager reads the leader's in-memory liveness from (managers only).
pub const LIVENESS_PATH: &str = "/cluster/v1/leader/liveness";
/// Path of the cluster's trusted CAs (any node of the cluster): how a node learns of a
/// CA rotation.
pub const CA_PATH: &str = "/cluster/v1/ca";

/// Whether only manager certificates may call `path`.
pub fn managers_only(path: &str) -> bool {
    path.starts_with("/raft/") || path.starts_with("/cluster/v1/leader/")
}

/// Revoked nodes: node name → revocation time (ms). Certificates issued to the node at
/// or before that time are refused. Fed from replicated state by the manager.
#[derive(Clone, Debug, Default)]
pub struct Revocations {
    inner: Arc<RwLock<HashMap<String, u64>>>,
}

impl Revocations {
    /// Replaces the whole set (a refresh from state).
    pub fn replace(&self, all: HashMap<String, u64>) {
        *crate::write(&self.inner) = all;
    }

    /// Adds one revocation at once (before the next refresh).
    pub fn insert(&self, node: &str, at_ms: u64) {
        crate::write(&self.inner).insert(node.to_string(), at_ms);
    }

    /// When `node` was revoked, if it was and a certificate issued at `issued_ms` is
    /// covered by it.
    pub fn revoked(&self, node: &str, issued_ms: u64) -> Option<u64> {
        let at = *crate::read(&self.inner).get(node)?;
        (issued_ms <= at).then_some(at)
    }
}

impl Peer {
    /// Whether this peer may act as `node` (its certificate names it).
    pub fn speaks_for(&self, node: &str) -> bool {
        matches!(self, Peer::Node { info, expired: false } if info.node == node)
    }

    /// The certificate's node name, for logs.
    pub fn name(&self) -> &str {
        match self {
            Peer::Anonymous => "<no certificate>",
            Peer::Node { info, .. } => &info.node,
        }
    }
}

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(serde_json::json!({"error": {"code": code, "message": message, "field": null}}))).into_response()
}

/// The layer: `axum::middleware::from_fn_with_state(revocations, net::door::check)`.
pub async fn check(State(revocations): State<Revocations>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let remote = super::tls::remote_of(&req).map(|a| a.to_string()).unwrap_or_default();
    let peer = req.extensions().get::<Peer>().cloned().unwrap_or(Peer::Anonymous);
    let verdict = match &peer {
        Peer::Anonymous if path == JOIN_PATH => None,
        Peer::Anonymous => Some((
            StatusCode::UNAUTHORIZED,
            "certificate_required",
            format!("{path} needs a client certificate of this cluster's CA; join with a token first"),
        )),
        Peer::Node { info, expired } => {
            if let Some(at) = revocations.revoked(&info.node, info.issued_ms) {
                Some((
                    StatusCode::FORBIDDEN,
                    "revoked",
                    format!(
                        "node {} was revoked or removed at {at} ms; its certificates are refused. \
                         Re-admit it with a fresh join token (holdfast token join --role {})",
                        info.node, info.role
                    ),
                ))
            } else if *expired && path != RENEW_PATH {
                Some((
                    StatusCode::UNAUTHORIZED,
                    "certificate_expired",
                    format!("the certificate of {} expired at {} ms; renew it first", info.node, info.not_after_ms),
                ))
            } else if managers_only(&path) && info.role != Role::Manager {
                Some((
                    StatusCode::FORBIDDEN,
                    "manager_only",
                    format!("{path} is for managers; {} holds a {} certificate", info.node, info.role),
                ))
            } else {
                None
            }
        }
    };
    match verdict {
        None => json_errors(next.run(req).await).await,
        Some((status, code, message)) => {
            tracing::warn!(%remote, peer = peer.name(), %path, code, "cluster port: refused: {message}");
            refuse(status, code, message)
        }
    }
}

/// Bounds requests in flight on the cluster port: past the limit, a JSON 503 at once.
pub async fn bounded(State(slots): State<Arc<tokio::sync::Semaphore>>, req: Request, next: Next) -> Response {
    match slots.try_acquire_owned() {
        Ok(_slot) => next.run(req).await,
        Err(_) => {
            let mut r =
                refuse(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "cluster port is at capacity; retry".into());
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            r
        }
    }
}

/// Gives every error answer of the cluster port the JSON error shape (extractor
/// rejections such as a malformed body are plain text otherwise).
async fn json_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let status = resp.status();
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4_096).await.map(|b| String::from_utf8_lossy(&b).into_owned());
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let mut out = refuse(status, code, text.unwrap_or_default());
    // Keep `Connection: close` and the like.
    for (k, v) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::pki::CertInfo;
    use tower::ServiceExt;

    fn node(name: &str, role: Role, issued_ms: u64, expired: bool) -> Peer {
        Peer::Node {
            info: CertInfo {
                node: name.into(),
                role,
                issued_ms,
                not_before_ms: issued_ms,
                not_after_ms: issued_ms + 1_000,
            },
            expired,
        }
    }

    async fn status(revocations: &Revocations, peer: Option<Peer>, path: &str) -> u16 {
        let router = axum::Router::new()
            .fallback(|| async { "reached" })
            .layer(axum::middleware::from_fn_with_state(revocations.clone(), check));
        let mut req = Request::builder().method("POST").uri(path).body(axum::body::Body::empty()).unwrap();
        if let Some(p) = peer {
            req.extensions_mut().insert(p);
        }
        router.oneshot(req).await.unwrap().status().as_u16()
    }

    /// What the handshake lets through (no certificate, one expired within the grace
    /// window) reaches exactly one route each; roles and revocation hold everywhere.
    #[tokio::test]
    async fn the_door_lets_each_kind_of_peer_reach_only_its_routes() {
        let rev = Revocations::default();
        rev.insert("gone", 500);
        let manager = || Some(node("m1", Role::Manager, 1_000, false));
        let worker = || Some(node("w1", Role::Worker, 1_000, false));
        let expired = || Some(node("w1", Role::Worker, 1_000, true));
        let revoked = || Some(node("gone", Role::Manager, 400, false));
        let readmitted = || Some(node("gone", Role::Worker, 600, false));
        let cases: Vec<(&str, Option<Peer>, &str, u16)> = vec![
            ("anonymous joins", None, JOIN_PATH, 200),
            ("anonymous renews", None, RENEW_PATH, 401),
            ("anonymous syncs", None, "/cluster/v1/sync", 401),
            ("anonymous appends", None, "/raft/append", 401),
            ("expired renews", expired(), RENEW_PATH, 200),
            ("expired syncs", expired(), "/cluster/v1/sync", 401),
            ("expired appends", expired(), "/raft/append", 401),
            ("worker syncs", worker(), "/cluster/v1/sync", 200),
            ("worker appends", worker(), "/raft/append", 403),
            ("worker votes", worker(), "/raft/vote", 403),
            ("worker reads the leader's liveness", worker(), LIVENESS_PATH, 403),
            ("anonymous reads the leader's liveness", None, LIVENESS_PATH, 401),
            ("manager reads the leader's liveness", manager(), LIVENESS_PATH, 200),
            ("worker reads the trusted CAs", worker(), CA_PATH, 200),
            ("anonymous reads the trusted CAs", None, CA_PATH, 401),
            ("manager appends", manager(), "/raft/append", 200),
            ("revoked manager appends", revoked(), "/raft/append", 403),
            ("revoked manager renews", revoked(), RENEW_PATH, 403),
            ("certificate issued after the revocation", readmitted(), "/cluster/v1/sync", 200),
        ];
        for (what, peer, path, want) in cases {
            assert_eq!(status(&rev, peer, path).await, want, "{what}: {path}");
        }
    }
}
