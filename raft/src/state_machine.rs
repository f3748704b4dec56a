//! The state machine in `state.db` and its snapshots.
//!
//! Commands, the last-applied log id and the membership are written in one SQLite
//! transaction, so the state database is always exactly "the log applied up to
//! `last_applied`". A snapshot is a consistent copy of the whole database
//! (`VACUUM INTO`); installing one copies the received database into the live file with
//! the SQLite backup API in a single step, which is one write transaction.

// openraft's storage traits fix the error type to its (large) StorageError, and the
// helpers here produce exactly that type.
#![allow(clippy::result_large_err)]

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageIOError};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::datadir::{self, Role};
use crate::types::{Entry, LogId, Payload, StorageError, StoredMembership, TypeConfig};
use crate::{Apply, DbError, Member};

const SM_SCHEMA: &str = "
CREATE TABLE _raft_sm (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const KEY_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";

/// Leading bytes of `snapshot.bin`; the rest is a little-endian u64 length, the
/// snapshot meta as JSON, then the database bytes.
const SNAPSHOT_MAGIC: &[u8; 8] = b"HFRSNAP1";

type Meta = SnapshotMeta<u64, Member>;

/// Prepared statements kept per `state.db` connection (writer and each reader).
pub(crate) const STATEMENT_CACHE: usize = 256;

/// The SQLite-backed [`RaftStateMachine`]; clones share one write connection.
#[derive(Clone)]
pub struct StateMachine {
    shared: Arc<Shared>,
}

struct Shared {
    /// The only connection that writes `state.db`.
    conn: Mutex<Connection>,
    app: Arc<dyn Apply>,
    dir: PathBuf,
    node_name: String,
    /// Meta of the snapshot persisted in `snapshot.bin`; the lock also serializes
    /// writers of that file.
    snapshot: Mutex<Option<Meta>>,
    /// Distinguishes temporary files of concurrent snapshot builds.
    seq: AtomicU64,
    /// The membership `state.db` holds, once `apply` has read or written it, so the
    /// next `apply` need not read it back; `None` when unknown (at open, after a
    /// snapshot install). Only touched with `conn` locked.
    membership: Mutex<Option<StoredMembership>>,
}

impl StateMachine {
    /// Opens `state.db` in `dir`, creating it (and the application schema) when absent;
    /// refuses a foreign file.
    pub fn open(dir: &Path, node_name: &str, app: Arc<dyn Apply>) -> Result<Self, DbError> {
        let path = dir.join(datadir::STATE_FILE);
        if !path.exists() {
            let app = app.clone();
            datadir::create_new(&path, Role::State, node_name, move |c| {
                c.execute_batch(SM_SCHEMA)?;
                app.init_schema(c)
            })?;
        }
        let conn = datadir::open_existing(&path, Role::State, node_name)?;
        // A store written by an older release gets the tables and columns added since
        // (the application's schema step is idempotent), before anything is applied.
        app.init_schema(&conn)
            .map_err(|e| DbError::Storage(format!("state.db: cannot bring the schema up to date: {e}")))?;
        // The log is the durable record: a state commit lost to a power cut is applied
        // again from the log on restart, because last-applied travels in the same
        // transaction. So commits here need not wait for fsync (WAL + NORMAL stays
        // atomic and survives a process crash); `build_snapshot` checkpoints with fsync
        // before the log behind a snapshot may be purged.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| DbError::Storage(format!("state.db: cannot set synchronous=NORMAL: {e}")))?;
        // Every command's statements stay compiled (the application prepares through
        // the cache; ARCHITECTURE.md "Decisions"), and there are more than the default 16.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let snapshot = load_snapshot_meta(&dir.join(datadir::SNAPSHOT_FILE))?;
        Ok(StateMachine {
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                app,
                dir: dir.to_path_buf(),
                node_name: node_name.to_string(),
                snapshot: Mutex::new(snapshot),
                seq: AtomicU64::new(0),
                membership: Mutex::new(None),
            }),
        })
    }

    /// Last applied log id, read synchronously (used by the data-dir consistency checks).
    pub(crate) fn last_applied_blocking(&self) -> Result<Option<LogId>, StorageError> {
        let conn = self.shared.lock_conn();
        read_sm_meta(&conn).map(|(applied, _)| applied)
    }

    async fn call<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StorageError> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e).into())
            .and_then(|r| r)
    }
}

