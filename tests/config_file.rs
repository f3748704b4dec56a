//! `--config FILE`: flags > `HOLDFAST_*` variables > file > defaults, unknown keys are
//! errors naming the key and the file, and every long flag of `agent` and `dev` has an
//! environment twin (README "Configuration file").
//!
//! One test sets process environment variables; it is the only test here that reads
//! them, and nothing in this file spawns processes that could inherit them.

use std::ffi::OsString;
use std::io::Write;

use clap::CommandFactory;
use holdfast::cli::{AgentArgs, Cli, Command, EXIT_CONFIG};
use holdfast::config_file::{parse_from, ParseExit};

fn agent(args: &[&str]) -> Result<AgentArgs, ParseExit> {
    let argv: Vec<OsString> = ["holdfast", "agent"].iter().chain(args).map(OsString::from).collect();
    match parse_from(argv)?.command {
        Command::Agent(a) => Ok(*a),
        other => panic!("parsed as {other:?}"),
    }
}

fn config_error(args: &[&str]) -> String {
    match agent(args) {
        Err(ParseExit::Config(m)) => m,
        Err(ParseExit::Clap(e)) => panic!("clap error instead of a config error: {e}"),
        Ok(a) => panic!("accepted: {a:?}"),
    }
}

/// Serializes the tests that parse (and so read the environment) with the one that
/// sets variables.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

const ENV_KEYS: [&str; 4] = ["HOLDFAST_NODE_ID", "HOLDFAST_LEASE", "HOLDFAST_API", "HOLDFAST_LABELS"];

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    for k in ENV_KEYS {
        std::env::remove_var(k);
    }
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        r#"node-id = "from-file"
worker = true
join = ["10.0.0.1:7701", "10.0.0.2:7701"]
lease = "40s"
api = "127.0.0.1:9000"
labels = {{ zone = "a", rack = "r1" }}
heartbeat-ttl = "2s"
log-format = "json""#
    )
    .unwrap();
    let path = file.path().to_str().unwrap().to_string();
    let cfg = ["--config", path.as_str()];

    // (case, env, extra flags, expected node-id, lease, api)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str], &'a str, u64, &'a str);
    let table: [Case; 5] = [
        ("file over defaults", &[], &[], "from-file", 40, "127.0.0.1:9000"),
        (
            "env over file",
            &[("HOLDFAST_NODE_ID", "from-env"), ("HOLDFAST_LEASE", "50s")],
            &[],
            "from-env",
            50,
            "127.0.0.1:9000",
        ),
        (
            "flag over env",
            &[("HOLDFAST_NODE_ID", "from-env")],
            &["--node-id", "from-flag"],
            "from-flag",
            40,
            "127.0.0.1:9000",
        ),
        ("flag over file", &[], &["--api", "127.0.0.1:9100", "--lease=60s"], "from-file", 60, "127.0.0.1:9100"),
        (
            "env over default without the key in the file",
            &[("HOLDFAST_API", "127.0.0.1:9200")],
            &[],
            "from-file",
            40,
            "127.0.0.1:9200",
        ),
    ];
    for (case, env, flags, node, lease, api) in table {
        for (k, v) in env {
            std::env::set_var(k, v);
        }
        let args: Vec<&str> = cfg.iter().chain(flags.iter()).copied().collect();
        let a = agent(&args).unwrap_or_else(|e| panic!("{case}: {e:?}"));
        for (k, _) in env {
            std::env::remove_var(k);
        }
        assert_eq!(a.node_id, node, "{case}: node-id");
        assert_eq!(a.lease.as_secs(), lease, "{case}: lease");
        assert_eq!(a.api, api, "{case}: api");
        // Keys that no layer above touches come from the file.
        assert!(a.worker, "{case}: worker = true from the file");
        assert_eq!(a.join, ["10.0.0.1:7701", "10.0.0.2:7701"], "{case}: join");
        assert_eq!(a.heartbeat_ttl.as_millis(), 2_000, "{case}");
        assert_eq!(a.service.log_format, holdfast::cli::LogFormat::Json, "{case}");
        let mut labels = a.labels.clone();
        labels.sort();
        assert_eq!(labels, [("rack".to_string(), "r1".to_string()), ("zone".into(), "a".into())], "{case}");
    }
    // Without --config, defaults stand (and node-id must come from somewhere).
    let a = agent(&["--node-id", "n", "--worker"]).unwrap();
    assert_eq!((a.lease.as_secs(), a.api.as_str()), (30, "127.0.0.1:7700"));
    // A flag list beats a file list entirely (no merging of lists).
    let a = agent(&["--config", &path, "--join", "10.9.9.9:7701"]).unwrap();
    assert_eq!(a.join, ["10.9.9.9:7701"]);
}

