//! Ways back when the cluster cannot help itself: quorum loss and disaster restore.
//!
//! Both end the same way: this member's log gets one more membership entry naming
//! **only itself** as voter, under a term higher than any it has seen, and a vote for
//! itself in that term marked committed. openraft then starts the member as the leader
//! of a one-member cluster (it restores a committed own vote as leadership), commits
//! the entry with its own quorum of one, and every entry already in the log or the
//! state database is kept. This is the same move etcd's `--force-new-cluster` makes:
//! the operator decides that this member's copy is the truth.
//!
//! * `--force-new-cluster` (quorum lost): [`force_new_cluster`] on the member's own
//!   data directory before Raft starts.
//! * restore: [`restore_snapshot`] builds a new data directory from a copy of
//!   `state.db` (made by [`crate::ReplicatedDb::backup_to`]) and leaves a marker so the
//!   first start forces the one-member membership with the addresses it really uses.
//!
//! Written by hand because openraft offers no way to shrink a membership without a
//! quorum of the old one; the two writes it needs (an entry and a vote) go through the
//! same tables `LogStore` reads, in one SQLite transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use openraft::{CommittedLeaderId, EntryPayload, Membership, Vote};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::datadir::{self, Role};
use crate::types::{Entry, LogId, StoredMembership};
use crate::{node_id_for, Config, DbError};

/// Marker left by [`restore_snapshot`]: the next open forces a one-member cluster.
pub(crate) const PENDING_MARKER: &str = "force-new-cluster.pending";
/// Marker written after a forced membership, naming the entry it wrote.
pub(crate) const DONE_MARKER: &str = "force-new-cluster.done";

/// What a forced one-member membership did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forced {
    /// Term of the new membership entry (and of this member's vote).
    pub term: u64,
    /// Log index of the new membership entry.
    pub index: u64,
    /// Names of the members the old membership had besides this one.
    pub dropped: Vec<String>,
}

/// What [`restore_snapshot`] found in the copy it restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// Last log index applied in the copy (everything up to it is in the new store).
    pub last_applied: u64,
    /// Names of the members of the cluster the copy was taken from.
    pub old_members: Vec<String>,
}

fn storage(path: &Path, what: &str, e: impl std::fmt::Display) -> DbError {
    datadir::data_dir_error(path, format!("{what}: {e}"))
}

fn read_meta_json<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    table: &str,
    key: &str,
) -> rusqlite::Result<Option<T>> {
    let raw: Option<String> =
        conn.query_row(&format!("SELECT value FROM {table} WHERE key = ?1"), [key], |r| r.get(0)).optional()?;
    Ok(raw.and_then(|s| serde_json::from_str::<Option<T>>(&s).ok().flatten()))
}

/// The log's last entry id, last purged id, vote, and the newest membership entry in
/// the log (if any), read from `raft-log.db`.
struct LogView {
    last: Option<LogId>,
    vote: Option<Vote<u64>>,
    membership: Option<StoredMembership>,
}

fn read_log(conn: &Connection) -> rusqlite::Result<LogView> {
    let purged: Option<LogId> = read_meta_json(conn, "raft_meta", "last_purged")?;
    let vote: Option<Vote<u64>> = read_meta_json(conn, "raft_meta", "vote")?;
    let mut last = purged;
    let mut membership = None;
    // Entries at or behind the purge point may still be on disk: a purge is deleted in
    // chunks after the point is written (ARCHITECTURE.md, "Decisions").
    let after_purge = purged.map_or(0, |p| i64::try_from(p.index).unwrap_or(i64::MAX).saturating_add(1));
    let mut stmt = conn.prepare("SELECT entry FROM log WHERE idx >= ?1 ORDER BY idx DESC")?;
    let mut rows = stmt.query([after_purge])?;
    let mut first = true;
    while let Some(row) = rows.next()? {
        let json: String = row.get(0)?;
        let entry: Entry = serde_json::from_str(&json)
            .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?;
        if first {
            last = Some(entry.log_id);
            first = false;
        }
        if let EntryPayload::Membership(m) = entry.payload {
            membership = Some(StoredMembership::new(Some(entry.log_id), m));
            break;
        }
    }
    Ok(LogView { last, vote, membership })
}

fn read_state(path: &Path) -> Result<(Option<LogId>, StoredMembership), DbError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| storage(path, "cannot open read-only", e))?;
    let applied: Option<LogId> =
        read_meta_json(&conn, "_raft_sm", "last_applied").map_err(|e| storage(path, "cannot read last applied", e))?;
    let membership: Option<StoredMembership> =
        read_meta_json(&conn, "_raft_sm", "membership").map_err(|e| storage(path, "cannot read membership", e))?;
    Ok((applied, membership.unwrap_or_default()))
}

