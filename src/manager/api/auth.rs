//! Bearer-token authentication and role checks for the public API, as one axum
//! middleware over every route (ARCHITECTURE.md, "Access").
//!
//! A bearer string is `hf_<id>_<secret>`: the id finds the stored token, the secret is
//! compared by its SHA-256 digest. Open without a token: the probes
//! (`/health/live`, `/health/ready`) and every `GET` outside `/v1/` and `/metrics` (the
//! embedded UI and its assets; the UI itself logs in with a token). Everything else
//! needs a role, see [`needed_role`].
//!
//! Freshness: a token found is remembered for [`CACHE_FOR`] (so a busy API does not
//! read SQLite per request). The leader refreshes from its own state, which has applied
//! every command it acknowledged; a follower may lag, so it refreshes with a
//! linearizable read (the leader's read index). A revocation therefore holds on every
//! manager within `CACHE_FOR` plus one apply, and at once on the manager that served
//! the `DELETE` (it drops the entry). A follower that cannot reach any leader answers
//! from its own state: it can serve only reads of that state then (writes need the
//! leader), and the leader it rejoins knows the revocation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;

use super::ApiError;
use crate::manager::state::tokens::{self, Role, TokenRow};
use crate::manager::state::Command;
use crate::manager::{now_ms, Manager};

/// How long a manager trusts a token it looked up.
pub const CACHE_FOR: Duration = Duration::from_millis(300);

/// Most tokens remembered (the cache is cleared when full).
const CACHE_ENTRIES: usize = 1_024;

/// Tokens looked up recently, by id, with when.
#[derive(Default)]
pub struct TokenCache(Mutex<HashMap<String, (Instant, TokenRow)>>);

impl TokenCache {
    /// Forgets token `id` (after this manager revoked it).
    pub fn forget(&self, id: &str) {
        crate::lock(&self.0).remove(id);
    }
}

/// File in the data directory holding the bootstrap admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The authenticated caller, put in the request's extensions by [`require`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Token id.
    pub token_id: String,
    /// Token name.
    pub name: String,
    /// Token role.
    pub role: Role,
}

impl Caller {
    /// The audit's `who`: `name (id)`.
    pub fn who(&self) -> String {
        format!("{} ({})", self.name, self.token_id)
    }
}

/// The role a request needs, `None` when it is open to anyone.
///
/// `reader`: every GET under `/v1/` (except audit, tokens and the cluster snapshot)
/// and `/metrics`;
/// `operator`: submit and stop tasks, drain and eligibility of nodes; `admin`:
/// everything else (members, tokens, the audit log, any route added later).
pub fn needed_role(method: &Method, path: &str) -> Option<Role> {
    let get = method == Method::GET || method == Method::HEAD;
    if path == "/health/live" || path == "/health/ready" {
        return None;
    }
    let api = path == "/v1" || path.starts_with("/v1/") || path == "/metrics" || path.starts_with("/metrics/");
    if !api {
        // The UI and its assets; anything else here is a 404 anyway.
        return if get { None } else { Some(Role::Admin) };
    }
    // A snapshot holds token digests and, with cluster TLS, the CA key.
    if path.starts_with("/v1/audit") || path.starts_with("/v1/tokens") || path.starts_with("/v1/cluster/snapshot") {
        return Some(Role::Admin);
    }
    if get {
        return Some(Role::Reader);
    }
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let operator = matches!(
        (method, segs.as_slice()),
        (&Method::POST, ["", "v1", "tasks"])
            | (&Method::POST, ["", "v1", "images"])
            | (&Method::DELETE, ["", "v1", "tasks", _])
            | (&Method::POST, ["", "v1", "nodes", _, "drain" | "eligibility"])
    );
    Some(if operator { Role::Operator } else { Role::Admin })
}

/// A fresh token: `(id, secret, bearer string)`. The id has 64 random bits (a
/// collision is a `conflict` rejection, retried by the caller), the secret 256.
pub fn new_token() -> (String, String, String) {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut id);
    rand::thread_rng().fill_bytes(&mut secret);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let (id, secret) = (hex(&id), hex(&secret));
    let bearer = format!("hf_{id}_{secret}");
    (id, secret, bearer)
}

