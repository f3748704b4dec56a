//! The image catalogue in the replicated state (ARCHITECTURE.md "Images without a
//! registry"): reference → config digest, layer digests and sizes. Only the catalogue
//! travels through Raft; the bytes are content-addressed blobs on each manager's disk
//! (`manager::images`). Like every command these are rejected, never failed, on bad
//! content.

use super::cached::Cached;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};

use super::{reject, Answer, EventKind, Outcome, RejectCode};
use crate::model::sync::{CatalogueEntry, LayerRef};

/// Catalogue changes, replicated through Raft; carried by `Command::Image`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ImageCommand {
    /// Adds an image (or points an existing reference at new content). The blobs it
    /// names were verified and stored on the pushing manager before this was written.
    Put {
        /// The entry.
        entry: CatalogueEntry,
        /// Leader wall clock.
        now_ms: u64,
    },
    /// Removes a reference; refused while a task that should run names it, unless
    /// `force`.
    Remove {
        /// Image reference (normalized, `name:tag`).
        reference: String,
        /// Remove even when a task uses it.
        force: bool,
        /// Only when unused since this time, ms (retention); `None` for an operator's
        /// delete.
        unused_since_ms: Option<u64>,
        /// Leader wall clock.
        now_ms: u64,
    },
}

/// Tables of the catalogue; part of the schema.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS images (
    reference TEXT PRIMARY KEY,
    config_digest TEXT NOT NULL,
    config_size INTEGER NOT NULL,
    layers TEXT NOT NULL,
    size INTEGER NOT NULL,
    pushed_ms INTEGER NOT NULL
);
"#;

/// Most layers one image may have (Docker's own limit is 127).
pub const MAX_LAYERS: usize = 256;
/// Longest image reference accepted.
pub const MAX_REF: usize = 255;

/// Whether `d` is `sha256:` followed by 64 lowercase hex digits.
pub fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Whether `r` can be an image reference: 1–255 printable ASCII characters without
/// spaces, and not starting with `-`.
pub fn valid_reference(r: &str) -> bool {
    !r.is_empty() && r.len() <= MAX_REF && !r.starts_with('-') && r.bytes().all(|b| b.is_ascii_graphic())
}

/// Why an entry cannot be stored, judged on its content alone.
pub fn check_entry(e: &CatalogueEntry) -> Option<String> {
    if !valid_reference(&e.reference) {
        return Some(format!("image reference {:?} is not valid", e.reference));
    }
    if !valid_digest(&e.config_digest) {
        return Some("config digest must be sha256:<64 hex>".into());
    }
    if e.layers.is_empty() || e.layers.len() > MAX_LAYERS {
        return Some(format!("an image has 1–{MAX_LAYERS} layers"));
    }
    if e.layers.iter().any(|l| !valid_digest(&l.digest) || l.size > i64::MAX as u64) {
        return Some("every layer needs a sha256 digest and a size".into());
    }
    let total = e.layers.iter().try_fold(e.config_size, |acc, l| acc.checked_add(l.size));
    if e.config_size > i64::MAX as u64 || total.is_none_or(|t| t > i64::MAX as u64) {
        return Some("image size out of range".into());
    }
    None
}

/// Applies one catalogue command.
pub fn apply(tx: &Transaction<'_>, cmd: ImageCommand) -> rusqlite::Result<Outcome> {
    match cmd {
        ImageCommand::Put { entry, now_ms } => {
            if let Some(why) = check_entry(&entry) {
                return reject(RejectCode::Invalid, why);
            }
            if now_ms > i64::MAX as u64 {
                return reject(RejectCode::Invalid, "now_ms out of range");
            }
            let size = entry.size();
            let layers = serde_json::to_string(&entry.layers).unwrap_or_default();
            tx.execute_cached(
                "INSERT INTO images (reference, config_digest, config_size, layers, size, pushed_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(reference) DO UPDATE SET config_digest = ?2, config_size = ?3, layers = ?4,
                   size = ?5, pushed_ms = ?6",
                params![
                    entry.reference,
                    entry.config_digest,
                    entry.config_size as i64,
                    layers,
                    size as i64,
                    now_ms as i64
                ],
            )?;
            Ok(Ok(Answer::ImagePut { reference: entry.reference, id: entry.config_digest, size }))
        }
        ImageCommand::Remove { reference, force, unused_since_ms, now_ms } => {
            if !valid_reference(&reference) {
                return reject(RejectCode::Invalid, format!("image reference {reference:?} is not valid"));
            }
            if now_ms > i64::MAX as u64 || unused_since_ms.is_some_and(|u| u > i64::MAX as u64) {
                return reject(RejectCode::Invalid, "time out of range");
            }
            let Some(row) = get(tx, &reference)? else {
                return reject(RejectCode::NotFound, format!("no image {reference} in the catalogue"));
            };
            let users = users(tx, &reference)?;
            if !force && !users.is_empty() {
                return reject(
                    RejectCode::Conflict,
                    format!(
                        "image {reference} is used by task(s) {}; stop them first or pass ?force=true",
                        users.join(", ")
                    ),
                );
            }
            if let Some(since) = unused_since_ms {
                // Retention: the leader judged it unused on an older read; re-check here.
                if row.pushed_ms > since || last_used_ms(tx, &reference)?.is_some_and(|u| u > since) {
                    return reject(RejectCode::Conflict, format!("image {reference} was pushed or used since"));
                }
            }
            tx.execute_cached("DELETE FROM images WHERE reference = ?1", [&reference])?;
            Ok(Ok(Answer::ImageRemoved { reference, removed: true }))
        }
    }
}

