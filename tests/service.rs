//! The binary as systemd runs it (README "Install", ARCHITECTURE.md "Running as a
//! service"): `sd_notify` datagrams on a real `NOTIFY_SOCKET`, JSON and journald log
//! lines, `--metrics` on a worker-only process, and the config-error exit code.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    eventually_blocking, free_port, has_line, holdfast_bin, http, notify_socket, poll_blocking, recv_datagram,
};

/// A child killed when dropped; stdout and stderr go to separate files.
struct Node {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Node {
    fn spawn(args: &[&str], dir: &Path, envs: &[(&str, String)]) -> Node {
        let stderr = dir.join("stderr.log");
        let err = std::fs::File::create(&stderr).unwrap();
        let out = std::fs::File::create(dir.join("stdout.log")).unwrap();
        Node::spawn_with(args, envs, Stdio::from(out), Stdio::from(err), stderr)
    }

    fn spawn_with(args: &[&str], envs: &[(&str, String)], out: Stdio, err: Stdio, stderr: std::path::PathBuf) -> Node {
        let mut cmd = Command::new(holdfast_bin());
        cmd.args(args).stdout(out).stderr(err).env_remove("HOLDFAST_LOG").env_remove("JOURNAL_STREAM");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Node { child: cmd.spawn().expect("spawn holdfast"), stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        poll_blocking(within, || self.child.try_wait().ok().flatten()).ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking GET with a short timeout: the status, or `None` when nothing answers.
fn get_now(url: &str) -> Option<u16> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        http().get(url).timeout(Duration::from_secs(2)).send().await.ok().map(|r| r.status().as_u16())
    })
}

fn get_text(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let r = http().get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.text().await.unwrap()
    })
}

#[test]
fn dev_notifies_ready_after_the_api_answers_then_watchdog_then_stopping() {
    common::require_docker();
    let dir = tempfile::tempdir().unwrap();
    let (sock, sock_path) = notify_socket(dir.path());
    let (api, cluster, metrics) = (free_port(), free_port(), free_port());
    let api_addr = format!("127.0.0.1:{api}");
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let data = dir.path().join("data");
    let mut node = Node::spawn(
        &[
            "dev",
            "--node-id",
            "svc",
            "--data-dir",
            data.to_str().unwrap(),
            "--api",
            &api_addr,
            "--cluster",
            &format!("127.0.0.1:{cluster}"),
            "--metrics",
            &metrics_addr,
            "--log-format",
            "json",
        ],
        dir.path(),
        // WatchdogSec=0.4s: a ping every 200 ms.
        &[("NOTIFY_SOCKET", sock_path), ("WATCHDOG_USEC", "400000".into())],
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    let mut before_ready = Vec::new();
    let ready = loop {
        let msg =
            recv_datagram(&sock, deadline).unwrap_or_else(|| panic!("no READY=1 in 60 s; log:\n{}", node.stderr()));
        if has_line(&msg, "READY=1") {
            break msg;
        }
        before_ready.push(msg);
    };
    // At the moment READY arrives, the API and the metrics port answer.
    assert_eq!(get_now(&format!("http://{api_addr}/health/live")), Some(200), "API not answering at READY=1");
    assert_eq!(get_now(&format!("http://{metrics_addr}/health/live")), Some(200));
    assert!(before_ready.iter().all(|m| !has_line(m, "WATCHDOG=1")), "watchdog before ready: {before_ready:?}");
    assert!(ready.contains("STATUS="), "{ready}");

    // Watchdog pings keep coming, with a status a human can read.
    let mut pings = 0;
    let mut status = String::new();
    while pings < 3 {
        let msg = recv_datagram(&sock, Instant::now() + Duration::from_secs(5)).expect("WATCHDOG=1 every 200 ms");
        if has_line(&msg, "WATCHDOG=1") {
            pings += 1;
            status = msg;
        }
    }
    assert!(status.contains("STATUS=leader svc, 1 voters"), "{status}");
    assert!(status.contains("engine ok"), "{status}");

    // /v1/cluster names each member's version (version, commit, build date).
    let token = std::fs::read_to_string(data.join("admin.token")).expect("dev writes admin.token");
    let cluster = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let r = http().get(format!("http://{api_addr}/v1/cluster")).bearer_auth(token.trim()).send().await.unwrap();
        assert!(r.status().is_success(), "/v1/cluster: {}", r.status());
        r.json::<serde_json::Value>().await.unwrap()
    });
    assert_eq!(cluster["members"][0]["version"], holdfast::cli::LONG_VERSION, "{cluster}");

    // One scrape of the metrics port covers manager, worker and breakers, with HELP.
    let text = get_text(&format!("http://{metrics_addr}/metrics"));
    for needle in [
        "# HELP holdfast_raft_term ",
        "holdfast_raft_is_leader 1",
        "# HELP holdfast_worker_containers ",
        "holdfast_worker_lease_remaining_seconds ",
        "holdfast_breaker_state{name=\"docker\"} 0",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle:?}:\n{text}");
    }

    let exit = node.terminate(Duration::from_secs(30)).expect("dev exits on SIGTERM");
    assert!(exit.success(), "{exit:?}");
    let mut rest = Vec::new();
    while let Some(m) = recv_datagram(&sock, Instant::now() + Duration::from_millis(300)) {
        rest.push(m);
    }
    assert!(rest.iter().any(|m| has_line(m, "STOPPING=1")), "no STOPPING=1 after SIGTERM: {rest:?}");

    // Every stderr line is a JSON object with a level and a message.
    let log = node.stderr();
    let mut lines = 0;
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines >= 3, "too few log lines: {log}");
}

