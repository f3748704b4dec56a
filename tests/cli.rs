//! The CLI end to end against a real `holdfast dev` (manager + worker on the real
//! Docker engine): tables by default, `-o json`, node commands, TOML specs, exit codes,
//! completions and the man page. Table rendering itself is unit-tested in
//! `src/client.rs` against fixed JSON.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::{eventually, free_port, holdfast_bin, http, require_docker, Proc};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

struct Dev {
    api: String,
    data: std::path::PathBuf,
    _proc: Proc,
}

impl Dev {
    async fn start(dir: &Path) -> Dev {
        let api = format!("127.0.0.1:{}", free_port());
        let cluster = format!("127.0.0.1:{}", free_port());
        let data = dir.join("data");
        let args =
            ["dev", "--api", &api, "--cluster", &cluster, "--node-id", "cli-dev", "--data-dir", data.to_str().unwrap()];
        let proc = Proc::spawn(&args, &dir.join("dev.log"), &[]);
        let url = format!("http://{api}/v1/nodes");
        let token_file = data.join("admin.token");
        eventually(WAIT, "the dev node to register as ready", || {
            let (url, token_file) = (url.clone(), token_file.clone());
            async move {
                let token = std::fs::read_to_string(&token_file).ok()?;
                let v: Value = http().get(&url).bearer_auth(token.trim()).send().await.ok()?.json().await.ok()?;
                v["nodes"].as_array()?.iter().any(|n| n["id"] == "cli-dev" && n["status"] == "ready").then_some(())
            }
        })
        .await;
        Dev { api: format!("http://{api}"), data, _proc: proc }
    }

    /// Runs `holdfast ARGS --api-url … --data-dir …` (the token comes from the data dir).
    fn cli(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--api-url", &self.api, "--data-dir", self.data.to_str().unwrap()]);
        run(&all)
    }
}

fn run(args: &[&str]) -> Output {
    std::process::Command::new(holdfast_bin())
        .args(args)
        .env_remove("HOLDFAST_API_TOKEN")
        .env_remove("HOLDFAST_OUTPUT")
        .output()
        .expect("run holdfast")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: Output) -> String {
    assert_eq!(o.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    stdout(&o)
}

fn json(o: Output) -> Value {
    let text = ok(o);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[tokio::test]
async fn the_cli_speaks_tables_json_and_exit_codes_against_holdfast_dev() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path()).await;

    // Nodes: a table by default, JSON with -o json.
    let table = ok(dev.cli(&["node", "list"]));
    let mut lines = table.lines();
    let words = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
    assert_eq!(words(lines.next().unwrap())[..3], ["NAME", "STATUS", "SCHEDULING"], "{table}");
    assert_eq!(words(lines.next().unwrap())[..3], ["cli-dev", "ready", "-"], "{table}");
    let nodes = json(dev.cli(&["node", "-o", "json"]));
    assert_eq!(nodes[0]["id"], "cli-dev", "{nodes}");

    // A TOML spec that can never be placed (no node has the label): pending, no container.
    let spec = dir.path().join("web.toml");
    std::fs::write(
        &spec,
        "name = \"cli-web\"\nimage = \"holdfast/echo:latest\"\n[constraints.labels]\nzone = \"nowhere\"\n",
    )
    .unwrap();
    let id = ok(dev.cli(&["task", "submit", spec.to_str().unwrap()])).trim().to_string();
    assert!(id.starts_with('t'), "{id}");
    let listed = eventually(Duration::from_secs(10), "the task listed as pending", || {
        let out = stdout(&dev.cli(&["task", "list"]));
        let id = id.clone();
        async move {
            out.lines().any(|l| l.starts_with(&id) && l.contains("cli-web") && l.contains("pending")).then_some(out)
        }
    })
    .await;
    assert!(listed.starts_with("ID "), "{listed}");
    let tasks = json(dev.cli(&["task", "list", "--name", "cli-web", "-o", "json"]));
    assert_eq!(tasks.as_array().map(Vec::len), Some(1), "{tasks}");
    assert_eq!(tasks[0]["id"], id.as_str());

    // Node commands change what the list shows.
    ok(dev.cli(&["node", "eligibility", "cli-dev", "--off"]));
    assert!(ok(dev.cli(&["node", "list"])).contains("ineligible"));
    ok(dev.cli(&["node", "eligibility", "cli-dev", "--on"]));
    ok(dev.cli(&["node", "drain", "cli-dev"]));
    assert_eq!(json(dev.cli(&["node", "list", "-o", "json"]))[0]["draining"], true);
    ok(dev.cli(&["node", "drain", "cli-dev", "--off"]));

    // Cluster status and members.
    let members = ok(dev.cli(&["cluster", "members"]));
    assert!(members.lines().nth(1).is_some_and(|l| l.starts_with("cli-dev") && l.contains("leader")), "{members}");
    assert!(ok(dev.cli(&["cluster"])).contains("this manager"));

    // Exit codes: 3 not found, 1 other refusals, 2 usage, 4 retryable (unreachable).
    assert_eq!(dev.cli(&["task", "get", "t00000000000000000000000000000000"]).status.code(), Some(3));
    assert_eq!(dev.cli(&["node", "drain", "no-such-node"]).status.code(), Some(3));
    assert_eq!(dev.cli(&["task", "get", "bad id!"]).status.code(), Some(1));
    assert_eq!(dev.cli(&["task", "lst"]).status.code(), Some(2));
    let port = free_port();
    let down = run(&["task", "list", "--api-url", &format!("http://127.0.0.1:{port}"), "--token", "x"]);
    assert_eq!(down.status.code(), Some(4));
    // agent keeps the configuration exit code the units name.
    assert_eq!(run(&["agent", "--no-such-flag"]).status.code(), Some(78));

    // Shell completions and the man page.
    assert!(ok(run(&["completions", "bash"])).contains("_holdfast()"));
    assert!(ok(run(&["completions", "zsh"])).contains("#compdef holdfast"));
    assert!(ok(run(&["completions", "fish"])).contains("complete -c holdfast"));
    assert!(ok(run(&["man"])).contains(".TH holdfast 1"));

    // Clean up what this test made.
    ok(dev.cli(&["task", "stop", &id]));
}

