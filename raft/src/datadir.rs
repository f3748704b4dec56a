//! Opening the SQLite files of a data directory without ever adopting a foreign file.
//!
//! Every database this crate creates carries an identity table (`_holdfast_raft`) with
//! the format version, the file's role and the node name. A file that lacks it, is not
//! SQLite, or names another node is refused with [`DbError::DataDir`] and left as it is.
//! New files are built under a temporary name and renamed into place, so a file with a
//! final name always has its identity.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::DbError;

/// Version of the on-disk layout; bumped on any incompatible schema change.
pub(crate) const FORMAT_VERSION: i64 = 1;
/// Name of the identity table present in every database of a store.
pub(crate) const IDENTITY_TABLE: &str = "_holdfast_raft";
/// File name of the Raft log database.
pub(crate) const LOG_FILE: &str = "raft-log.db";
/// File name of the state database.
pub(crate) const STATE_FILE: &str = "state.db";
/// File name of the persisted latest snapshot.
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.bin";

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The role a database plays in the store, recorded in its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// `raft-log.db`.
    Log,
    /// `state.db`.
    State,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Log => "log",
            Role::State => "state",
        }
    }
}

pub(crate) fn data_dir_error(path: &Path, reason: impl Into<String>) -> DbError {
    DbError::DataDir { path: path.to_path_buf(), reason: reason.into() }
}

/// Creates the data directory when absent; refuses a path that is not a directory.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), DbError> {
    match fs::metadata(dir) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(data_dir_error(dir, "exists but is not a directory; pass a directory path as the data dir")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| data_dir_error(dir, format!("cannot create the directory: {e}")))
        }
        Err(e) => Err(data_dir_error(dir, format!("cannot inspect the directory: {e}"))),
    }
}

/// Sets the pragmas every read-write connection of the store uses.
pub(crate) fn configure(conn: &Connection) -> Result<(), String> {
    // WAL lets readers run beside the single writer; FULL makes every commit durable
    // before it returns, which is what openraft is promised.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(|e| e.to_string())?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("could not switch to WAL journal mode (got {mode})"));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(|e| e.to_string())?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(|e| e.to_string())?;
    Ok(())
}

/// Reads the identity of a database, `None` when it has no identity table.
fn read_identity(conn: &Connection) -> rusqlite::Result<Option<(i64, String, String)>> {
    let has_table: Option<i64> = conn
        .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", [IDENTITY_TABLE], |r| r.get(0))
        .optional()?;
    if has_table.is_none() {
        return Ok(None);
    }
    let get = |key: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row(&format!("SELECT value FROM {IDENTITY_TABLE} WHERE key = ?1"), [key], |r| r.get(0)).optional()
    };
    let version = get("format_version")?.and_then(|v| v.parse::<i64>().ok());
    let role = get("role")?;
    let name = get("node_name")?;
    match (version, role, name) {
        (Some(v), Some(r), Some(n)) => Ok(Some((v, r, n))),
        _ => Ok(None),
    }
}

/// Checks that `conn` is a store database of `role` written by `node_name` (by any
/// node when `None`, as for a snapshot received from the leader).
pub(crate) fn check_identity(
    conn: &Connection,
    path: &Path,
    role: Role,
    node_name: Option<&str>,
) -> Result<(), DbError> {
    let identity = read_identity(conn).map_err(|e| {
        data_dir_error(path, format!("is not a readable SQLite database ({e}); move it away or pick another data dir"))
    })?;
    let Some((version, stored_role, stored_name)) = identity else {
        return Err(data_dir_error(
            path,
            format!(
                "is a SQLite database without the {IDENTITY_TABLE} identity table, so it was not \
                 written by holdfast-raft; move it away or pick another data dir"
            ),
        ));
    };
    if version != FORMAT_VERSION {
        return Err(data_dir_error(
            path,
            format!("has store format version {version}, this build reads version {FORMAT_VERSION}"),
        ));
    }
    if stored_role != role.as_str() {
        return Err(data_dir_error(
            path,
            format!("holds the holdfast-raft {stored_role} database, expected the {} database", role.as_str()),
        ));
    }
    if let Some(node_name) = node_name.filter(|n| *n != stored_name) {
        return Err(data_dir_error(
            path,
            format!(
                "belongs to node {stored_name:?}, not {node_name:?}; start with --node-id \
                 {stored_name} or use another data dir"
            ),
        ));
    }
    Ok(())
}