#[test]
fn worker_alone_serves_metrics_notifies_and_logs_for_journald() {
    common::require_docker();
    let dir = tempfile::tempdir().unwrap();
    let (sock, sock_path) = notify_socket(dir.path());
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // No manager answers here: the worker runs on without a lease.
    let dead_manager = format!("127.0.0.1:{}", free_port());
    let stderr_path = dir.path().join("stderr.log");
    let err = std::fs::File::create(&stderr_path).unwrap();
    // systemd sets JOURNAL_STREAM to the device and inode of the stream it connected.
    let journal = {
        use std::os::unix::fs::MetadataExt;
        let m = err.metadata().unwrap();
        format!("{}:{}", m.dev(), m.ino())
    };
    let data = dir.path().join("data");
    // A worker that joined once (its certificate is in `<data>/tls`) and whose managers
    // are now all gone: it starts from its own identity, no token needed.
    let ca = holdfast::net::pki::Ca::generate().unwrap();
    common::write_identity(&ca, &data, "lonely", holdfast::net::pki::Role::Worker);
    let _node = Node::spawn_with(
        &[
            "agent",
            "--worker",
            "--node-id",
            "lonely",
            "--join",
            &dead_manager,
            "--data-dir",
            data.to_str().unwrap(),
            "--metrics",
            &metrics_addr,
            "--log-level",
            "info",
        ],
        &[("NOTIFY_SOCKET", sock_path), ("JOURNAL_STREAM", journal)],
        Stdio::null(),
        Stdio::from(err),
        stderr_path.clone(),
    );
    // READY=1 after the first successful engine call, even with no manager.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let msg = recv_datagram(&sock, deadline).expect("READY=1 from a worker whose engine answers");
        if has_line(&msg, "READY=1") {
            break msg;
        }
    };
    assert!(ready.contains("STATUS=no valid lease, engine ok"), "{ready}");

    let text = get_text(&format!("http://{metrics_addr}/metrics"));
    for needle in [
        "# HELP holdfast_worker_lease_remaining_seconds ",
        "holdfast_worker_lease_remaining_seconds 0",
        "# HELP holdfast_worker_outbox_reports ",
        "holdfast_worker_containers{state=\"running\"} 0",
        "holdfast_worker_engine_ok 1",
        "# HELP holdfast_breaker_state ",
        "holdfast_breaker_state{name=\"docker\"} 0",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle:?}:\n{text}");
    }
    assert_eq!(get_now(&format!("http://{metrics_addr}/health/ready")), Some(200));

    // Journald lines: a syslog priority first, no timestamp (the journal adds one).
    let log = eventually_blocking(Duration::from_secs(30), "a warning line (<4>) in the log", || {
        let log = std::fs::read_to_string(&stderr_path).unwrap();
        log.lines().any(|l| l.starts_with("<4>")).then_some(log)
    });
    assert!(log.lines().any(|l| l.starts_with("<6>") && l.contains("worker starting")), "{log}");
    assert!(log.lines().any(|l| l.starts_with("<4>") && l.contains("sync failed")), "{log}");
    for line in log.lines() {
        assert!(line.starts_with('<'), "line without priority: {line}");
        // tracing's text format would start with the timestamp (`2026-01-31T...`).
        let after = line.split_once('>').map_or("", |(_, r)| r).trim_start();
        assert!(!after.starts_with(|c: char| c.is_ascii_digit()), "timestamp in {line}");
    }
}

#[test]
fn configuration_errors_exit_with_ex_config() {
    let dir = tempfile::tempdir().unwrap();
    let code = |args: &[&str]| {
        Command::new(holdfast_bin()).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().code()
    };
    let want = Some(i32::from(holdfast::cli::EXIT_CONFIG));
    assert_eq!(code(&["agent", "--no-such-flag"]), want);
    assert_eq!(code(&["agent", "--node-id", "w", "--worker"]), want, "a worker without --join");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "node-id = \"w\"\nwokrer = true\n").unwrap();
    assert_eq!(code(&["agent", "--config", file.to_str().unwrap()]), want);
    assert_eq!(code(&["agent", "--node-id", "w", "--worker", "--join", "x:1", "--log-level", "info,=="]), want);
    // The metrics port has no authentication: loopback only.
    let metrics = ["agent", "--node-id", "w", "--worker", "--join", "x:1", "--metrics", "0.0.0.0:9700"];
    assert_eq!(code(&metrics), want);
    assert_eq!(code(&["--version"]), Some(0));
}

#[test]
fn version_names_the_commit_and_build_date() {
    let out = Command::new(holdfast_bin()).arg("--version").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // holdfast 0.1.0 (commit 0123456789ab, built 2026-01-31)
    let rest = text.trim().strip_prefix(&format!("holdfast {} (commit ", env!("CARGO_PKG_VERSION"))).expect(&text);
    let (commit, rest) = rest.split_once(", built ").expect(&text);
    assert!(commit == "unknown" || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())), "{text}");
    let date = rest.strip_suffix(')').expect(&text);
    let parts: Vec<&str> = date.split('-').collect();
    assert!(parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()), "{text}");
}