#[test]
fn unknown_keys_and_bad_values_name_the_key_and_the_file() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "node-id = \"x\"\nnode_idd = \"y\"").unwrap();
    let path = file.path().display().to_string();
    let msg = config_error(&["--config", &path]);
    assert!(msg.contains("node_idd") && msg.contains(&path), "{msg}");

    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "node_id = \"x\"").unwrap();
    let msg = config_error(&["--config", file.path().to_str().unwrap()]);
    assert!(msg.contains("did you mean node-id"), "{msg}");

    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "worker = \"yes\"").unwrap();
    let msg = config_error(&["--config", file.path().to_str().unwrap(), "--node-id", "n"]);
    assert!(msg.contains("\"worker\"") && msg.contains("true or false"), "{msg}");

    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "api = [\"a:1\", \"b:2\"]").unwrap();
    let msg = config_error(&["--config", file.path().to_str().unwrap(), "--node-id", "n"]);
    assert!(msg.contains("one value"), "{msg}");

    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "node-id = \"unterminated").unwrap();
    let msg = config_error(&["--config", file.path().to_str().unwrap()]);
    assert!(msg.contains(file.path().to_str().unwrap()), "{msg}");

    let msg = config_error(&["--config", "/nonexistent/holdfast.toml"]);
    assert!(msg.contains("/nonexistent/holdfast.toml"), "{msg}");

    // A bad value from the file is rejected by the flag's own parser, as clap would.
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "node-id = \"n\"\nlease = \"forever\"").unwrap();
    let err = agent(&["--config", file.path().to_str().unwrap()]).unwrap_err();
    assert!(matches!(err, ParseExit::Clap(_)), "{err:?}");
    assert_eq!(err.code(), EXIT_CONFIG);
}

#[test]
fn every_long_flag_of_agent_and_dev_has_an_env_twin() {
    let cmd = Cli::command();
    let mut checked = 0;
    for name in ["agent", "dev"] {
        let sub = cmd.find_subcommand(name).expect(name);
        for arg in sub.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            let env = arg.get_env().unwrap_or_else(|| panic!("holdfast {name} --{long} has no env twin"));
            let want = format!("HOLDFAST_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(env.to_str(), Some(want.as_str()), "holdfast {name} --{long}");
            checked += 1;
        }
    }
    assert!(checked >= 25, "walked only {checked} flags");
}

#[test]
fn the_example_config_names_only_real_flags() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/holdfast.toml")).unwrap();
    let cmd = Cli::command();
    let agent = cmd.find_subcommand("agent").unwrap();
    let longs: Vec<&str> = agent.get_arguments().filter_map(|a| a.get_long()).collect();
    let mut keys = 0;
    for line in text.lines() {
        // `# key = value   # comment` lines are the documented keys.
        let Some(rest) = line.strip_prefix("# ") else { continue };
        let Some((key, value)) = rest.split_once(" = ") else { continue };
        if key.contains(' ') {
            continue;
        }
        assert!(longs.contains(&key), "example key {key:?} is not a flag of holdfast agent");
        let value = value.split("  #").next().unwrap().trim();
        let doc: Result<toml::Table, _> = toml::from_str(&format!("{key} = {value}"));
        assert!(doc.is_ok(), "example value for {key} is not TOML: {value}");
        keys += 1;
    }
    assert!(keys >= 10, "found only {keys} example keys");
}

/// `--snapshot-every` (README "A cluster"): the Raft default, a file's integer, and a
/// value below the least one refused with the flag's range, not accepted and ignored.
#[test]
fn snapshot_every_takes_the_raft_default_a_file_value_and_refuses_too_few() {
    let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
    let a = agent(&["--node-id", "n"]).unwrap();
    assert_eq!(a.snapshot_every, holdfast_raft::DEFAULT_SNAPSHOT_EVERY);

    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "node-id = \"n\"\nsnapshot-every = 20000").unwrap();
    let a = agent(&["--config", file.path().to_str().unwrap()]).unwrap();
    assert_eq!(a.snapshot_every, 20_000);

    let too_few = (holdfast::cli::MIN_SNAPSHOT_EVERY - 1).to_string();
    let err = agent(&["--node-id", "n", "--snapshot-every", &too_few]).unwrap_err();
    let ParseExit::Clap(e) = &err else { panic!("{err:?}") };
    assert!(e.to_string().contains(&holdfast::cli::MIN_SNAPSHOT_EVERY.to_string()), "{e}");
    assert_eq!(err.code(), EXIT_CONFIG);
}