/// Splits a bearer string into id and secret, `None` when it is not one of ours.
fn parse_bearer(s: &str) -> Option<(&str, &str)> {
    let rest = s.strip_prefix("hf_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |x: &str, n: usize| x.len() == n && x.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// Compares two digests without an early exit.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(message: String) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// State of the auth middleware: the manager (its database and token cache).
#[derive(Clone)]
pub struct Auth {
    manager: Arc<Manager>,
}

impl Auth {
    /// The middleware state for `manager`.
    pub fn new(manager: Arc<Manager>) -> Self {
        Auth { manager }
    }

    /// The stored token with `id`, fresh enough that a committed revocation is seen.
    async fn lookup(&self, id: &str) -> Result<Option<TokenRow>, ApiError> {
        if let Some((at, row)) = crate::lock(&self.manager.tokens.0).get(id) {
            if at.elapsed() < CACHE_FOR {
                return Ok(Some(row.clone()));
            }
        }
        let db = &self.manager.db;
        let key = id.to_string();
        let found = if db.status().role == holdfast_raft::Role::Leader {
            db.read_local(move |c| tokens::get(c, &key)).await?
        } else {
            match db.read(move |c| tokens::get(c, &key)).await {
                Ok(found) => found,
                // Cut off, or stopped (e.g. waiting for an upgrade): this member's own
                // state still says who may read its health.
                Err(holdfast_raft::DbError::NoLeader { .. } | holdfast_raft::DbError::Timeout { .. }) => {
                    let key = id.to_string();
                    return Ok(db.read_local(move |c| tokens::get(c, &key)).await?);
                }
                Err(holdfast_raft::DbError::Storage(_)) if db.status().role == holdfast_raft::Role::Shutdown => {
                    let key = id.to_string();
                    return Ok(db.read_local(move |c| tokens::get(c, &key)).await?);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut cache = crate::lock(&self.manager.tokens.0);
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        match &found {
            Some(row) => cache.insert(id.to_string(), (Instant::now(), row.clone())),
            None => cache.remove(id),
        };
        Ok(found)
    }

    /// Who sent `header`, or the 401 that says what is wrong (never echoing a secret).
    async fn authenticate(&self, header: Option<&HeaderValue>) -> Result<Caller, Response> {
        let Some(value) = header else {
            return Err(unauthorized(
                "this call needs a token: send `Authorization: Bearer <token>` (the first manager writes \
                 admin.token in its data dir; `holdfast token create` makes more)"
                    .into(),
            ));
        };
        let text = value.to_str().unwrap_or_default().trim();
        let Some(bearer) = text.strip_prefix("Bearer ").or_else(|| text.strip_prefix("bearer ")) else {
            return Err(unauthorized("the Authorization header must be `Bearer <token>`".into()));
        };
        let Some((id, secret)) = parse_bearer(bearer.trim()) else {
            return Err(unauthorized("the bearer token is malformed: expected hf_<16 hex>_<64 hex>".into()));
        };
        let row = match self.lookup(id).await {
            Ok(row) => row,
            Err(e) => return Err(e.into_response()),
        };
        let Some(row) = row.filter(|r| same(&r.secret_sha256, &tokens::digest(secret))) else {
            return Err(unauthorized(format!("token {id} is unknown or its secret does not match")));
        };
        if let Some(at) = row.revoked_ms {
            return Err(unauthorized(format!("token {id} ({}) was revoked at {at} ms", row.name)));
        }
        if let Some(exp) = row.expires_ms.filter(|e| *e <= now_ms()) {
            return Err(unauthorized(format!("token {id} ({}) expired at {exp} ms", row.name)));
        }
        let Some(role) = Role::parse(&row.role) else {
            return Err(unauthorized(format!("token {id} has an unknown role")));
        };
        Ok(Caller { token_id: row.id, name: row.name, role })
    }
}

/// The middleware: authenticates, checks the role the route needs, and hands the
/// [`Caller`] to handlers (audit, redaction) through the request's extensions.
pub async fn require(State(auth): State<Auth>, mut req: Request, next: Next) -> Response {
    let Some(needed) = needed_role(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let caller = match auth.authenticate(req.headers().get(header::AUTHORIZATION)).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if caller.role < needed {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} {} needs the {} role; token {} has {}",
                req.method(),
                req.uri().path(),
                needed.as_str(),
                caller.name,
                caller.role.as_str()
            ),
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Wraps `router` (all API routes, streams included) in the token check.
pub fn layer(router: axum::Router, manager: Arc<Manager>) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(Auth::new(manager), require))
}

/// Creates `dir` (mode 0700) or tightens it to 0700, and sets this process's umask to
/// 0077 so every database, key, token and spool file it creates is 0600 and every
/// directory 0700 (ARCHITECTURE.md, "Files").
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        std::fs::create_dir_all(dir)?;
        // 0700 on the root protects what a release before this one left readable
        // below it; files found there are not ours to change.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// Writes `contents` to `path` with mode 0600, atomically (temp file, then rename).
pub fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    #[cfg(unix)]
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::fs::rename(&tmp, path)
}

/// On a bootstrapping manager: once it leads, makes sure `<data_dir>/admin.token`
/// holds a valid admin token, creating one through Raft when the file is absent (a
/// fresh cluster, or an operator removed the file to get a new one). Retries until
/// written or `stop` fires.
pub async fn ensure_admin_token(
    manager: Arc<Manager>,
    data_dir: std::path::PathBuf,
    mut stop: tokio::sync::broadcast::Receiver<()>,
) {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        return;
    }
    let backoff = crate::resilience::retry::RetryPolicy {
        base: Duration::from_millis(50),
        cap: Duration::from_secs(2),
        max_attempts: None,
        deadline: None,
    };
    for failures in 0u32.. {
        if manager.db.status().role == holdfast_raft::Role::Leader {
            let (id, secret, bearer) = new_token();
            let cmd = Command::CreateToken {
                id,
                name: "admin".into(),
                role: Role::Admin.as_str().into(),
                secret_sha256: tokens::digest(&secret),
                expires_ms: None,
                created_by: "bootstrap".into(),
                now_ms: now_ms(),
            };
            match super::write(&manager, &cmd).await {
                Ok(_) => match write_private(&path, &format!("{bearer}\n")) {
                    Ok(()) => {
                        tracing::info!(file = %path.display(), "wrote the admin API token");
                        return;
                    }
                    Err(e) => tracing::error!(file = %path.display(), error = %e, "cannot write the admin token"),
                },
                Err(e) => tracing::warn!(error = %e, "cannot create the admin token yet; retrying"),
            }
        }
        let wait = backoff.delay(failures, &mut rand::thread_rng());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.recv() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_table() {
        use Role::*;
        let cases: &[(&str, &str, Option<Role>)] = &[
            ("GET", "/health/live", None),
            ("GET", "/health/ready", None),
            ("GET", "/", None),
            ("GET", "/assets/app.js", None),
            ("POST", "/", Some(Admin)),
            ("GET", "/metrics", Some(Reader)),
            ("GET", "/v1/tasks", Some(Reader)),
            ("GET", "/v1/tasks/t1/logs", Some(Reader)),
            ("GET", "/v1/events", Some(Reader)),
            ("GET", "/v1/health", Some(Reader)),
            ("GET", "/v1/audit", Some(Admin)),
            ("GET", "/v1/tokens", Some(Admin)),
            ("POST", "/v1/tokens", Some(Admin)),
            ("DELETE", "/v1/tokens/abc", Some(Admin)),
            ("POST", "/v1/tasks", Some(Operator)),
            ("DELETE", "/v1/tasks/t1", Some(Operator)),
            ("POST", "/v1/nodes/n1/drain", Some(Operator)),
            ("POST", "/v1/nodes/n1/eligibility", Some(Operator)),
            ("DELETE", "/v1/cluster/members/m2", Some(Admin)),
            ("DELETE", "/v1/nodes/n1", Some(Admin)),
            ("POST", "/v1/cluster/probe", Some(Admin)),
            ("GET", "/v1/cluster/snapshot", Some(Admin)),
            ("GET", "/v1/cluster/ca", Some(Reader)),
            ("POST", "/v1/cluster/ca/rotate", Some(Admin)),
            ("POST", "/v1/cluster/ca/finish", Some(Admin)),
            ("PUT", "/v1/tasks/t1", Some(Admin)),
            ("POST", "/v1/anything-new", Some(Admin)),
        ];
        for (m, p, want) in cases {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(needed_role(&m, p), *want, "{m} {p}");
        }
    }

    #[test]
    fn bearer_parsing() {
        let (id, secret, bearer) = new_token();
        assert_eq!(parse_bearer(&bearer), Some((id.as_str(), secret.as_str())));
        for bad in ["", "hf_", "hf_abc_def", &bearer[..bearer.len() - 1], &bearer.replace("hf_", "xx_")] {
            assert_eq!(parse_bearer(bad), None, "{bad}");
        }
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
