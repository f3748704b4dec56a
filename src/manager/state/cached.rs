//! Statements from the connection's prepared-statement cache.
//!
//! `Connection::execute` and `Connection::query_row` compile their SQL on every call;
//! on the apply path that re-prepare was 6–8% of the leader's CPU (ARCHITECTURE.md,
//! "Decisions"). These do the same through `prepare_cached`, so a command's statements
//! are compiled once per connection and reused. Same results and errors, SQL must be
//! one statement (as for `execute`).

use rusqlite::{Connection, Params, Row};

/// `execute` and `query_row` through the connection's statement cache.
pub(crate) trait Cached {
    /// [`Connection::execute`] with a cached statement.
    fn execute_cached<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    /// [`Connection::query_row`] with a cached statement.
    fn query_row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn execute_cached<P: Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn query_row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}
