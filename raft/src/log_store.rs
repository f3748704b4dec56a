//! The Raft log, vote and pointers in `raft-log.db`.
//!
//! Every write commits a SQLite transaction under `synchronous=FULL` before openraft
//! hears of it, so a vote or an acknowledged entry survives a crash. SQLite is blocking,
//! so each call runs on the blocking pool against one shared connection; the mutex also
//! serializes writes, which openraft requires.
//!
//! Appends are **group-committed**: `append` hands its entries to one writer thread and
//! returns at once; the writer commits everything queued meanwhile in one transaction
//! (one fsync) and only then tells openraft through each `LogFlushed` callback. So
//! RaftCore keeps accepting client writes while the disk syncs, and a burst costs one
//! fsync instead of one per entry. Until written, entries are served to readers from an
//! in-memory overlay; truncate first waits for the writer to drain.
//!
//! **Purge is lazy**: openraft awaits `purge` inside its core loop, and deleting the
//! tens of thousands of entries behind a snapshot in one transaction took over half a
//! second, in which its Raft core handled nothing else. So `purge` only moves the purge
//! point in memory and queues it; the writer persists the point with its next group
//! commit and deletes the entries behind it [`PURGE_CHUNK`] at a time, one chunk per
//! transaction, beside the appends (ARCHITECTURE.md, "Decisions"). Readers never see
//! an entry at or below the purge point, on disk or not, and after a crash the writer
//! goes on deleting what is left.
//!
//! The overlay also keeps the newest written entries (at most [`RECENT_MAX`] of them and
//! [`RECENT_BYTES`] of their JSON) after they are written, so
//! replication to followers, which reads what was just appended, is answered from memory
//! instead of waiting behind the writer's fsync for the connection and parsing JSON on
//! the blocking pool (ARCHITECTURE.md, "Decisions"). A read falls back to the database
//! unless every index it asks for is in memory.
//!
//! The **committed pointer** costs no fsync of its own: openraft awaits
//! `save_committed` inside its core loop before every apply, so a synced write there put
//! a second fsync in series with every commit. It is kept in memory and rides in the
//! writer's next group-commit transaction (ARCHITECTURE.md, "Decisions"). What is on disk
//! is then an older committed id, never a newer one, and never past the entries written
//! before it, which is all openraft needs of it on restart.

// openraft's storage traits fix the error type to its (large) StorageError, and the
// helpers here produce exactly that type.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use rusqlite::{Connection, OptionalExtension};

use crate::datadir::{self, Role};
use crate::types::{Entry, LogId, StorageError, TypeConfig};
use crate::DbError;

const SCHEMA: &str = "
CREATE TABLE log (
    idx    INTEGER PRIMARY KEY,
    log_id TEXT NOT NULL,
    entry  TEXT NOT NULL
);
CREATE TABLE raft_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// One entry ready to be written: SQL index, log id JSON, entry JSON, and the entry.
type Row = (i64, String, String, Entry);

/// Told whether an append's transaction committed (openraft's `LogFlushed` in service).
type Done = Box<dyn FnOnce(Result<(), std::io::Error>) + Send>;

/// Work for the writer thread, processed strictly in order.
enum Job {
    /// Entries to commit, then acknowledge through the callback.
    Append(Vec<Row>, Done),
    /// A new purge point: written with the next commit, the entries up to it deleted
    /// over the following ones.
    Purge(LogId),
    /// Answered once every job queued before it is done.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// An entry in the in-memory overlay.
struct Recent {
    /// The newest entry appended at this index.
    entry: Entry,
    /// Committed to `raft-log.db`; only written entries may be evicted.
    written: bool,
    /// Length of its JSON, which stands for its size in memory.
    bytes: usize,
}

/// Written entries kept in memory for readers (module docs), besides unwritten ones.
const RECENT_MAX: usize = 1_024;
/// Most JSON bytes of written entries kept in memory (one spec may be 256 KiB).
const RECENT_BYTES: usize = 4 << 20;

/// The in-memory overlay: the newest entries by index, with a running total of the
/// written ones' bytes. The total is kept, not summed, because the writer evicts after
/// every batch while holding the lock readers need; summing up to 1,024 entries there
/// was the log writer's largest own cost under load (ARCHITECTURE.md, "Decisions").
#[derive(Default)]
struct Overlay {
    entries: BTreeMap<i64, Recent>,
    written_bytes: usize,
}

impl Overlay {
    /// Adds an appended, not yet written entry, replacing any at its index.
    fn insert(&mut self, idx: i64, entry: Entry, bytes: usize) {
        if let Some(old) = self.entries.insert(idx, Recent { entry, written: false, bytes }) {
            self.forget(&old);
        }
    }

