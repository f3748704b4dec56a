//! `WATCHDOG=1` proves the Raft core is alive: pings flow while a real openraft core
//! runs and applies, and stop once that core is shut down (ARCHITECTURE.md "Running as
//! a service").
//!
//! In its own test binary because it points this process's `NOTIFY_SOCKET` at a
//! socket it owns (the `sd-notify` crate reads the variable, as under systemd).

mod common;

use std::time::{Duration, Instant};

use common::{has_line, notify_socket, recv_datagram};
use holdfast::service::{supervise, Watched};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_when_the_raft_core_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, sock_path) = notify_socket(dir.path());
    std::env::set_var("NOTIFY_SOCKET", &sock_path);

    let (domain, _applied) = holdfast::manager::state::DomainState::new();
    let config = holdfast_raft::Config::new(
        "wd",
        dir.path().join("manager"),
        "127.0.0.1:1",
        "127.0.0.1:2",
        common::manager_tls().0,
    );
    let db = holdfast_raft::ReplicatedDb::open(config, domain).await.unwrap();
    db.bootstrap().await.unwrap();

    let (stop_tx, _) = tokio::sync::broadcast::channel(1);
    let watched = Watched { db: Some(db.clone()), worker: None, max_idle: Duration::from_secs(30) };
    let task = tokio::spawn(supervise(watched, Duration::from_millis(50), stop_tx.subscribe()));

    let sock = std::sync::Arc::new(sock);
    let rx = sock.clone();
    let first = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut pings = 0;
        while pings < 5 {
            let m =
                recv_datagram(&rx, Instant::now() + Duration::from_secs(20)).unwrap_or_else(|| panic!("only {seen:?}"));
            pings += usize::from(has_line(&m, "WATCHDOG=1"));
            seen.push(m);
        }
        seen
    })
    .await
    .unwrap();
    assert!(has_line(&first[0], "READY=1"), "READY=1 first: {first:?}");
    assert!(first.iter().any(|m| m.contains("STATUS=leader wd, 1 voters")), "{first:?}");

    // Stop the real Raft core, as a fatal storage error or a shutdown does.
    db.shutdown().await;
    assert_eq!(db.status().role, holdfast_raft::Role::Shutdown);

    let rx = sock.clone();
    let after = tokio::task::spawn_blocking(move || {
        // Drain what was sent before the stop was seen, up to the first "stopped" status.
        let mut seen = Vec::new();
        loop {
            let m = recv_datagram(&rx, Instant::now() + Duration::from_secs(10))
                .unwrap_or_else(|| panic!("no raft-stopped status: {seen:?}"));
            let stopped = m.contains("STATUS=raft stopped");
            seen.push(m);
            if stopped {
                break;
            }
        }
        // Then 20 more ticks (1 s): status lines, never a ping.
        let mut later = Vec::new();
        let until = Instant::now() + Duration::from_secs(1);
        while let Some(m) = recv_datagram(&rx, until) {
            later.push(m);
        }
        (seen, later)
    })
    .await
    .unwrap();
    let (seen, later) = after;
    assert!(!has_line(seen.last().unwrap(), "WATCHDOG=1"), "{seen:?}");
    assert!(later.len() >= 5, "the loop keeps reporting status: {later:?}");
    assert!(later.iter().all(|m| !has_line(m, "WATCHDOG=1")), "pings after Raft stopped: {later:?}");

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("supervise ends on stop").unwrap();
}