impl Shared {
    fn lock_conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("state.db mutex poisoned by a panicked SQLite call")
    }

    fn lock_membership(&self) -> std::sync::MutexGuard<'_, Option<StoredMembership>> {
        self.membership.lock().expect("membership mutex poisoned")
    }

    fn lock_snapshot(&self) -> std::sync::MutexGuard<'_, Option<Meta>> {
        self.snapshot.lock().expect("snapshot mutex poisoned by a panicked snapshot write")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(datadir::STATE_FILE)
    }

    /// Persists `data` as the current snapshot unless a newer one is already stored.
    fn store_snapshot(&self, meta: &Meta, data: &[u8]) -> Result<(), StorageError> {
        let mut current = self.lock_snapshot();
        if let Some(cur) = current.as_ref() {
            if cur.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        let sig = Some(meta.signature());
        write_snapshot_file(&self.dir.join(datadir::SNAPSHOT_FILE), meta, data)
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        *current = Some(meta.clone());
        Ok(())
    }
}

fn read_sm_meta(conn: &Connection) -> Result<(Option<LogId>, StoredMembership), StorageError> {
    let get = |key: &str| -> Result<Option<String>, StorageError> {
        conn.prepare_cached("SELECT value FROM _raft_sm WHERE key = ?1")
            .and_then(|mut stmt| stmt.query_row([key], |r| r.get(0)).optional())
            .map_err(|e| StorageIOError::read_state_machine(&e).into())
    };
    let applied = match get(KEY_APPLIED)? {
        Some(s) => serde_json::from_str(&s).map_err(|e| StorageIOError::read_state_machine(&e))?,
        None => None,
    };
    let membership = match get(KEY_MEMBERSHIP)? {
        Some(s) => serde_json::from_str(&s).map_err(|e| StorageIOError::read_state_machine(&e))?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

fn write_sm_meta(conn: &Connection, applied: &Option<LogId>, membership: &StoredMembership) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("INSERT OR REPLACE INTO _raft_sm (key, value) VALUES (?1, ?2)")?;
    stmt.execute([KEY_APPLIED, &to_json(applied)?])?;
    stmt.execute([KEY_MEMBERSHIP, &to_json(membership)?])?;
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> rusqlite::Result<String> {
    serde_json::to_string(v).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

fn write_snapshot_file(path: &Path, meta: &Meta, data: &[u8]) -> std::io::Result<()> {
    let meta_json = serde_json::to_vec(meta)?;
    let tmp = datadir::tmp_path(path, "write");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(SNAPSHOT_MAGIC)?;
        f.write_all(&(meta_json.len() as u64).to_le_bytes())?;
        f.write_all(&meta_json)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        datadir::sync_dir(dir)?;
    }
    Ok(())
}

/// Writes `snapshot.bin` for a store built by a restore: `data` is the restored
/// `state.db`, applied up to `applied`.
pub(crate) fn write_restored_snapshot(
    dir: &Path,
    applied: LogId,
    membership: StoredMembership,
    data: &[u8],
) -> std::io::Result<()> {
    let last = Some(applied);
    let meta = Meta { snapshot_id: snapshot_id(&last), last_log_id: last, last_membership: membership };
    write_snapshot_file(&dir.join(datadir::SNAPSHOT_FILE), &meta, data)
}

/// Splits the content of `snapshot.bin` into meta and database bytes.
fn parse_snapshot_file(mut bytes: Vec<u8>) -> Result<(Meta, Vec<u8>), String> {
    if bytes.len() < 16 || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err("does not start with the holdfast-raft snapshot header".into());
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[8..16]);
    let len = usize::try_from(u64::from_le_bytes(len)).map_err(|e| e.to_string())?;
    let end = 16usize.checked_add(len).filter(|e| *e <= bytes.len());
    let Some(end) = end else {
        return Err("is truncated".into());
    };
    let meta: Meta = serde_json::from_slice(&bytes[16..end]).map_err(|e| e.to_string())?;
    let data = bytes.split_off(end);
    Ok((meta, data))
}

/// Refuses a `snapshot.bin` that this crate did not write.
pub(crate) fn validate_snapshot_file(path: &Path) -> Result<(), DbError> {
    load_snapshot_meta(path).map(|_| ())
}

fn load_snapshot_meta(path: &Path) -> Result<Option<Meta>, DbError> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = fs::read(path).map_err(|e| datadir::data_dir_error(path, format!("cannot read: {e}")))?;
    let (meta, _) = parse_snapshot_file(bytes).map_err(|reason| {
        datadir::data_dir_error(path, format!("{reason}; it is not a holdfast-raft snapshot, move it away"))
    })?;
    Ok(Some(meta))
}

