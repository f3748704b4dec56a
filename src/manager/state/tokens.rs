//! API bearer tokens in the replicated state: schema, the apply arms of
//! `CreateToken`/`RevokeToken`, and the reads the auth layer and `/v1/tokens` make.
//!
//! Only a SHA-256 digest of each secret is stored. A plain fast hash is enough here
//! (no salt, no key stretching) because secrets are 256-bit random values made by
//! the server, never passwords a person chose: there is nothing to guess or to look up
//! in a table, so slowing down a brute force buys nothing.

use super::cached::Cached;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{reject, valid_id, Answer, Outcome, RejectCode};

/// What a token may do (ARCHITECTURE.md, "Access"): `admin` everything, `operator`
/// tasks and node drain/eligibility, `reader` GETs with env values redacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only; env values redacted.
    Reader,
    /// Tasks, drain, eligibility.
    Operator,
    /// Everything, including members and tokens.
    Admin,
}

impl Role {
    /// Parses `admin`, `operator` or `reader`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "operator" => Some(Role::Operator),
            "reader" => Some(Role::Reader),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Reader => "reader",
        }
    }
}

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER,
    revoked_ms INTEGER
);
"#;

/// Longest token name accepted.
pub const MAX_NAME: usize = 128;

/// Hex SHA-256 of a token secret.
pub fn digest(secret: &str) -> String {
    let d = Sha256::digest(secret.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A token as stored (its secret only as a digest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenRow {
    /// Token id (public; part of the bearer string).
    pub id: String,
    /// Human name; the audit's `who`.
    pub name: String,
    /// Role text.
    pub role: String,
    /// Digest of the secret.
    #[serde(skip)]
    pub secret_sha256: String,
    /// Who created it.
    pub created_by: String,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// Expiry, ms since the epoch.
    pub expires_ms: Option<u64>,
    /// Revocation time, ms since the epoch.
    pub revoked_ms: Option<u64>,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok(TokenRow {
        id: r.get(0)?,
        name: r.get(1)?,
        role: r.get(2)?,
        secret_sha256: r.get(3)?,
        created_by: r.get(4)?,
        created_ms: r.get::<_, i64>(5)? as u64,
        expires_ms: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        revoked_ms: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
    })
}

const COLUMNS: &str = "id, name, role, secret_sha256, created_by, created_ms, expires_ms, revoked_ms";

/// One token by id.
pub fn get(c: &Connection, id: &str) -> rusqlite::Result<Option<TokenRow>> {
    c.query_row_cached(&format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"), [id], row).optional()
}

/// Every token, oldest first.
pub fn list(c: &Connection) -> rusqlite::Result<Vec<TokenRow>> {
    let mut stmt = c.prepare_cached(&format!("SELECT {COLUMNS} FROM tokens ORDER BY created_ms, id"))?;
    let rows = stmt.query_map([], row)?.collect();
    rows
}

#[allow(clippy::too_many_arguments)]
pub(super) fn create(
    tx: &Transaction<'_>,
    id: &str,
    name: &str,
    role: &str,
    secret_sha256: &str,
    created_by: &str,
    expires_ms: Option<u64>,
    now_ms: u64,
) -> rusqlite::Result<Outcome> {
    if !valid_id(id) {
        return reject(RejectCode::Invalid, format!("token id {id:?} is not a valid id"));
    }
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return reject(RejectCode::Invalid, format!("token name must be 1–{MAX_NAME} printable characters"));
    }
    if Role::parse(role).is_none() {
        return reject(RejectCode::Invalid, format!("unknown role {role:?}; use admin, operator or reader"));
    }
    if secret_sha256.len() != 64 || !secret_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return reject(RejectCode::Invalid, "secret digest must be 64 hex digits");
    }
    if expires_ms.is_some_and(|e| e > i64::MAX as u64) {
        return reject(RejectCode::Invalid, "expiry out of range");
    }
    if get(tx, id)?.is_some() {
        return reject(RejectCode::Conflict, format!("a token with id {id} already exists"));
    }
    tx.execute_cached(
        "INSERT INTO tokens (id, name, role, secret_sha256, created_by, created_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![id, name, role, secret_sha256, created_by, now_ms as i64, expires_ms.map(|e| e as i64)],
    )?;
    Ok(Ok(Answer::TokenCreated { id: id.into(), name: name.into(), role: role.into() }))
}

pub(super) fn revoke(tx: &Transaction<'_>, id: &str, now_ms: u64) -> rusqlite::Result<Outcome> {
    let Some(t) = get(tx, id)? else {
        return reject(RejectCode::NotFound, format!("no token with id {id}"));
    };
    if t.revoked_ms.is_some() {
        return Ok(Ok(Answer::TokenRevoked { id: id.into(), revoked: true }));
    }
    if t.role == Role::Admin.as_str() {
        // Revoking the last admin token would lock everyone out of tokens and members.
        let others: i64 = tx.query_row_cached(
            "SELECT COUNT(*) FROM tokens WHERE role = 'admin' AND revoked_ms IS NULL AND id != ?1
               AND (expires_ms IS NULL OR expires_ms > ?2)",
            params![id, now_ms as i64],
            |r| r.get(0),
        )?;
        if others == 0 {
            return reject(
                RejectCode::Conflict,
                format!("token {id} is the last valid admin token; create another first"),
            );
        }
    }
    tx.execute_cached("UPDATE tokens SET revoked_ms = ?2 WHERE id = ?1", params![id, now_ms as i64])?;
    Ok(Ok(Answer::TokenRevoked { id: id.into(), revoked: true }))
}