fn names(m: &StoredMembership) -> Vec<String> {
    m.membership().nodes().map(|(_, n)| n.name.clone()).collect()
}

/// Appends a membership entry naming only this member (`config`'s name and advertised
/// addresses) to the log in `config.data_dir`, with a committed vote for itself in a
/// new, higher term. The member must not be running. Refuses a directory that is not
/// an initialized manager store of this node name.
pub fn force_new_cluster(config: &Config) -> Result<Forced, DbError> {
    let dir = &config.data_dir;
    let log_path = dir.join(datadir::LOG_FILE);
    let state_path = dir.join(datadir::STATE_FILE);
    if !log_path.exists() || !state_path.exists() {
        return Err(datadir::data_dir_error(
            dir,
            "holds no manager store (raft-log.db and state.db); --force-new-cluster restarts an existing \
             manager from its own data, so point --data-dir at a surviving manager's directory",
        ));
    }
    datadir::validate_existing(&state_path, Role::State, &config.node_name)?;
    let (applied, sm_membership) = read_state(&state_path)?;
    let conn = datadir::open_existing(&log_path, Role::Log, &config.node_name)?;
    let view = read_log(&conn).map_err(|e| storage(&log_path, "cannot read the log", e))?;
    let last = match (view.last, applied) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let Some(last) = last else {
        return Err(datadir::data_dir_error(
            dir,
            "was never initialized (empty log); start it with --bootstrap or --join instead",
        ));
    };
    let current = match view.membership {
        Some(m) if m.log_id() >= sm_membership.log_id() => m,
        _ => sm_membership,
    };
    let id = node_id_for(&config.node_name);
    let dropped: Vec<String> = names(&current).into_iter().filter(|n| *n != config.node_name).collect();

    let term = view.vote.map(|v| v.leader_id().term).unwrap_or(0).max(last.leader_id.term) + 1;
    let me = config.member();
    let membership = Membership::new(vec![BTreeSet::from([id])], BTreeMap::from([(id, me)]));
    let log_id = LogId::new(CommittedLeaderId::new(term, id), last.index + 1);
    let entry = Entry { log_id, payload: EntryPayload::Membership(membership) };
    let vote = Vote::new_committed(term, id);
    let (log_id_json, entry_json, vote_json) =
        (to_json(&log_path, &log_id)?, to_json(&log_path, &entry)?, to_json(&log_path, &vote)?);
    let tx = conn.unchecked_transaction().map_err(|e| storage(&log_path, "cannot begin", e))?;
    tx.execute(
        "INSERT OR REPLACE INTO log (idx, log_id, entry) VALUES (?1, ?2, ?3)",
        rusqlite::params![i64::try_from(log_id.index).unwrap_or(i64::MAX), log_id_json, entry_json],
    )
    .and_then(|_| {
        tx.execute("INSERT OR REPLACE INTO raft_meta (key, value) VALUES ('vote', ?1)", [vote_json])?;
        tx.commit()
    })
    .map_err(|e| storage(&log_path, "cannot write the new membership", e))?;
    let forced = Forced { term, index: log_id.index, dropped };
    let marker = format!("term {} index {} dropped {:?}\n", forced.term, forced.index, forced.dropped);
    write_synced(&dir.join(DONE_MARKER), marker.as_bytes()).map_err(|e| storage(dir, "cannot write marker", e))?;
    datadir::remove_if_exists(&dir.join(PENDING_MARKER)).map_err(|e| storage(dir, "cannot remove marker", e))?;
    Ok(forced)
}