fn snapshot_id(last: &Option<LogId>) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    match last {
        Some(l) => format!("{}-{}-{nanos}", l.leader_id.term, l.index),
        None => format!("none-{nanos}"),
    }
}

fn path_str(path: &Path) -> Result<&str, StorageError> {
    path.to_str().ok_or_else(|| {
        StorageIOError::write_snapshot(None, &std::io::Error::other(format!("path {} is not UTF-8", path.display())))
            .into()
    })
}

/// Most entries that [`StateMachine::apply`] applies on the calling task rather than
/// in the blocking pool.
const INLINE_ENTRIES: usize = 4;
/// Most bytes of command payload applied on the calling task; one submission is
/// ~0.6 KiB.
const INLINE_BYTES: usize = 4 * 1024;

/// Whether `entries` are few and small enough to apply on the calling task.
fn is_small(entries: &[Entry]) -> bool {
    let bytes: usize = entries
        .iter()
        .map(|e| match &e.payload {
            EntryPayload::Normal(cmd) => cmd.0.len(),
            _ => 0,
        })
        .sum();
    entries.len() <= INLINE_ENTRIES && bytes <= INLINE_BYTES
}

/// Applies `entries` in one transaction on `conn` (the state database's write
/// connection, locked by the caller) and wakes the application after the commit.
fn apply_batch(shared: &Shared, conn: &mut Connection, entries: Vec<Entry>) -> Result<Vec<Payload>, StorageError> {
    let known = shared.lock_membership().clone();
    let mut membership = match known {
        Some(m) => m,
        None => read_sm_meta(conn)?.1,
    };
    let tx = conn.transaction().map_err(|e| StorageIOError::write_state_machine(&e))?;
    let mut responses = Vec::with_capacity(entries.len());
    let mut last = None;
    for entry in entries {
        let log_id = entry.log_id;
        match entry.payload {
            EntryPayload::Blank => responses.push(Payload::default()),
            EntryPayload::Normal(cmd) => {
                let resp =
                    shared.app.apply(&tx, log_id.index, &cmd.0).map_err(|e| StorageIOError::apply(log_id, &e))?;
                responses.push(Payload(resp));
            }
            EntryPayload::Membership(m) => {
                membership = StoredMembership::new(Some(log_id), m);
                responses.push(Payload::default());
            }
        }
        last = Some(log_id);
    }
    write_sm_meta(&tx, &last, &membership).map_err(|e| StorageIOError::write_state_machine(&e))?;
    tx.commit().map_err(|e| StorageIOError::write_state_machine(&e))?;
    // A failed apply leaves the cache as it was, matching the rolled-back file.
    *shared.lock_membership() = Some(membership);
    if let Some(last) = last {
        shared.app.committed(last.index);
    }
    Ok(responses)
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        self.call(|shared| {
            let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
            let tmp = shared.dir.join(format!("snapshot-build-{seq}.tmp"));
            let werr = |e: &dyn std::error::Error| {
                StorageError::from(StorageIOError::write_snapshot(None, &std::io::Error::other(e.to_string())))
            };
            datadir::remove_if_exists(&tmp).map_err(|e| werr(&e))?;
            // A separate read-only connection: VACUUM INTO reads one consistent
            // snapshot of the database while apply() keeps writing.
            let result = (|| {
                {
                    let ro = Connection::open_with_flags(
                        shared.state_path(),
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(|e| werr(&e))?;
                    // VACUUM INTO syncs its output at this connection's `synchronous`
                    // level. The copy is read back and deleted below, and what must be
                    // durable is written by `store_snapshot`, so it is not synced: one
                    // fsync of the whole database less per snapshot, on a disk the log's
                    // fsyncs share (ARCHITECTURE.md, "Decisions").
                    ro.pragma_update(None, "synchronous", "OFF").map_err(|e| werr(&e))?;
                    ro.execute("VACUUM INTO ?1", [path_str(&tmp)?]).map_err(|e| werr(&e))?;
                }
                // Make everything the copy holds durable in state.db (a FULL checkpoint
                // fsyncs the database file) before openraft purges the log behind it.
                shared.lock_conn().query_row("PRAGMA wal_checkpoint(FULL)", [], |_| Ok(())).map_err(|e| werr(&e))?;
                // The meta comes from the copy itself, so it matches the data exactly.
                let (applied, membership) = {
                    let copy = Connection::open_with_flags(
                        &tmp,
                        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )
                    .map_err(|e| werr(&e))?;
                    read_sm_meta(&copy)?
                };
                let data = fs::read(&tmp).map_err(|e| werr(&e))?;
                Ok::<_, StorageError>((applied, membership, data))
            })();
            let _ = datadir::remove_if_exists(&tmp);
            let (applied, membership, data) = result?;
            let meta = Meta { snapshot_id: snapshot_id(&applied), last_log_id: applied, last_membership: membership };
            shared.store_snapshot(&meta, &data)?;
            Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
        })
        .await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.call(|shared| read_sm_meta(&shared.lock_conn())).await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Payload>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // A small batch on a free connection is applied right here: the hop to the
        // blocking pool and back (two cross-thread wake-ups) costs more CPU than such an
        // apply, which writes the WAL without fsync (ARCHITECTURE.md, "Decisions").
        // Anything bigger, or a connection a snapshot holds, goes to the pool.
        if is_small(&entries) {
            if let Ok(mut conn) = self.shared.conn.try_lock() {
                let shared = &self.shared;
                return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    apply_batch(shared, &mut conn, entries)
                }))
                .unwrap_or_else(|_| {
                    let panicked = std::io::Error::other("apply panicked");
                    Err(StorageIOError::write_state_machine(&panicked).into())
                });
            }
        }
        self.call(move |shared| apply_batch(shared, &mut shared.lock_conn(), entries)).await
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError> {
        let meta = meta.clone();
        let data = snapshot.into_inner();
        self.call(move |shared| {
            let sig = Some(meta.signature());
            let err = |e: &dyn std::fmt::Display| {
                StorageError::from(StorageIOError::write_snapshot(sig.clone(), &std::io::Error::other(e.to_string())))
            };
            let tmp = shared.dir.join("snapshot-install.tmp");
            datadir::remove_if_exists(&tmp).map_err(|e| err(&e))?;
            let result = (|| {
                fs::write(&tmp, &data).map_err(|e| err(&e))?;
                datadir::check_sqlite_header(&tmp).map_err(|e| err(&e))?;
                let src = Connection::open_with_flags(
                    &tmp,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(|e| err(&e))?;
                datadir::check_identity(&src, &tmp, Role::State, None).map_err(|e| err(&e))?;
                let (applied, _) = read_sm_meta(&src)?;
                if applied != meta.last_log_id {
                    return Err(err(&format!(
                        "snapshot data is applied up to {applied:?} but its meta says {:?}",
                        meta.last_log_id
                    )));
                }
                // The copy carries the sender's node name; the live file must keep ours.
                datadir::write_identity(&src, Role::State, &shared.node_name).map_err(|e| err(&e))?;

                let mut live = shared.lock_conn();
                // The snapshot brings its own membership: read it again on the next apply.
                *shared.lock_membership() = None;
                {
                    let backup = rusqlite::backup::Backup::new(&src, &mut live).map_err(|e| err(&e))?;
                    // -1 copies every page in one step: one write transaction on the
                    // live database, so readers see the old state or the new one.
                    match backup.step(-1).map_err(|e| err(&e))? {
                        rusqlite::backup::StepResult::Done => {}
                        other => {
                            return Err(err(&format!("backup into state.db did not finish in one step: {other:?}")))
                        }
                    }
                }
                let (applied, _) = read_sm_meta(&live)?;
                if applied != meta.last_log_id {
                    return Err(err(&format!(
                        "state.db is applied up to {applied:?} after installing snapshot {}",
                        meta.snapshot_id
                    )));
                }
                Ok(())
            })();
            let _ = datadir::remove_if_exists(&tmp);
            result?;
            shared.store_snapshot(&meta, &data)
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        self.call(|shared| {
            let current = shared.lock_snapshot();
            let Some(meta) = current.as_ref() else {
                return Ok(None);
            };
            let sig = Some(meta.signature());
            let bytes = fs::read(shared.dir.join(datadir::SNAPSHOT_FILE))
                .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
            let (meta, data) = parse_snapshot_file(bytes)
                .map_err(|e| StorageIOError::read_snapshot(sig, &std::io::Error::other(e)))?;
            Ok(Some(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use openraft::Membership;

    use super::*;

    struct NoApp;

    impl Apply for NoApp {
        fn init_schema(&self, _conn: &Connection) -> rusqlite::Result<()> {
            Ok(())
        }

        fn apply(&self, _tx: &rusqlite::Transaction<'_>, _index: u64, command: &[u8]) -> rusqlite::Result<Vec<u8>> {
            Ok(command.to_vec())
        }
    }

    /// Writes each command's index, and on `committed` reads it back on a connection of
    /// its own, as a woken long-poll does.
    struct Witness {
        path: std::path::PathBuf,
        seen: std::sync::Mutex<Vec<(u64, Option<u64>)>>,
    }

    impl Apply for Witness {
        fn init_schema(&self, conn: &Connection) -> rusqlite::Result<()> {
            conn.execute_batch("CREATE TABLE IF NOT EXISTS w (i INTEGER)")
        }

        fn apply(&self, tx: &rusqlite::Transaction<'_>, index: u64, _command: &[u8]) -> rusqlite::Result<Vec<u8>> {
            tx.execute("INSERT INTO w (i) VALUES (?1)", [index as i64])?;
            Ok(Vec::new())
        }

        fn committed(&self, index: u64) {
            let other = Connection::open(&self.path).unwrap();
            let max: Option<i64> = other.query_row("SELECT MAX(i) FROM w", [], |r| r.get(0)).unwrap();
            self.seen.lock().unwrap().push((index, max.map(|m| m as u64)));
        }
    }

    /// What `apply` wrote is visible to other connections when `committed` is called
    /// (a long-poll woken from `apply` itself read the old state and slept until its
    /// deadline: the 2 s tail of submit → running).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_is_called_after_the_write_is_visible() {
        let dir = tempfile::tempdir().unwrap();
        let app = Arc::new(Witness { path: dir.path().join(datadir::STATE_FILE), seen: Default::default() });
        let mut sm = StateMachine::open(dir.path(), "unit", app.clone()).unwrap();
        let cmd = |i| entry(i, EntryPayload::Normal(crate::types::Payload(vec![1])));
        sm.apply([cmd(1), cmd(2)]).await.unwrap();
        sm.apply([entry(3, EntryPayload::Blank), cmd(4)]).await.unwrap();
        assert_eq!(*app.seen.lock().unwrap(), vec![(2, Some(2)), (4, Some(4))]);
    }

    /// Records each command; a command `b"panic"` panics and `b"fail"` fails, as a
    /// buggy application could.
    struct Recorder;

    impl Apply for Recorder {
        fn init_schema(&self, conn: &Connection) -> rusqlite::Result<()> {
            conn.execute_batch("CREATE TABLE IF NOT EXISTS r (i INTEGER, c BLOB)")
        }

        fn apply(&self, tx: &rusqlite::Transaction<'_>, index: u64, command: &[u8]) -> rusqlite::Result<Vec<u8>> {
            match command {
                b"panic" => panic!("the application panicked"),
                b"fail" => Err(rusqlite::Error::InvalidQuery),
                _ => {
                    tx.execute("INSERT INTO r (i, c) VALUES (?1, ?2)", rusqlite::params![index as i64, command])?;
                    Ok(command.to_vec())
                }
            }
        }
    }

    /// Small batches apply on the calling task, big ones (by count or by bytes) in the
    /// blocking pool; both answer in order and commit, and on both a failing or panicking
    /// command fails the whole batch as a storage error, writing none of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_and_big_batches_apply_alike_and_a_failing_one_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), "unit", Arc::new(Recorder)).unwrap();
        let cmd = |i: u64, c: &[u8]| entry(i, EntryPayload::Normal(crate::types::Payload(c.to_vec())));
        let big = vec![7u8; INLINE_BYTES + 1];
        let small = [cmd(1, b"a"), cmd(2, b"b")];
        assert!(is_small(&small));
        let many: Vec<Entry> = (3..=3 + INLINE_ENTRIES as u64).map(|i| cmd(i, b"m")).collect();
        assert!(!is_small(&many) && !is_small(&[cmd(0, &big)]));

        let out = sm.apply(small).await.unwrap();
        assert_eq!(out.iter().map(|p| p.0.clone()).collect::<Vec<_>>(), vec![b"a".to_vec(), b"b".to_vec()]);
        let last_many = 3 + INLINE_ENTRIES as u64;
        assert_eq!(sm.apply(many).await.unwrap().len(), INLINE_ENTRIES + 1);
        assert_eq!(sm.apply([cmd(last_many + 1, &big)]).await.unwrap()[0].0, big);

        let count = || {
            let c = Connection::open(dir.path().join(datadir::STATE_FILE)).unwrap();
            c.query_row("SELECT COUNT(*) FROM r", [], |r| r.get::<_, i64>(0)).unwrap()
        };
        assert_eq!(count(), 2 + INLINE_ENTRIES as i64 + 1 + 1);
        let next = last_many + 2;
        for bad in [&b"fail"[..], b"panic"] {
            // Inline (one small entry after a good one) and through the pool (with a big one).
            assert!(sm.apply([cmd(next, b"ok"), cmd(next + 1, bad)]).await.is_err(), "{bad:?} inline");
            assert!(sm.apply([cmd(next, &big), cmd(next + 1, bad)]).await.is_err(), "{bad:?} in the pool");
            if bad == b"fail" {
                assert_eq!(count(), 2 + INLINE_ENTRIES as i64 + 2, "a failed batch writes nothing");
                let (applied, _) = sm.applied_state().await.unwrap();
                assert_eq!(applied.map(|l| l.index), Some(last_many + 1));
            }
        }
    }

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
        Entry { log_id: openraft::testing::log_id(1, 1, index), payload }
    }

    fn membership(voters: &[u64]) -> Membership<u64, Member> {
        let nodes: BTreeMap<u64, Member> = voters.iter().map(|id| (*id, Member::default())).collect();
        Membership::new(vec![voters.iter().copied().collect::<BTreeSet<_>>()], nodes)
    }

    /// `apply` keeps the membership in memory instead of reading it back each time; an
    /// installed snapshot brings its own, which the next `apply` must keep, not
    /// overwrite with the one from before the install.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn membership_survives_applies_and_a_snapshot_install() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut sm = StateMachine::open(a.path(), "unit", Arc::new(NoApp)).unwrap();
        sm.apply([entry(1, EntryPayload::Membership(membership(&[1])))]).await.unwrap();
        sm.apply([entry(2, EntryPayload::Blank)]).await.unwrap();
        let (applied, m) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(2));
        assert_eq!(m.membership(), &membership(&[1]), "kept across an apply without membership");

        // Another member's state, further on and with three voters, as a snapshot.
        let mut other = StateMachine::open(b.path(), "other", Arc::new(NoApp)).unwrap();
        other.apply([entry(3, EntryPayload::Membership(membership(&[1, 2, 3])))]).await.unwrap();
        let snap = other.build_snapshot().await.unwrap();
        sm.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
        sm.apply([entry(4, EntryPayload::Blank)]).await.unwrap();
        let (applied, m) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(4));
        assert_eq!(m.membership(), &membership(&[1, 2, 3]), "the snapshot's membership, not the cached one");
    }
}
