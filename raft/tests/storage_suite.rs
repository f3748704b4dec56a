//! openraft's own storage test suite against the SQLite log store and state machine.

use std::sync::Arc;

use holdfast_raft::store::{LogStore, StateMachine, TypeConfig};
use holdfast_raft::Apply;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};
use tempfile::TempDir;

/// The suite only applies blank and membership entries; normal commands never arrive.
struct NoApp;

impl Apply for NoApp {
    fn init_schema(&self, conn: &rusqlite::Connection) -> rusqlite::Result<()> {
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    }

    fn apply(&self, _tx: &rusqlite::Transaction<'_>, _index: u64, command: &[u8]) -> rusqlite::Result<Vec<u8>> {
        Ok(command.to_vec())
    }
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let log = LogStore::open(dir.path(), "suite").map_err(|e| StorageIOError::write(&e))?;
        let sm = StateMachine::open(dir.path(), "suite", Arc::new(NoApp)).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite builds its own runtimes, so this is a plain #[test].
    Suite::test_all(Builder).expect("openraft storage suite");
}