/// Decides, before Raft starts, whether this open must force a one-member cluster:
/// when asked (`config.force_new_cluster`) or when a restore left its marker. A flag
/// left in place after the reset is harmless while the membership is still this
/// member alone; once others have joined again it is refused, because forcing again
/// would drop them.
pub(crate) fn force_if_asked(config: &Config) -> Result<Option<Forced>, DbError> {
    let dir = &config.data_dir;
    let pending = dir.join(PENDING_MARKER).exists();
    if !config.force_new_cluster && !pending {
        return Ok(None);
    }
    if !pending && dir.join(DONE_MARKER).exists() {
        let state_path = dir.join(datadir::STATE_FILE);
        let log_path = dir.join(datadir::LOG_FILE);
        let (_, sm) = read_state(&state_path)?;
        let conn = Connection::open_with_flags(&log_path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| storage(&log_path, "cannot open read-only", e))?;
        let view = read_log(&conn).map_err(|e| storage(&log_path, "cannot read the log", e))?;
        let current = view.membership.unwrap_or(sm);
        let others: Vec<String> = names(&current).into_iter().filter(|n| *n != config.node_name).collect();
        if others.is_empty() {
            tracing::warn!(
                node = %config.node_name,
                "--force-new-cluster is still set but this member already leads a one-member cluster; \
                 nothing to do (remove the flag)"
            );
            return Ok(None);
        }
        return Err(datadir::data_dir_error(
            dir,
            format!(
                "was already reset with --force-new-cluster and members {others:?} have joined since; \
                 forcing again would drop them. Remove --force-new-cluster (or delete {DONE_MARKER} if \
                 you really mean to reset again)"
            ),
        ));
    }
    force_new_cluster(config).map(Some)
}

/// Builds a new manager data directory `dir` for member `node_name` from `copy`, a
/// consistent copy of another member's `state.db`. The directory must be absent or
/// empty. The new store holds everything applied in the copy; its log starts after it
/// (the copy is also kept as the current Raft snapshot, so members that join later
/// receive it), and the first open forces a one-member cluster with the addresses that
/// open is given.
pub fn restore_snapshot(copy: &Path, dir: &Path, node_name: &str) -> Result<Restored, DbError> {
    if dir.exists() {
        let mut entries = fs::read_dir(dir).map_err(|e| storage(dir, "cannot list", e))?;
        if entries.next().is_some() {
            return Err(datadir::data_dir_error(
                dir,
                "is not empty; restore into a new, empty directory (nothing was written)",
            ));
        }
    }
    datadir::check_sqlite_header(copy)?;
    let (applied, membership) = {
        let src = Connection::open_with_flags(copy, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| storage(copy, "cannot open read-only", e))?;
        datadir::check_identity(&src, copy, Role::State, None)?;
        drop(src);
        read_state(copy)?
    };
    let Some(applied) = applied else {
        return Err(datadir::data_dir_error(copy, "holds no applied entries; it is not a backup of a running cluster"));
    };
    datadir::ensure_dir(dir)?;
    let state_path = dir.join(datadir::STATE_FILE);
    let tmp = datadir::tmp_path(&state_path, "restore");
    fs::copy(copy, &tmp).map_err(|e| storage(&tmp, "cannot copy", e))?;
    {
        let conn = Connection::open(&tmp).map_err(|e| storage(&tmp, "cannot open", e))?;
        // The copy names the member it was taken from; the new store is ours.
        datadir::write_identity(&conn, Role::State, node_name).map_err(|e| storage(&tmp, "identity", e))?;
        conn.close().map_err(|(_, e)| storage(&tmp, "cannot close", e))?;
    }
    fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| storage(&tmp, "cannot sync", e))?;
    fs::rename(&tmp, &state_path).map_err(|e| storage(&state_path, "cannot rename into place", e))?;

    // An empty log whose purge point is the copy's last applied entry: openraft sees
    // a log that "continues" the state, and sends the snapshot to members behind it.
    let log = crate::log_store::LogStore::open(dir, node_name)?;
    drop(log);
    let log_path = dir.join(datadir::LOG_FILE);
    let conn = datadir::open_existing(&log_path, Role::Log, node_name)?;
    let purged = serde_json::to_string(&Some(applied)).map_err(|e| storage(&log_path, "cannot encode", e))?;
    conn.execute("INSERT OR REPLACE INTO raft_meta (key, value) VALUES ('last_purged', ?1)", [&purged])
        .and_then(|_| conn.execute("INSERT OR REPLACE INTO raft_meta (key, value) VALUES ('committed', ?1)", [&purged]))
        .map_err(|e| storage(&log_path, "cannot write the purge point", e))?;
    drop(conn);
    let data = fs::read(&state_path).map_err(|e| storage(&state_path, "cannot read", e))?;
    crate::state_machine::write_restored_snapshot(dir, applied, membership.clone(), &data)
        .map_err(|e| storage(dir, "cannot write snapshot.bin", e))?;
    write_synced(&dir.join(PENDING_MARKER), b"restored\n").map_err(|e| storage(dir, "cannot write marker", e))?;
    datadir::sync_dir(dir).map_err(|e| storage(dir, "cannot sync", e))?;
    Ok(Restored { last_applied: applied.index, old_members: names(&membership) })
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn to_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<String, DbError> {
    serde_json::to_string(v).map_err(|e| storage(path, "cannot encode", e))
}
