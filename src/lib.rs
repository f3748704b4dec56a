//! holdfast: an edge-native container orchestrator in one static binary.
//!
//! `main.rs` parses flags into a [`config::Config`] and calls [`node::run`]. See
//! `ARCHITECTURE.md` for the map and the invariants.

pub mod backup;
pub mod cli;
pub mod client;
pub mod config;
pub mod config_file;
pub mod echo;
pub mod guard;
pub mod logging;
pub mod manager;
pub mod model;
pub mod net;
pub mod node;
pub mod resilience;
pub mod service;
pub mod worker;

/// Locks a std mutex, recovering from poisoning: every mutex here guards plain maps
/// and sets that stay valid if a holder panicked.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for the read side of a std `RwLock`, with the same poisoning rule.
pub(crate) fn read<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// [`lock`] for the write side of a std `RwLock`, with the same poisoning rule.
pub(crate) fn write<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested; draining");
}