    /// Marks `entry` written (`ok`) or drops it (its transaction failed: readers must
    /// not see it as the log), unless a later append replaced its index.
    fn settle(&mut self, idx: i64, entry: &Entry, ok: bool) {
        let Some(r) = self.entries.get_mut(&idx).filter(|r| r.entry.log_id == entry.log_id) else { return };
        if ok {
            if !r.written {
                r.written = true;
                self.written_bytes += r.bytes;
            }
        } else if let Some(old) = self.entries.remove(&idx) {
            self.forget(&old);
        }
    }

    /// Evicts the oldest written entries beyond [`RECENT_MAX`] and [`RECENT_BYTES`];
    /// unwritten ones are never evicted.
    fn evict(&mut self) {
        while self.entries.len() > RECENT_MAX || self.written_bytes > RECENT_BYTES {
            match self.entries.first_entry() {
                Some(e) if e.get().written => {
                    let old = e.remove();
                    self.forget(&old);
                }
                _ => break,
            }
        }
    }

    /// Keeps only the entries whose index passes `keep` (truncate and purge).
    fn retain(&mut self, keep: impl Fn(i64) -> bool) {
        let mut dropped = 0;
        self.entries.retain(|idx, r| {
            let k = keep(*idx);
            if !k && r.written {
                dropped += r.bytes;
            }
            k
        });
        self.written_bytes -= dropped;
    }

    fn forget(&mut self, old: &Recent) {
        if old.written {
            self.written_bytes -= old.bytes;
        }
    }
}

/// The SQLite-backed [`RaftLogStorage`]; clones share one connection and one writer.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Mutex<Connection>>,
    /// The purge point openraft gave last; entries up to it are gone for readers even
    /// while the writer is still deleting them (module docs).
    purged: Arc<Mutex<Option<LogId>>>,
    /// The newest entries by index: every appended entry not yet committed (readers see
    /// it here first) and the newest written ones within [`RECENT_MAX`] and
    /// [`RECENT_BYTES`], always a suffix of the log.
    pending: Arc<Mutex<Overlay>>,
    /// The committed log id openraft gave last, persisted by the writer's next commit.
    committed: Arc<Mutex<Option<LogId>>>,
    writer: mpsc::Sender<Job>,
}

/// Most entries committed in one transaction (bounds the time one fsync batch takes).
const GROUP_MAX: usize = 4_096;

/// Most purged entries deleted in one transaction. In a SQLite reproduction with
/// entries of about 900 bytes, a transaction deleting 256 of them took a median 4 ms,
/// fsync included, 1,000 of them 9 ms, and 49,000 at once 570 ms; a chunk adds a few
/// milliseconds to the group commit it rides in.
const PURGE_CHUNK: i64 = 512;

/// What the writer still owes the purge point openraft gave last.
#[derive(Debug)]
struct PurgeDebt {
    /// A point not yet written to `raft-log.db`.
    unwritten: Option<LogId>,
    /// Entries at or below this index are deleted, a chunk per transaction.
    upto: i64,
    /// Entries may remain at or below `upto`.
    owed: bool,
}

impl PurgeDebt {
    /// Work remains, to do even when no append comes.
    fn pending(&self) -> bool {
        self.owed || self.unwritten.is_some()
    }

    fn take(&mut self, point: LogId) {
        self.unwritten = self.unwritten.max(Some(point));
        self.upto = self.upto.max(to_sql_index(point.index));
        self.owed = true;
    }
}