/// A catalogue row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageRow {
    /// The entry itself.
    #[serde(flatten)]
    pub entry: CatalogueEntry,
    /// Total bytes (config and layers).
    pub size: u64,
    /// When it was pushed, ms since the epoch.
    pub pushed_ms: u64,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    let layers: String = r.get(3)?;
    Ok(ImageRow {
        entry: CatalogueEntry {
            reference: r.get(0)?,
            config_digest: r.get(1)?,
            config_size: r.get::<_, i64>(2)? as u64,
            layers: serde_json::from_str::<Vec<LayerRef>>(&layers).unwrap_or_default(),
        },
        size: r.get::<_, i64>(4)? as u64,
        pushed_ms: r.get::<_, i64>(5)? as u64,
    })
}

const COLUMNS: &str = "reference, config_digest, config_size, layers, size, pushed_ms";

/// One image by reference.
pub fn get(c: &Connection, reference: &str) -> rusqlite::Result<Option<ImageRow>> {
    c.query_row_cached(&format!("SELECT {COLUMNS} FROM images WHERE reference = ?1"), [reference], row).optional()
}

/// Every image, by reference.
pub fn list(c: &Connection) -> rusqlite::Result<Vec<ImageRow>> {
    let mut stmt = c.prepare_cached(&format!("SELECT {COLUMNS} FROM images ORDER BY reference"))?;
    let rows = stmt.query_map([], row)?.collect();
    rows
}

/// Tasks that should run and name `reference` as their image.
pub fn users(c: &Connection, reference: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = c.prepare_cached(
        "SELECT id FROM tasks WHERE desired = 'run' AND json_extract(spec, '$.image') IN (?1, ?2) ORDER BY id LIMIT 20",
    )?;
    let short = reference.strip_suffix(":latest").unwrap_or(reference);
    let rows = stmt.query_map(params![reference, short], |r| r.get(0))?.collect();
    rows
}

/// The last time a task naming `reference` changed (submitted or stopped), ms.
pub fn last_used_ms(c: &Connection, reference: &str) -> rusqlite::Result<Option<u64>> {
    let short = reference.strip_suffix(":latest").unwrap_or(reference);
    let v: Option<i64> = c.query_row_cached(
        "SELECT MAX(updated_ms) FROM tasks WHERE json_extract(spec, '$.image') IN (?1, ?2)",
        params![reference, short],
        |r| r.get(0),
    )?;
    Ok(v.map(|v| v as u64))
}

/// Every blob digest the catalogue references (configs and layers).
pub fn referenced_blobs(c: &Connection) -> rusqlite::Result<std::collections::BTreeSet<String>> {
    let mut out = std::collections::BTreeSet::new();
    for r in list(c)? {
        out.insert(r.entry.config_digest.clone());
        out.extend(r.entry.layers.into_iter().map(|l| l.digest));
    }
    Ok(out)
}

/// Domain events of an applied catalogue command: `(at_ms, kind, subject, detail)`.
pub(super) fn events_for(cmd: &ImageCommand, out: &Answer) -> Vec<(u64, EventKind, String, serde_json::Value)> {
    let size = match out {
        Answer::ImagePut { size, .. } => Some(*size),
        _ => None,
    };
    match cmd {
        ImageCommand::Put { entry, now_ms } => vec![(
            *now_ms,
            EventKind::ImagePushed,
            entry.reference.clone(),
            serde_json::json!({ "id": entry.config_digest, "size": size, "layers": entry.layers.len() }),
        )],
        ImageCommand::Remove { reference, force, unused_since_ms, now_ms } => vec![(
            *now_ms,
            EventKind::ImageRemoved,
            reference.clone(),
            serde_json::json!({ "force": force, "retention": unused_since_ms.is_some() }),
        )],
    }
}