/// Writes the identity rows into a fresh database (or rewrites the node name).
pub(crate) fn write_identity(conn: &Connection, role: Role, node_name: &str) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {IDENTITY_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
    ))?;
    let sql = format!("INSERT OR REPLACE INTO {IDENTITY_TABLE} (key, value) VALUES (?1, ?2)");
    conn.execute(&sql, ["format_version", &FORMAT_VERSION.to_string()])?;
    conn.execute(&sql, ["role", role.as_str()])?;
    conn.execute(&sql, ["node_name", node_name])?;
    Ok(())
}

/// Checks that the file at `path` starts with the SQLite header.
pub(crate) fn check_sqlite_header(path: &Path) -> Result<(), DbError> {
    let md = fs::metadata(path).map_err(|e| data_dir_error(path, format!("cannot inspect the file: {e}")))?;
    if !md.is_file() {
        return Err(data_dir_error(path, "exists but is not a regular file; move it away or pick another data dir"));
    }
    let mut header = [0u8; 16];
    let mut f = fs::File::open(path).map_err(|e| data_dir_error(path, format!("cannot open: {e}")))?;
    let mut read = 0;
    while read < header.len() {
        let n = f.read(&mut header[read..]).map_err(|e| data_dir_error(path, format!("cannot read: {e}")))?;
        if n == 0 {
            break;
        }
        read += n;
    }
    if read < header.len() || &header != SQLITE_MAGIC {
        return Err(data_dir_error(
            path,
            "is not a SQLite database, so it is not a holdfast-raft store file; move it away or \
             pick another data dir",
        ));
    }
    Ok(())
}

/// Checks, over a read-only connection, that `path` is a store database of `role`
/// written by `node_name`; a foreign database is not modified (not even switched to WAL).
pub(crate) fn validate_existing(path: &Path, role: Role, node_name: &str) -> Result<(), DbError> {
    check_sqlite_header(path)?;
    let ro = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| data_dir_error(path, format!("cannot open read-only: {e}")))?;
    check_identity(&ro, path, role, Some(node_name))
}

/// Opens an existing store database read-write after checking its identity.
pub(crate) fn open_existing(path: &Path, role: Role, node_name: &str) -> Result<Connection, DbError> {
    validate_existing(path, role, node_name)?;
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| data_dir_error(path, format!("cannot open read-write: {e}")))?;
    configure(&conn).map_err(|e| data_dir_error(path, format!("cannot configure: {e}")))?;
    Ok(conn)
}

/// Creates a new store database at `path` (which must not exist) under a temporary
/// name, runs `init` on it, and renames it into place.
pub(crate) fn create_new(
    path: &Path,
    role: Role,
    node_name: &str,
    init: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> Result<(), DbError> {
    let tmp = tmp_path(path, "init");
    // A leftover from a crash during an earlier creation; it never got its final name,
    // so nothing depends on it.
    remove_if_exists(&tmp).map_err(|e| data_dir_error(&tmp, format!("cannot remove: {e}")))?;
    {
        let conn = Connection::open(&tmp).map_err(|e| data_dir_error(&tmp, format!("cannot create: {e}")))?;
        configure(&conn).map_err(|e| data_dir_error(&tmp, format!("cannot configure: {e}")))?;
        let tx = conn.unchecked_transaction().and_then(|tx| {
            write_identity(&tx, role, node_name)?;
            init(&tx)?;
            tx.commit()
        });
        tx.map_err(|e| data_dir_error(&tmp, format!("cannot initialize: {e}")))?;
        conn.close().map_err(|(_, e)| data_dir_error(&tmp, format!("cannot close: {e}")))?;
    }
    if path.exists() {
        return Err(data_dir_error(path, "appeared while the store was being created; refusing to overwrite it"));
    }
    fs::rename(&tmp, path).map_err(|e| data_dir_error(path, format!("cannot rename into place: {e}")))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(|e| data_dir_error(dir, format!("cannot sync directory: {e}")))?;
    }
    Ok(())
}

/// Removes temporary files a crash may have left behind (and their SQLite side
/// files). Only names this crate generates are touched.
pub(crate) fn remove_stale_tmp(dir: &Path) -> Result<(), DbError> {
    const OURS: [&str; 5] = ["snapshot-build-", "snapshot-install.", "snapshot.bin.", "raft-log.db.", "state.db."];
    let entries = fs::read_dir(dir).map_err(|e| data_dir_error(dir, format!("cannot list: {e}")))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = OURS.iter().any(|p| name.starts_with(p)) && name.contains(".tmp");
        if ours {
            let path = entry.path();
            remove_if_exists(&path).map_err(|e| data_dir_error(&path, format!("cannot remove stale file: {e}")))?;
        }
    }
    Ok(())
}

/// `<path>.<suffix>.tmp`, the name used for files not yet in place.
pub(crate) fn tmp_path(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}.tmp"));
    path.with_file_name(name)
}

pub(crate) fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Makes a rename inside `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
}
