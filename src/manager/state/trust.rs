//! Replicated trust state (ARCHITECTURE.md "Trust"): the cluster CA (managers only;
//! never served to workers), join tokens stored as SHA-256 hashes with an optional TTL
//! and use count, and node revocations. Commands here are variants of
//! [`TrustCommand`], carried by `Command::Trust`; like every command they are rejected,
//! never failed, on bad content.

use std::collections::HashMap;

use super::cached::Cached;
use rusqlite::{params, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::{reject, Answer, CaChange, Outcome, RejectCode};

/// Trust changes, replicated through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TrustCommand {
    /// Records the cluster CA (first manager, once). A second, different CA is refused.
    SetCa {
        /// CA certificate, PEM.
        cert_pem: String,
        /// CA private key, PEM.
        key_pem: String,
    },
    /// Adds a join token (by hash). With `replace`, every other token of that role stops
    /// working (rotation); nodes already joined are not affected.
    AddJoinToken {
        /// Hex SHA-256 of the secret.
        hash: String,
        /// `manager` or `worker`.
        role: String,
        /// Expiry, ms since the epoch; none = never.
        expires_at_ms: Option<u64>,
        /// Joins left; none = unlimited.
        uses: Option<u64>,
        /// Revoke the role's other tokens.
        replace: bool,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Spends one use of a join token for `node`; rejected when unknown, revoked,
    /// expired, used up, or of another role.
    UseJoinToken {
        /// Hex SHA-256 of the presented secret.
        hash: String,
        /// Role asked for.
        role: String,
        /// Joining node.
        node: String,
        /// Wall clock of the manager that checks.
        now_ms: u64,
    },
    /// Starts a CA rotation: `cert_pem`/`key_pem` become the signing CA, the current
    /// one stays trusted as the previous CA until [`TrustCommand::FinishCaRotation`];
    /// `cross_pem` is the new CA signed by the old. Rejected without a CA or while a
    /// rotation is under way.
    RotateCa {
        /// New CA certificate, PEM.
        cert_pem: String,
        /// New CA private key, PEM.
        key_pem: String,
        /// The new CA cross-signed by the current one, PEM.
        cross_pem: String,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Ends a CA rotation: the previous CA is no longer trusted anywhere.
    FinishCaRotation {
        /// Wall clock.
        now_ms: u64,
    },
    /// Records that `node` now holds a certificate of the CA with `ca_digest`.
    CaHeld {
        /// Node name.
        node: String,
        /// Hex SHA-256 of the CA certificate.
        ca_digest: String,
        /// Wall clock.
        now_ms: u64,
    },
    /// Refuses every certificate issued to `node` until now.
    RevokeNode {
        /// Node name.
        node: String,
        /// Why (shown in logs).
        reason: String,
        /// Wall clock.
        now_ms: u64,
    },
}

/// Tables of the trust state; part of the schema.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS trust_ca (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem TEXT NOT NULL,
    key_pem TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS join_tokens (
    hash TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    expires_at_ms INTEGER,
    uses_left INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS trust_ca_previous (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem TEXT NOT NULL,
    cross_pem TEXT NOT NULL,
    started_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS trust_ca_holders (
    node TEXT PRIMARY KEY,
    ca_digest TEXT NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revocations (
    node TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"#;

fn valid_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_role(r: &str) -> bool {
    r == "manager" || r == "worker"
}

/// Applies one trust command.
pub fn apply(tx: &Transaction<'_>, cmd: TrustCommand) -> rusqlite::Result<Outcome> {
    match cmd {
        TrustCommand::SetCa { cert_pem, key_pem } => set_ca(tx, &cert_pem, &key_pem),
        TrustCommand::AddJoinToken { hash, role, expires_at_ms, uses, replace, now_ms } => {
            add_join_token(tx, hash, role, expires_at_ms, uses, replace, now_ms)
        }
        TrustCommand::UseJoinToken { hash, role, node, now_ms } => use_join_token(tx, &hash, role, node, now_ms),
        TrustCommand::RotateCa { cert_pem, key_pem, cross_pem, now_ms } => {
            rotate_ca(tx, &cert_pem, &key_pem, &cross_pem, now_ms)
        }
        TrustCommand::FinishCaRotation { .. } => {
            if tx.execute_cached("DELETE FROM trust_ca_previous", [])? == 0 {
                return reject(RejectCode::NotFound, "no CA rotation is under way");
            }
            Ok(Ok(Answer::Ca { ca: CaChange::Rotated }))
        }
        TrustCommand::CaHeld { node, ca_digest, now_ms } => {
            if !valid_hash(&ca_digest) {
                return reject(RejectCode::BadCa, "a CA digest is 64 hex digits");
            }
            tx.execute_cached(
                "INSERT INTO trust_ca_holders (node, ca_digest, at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(node) DO UPDATE SET ca_digest = excluded.ca_digest, at_ms = excluded.at_ms",
                params![node, ca_digest.to_ascii_lowercase(), now_ms.min(i64::MAX as u64) as i64],
            )?;
            Ok(Ok(Answer::CaHeld { node }))
        }
        TrustCommand::RevokeNode { node, reason, now_ms } => {
            if node.is_empty() || node.len() > 253 {
                return reject(RejectCode::BadNode, "node name must be 1..253 characters");
            }
            tx.execute_cached(
                "INSERT INTO revocations (node, at_ms, reason) VALUES (?1, ?2, ?3)
                 ON CONFLICT(node) DO UPDATE SET at_ms = excluded.at_ms, reason = excluded.reason",
                params![node, now_ms.min(i64::MAX as u64) as i64, reason],
            )?;
            Ok(Ok(Answer::NodeRevoked { revoked: node, at_ms: now_ms }))
        }
    }
}

/// `SetCa`: records the cluster CA once; the same CA again changes nothing.
fn set_ca(tx: &Transaction<'_>, cert_pem: &str, key_pem: &str) -> rusqlite::Result<Outcome> {
    if !cert_pem.contains("BEGIN CERTIFICATE") || !key_pem.contains("PRIVATE KEY") {
        return reject(RejectCode::BadCa, "the CA must be a PEM certificate and a PEM private key");
    }
    let existing: Option<String> =
        tx.query_row_cached("SELECT cert_pem FROM trust_ca WHERE id = 1", [], |r| r.get(0)).optional()?;
    match existing {
        Some(c) if c == cert_pem => Ok(Ok(Answer::Ca { ca: CaChange::Unchanged })),
        Some(_) => reject(RejectCode::Conflict, "the cluster already has another CA"),
        None => {
            tx.execute_cached(
                "INSERT INTO trust_ca (id, cert_pem, key_pem) VALUES (1, ?1, ?2)",
                params![cert_pem, key_pem],
            )?;
            Ok(Ok(Answer::Ca { ca: CaChange::Set }))
        }
    }
}

/// `AddJoinToken`: stores a token's hash (revoking the role's others on `replace`).
fn add_join_token(
    tx: &Transaction<'_>,
    hash: String,
    role: String,
    expires_at_ms: Option<u64>,
    uses: Option<u64>,
    replace: bool,
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    if !valid_hash(&hash) || !valid_role(&role) {
        return reject(RejectCode::BadToken, "a join token needs a 64-hex hash and role manager or worker");
    }
    if uses == Some(0) || uses.is_some_and(|u| u > i64::MAX as u64) {
        return reject(RejectCode::BadToken, "uses must be at least 1");
    }
    if replace {
        tx.execute_cached("UPDATE join_tokens SET revoked = 1 WHERE role = ?1 AND hash != ?2", params![role, hash])?;
    }
    let exp = expires_at_ms.map(|e| e.min(i64::MAX as u64) as i64);
    tx.execute_cached(
        "INSERT OR IGNORE INTO join_tokens (hash, role, expires_at_ms, uses_left, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![hash, role, exp, uses.map(|u| u as i64), now_ms.min(i64::MAX as u64) as i64],
    )?;
    Ok(Ok(Answer::JoinTokenAdded { role }))
}

/// `UseJoinToken`: spends one use of a known, live token of the right role.
fn use_join_token(
    tx: &Transaction<'_>,
    hash: &str,
    role: String,
    node: String,
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    let row: Option<(String, Option<i64>, Option<i64>, i64)> = tx
        .query_row_cached(
            "SELECT role, expires_at_ms, uses_left, revoked FROM join_tokens WHERE hash = ?1",
            [hash],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((token_role, expires, uses_left, revoked)) = row else {
        return reject(RejectCode::TokenUnknown, "this join token is not known to the cluster");
    };
    if revoked != 0 {
        return reject(RejectCode::TokenRevoked, "this join token was rotated or revoked");
    }
    if expires.is_some_and(|e| (now_ms as i64) >= e) {
        return reject(RejectCode::TokenExpired, "this join token has expired");
    }
    if uses_left.is_some_and(|u| u <= 0) {
        return reject(RejectCode::TokenUsedUp, "this join token has no uses left");
    }
    if token_role != role {
        return reject(
            RejectCode::TokenRole,
            format!("this is a {token_role} join token; node {node} asked to join as {role}"),
        );
    }
    tx.execute_cached(
        "UPDATE join_tokens SET used = used + 1, uses_left = CASE WHEN uses_left IS NULL THEN NULL ELSE uses_left - 1 END WHERE hash = ?1",
        [hash],
    )?;
    Ok(Ok(Answer::Joined { node, role }))
}

/// `RotateCa`: the new CA signs from now on; the old one stays trusted (with the cross
/// certificate) until `FinishCaRotation`.
fn rotate_ca(
    tx: &Transaction<'_>,
    cert_pem: &str,
    key_pem: &str,
    cross_pem: &str,
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    let pem = |p: &str| p.contains("BEGIN CERTIFICATE") && p.len() < 16_384;
    if !pem(cert_pem) || !pem(cross_pem) || !key_pem.contains("PRIVATE KEY") || key_pem.len() > 16_384 {
        return reject(RejectCode::BadCa, "a new CA needs PEM certificates and a PEM private key");
    }
    let Some(old) =
        tx.query_row_cached("SELECT cert_pem FROM trust_ca WHERE id = 1", [], |r| r.get::<_, String>(0)).optional()?
    else {
        return reject(RejectCode::NoCa, "the cluster has no CA to rotate");
    };
    if old == cert_pem {
        return reject(RejectCode::Conflict, "that is already the cluster's CA");
    }
    let rotating: i64 = tx.query_row_cached("SELECT COUNT(*) FROM trust_ca_previous", [], |r| r.get(0))?;
    if rotating > 0 {
        return reject(RejectCode::Conflict, "a CA rotation is already under way; finish it first");
    }
    tx.execute_cached(
        "INSERT INTO trust_ca_previous (id, cert_pem, cross_pem, started_ms) VALUES (1, ?1, ?2, ?3)",
        params![old, cross_pem, now_ms.min(i64::MAX as u64) as i64],
    )?;
    tx.execute_cached("UPDATE trust_ca SET cert_pem = ?1, key_pem = ?2 WHERE id = 1", params![cert_pem, key_pem])?;
    Ok(Ok(Answer::Ca { ca: CaChange::Rotating }))
}

/// The cluster CA `(cert_pem, key_pem)`, if recorded.
pub fn ca(conn: &rusqlite::Connection) -> rusqlite::Result<Option<(String, String)>> {
    conn.query_row_cached("SELECT cert_pem, key_pem FROM trust_ca WHERE id = 1", [], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

/// The previous CA and the cross certificate `(cert_pem, cross_pem)` while a CA
/// rotation is under way.
pub fn previous_ca(conn: &rusqlite::Connection) -> rusqlite::Result<Option<(String, String)>> {
    conn.query_row_cached("SELECT cert_pem, cross_pem FROM trust_ca_previous WHERE id = 1", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .optional()
}

/// Which CA each node's certificate comes from: node → CA digest.
pub fn ca_holders(conn: &rusqlite::Connection) -> rusqlite::Result<HashMap<String, String>> {
    let mut stmt = conn.prepare_cached("SELECT node, ca_digest FROM trust_ca_holders")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    rows.collect()
}

/// Every revocation: node → time (ms).
pub fn revocations(conn: &rusqlite::Connection) -> rusqlite::Result<HashMap<String, u64>> {
    let mut stmt = conn.prepare_cached("SELECT node, at_ms FROM revocations")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))?;
    rows.collect()
}