/// `task logs -f` keeps printing what the container writes, each line once: the echo
/// task logs every health probe it answers (with its own microsecond timestamp), so
/// the followed output must keep growing after the first page, with no line twice.
#[tokio::test]
async fn task_logs_follow_prints_new_lines_once() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start(dir.path()).await;
    let spec = dir.path().join("probed.json");
    let body = serde_json::json!({
        "name": "cli-follow",
        "image": "holdfast/echo:latest",
        "health": {"http": {"path": "/health", "port": 7777}, "interval_ms": 300, "timeout_ms": 250, "failures": 3},
    });
    std::fs::write(&spec, body.to_string()).unwrap();
    let id = ok(dev.cli(&["task", "submit", spec.to_str().unwrap()])).trim().to_string();
    eventually(WAIT, "the probed task running", || async {
        let v = json(dev.cli(&["task", "get", &id, "-o", "json"]));
        (v["state"] == "running").then_some(())
    })
    .await;

    let out_path = dir.path().join("follow.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut follow = std::process::Command::new(holdfast_bin())
        .args(["task", "logs", "-f", &id, "--tail", "5", "--api-url", &dev.api, "--data-dir"])
        .arg(&dev.data)
        .env_remove("HOLDFAST_API_TOKEN")
        .stdout(out)
        .spawn()
        .expect("start task logs -f");
    let probes = || {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        let n = text.lines().filter(|l| l.contains("health probe answered")).count();
        (n, text)
    };
    let first = eventually(WAIT, "the first followed probe line", || async {
        let (n, _) = probes();
        (n > 0).then_some(n)
    })
    .await;
    eventually(WAIT, "five more probe lines, followed", || async {
        let (n, text) = probes();
        (n >= first + 5).then_some(()).ok_or_else(|| format!("{n} probe lines (first page {first}):\n{text}"))
    })
    .await;
    let _ = follow.kill();
    let _ = follow.wait();
    let (_, text) = probes();
    let mut seen = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        assert!(seen.insert(line), "printed twice: {line}\n{text}");
    }

    // Clean up while the agent is here: a worker that goes away leaves its tasks running
    // (edge autonomy), so an unstopped task would outlive the test as a container.
    ok(dev.cli(&["task", "stop", &id]));
    eventually(WAIT, "the probed task stopped", || async {
        let v = json(dev.cli(&["task", "get", &id, "-o", "json"]));
        (v["state"] == "stopped").then_some(())
    })
    .await;
}