/// Deletes the oldest [`PURGE_CHUNK`] entries at or below `upto`; says whether any
/// remain. The first index is looked up, not remembered, so a restored log whose
/// point lies far past its entries costs one round.
fn delete_chunk(conn: &Connection, upto: i64) -> Result<bool, rusqlite::Error> {
    let first: Option<i64> = conn.prepare_cached("SELECT MIN(idx) FROM log")?.query_row([], |r| r.get(0))?;
    let Some(first) = first.filter(|f| *f <= upto) else { return Ok(false) };
    let end = first.saturating_add(PURGE_CHUNK).min(upto.saturating_add(1));
    conn.prepare_cached("DELETE FROM log WHERE idx >= ?1 AND idx < ?2")?.execute([first, end])?;
    Ok(end <= upto)
}

fn writer_loop(
    db: Arc<Mutex<Connection>>,
    pending: Arc<Mutex<Overlay>>,
    committed: Arc<Mutex<Option<LogId>>>,
    mut debt: PurgeDebt,
    rx: mpsc::Receiver<Job>,
) {
    // Last committed id written; only a newer one is written again.
    let mut saved: Option<LogId> = None;
    loop {
        // With purge work left, an empty queue is time to do it.
        let first = if debt.pending() {
            match rx.try_recv() {
                Ok(job) => Some(job),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        };
        // Read before draining the queue: every entry this id covers was handed to the
        // writer before openraft could call it committed, so it is in this transaction
        // or an earlier one.
        let commit_ptr = *committed.lock().expect("committed mutex poisoned");
        let mut jobs: Vec<Job> = first.into_iter().collect();
        let mut rows = jobs.iter().map(Job::rows).sum::<usize>();
        // Everything queued while the last fsync ran goes into this one.
        while rows < GROUP_MAX {
            match rx.try_recv() {
                Ok(job) => {
                    rows += job.rows();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        for job in &jobs {
            if let Job::Purge(point) = job {
                debt.take(*point);
            }
        }
        let result = {
            let mut conn = db.lock().expect("raft-log.db mutex poisoned by a panicked SQLite call");
            (|| -> Result<bool, rusqlite::Error> {
                let tx = conn.transaction()?;
                {
                    let mut stmt =
                        tx.prepare_cached("INSERT OR REPLACE INTO log (idx, log_id, entry) VALUES (?1, ?2, ?3)")?;
                    for job in &jobs {
                        if let Job::Append(rows, _) = job {
                            for (idx, log_id, json, _) in rows {
                                stmt.execute(rusqlite::params![idx, log_id, json])?;
                            }
                        }
                    }
                }
                // A batch cut at GROUP_MAX may leave covered entries queued: skip then.
                if rows < GROUP_MAX && commit_ptr.is_some() && commit_ptr > saved {
                    write_meta(&tx, KEY_COMMITTED, &commit_ptr)?;
                }
                // The point is written no later than the first delete behind it, so the
                // log on disk never shows a hole below its first entry.
                if let Some(point) = debt.unwritten {
                    write_meta(&tx, KEY_PURGED, &point)?;
                }
                let left = debt.owed && delete_chunk(&tx, debt.upto)?;
                tx.commit()?;
                Ok(left)
            })()
        };
        if let Ok(left) = result {
            debt.unwritten = None;
            debt.owed = left;
            if rows < GROUP_MAX && commit_ptr > saved {
                saved = commit_ptr;
            }
        }
        let result = result.map(|_| ());
        {
            let mut p = pending.lock().expect("pending-entries mutex poisoned");
            for job in &jobs {
                if let Job::Append(rows, _) = job {
                    for (idx, _, _, entry) in rows {
                        p.settle(*idx, entry, result.is_ok());
                    }
                }
            }
            p.evict();
        }
        for job in jobs {
            match job {
                Job::Append(_, done) => match &result {
                    Ok(()) => done(Ok(())),
                    Err(e) => done(Err(std::io::Error::other(e.to_string()))),
                },
                Job::Purge(_) => {}
                Job::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
        // Appends hear of a failure through their callbacks; a purge-only round has no
        // one to tell, and would otherwise be retried at once, forever.
        if let (Err(e), 0) = (&result, rows) {
            tracing::warn!("cannot purge raft-log.db behind a snapshot, retrying: {e}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Job {
    fn rows(&self) -> usize {
        match self {
            Job::Append(r, _) => r.len(),
            _ => 0,
        }
    }
}

impl LogStore {
    /// Opens `raft-log.db` in `dir`, creating it when absent; refuses a foreign file.
    pub fn open(dir: &Path, node_name: &str) -> Result<Self, DbError> {
        let path = dir.join(datadir::LOG_FILE);
        if !path.exists() {
            datadir::create_new(&path, Role::Log, node_name, |c| c.execute_batch(SCHEMA))?;
        }
        let conn = datadir::open_existing(&path, Role::Log, node_name)?;
        let point: Option<LogId> = read_meta(&conn, KEY_PURGED)
            .map_err(|e| DbError::Storage(format!("cannot read {}: {e}", path.display())))?;
        // A purge cut short by a crash left entries behind the point: the writer goes on.
        let debt =
            PurgeDebt { unwritten: None, upto: point.map_or(-1, |p| to_sql_index(p.index)), owed: point.is_some() };
        let db = Arc::new(Mutex::new(conn));
        let purged = Arc::new(Mutex::new(point));
        let pending = Arc::new(Mutex::new(Overlay::default()));
        let committed = Arc::new(Mutex::new(None));
        let (writer, rx) = mpsc::channel();
        let (wdb, wpending, wcommitted) = (db.clone(), pending.clone(), committed.clone());
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer_loop(wdb, wpending, wcommitted, debt, rx))
            .map_err(|e| DbError::Storage(format!("cannot start the log writer thread: {e}")))?;
        Ok(LogStore { db, purged, pending, committed, writer })
    }

    /// The first index readers may see: one past the purge point.
    fn first_readable(&self) -> i64 {
        let point = *self.purged.lock().expect("purge point mutex poisoned");
        point.map_or(0, |p| to_sql_index(p.index).saturating_add(1))
    }

    /// Queues `entries` for the writer; `done` hears whether they committed.
    fn enqueue(&self, entries: impl IntoIterator<Item = Entry>, done: Done) -> Result<(), StorageError> {
        let mut rows = Vec::new();
        for entry in entries {
            let log_id =
                serde_json::to_string(&entry.log_id).map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            let json = serde_json::to_string(&entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            rows.push((to_sql_index(entry.log_id.index), log_id, json, entry));
        }
        {
            let mut p = self.pending.lock().expect("pending-entries mutex poisoned");
            for (idx, _, json, entry) in &rows {
                p.insert(*idx, entry.clone(), json.len());
            }
        }
        self.writer
            .send(Job::Append(rows, done))
            .map_err(|e| StorageIOError::write_logs(&std::io::Error::other(e.to_string())).into())
    }

    /// Waits until every append queued so far is committed.
    async fn drain_writer(&self) -> Result<(), StorageError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.writer
            .send(Job::Barrier(tx))
            .map_err(|e| StorageIOError::write_logs(&std::io::Error::other(e.to_string())))?;
        rx.await.map_err(|e| StorageIOError::write_logs(&e).into())
    }

    fn pending_range(&self, start: i64, end: i64) -> Vec<Entry> {
        let p = self.pending.lock().expect("pending-entries mutex poisoned");
        p.entries.range(start..end).map(|(_, r)| r.entry.clone()).collect()
    }

    /// The entries `start..end` when every one of them is in memory, else `None`.
    fn recent_range(&self, start: i64, end: i64) -> Option<Vec<Entry>> {
        // An open end asks for "up to the last entry": the database may know of more.
        if end == i64::MAX {
            return None;
        }
        if start >= end {
            return Some(Vec::new());
        }
        let p = self.pending.lock().expect("pending-entries mutex poisoned");
        let wanted = usize::try_from(end - start).ok()?;
        // Keys are distinct, so `wanted` of them in `start..end` are all of them.
        (p.entries.range(start..end).count() == wanted)
            .then(|| p.entries.range(start..end).map(|(_, r)| r.entry.clone()).collect())
    }

    /// The id of the newest entry in the overlay (queued or recently written).
    fn newest_in_overlay(&self) -> Option<LogId> {
        self.pending
            .lock()
            .expect("pending-entries mutex poisoned")
            .entries
            .values()
            .next_back()
            .map(|r| r.entry.log_id)
    }

    /// The id of the last entry appended, written or not. The overlay is a suffix of
    /// the log, so its newest entry is the last one; only an empty overlay (a member
    /// that has just started) costs a read.
    pub(crate) async fn last_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let recent = self.newest_in_overlay();
        match recent {
            Some(id) => Ok(Some(id)),
            None => self.clone().get_log_state().await.map(|s| s.last_log_id),
        }
    }

    /// The purge point (used by the data-dir consistency checks).
    pub(crate) fn last_purged(&self) -> Option<LogId> {
        *self.purged.lock().expect("purge point mutex poisoned")
    }

    async fn call<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StorageError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.lock().expect("raft-log.db mutex poisoned by a panicked SQLite call");
            f(&mut conn)
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e).into())
        .and_then(|r| r)
    }
}

fn to_sql_index(i: u64) -> i64 {
    // Raft indexes never come near 2^63; clamping keeps open range ends meaningful.
    i64::try_from(i).unwrap_or(i64::MAX)
}

fn read_meta<T: serde::de::DeserializeOwned>(conn: &Connection, key: &str) -> Result<Option<T>, StorageError> {
    let raw: Option<String> = conn
        .prepare_cached("SELECT value FROM raft_meta WHERE key = ?1")
        .and_then(|mut stmt| stmt.query_row([key], |r| r.get(0)).optional())
        .map_err(|e| StorageIOError::read(&e))?;
    match raw {
        None => Ok(None),
        Some(s) => serde_json::from_str(&s).map(Some).map_err(|e| StorageIOError::read(&e).into()),
    }
}

fn write_meta<T: serde::Serialize>(conn: &Connection, key: &str, value: &T) -> Result<(), rusqlite::Error> {
    let json = serde_json::to_string(value).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    conn.prepare_cached("INSERT OR REPLACE INTO raft_meta (key, value) VALUES (?1, ?2)")?.execute([key, &json])?;
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => to_sql_index(*s),
            Bound::Excluded(s) => to_sql_index(s.saturating_add(1)),
            Bound::Unbounded => 0,
        };
        // Entries behind the purge point may still be on disk (module docs).
        let start = start.max(self.first_readable());
        let end = match range.end_bound() {
            Bound::Included(e) => to_sql_index(e.saturating_add(1)),
            Bound::Excluded(e) => to_sql_index(*e),
            Bound::Unbounded => i64::MAX,
        };
        if let Some(all) = self.recent_range(start, end) {
            return Ok(all);
        }
        let on_disk = self
            .call(move |conn| {
                let mut stmt = conn
                    .prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")
                    .map_err(|e| StorageIOError::read_logs(&e))?;
                let rows = stmt
                    .query_map([start, end], |r| r.get::<_, String>(0))
                    .map_err(|e| StorageIOError::read_logs(&e))?;
                let mut out = Vec::new();
                for row in rows {
                    let json = row.map_err(|e| StorageIOError::read_logs(&e))?;
                    let entry: Entry = serde_json::from_str(&json).map_err(|e| StorageIOError::read_logs(&e))?;
                    out.push(entry);
                }
                Ok(out)
            })
            .await?;
        // Entries still in the writer's queue overlay what is on disk (newest wins).
        let queued = self.pending_range(start, end);
        if queued.is_empty() {
            return Ok(on_disk);
        }
        let mut by_index: BTreeMap<u64, Entry> = on_disk.into_iter().map(|e| (e.log_id.index, e)).collect();
        for e in queued {
            by_index.insert(e.log_id.index, e);
        }
        Ok(by_index.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let on_disk = self
            .call(|conn| {
                let last: Option<String> = conn
                    .query_row("SELECT log_id FROM log ORDER BY idx DESC LIMIT 1", [], |r| r.get(0))
                    .optional()
                    .map_err(|e| StorageIOError::read_logs(&e))?;
                last.map(|json| serde_json::from_str::<LogId>(&json).map_err(|e| StorageIOError::read_logs(&e).into()))
                    .transpose()
            })
            .await?;
        let last_purged = *self.purged.lock().expect("purge point mutex poisoned");
        // Options order None first, so the largest of the three is the last log id; the
        // purge point counts too, since what is left on disk may all lie behind it.
        let last_log_id = on_disk.max(self.newest_in_overlay()).max(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        let vote = *vote;
        self.call(move |conn| write_meta(conn, KEY_VOTE, &vote).map_err(|e| StorageIOError::write_vote(&e).into()))
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.call(|conn| read_meta(conn, KEY_VOTE)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // No I/O here: the writer persists it with the next group commit (module docs).
        let mut c = self.committed.lock().expect("committed mutex poisoned");
        if committed > *c {
            *c = committed;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let in_memory = *self.committed.lock().expect("committed mutex poisoned");
        let on_disk = self.call(|conn| Ok(read_meta::<Option<LogId>>(conn, KEY_COMMITTED)?.flatten())).await?;
        Ok(in_memory.max(on_disk))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Durability is reported later, through `callback`, once the group commits.
        self.enqueue(entries, Box::new(move |result| callback.log_io_completed(result)))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = to_sql_index(log_id.index);
        // Queued appends must land before the delete, or they would come back after it.
        self.drain_writer().await?;
        self.pending.lock().expect("pending-entries mutex poisoned").retain(|idx| idx < from);
        self.call(move |conn| {
            conn.execute("DELETE FROM log WHERE idx >= ?1", [from]).map_err(|e| StorageIOError::write_logs(&e))?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // No I/O here: the writer deletes in chunks behind the point (module docs).
        let upto = to_sql_index(log_id.index);
        {
            let mut point = self.purged.lock().expect("purge point mutex poisoned");
            if Some(log_id) <= *point {
                return Ok(());
            }
            *point = Some(log_id);
        }
        self.pending.lock().expect("pending-entries mutex poisoned").retain(|idx| idx > upto);
        self.writer
            .send(Job::Purge(log_id))
            .map_err(|e| StorageIOError::write_logs(&std::io::Error::other(e.to_string())).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// openraft awaits `save_committed` inside its core loop before each apply: it must
    /// not wait for the disk (an fsync there sat in series with every commit). Holding
    /// the database lock stands for a disk busy with a group commit.
    // Holding the lock across the await is the point: it stands for a busy disk.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn save_committed_never_waits_on_the_disk_and_lands_with_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), "unit").unwrap();
        let committed = Some(openraft::testing::log_id(1, 7, 3));
        {
            let db = store.db.clone();
            let busy = db.lock().unwrap();
            let saved = tokio::time::timeout(Duration::from_secs(2), store.save_committed(committed)).await;
            drop(busy);
            assert!(saved.is_ok(), "save_committed waited for the database");
        }
        assert_eq!(store.read_committed().await.unwrap(), committed, "the latest committed id is read back");
        // An older id never replaces a newer one.
        store.save_committed(Some(openraft::testing::log_id(1, 7, 2))).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), committed);
        // The writer's next transaction persists it.
        store.drain_writer().await.unwrap();
        drop(store);
        let mut reopened = LogStore::open(dir.path(), "unit").unwrap();
        assert_eq!(reopened.read_committed().await.unwrap(), committed, "persisted by the next group commit");
    }

    fn blank(index: u64) -> Entry {
        Entry { log_id: openraft::testing::log_id(1, 7, index), payload: openraft::EntryPayload::Blank }
    }

    async fn append_written(store: &mut LogStore, indexes: std::ops::Range<u64>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.enqueue(indexes.map(blank), Box::new(move |r| drop(tx.send(r)))).unwrap();
        rx.await.unwrap().unwrap();
    }

    fn indexes(entries: &[Entry]) -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    }

    /// Replication reads what was just appended: once written, those entries are still
    /// answered from memory, without waiting for the connection the writer holds during
    /// an fsync. Older ones come from the database, and purge and truncate drop entries
    /// from memory as from disk.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recent_entries_are_read_from_memory_and_older_ones_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), "unit").unwrap();
        let last = RECENT_MAX as u64 + 100;
        append_written(&mut store, 1..last + 1).await;
        {
            let db = store.db.clone();
            let busy = db.lock().unwrap();
            let read =
                tokio::time::timeout(Duration::from_secs(2), store.try_get_log_entries(last - 9..last + 1)).await;
            drop(busy);
            let got = read.expect("a read of just-written entries waited for the database").unwrap();
            assert_eq!(indexes(&got), (last - 9..=last).collect::<Vec<_>>());
        }
        // Evicted from memory, read from disk, across the boundary too.
        let got = store.try_get_log_entries(1..last + 1).await.unwrap();
        assert_eq!(indexes(&got), (1..=last).collect::<Vec<_>>());
        assert!(store.pending.lock().unwrap().entries.len() <= RECENT_MAX, "written entries are evicted");
        // Beyond the last entry: what exists, not more.
        let got = store.try_get_log_entries(last - 1..last + 5).await.unwrap();
        assert_eq!(indexes(&got), vec![last - 1, last]);

        store.truncate(openraft::testing::log_id(1, 7, last - 4)).await.unwrap();
        let got = store.try_get_log_entries(last - 9..last + 1).await.unwrap();
        assert_eq!(indexes(&got), (last - 9..last - 4).collect::<Vec<_>>(), "truncated entries are gone");
        store.purge(openraft::testing::log_id(1, 7, last - 7)).await.unwrap();
        let got = store.try_get_log_entries(last - 9..last - 4).await.unwrap();
        assert_eq!(indexes(&got), vec![last - 6, last - 5], "purged entries are gone");

        // Large entries: memory holds at most RECENT_BYTES of them; all are still read.
        let big = |index: u64| Entry {
            log_id: openraft::testing::log_id(1, 7, index),
            payload: openraft::EntryPayload::Normal(crate::types::Payload(vec![7; 512 * 1024])),
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.enqueue((last - 4..last + 6).map(big), Box::new(move |r| drop(tx.send(r)))).unwrap();
        rx.await.unwrap().unwrap();
        let overlay = store.pending.lock().unwrap();
        let kept: usize = overlay.entries.values().filter(|r| r.written).map(|r| r.bytes).sum();
        assert!(kept <= RECENT_BYTES, "{kept} bytes of written entries kept in memory");
        assert_eq!(kept, overlay.written_bytes, "the running total matches the entries");
        drop(overlay);
        let got = store.try_get_log_entries(last - 6..last + 6).await.unwrap();
        assert_eq!(indexes(&got), (last - 6..last + 6).collect::<Vec<_>>());
    }

    fn first_on_disk(dir: &Path) -> Option<i64> {
        let conn = Connection::open(dir.join(datadir::LOG_FILE)).unwrap();
        conn.query_row("SELECT MIN(idx) FROM log", [], |r| r.get(0)).unwrap()
    }

    /// Polls until the writer has deleted every entry at or below `upto`.
    async fn wait_deleted(dir: &Path, upto: i64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let first = first_on_disk(dir);
            if first.is_none_or(|f| f > upto) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "entries behind the purge point stay: first {first:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// openraft awaits `purge` inside its core loop, and deleting the entries behind a
    /// snapshot at once stalled it for half a second: `purge` must not wait for the disk.
    /// Readers stop seeing the entries at once; the writer deletes them afterwards.
    #[allow(clippy::await_holding_lock)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purge_never_waits_on_the_disk_and_readers_see_the_log_as_purged_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), "unit").unwrap();
        let last = 3 * PURGE_CHUNK as u64 + 10;
        append_written(&mut store, 1..last + 1).await;
        let point = openraft::testing::log_id(1, 7, last - 5);
        {
            let db = store.db.clone();
            let busy = db.lock().unwrap();
            let purged = tokio::time::timeout(Duration::from_secs(2), store.purge(point)).await;
            drop(busy);
            purged.expect("purge waited for the database").unwrap();
        }
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(point));
        assert_eq!(state.last_log_id, Some(openraft::testing::log_id(1, 7, last)));
        let got = store.try_get_log_entries(0..last + 1).await.unwrap();
        assert_eq!(indexes(&got), (last - 4..=last).collect::<Vec<_>>(), "purged entries are not read");
        // An older point changes nothing.
        store.purge(openraft::testing::log_id(1, 7, 3)).await.unwrap();
        assert_eq!(store.get_log_state().await.unwrap().last_purged_log_id, Some(point));
        wait_deleted(dir.path(), to_sql_index(point.index)).await;
        assert_eq!(first_on_disk(dir.path()), Some(to_sql_index(last - 4)), "only purged entries were deleted");
        // Appends go on after the purge, and the point is on disk.
        append_written(&mut store, last + 1..last + 3).await;
        store.drain_writer().await.unwrap();
        drop(store);
        let mut reopened = LogStore::open(dir.path(), "unit").unwrap();
        let state = reopened.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(point));
        assert_eq!(state.last_log_id, Some(openraft::testing::log_id(1, 7, last + 2)));
    }

    /// A chunk deletes at most [`PURGE_CHUNK`] of the oldest entries, never one past the
    /// point, and says whether more remain.
    #[test]
    fn a_chunk_deletes_the_oldest_entries_up_to_the_point_and_no_more() {
        let dir = tempfile::tempdir().unwrap();
        drop(LogStore::open(dir.path(), "unit").unwrap());
        let conn = Connection::open(dir.path().join(datadir::LOG_FILE)).unwrap();
        let n = 2 * PURGE_CHUNK + 300;
        for idx in 1..=n {
            conn.execute("INSERT INTO log (idx, log_id, entry) VALUES (?1, '', '')", [idx]).unwrap();
        }
        let upto = 2 * PURGE_CHUNK + 100;
        let first = |conn: &Connection| conn.query_row("SELECT MIN(idx) FROM log", [], |r| r.get::<_, i64>(0)).unwrap();
        assert!(delete_chunk(&conn, upto).unwrap(), "more remain after one chunk");
        assert_eq!(first(&conn), 1 + PURGE_CHUNK);
        assert!(delete_chunk(&conn, upto).unwrap());
        assert_eq!(first(&conn), 1 + 2 * PURGE_CHUNK);
        assert!(!delete_chunk(&conn, upto).unwrap(), "the last chunk says none remain");
        assert_eq!(first(&conn), upto + 1);
        assert!(!delete_chunk(&conn, upto).unwrap(), "nothing behind the point: nothing to do");
        assert_eq!(first(&conn), upto + 1);
        let left: i64 = conn.query_row("SELECT COUNT(*) FROM log", [], |r| r.get(0)).unwrap();
        assert_eq!(left, n - upto, "entries past the point stay");
    }

    /// A crash between writing the purge point and deleting the entries behind it
    /// leaves them on disk: readers never see them, and the writer deletes them after
    /// the restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_cut_short_by_a_crash_is_finished_after_the_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open(dir.path(), "unit").unwrap();
        append_written(&mut store, 1..101).await;
        drop(store);
        // What the writer's first purge transaction leaves: the point, and every entry.
        let point = openraft::testing::log_id(1, 7, 60);
        let conn = Connection::open(dir.path().join(datadir::LOG_FILE)).unwrap();
        write_meta(&conn, KEY_PURGED, &point).unwrap();
        drop(conn);
        assert_eq!(first_on_disk(dir.path()), Some(1));

        let mut store = LogStore::open(dir.path(), "unit").unwrap();
        assert_eq!(store.last_purged(), Some(point));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(point));
        assert_eq!(state.last_log_id, Some(openraft::testing::log_id(1, 7, 100)));
        let got = store.try_get_log_entries(0..200).await.unwrap();
        assert_eq!(indexes(&got), (61..=100).collect::<Vec<_>>());
        wait_deleted(dir.path(), 60).await;
        assert_eq!(first_on_disk(dir.path()), Some(61));

        // A point past every entry: the log ends at the point.
        let beyond = openraft::testing::log_id(2, 7, 150);
        store.purge(beyond).await.unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(beyond), Some(beyond)));
        wait_deleted(dir.path(), 150).await;
        assert_eq!(first_on_disk(dir.path()), None);
    }
}
