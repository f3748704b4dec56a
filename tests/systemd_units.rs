//! The unit files in `systemd/` are valid (`systemd-analyze verify`), hardened
//! (`systemd-analyze security --offline=true`: manager ≤ 2.0, worker ≤ 5.0), and say
//! what README "Install" promises: readiness and watchdog, no restart loop on a bad
//! config, and a worker that survives a Docker restart.

use std::path::{Path, PathBuf};
use std::process::Command;

fn unit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(unit(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `Key=value` lines of a unit, in order (repeated keys kept).
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn get<'a>(s: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    s.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

fn exposure(name: &str) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit(name))
        .output()
        .expect("systemd-analyze is installed (.ci/run installs the systemd package)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level for {name}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let score = line.rsplit(':').next().unwrap_or("").split_whitespace().next().unwrap_or("");
    score.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn units_verify_cleanly_against_the_built_binary() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_holdfast");
    let mut paths = Vec::new();
    for name in ["holdfast-manager.service", "holdfast-worker.service"] {
        // The units name the installed path; verify checks it exists and is executable.
        let text = read(name).replace("/usr/bin/holdfast", bin);
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p);
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&paths).output().expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify failed: {stderr}");
    // Any line mentioning our units is a warning about them (unknown keys, bad values).
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("holdfast-")).collect();
    assert!(ours.is_empty(), "verify warnings: {ours:?}");
}

#[test]
fn manager_unit_scores_at_most_2_and_worker_at_most_5() {
    let manager = exposure("holdfast-manager.service");
    let worker = exposure("holdfast-worker.service");
    eprintln!("systemd-analyze security --offline=true: manager {manager}, worker {worker}");
    assert!(manager <= 2.0, "manager exposure {manager} > 2.0");
    assert!(worker <= 5.0, "worker exposure {worker} > 5.0");
}

#[test]
fn units_notify_watch_and_do_not_loop_on_config_errors() {
    let config_exit = holdfast::cli::EXIT_CONFIG.to_string();
    for name in ["holdfast-manager.service", "holdfast-worker.service"] {
        let s = settings(&read(name));
        assert_eq!(get(&s, "Type"), ["notify"], "{name}");
        assert_eq!(get(&s, "NotifyAccess"), ["main"], "{name}");
        assert_eq!(get(&s, "WatchdogSec").len(), 1, "{name}");
        assert_eq!(get(&s, "RestartPreventExitStatus"), [config_exit.as_str()], "{name}");
        assert_eq!(get(&s, "User"), ["holdfast"], "{name}: runs as its own user, not root");
        assert_eq!(get(&s, "StateDirectoryMode"), ["0700"], "{name}");
        assert_eq!(get(&s, "UMask"), ["0077"], "{name}");
        assert_eq!(get(&s, "CapabilityBoundingSet"), [""], "{name}: empty bounding set");
        for doc in get(&s, "Documentation") {
            for uri in doc.split_whitespace() {
                let ok = ["http://", "https://", "file:", "info:", "man:"].iter().any(|p| uri.starts_with(p));
                assert!(ok, "{name}: Documentation={uri} is not a URI systemd accepts");
            }
        }
        let exec = get(&s, "ExecStart").concat();
        assert!(!exec.contains("--bootstrap"), "{name}: a unit never bootstraps by itself");
    }
    let w = settings(&read("holdfast-worker.service"));
    assert!(get(&w, "Requires").iter().all(|v| !v.contains("docker")), "worker must not Require docker");
    assert!(get(&w, "Wants").iter().any(|v| v.contains("docker.service")));
    assert!(get(&w, "After").iter().any(|v| v.contains("docker.service")));
    assert_eq!(get(&w, "SupplementaryGroups"), ["docker"]);
}
