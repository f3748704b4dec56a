//! A few read-only connections to `state.db` for reads beside the single writer.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use crate::DbError;

/// Read-only connections kept open for reads.
const READ_POOL_SIZE: usize = 4;

/// A few read-only connections to `state.db`, used one at a time on the blocking pool.
pub(crate) struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    /// Longest wait for a free connection; past it the read fails instead of queueing
    /// behind reads that never finish.
    wait: Duration,
}

impl ReadPool {
    pub(crate) fn new(path: PathBuf, wait: Duration) -> Self {
        ReadPool { path, idle: Mutex::new(Vec::new()), permits: Arc::new(Semaphore::new(READ_POOL_SIZE)), wait }
    }

    pub(crate) fn close(&self) {
        self.idle.lock().expect("read pool mutex poisoned").clear();
        self.permits.close();
    }

    pub(crate) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let acquire = self.permits.clone().acquire_owned();
        let permit = tokio::time::timeout(self.wait, acquire)
            .await
            .map_err(|_| DbError::Timeout { after: self.wait, leader: None })?
            .map_err(|_| DbError::Storage("the read pool is closed (member shut down)".into()))?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = pool.take()?;
            let out = f(&conn);
            pool.idle.lock().expect("read pool mutex poisoned").push(conn);
            out.map_err(|e| DbError::Storage(format!("read on state.db failed: {e}")))
        })
        .await
        .map_err(|e| DbError::Storage(format!("read closure panicked: {e}")))?
    }

    fn take(&self) -> Result<Connection, DbError> {
        if let Some(c) = self.idle.lock().expect("read pool mutex poisoned").pop() {
            return Ok(c);
        }
        let conn =
            Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(|e| DbError::Storage(format!("cannot open {}: {e}", self.path.display())))?;
        conn.set_prepared_statement_cache_capacity(crate::state_machine::STATEMENT_CACHE);
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(|e| DbError::Storage(format!("cannot configure a read connection: {e}")))?;
        Ok(conn)
    }
}
