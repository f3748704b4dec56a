//! Command-line interface: flags (each with a `HOLDFAST_<FLAG>` twin) and their
//! translation into [`Config`](crate::config::Config).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ManagerRole, WorkerRole};

/// Exit code of a client command that failed (`task`, `node`, `cluster`, `token`).
pub const EXIT_ERROR: u8 = 1;
/// Exit code of a client command given wrong flags or arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code when the API answered 404: no such task, node, token or route.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code when the API refused for now (503: no leader, quorum lost, overloaded):
/// the same command may succeed if retried.
pub const EXIT_RETRYABLE: u8 = 4;

/// The exit code of a failed parse: usage errors of the client commands exit with
/// [`EXIT_USAGE`]; those of `agent` and `dev` keep [`EXIT_CONFIG`] (the units name it).
pub fn parse_error_code(args: &[std::ffi::OsString], code: u8) -> u8 {
    if code != EXIT_CONFIG {
        return code;
    }
    let sub = args.iter().skip(1).find(|a| !a.to_string_lossy().starts_with('-'));
    match sub.map(|s| s.to_string_lossy().into_owned()).as_deref() {
        Some("agent" | "dev") | None => EXIT_CONFIG,
        Some(_) => EXIT_USAGE,
    }
}

/// How client commands print what the API answered.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The API's JSON, for scripts.
    Json,
}

/// Exit code for a configuration error (a bad flag, file, key or value): `EX_CONFIG`
/// from sysexits. The units' `RestartPreventExitStatus=` names it so a typo does not
/// restart in a loop.
pub const EXIT_CONFIG: u8 = 78;

/// Least `--snapshot-every`: below it a manager would spend its time copying its
/// state database.
pub const MIN_SNAPSHOT_EVERY: u64 = 1_000;

/// `holdfast --version`: version, git commit and build date (from `build.rs`).
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("HOLDFAST_GIT_COMMIT"),
    ", built ",
    env!("HOLDFAST_BUILD_DATE"),
    ")"
);
use crate::manager::sink::{SinkConfig, SinkTarget};

/// holdfast: an edge-native container orchestrator in one binary.
#[derive(Parser, Debug)]
#[command(name = "holdfast", version = LONG_VERSION, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Manager + worker in one process, single-node cluster: first runs, demos, CI.
    Dev(DevArgs),
    /// A cluster node: manager, worker, or both.
    Agent(Box<AgentArgs>),
    /// The reference echo task: POST / answers with the same body.
    Echo(EchoArgs),
    /// Images: the built-in echo image, and the managers' catalogue (push, list, rm).
    Image {
        /// Which image.
        #[command(subcommand)]
        which: ImageCommand,
        /// API address and authentication.
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Tasks (client of the HTTP API).
    Task {
        /// Task command.
        #[command(subcommand)]
        cmd: TaskCommand,
        /// Output format, API address and authentication.
        #[command(flatten)]
        api: ApiOutputArgs,
    },
    /// Nodes (client of the HTTP API); the list when no command is given.
    Node {
        /// Node command.
        #[command(subcommand)]
        cmd: Option<NodeCommand>,
        /// Output format, API address and authentication.
        #[command(flatten)]
        api: ApiOutputArgs,
    },
    /// Internal: the first process of guarded (`exclusive`) containers; see
    /// ARCHITECTURE.md, "The fence inside the container". Not for operators.
    #[command(hide = true)]
    Guard(GuardArgs),
    /// Cluster status, and backups (client of the HTTP API).
    Cluster {
        /// What to do; cluster status when absent.
        #[command(subcommand)]
        cmd: Option<ClusterCommand>,
        /// Output format, API address and authentication.
        #[command(flatten)]
        api: ApiOutputArgs,
    },
    /// API tokens (client of the HTTP API; needs an admin token).
    Token {
        /// Token command.
        #[command(subcommand)]
        cmd: TokenCommand,
        /// Output format, API address and authentication.
        #[command(flatten)]
        api: ApiOutputArgs,
    },
    /// Print a shell completion script (`holdfast completions bash > /etc/bash_completion.d/holdfast`).
    Completions {
        /// `bash`, `zsh`, `fish`, `elvish` or `powershell`.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `holdfast man | man -l -`).
    Man,
}

/// `holdfast node ...`
#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List nodes (every page).
    List,
    /// Show one node with its history.
    Get {
        /// Node name.
        id: String,
    },
    /// Drain a node: its placements move elsewhere; `--off` ends the drain.
    Drain {
        /// Node name.
        id: String,
        /// End the drain instead.
        #[arg(long)]
        off: bool,
        /// Stop whatever is left after this long (e.g. `10m`).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "off")]
        deadline: Option<std::time::Duration>,
    },
    /// Whether a node takes new placements (`--off` to stop, `--on` to resume).
    Eligibility {
        /// Node name.
        id: String,
        /// Take no new placements.
        #[arg(long, conflicts_with = "on", required_unless_present = "on")]
        off: bool,
        /// Take new placements again.
        #[arg(long)]
        on: bool,
    },
    /// Remove a decommissioned node from the cluster (admin).
    Remove {
        /// Node name.
        id: String,
    },
}

/// Where the API client connects, and how it authenticates (global flags of the
/// client commands).
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    /// API base URL.
    #[arg(long, env = "HOLDFAST_API_URL", default_value = "http://127.0.0.1:7700", global = true)]
    pub api_url: String,
    /// How to authenticate.
    #[command(flatten)]
    pub auth: ApiAuth,
}

/// [`ApiArgs`] with the output format, for the client commands that print tables.
#[derive(Args, Debug, Clone)]
pub struct ApiOutputArgs {
    /// `table` (default) or `json`.
    #[arg(short = 'o', long, env = "HOLDFAST_OUTPUT", value_enum, default_value = "table", global = true)]
    pub output: Output,
    /// API address and authentication.
    #[command(flatten)]
    pub api: ApiArgs,
}

/// How the API client authenticates and checks the server: the token comes from
/// `--token`, else `HOLDFAST_API_TOKEN`, else `<data-dir>/admin.token`.
#[derive(Args, Debug, Clone)]
pub struct ApiAuth {
    /// API bearer token.
    #[arg(long, env = "HOLDFAST_API_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Data directory holding `admin.token` (and `tls/ca.pem` for an https URL).
    #[arg(long, env = "HOLDFAST_DATA_DIR", default_value = "./holdfast-data", global = true)]
    pub data_dir: PathBuf,
    /// CA certificate(s) (PEM) that signed the API's certificate, for an https URL;
    /// defaults to the cluster CA in `<data-dir>/tls/ca.pem`, else `<data-dir>/ca.pem`.
    #[arg(long, env = "HOLDFAST_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
}

/// `holdfast token ...`
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create an API token; its secret is printed once.
    Create {
        /// `admin`, `operator` or `reader`.
        #[arg(long)]
        role: String,
        /// Name the audit log records for calls made with it.
        #[arg(long)]
        name: String,
        /// Lifetime (e.g. `30d`, `12h`); none by default.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id, on every manager at once.
    Revoke {
        /// Token id.
        id: String,
    },
    /// Print the join token of a role (from the first manager's data dir,
    /// `--data-dir`), or with `--rotate` make a new one through the API (older ones of
    /// the role stop working; nodes already joined keep theirs).
    Join {
        /// `worker` or `manager`.
        #[arg(long, value_parser = parse_role)]
        role: crate::net::pki::Role,
        /// Make a new token instead of printing the current one.
        #[arg(long)]
        rotate: bool,
        /// With `--rotate`: the token expires after this long (e.g. `1h`).
        #[arg(long, value_parser = humantime::parse_duration, requires = "rotate")]
        ttl: Option<std::time::Duration>,
        /// With `--rotate`: the token admits at most this many nodes.
        #[arg(long, requires = "rotate")]
        uses: Option<u64>,
    },
}

/// `holdfast cluster ...`
#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// The cluster CA: where a rotation stands, or rotate it.
    Ca {
        /// Status when absent.
        #[command(subcommand)]
        cmd: Option<CaCommand>,
    },
    /// The managers: name, addresses, role, version, how far each has applied.
    Members,
    /// Back up or restore the whole replicated state.
    Snapshot {
        /// Save or restore.
        #[command(subcommand)]
        cmd: SnapshotCommand,
    },
}

/// `holdfast cluster ca ...`
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Start a CA rotation: a new CA signs from now on, both are trusted until
    /// `--finish`, every node renews onto the new one by itself, and new join tokens
    /// (pinned to the new CA) replace the old ones, which are refused from now on. The
    /// new tokens are printed and written to `join-<role>.token` in `--data-dir` when
    /// those files exist.
    Rotate {
        /// Retire the old CA (refused while a node still holds a certificate of it).
        #[arg(long)]
        finish: bool,
        /// With `--finish`: retire it even so (such nodes then need a new join token).
        #[arg(long, requires = "finish")]
        force: bool,
    },
}

/// `holdfast cluster snapshot ...`
#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Stream an online, consistent snapshot from the API into FILE (checked, then
    /// renamed into place).
    Save {
        /// Where to write it.
        file: PathBuf,
    },
    /// Seed a new first manager's data directory (`--data-dir`; its `manager/` part
    /// must not exist yet) from FILE; then start it with
    /// `holdfast agent --manager --node-id ID --data-dir DIR` (no --bootstrap).
    Restore {
        /// A file written by `snapshot save`.
        file: PathBuf,
        /// Node name of the new manager (keep the old leader's name and address so
        /// workers reconnect unchanged).
        #[arg(long)]
        node_id: String,
    },
}

fn parse_role(s: &str) -> Result<crate::net::pki::Role, String> {
    crate::net::pki::Role::parse(s).ok_or_else(|| format!("role {s:?} must be worker or manager"))
}

/// Life and grace of cluster certificates (`agent` and `dev`).
#[derive(Args, Debug, Clone)]
pub struct CertArgs {
    /// Life of the cluster-port certificates this manager signs (a manager setting:
    /// the signer decides); nodes renew at two thirds of it, over the running connection.
    #[arg(long, env = "HOLDFAST_CERT_LIFETIME", value_parser = humantime::parse_duration, default_value = "30d")]
    pub cert_lifetime: std::time::Duration,
    /// How long after expiry a node that was cut off may still renew by itself.
    #[arg(long, env = "HOLDFAST_CERT_GRACE", value_parser = humantime::parse_duration, default_value = "90d")]
    pub cert_grace: std::time::Duration,
}

/// Retention of finished work and history (`agent` and `dev`; managers).
#[derive(Args, Debug, Clone)]
pub struct RetentionArgs {
    /// Finished tasks (stopped, completed, failed) are removed this long after their
    /// last change, with their placements and history; idempotency keys live as long.
    #[arg(long, env = "HOLDFAST_RETAIN", value_parser = humantime::parse_duration, default_value = "24h")]
    pub retain: std::time::Duration,
    /// Nodes `down` for longer than this are removed (`0s`: never).
    #[arg(long, env = "HOLDFAST_NODE_GC", value_parser = humantime::parse_duration, default_value = "7d")]
    pub node_gc: std::time::Duration,
    /// Audit entries older than this are removed.
    #[arg(long, env = "HOLDFAST_AUDIT_RETAIN", value_parser = humantime::parse_duration, default_value = "90d")]
    pub audit_retain: std::time::Duration,
    /// At most this many audit entries are kept (the newest).
    #[arg(long, env = "HOLDFAST_AUDIT_MAX_ROWS", default_value_t = 1_000_000)]
    pub audit_max_rows: u64,
}

impl RetentionArgs {
    /// The settings.
    pub fn retention(&self) -> crate::config::Retention {
        crate::config::Retention {
            retain: self.retain,
            node_gc: self.node_gc,
            audit_retain: self.audit_retain,
            audit_max_rows: self.audit_max_rows,
        }
    }
}

/// `holdfast image ...`
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build `holdfast/echo:<version>` and `:latest` FROM scratch from this binary.
    Echo,
    /// Push a `docker save` archive to the managers (README "Images without a
    /// registry"); workers then fetch it from them.
    Push {
        /// The archive (`docker save -o FILE NAME:TAG`), or `-` for stdin.
        #[arg(required_unless_present = "from_docker", conflicts_with = "from_docker")]
        file: Option<PathBuf>,
        /// Stream the image `NAME:TAG` from the local Docker engine instead.
        #[arg(long, env = "HOLDFAST_FROM_DOCKER")]
        from_docker: Option<String>,
    },
    /// List the managers' image catalogue.
    List,
    /// Remove an image from the catalogue (admin); refused while a task uses it.
    Rm {
        /// Image reference, `NAME:TAG`.
        reference: String,
        /// Remove even when a task uses it.
        #[arg(long, env = "HOLDFAST_FORCE")]
        force: bool,
    },
}

/// `holdfast task ...`
#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Submit a TaskSpec from a JSON or TOML file (`-` for stdin; TOML when the file
    /// ends in `.toml` or is not JSON).
    Submit {
        /// Path of the spec.
        file: PathBuf,
        /// Idempotency key making retries safe.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// List tasks, newest first (every page unless `--limit`).
    List {
        /// Only tasks in this state (`running`, `pending`, `failed`, ...).
        #[arg(long)]
        state: Option<String>,
        /// Only tasks with a placement on this node.
        #[arg(long)]
        node: Option<String>,
        /// Only tasks with this name.
        #[arg(long)]
        name: Option<String>,
        /// At most this many tasks.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one task.
    Get {
        /// Task id.
        id: String,
    },
    /// Stop a task.
    Stop {
        /// Task id.
        id: String,
    },
    /// Show a task's container logs.
    Logs {
        /// Task id.
        id: String,
        /// Lines from the end to start with.
        #[arg(long, default_value_t = 200)]
        tail: usize,
        /// Keep printing new lines as the container writes them (each line once), until
        /// interrupted or the task's logs can no longer be read.
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

/// Log line format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of every long-running process (`agent`, `dev`): config file, logs, metrics.
#[derive(Args, Debug, Clone)]
pub struct ServiceArgs {
    /// TOML file with one key per long flag (`node-id = "m1"`); flags and `HOLDFAST_*`
    /// variables win over it. An unknown key is an error.
    #[arg(long, env = "HOLDFAST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log line format: `text` or `json`. Under journald, text lines carry the syslog
    /// priority and no timestamp.
    #[arg(long, env = "HOLDFAST_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter: a level (`info`, `debug`) or per-module directives
    /// (`info,openraft=warn`). Default: `HOLDFAST_LOG`, else `info,openraft=warn`.
    #[arg(long, env = "HOLDFAST_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Serve `/metrics`, `/health/live` and `/health/ready` on this loopback address
    /// too (any role; the only metrics endpoint of a worker-only process). It has no
    /// authentication, so a non-loopback address is refused.
    #[arg(long, env = "HOLDFAST_METRICS")]
    pub metrics: Option<String>,
}

impl ServiceArgs {
    /// Checks what clap cannot: `--metrics` serves without a token, so it must stay on
    /// loopback (secure by default; managers serve `/metrics` on the API with a token).
    pub fn validate(&self) -> Result<(), String> {
        match &self.metrics {
            Some(a) if !crate::manager::api::tls::is_loopback(a) => Err(format!(
                "--metrics {a}: the metrics port has no authentication, so it listens on loopback only \
                 (e.g. 127.0.0.1:9700); scrape a manager remotely through the API's /metrics with a reader token"
            )),
            _ => Ok(()),
        }
    }

    /// The node's service options.
    pub fn options(&self) -> crate::service::ServiceOptions {
        crate::service::ServiceOptions { metrics: self.metrics.clone() }
    }
}

/// `holdfast dev` flags.
#[derive(Args, Debug)]
pub struct DevArgs {
    /// Data directory.
    #[arg(long, env = "HOLDFAST_DATA_DIR", default_value = "./holdfast-data")]
    pub data_dir: PathBuf,
    /// Listen address of the HTTP API and the web UI (the UI is served at `/`).
    #[arg(long, env = "HOLDFAST_API", default_value = "127.0.0.1:7700")]
    pub api: String,
    /// Cluster listen address.
    #[arg(long, env = "HOLDFAST_CLUSTER", default_value = "127.0.0.1:7701")]
    pub cluster: String,
    /// Node name.
    #[arg(long, env = "HOLDFAST_NODE_ID", default_value = "dev")]
    pub node_id: String,
    /// Forward domain events to an `http://` URL (POST JSON batches) or a file path
    /// (append JSON lines) while this manager leads; spooled under the data dir while
    /// the sink is down.
    #[arg(long, env = "HOLDFAST_EVENT_SINK", value_parser = parse_sink)]
    pub event_sink: Option<SinkTarget>,
    /// Config file, logs and metrics.
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Certificate life and grace.
    #[command(flatten)]
    pub certs: CertArgs,
    /// Retention of finished work and history.
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// `holdfast agent` flags (the public contract, README "A cluster" and "CLI").
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Run the control plane.
    #[arg(long, env = "HOLDFAST_MANAGER")]
    pub manager: bool,
    /// Run the data plane.
    #[arg(long, env = "HOLDFAST_WORKER")]
    pub worker: bool,
    /// Node name, unique in the cluster.
    #[arg(long, env = "HOLDFAST_NODE_ID")]
    pub node_id: String,
    /// Data directory.
    #[arg(long, env = "HOLDFAST_DATA_DIR", default_value = "/var/lib/holdfast")]
    pub data_dir: PathBuf,
    /// Listen address of the HTTP API and the web UI, served at `/` (managers).
    #[arg(long, env = "HOLDFAST_API", default_value = "127.0.0.1:7700")]
    pub api: String,
    /// Cluster (Raft + worker sync) listen address (managers).
    #[arg(long, env = "HOLDFAST_CLUSTER", default_value = "127.0.0.1:7701")]
    pub cluster: String,
    /// Host (or host:port for the cluster endpoint) others use to reach this node;
    /// defaults to the listen addresses.
    #[arg(long, env = "HOLDFAST_ADVERTISE")]
    pub advertise: Option<String>,
    /// Start a new cluster with this manager as its first member.
    #[arg(long, env = "HOLDFAST_BOOTSTRAP")]
    pub bootstrap: bool,
    /// Quorum lost for good: restart this surviving manager as the only member of a new
    /// cluster that keeps all its state (tasks, nodes, tokens, CA). Wipe the other
    /// managers' data directories before they join again. Remove the flag afterwards.
    #[arg(long, env = "HOLDFAST_FORCE_NEW_CLUSTER")]
    pub force_new_cluster: bool,
    /// Cluster addresses of existing managers (comma-separated).
    #[arg(long, env = "HOLDFAST_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Node labels `k=v,k2=v2` (workers).
    #[arg(long, env = "HOLDFAST_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Placement strategy for new tasks: `binpack` (fill nodes) or `spread`. A cluster
    /// setting: give every manager the same.
    #[arg(long, env = "HOLDFAST_PLACEMENT", value_enum, default_value = "binpack")]
    pub placement: crate::manager::scheduler::Strategy,
    /// Lease a manager grants workers on each sync (managers); a cut-off worker's
    /// authority ends this long after its last successful sync.
    #[arg(long, env = "HOLDFAST_LEASE", value_parser = humantime::parse_duration, default_value = "30s")]
    pub lease: std::time::Duration,
    /// Silence after which a manager marks a worker `disconnected` (managers).
    #[arg(long, env = "HOLDFAST_HEARTBEAT_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub heartbeat_ttl: std::time::Duration,
    /// File holding a join token (`HFTKN-1-...`), for a node that has no cluster
    /// certificate yet; written by the first manager as `join-worker.token` and
    /// `join-manager.token` in its data dir.
    #[arg(long, env = "HOLDFAST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// A join token given inline (prefer `--token-file`: command lines are visible;
    /// `--token-file` wins when both are given).
    #[arg(long, env = "HOLDFAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Certificate life and grace.
    #[command(flatten)]
    pub certs: CertArgs,
    /// Retention of finished work and history.
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Forward domain events to an `http://` URL (POST JSON batches) or a file path
    /// (append JSON lines) while this manager leads (managers); spooled under the data dir while
    /// the sink is down.
    #[arg(long, env = "HOLDFAST_EVENT_SINK", value_parser = parse_sink)]
    pub event_sink: Option<SinkTarget>,
    /// Refuse writes (507) while the data dir's disk has less than this many MiB free,
    /// so a full disk is a clear error that heals itself, not a storage failure (0: off).
    #[arg(long, env = "HOLDFAST_MIN_FREE_MB", default_value_t = crate::config::DEFAULT_MIN_FREE_MB)]
    pub min_free_mb: u64,
    /// Snapshot the state and shrink the Raft log behind it every this many entries
    /// (managers). Each snapshot copies the state database; the log holds up to this
    /// many entries (~1 KB each): lower it on a small disk (README "A cluster").
    #[arg(long, env = "HOLDFAST_SNAPSHOT_EVERY", default_value_t = holdfast_raft::DEFAULT_SNAPSHOT_EVERY,
          value_parser = clap::value_parser!(u64).range(MIN_SNAPSHOT_EVERY..))]
    pub snapshot_every: u64,
    /// An image in the managers' catalogue that no task has used for this long is
    /// removed (managers; README "Images without a registry").
    #[arg(long, env = "HOLDFAST_IMAGE_RETAIN", value_parser = humantime::parse_duration, default_value = "24h")]
    pub image_retain: std::time::Duration,
    /// Cap on the bytes per second a worker spends fetching images from the managers,
    /// e.g. `2M` for a thin link (workers; suffixes K, M, G are powers of 1024).
    #[arg(long, env = "HOLDFAST_IMAGE_BANDWIDTH", value_parser = parse_bandwidth)]
    pub image_bandwidth: Option<u64>,
    /// PEM certificate (chain) the API serves over HTTPS (managers; with --api-key).
    /// Off loopback the API is always HTTPS; without this it serves a certificate the
    /// manager issues itself from the cluster CA (and renews in place).
    #[arg(long, env = "HOLDFAST_API_CERT", requires = "api_key")]
    pub api_cert: Option<PathBuf>,
    /// PEM private key of --api-cert.
    #[arg(long, env = "HOLDFAST_API_KEY", requires = "api_cert")]
    pub api_key: Option<PathBuf>,
    /// Config file, logs and metrics.
    #[command(flatten)]
    pub service: ServiceArgs,
}

/// `holdfast guard` flags. Deliberately without env twins: the guard runs inside the
/// task's container, whose environment belongs to the task.
#[derive(Args, Debug)]
pub struct GuardArgs {
    /// The deadline file the worker keeps current (it also carries the SIGTERM →
    /// SIGKILL grace).
    #[arg(long, default_value = "/.holdfast-deadline")]
    pub deadline_file: PathBuf,
    /// The app to run: the image's ENTRYPOINT + CMD (after `--`).
    #[arg(last = true)]
    pub argv: Vec<std::ffi::OsString>,
}

/// `holdfast echo` flags.
#[derive(Args, Debug)]
pub struct EchoArgs {
    /// Listen address.
    #[arg(long, env = "HOLDFAST_LISTEN", default_value = "0.0.0.0:7777")]
    pub listen: std::net::SocketAddr,
    /// Exit on its own after this long (e.g. `2s`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub exit_after: Option<std::time::Duration>,
    /// Exit code used with `--exit-after`.
    #[arg(long, default_value_t = 0)]
    pub exit_code: i32,
    /// Exit 1 when a POST body equals this.
    #[arg(long)]
    pub crash_on: Option<String>,
    /// Wait this long before listening.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub startup_delay: Option<std::time::Duration>,
    /// `GET /health` fails once this long has passed.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub fail_health_after: Option<std::time::Duration>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} must look like key=value")),
    }
}

/// Bytes per second: a whole number with an optional K, M or G suffix (powers of 1024).
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    match num.trim().parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
        Some(n) if n >= 1024 => Ok(n),
        _ => Err(format!("{s:?}: give bytes per second, at least 1K, e.g. 512K or 2M")),
    }
}

fn parse_sink(s: &str) -> Result<SinkTarget, String> {
    SinkTarget::parse(s)
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or("", |(_, p)| p)
}

/// A usable host for others to dial when we listen on a wildcard address.
fn dialable(host: &str) -> &str {
    if host == "0.0.0.0" || host == "[::]" {
        "127.0.0.1"
    } else {
        host
    }
}

impl DevArgs {
    /// The single-node configuration.
    pub fn to_config(&self) -> Config {
        Config {
            node_id: self.node_id.clone(),
            data_dir: self.data_dir.clone(),
            manager: Some(ManagerRole {
                event_sink: self.event_sink.clone().map(SinkConfig::new),
                retention: self.retention.retention(),
                ..ManagerRole::bootstrap(&self.api, &self.cluster)
            }),
            worker: Some(WorkerRole {
                managers: vec![self.cluster.clone()],
                advertise_host: dialable(host_of(&self.api)).to_string(),
                labels: BTreeMap::new(),
                resources_override: None,
                image_bandwidth: None,
            }),
            trust: crate::config::TrustSettings {
                token: None,
                cert_lifetime: self.certs.cert_lifetime,
                cert_grace: self.certs.cert_grace,
            },
        }
    }
}

impl AgentArgs {
    /// Validates the flags and builds the configuration.
    pub fn to_config(&self) -> Result<Config, String> {
        self.check_node_flags()?;
        let token = self.join_token()?;
        let adv_host = self.advertise.as_deref().map(host_of);
        let advertise_cluster = match &self.advertise {
            Some(a) if a.contains(':') => a.clone(),
            Some(h) => format!("{h}:{}", port_of(&self.cluster)),
            None => format!("{}:{}", dialable(host_of(&self.cluster)), port_of(&self.cluster)),
        };
        let advertise_api =
            format!("{}:{}", adv_host.unwrap_or_else(|| dialable(host_of(&self.api))), port_of(&self.api));
        self.check_manager_flags()?;
        let manager = self.manager.then(|| self.manager_role(advertise_cluster.clone(), advertise_api));
        let worker = if self.worker { Some(self.worker_role(adv_host, advertise_cluster)?) } else { None };
        let trust = crate::config::TrustSettings {
            token,
            cert_lifetime: self.certs.cert_lifetime,
            cert_grace: self.certs.cert_grace,
        };
        Ok(Config { node_id: self.node_id.clone(), data_dir: self.data_dir.clone(), manager, worker, trust })
    }

    /// A role, a valid node id, and a heartbeat TTL and lease that fit together.
    fn check_node_flags(&self) -> Result<(), String> {
        if !self.manager && !self.worker {
            return Err("pass --manager, --worker, or both".into());
        }
        if !crate::manager::state::valid_id(&self.node_id) {
            return Err(format!("--node-id {:?}: use 1–64 ASCII letters, digits, '-', '_' or '.'", self.node_id));
        }
        if self.heartbeat_ttl < std::time::Duration::from_millis(500) || self.lease < self.heartbeat_ttl {
            return Err(format!(
                "need --heartbeat-ttl ≥ 500ms and --lease ≥ --heartbeat-ttl (got {:?} and {:?})",
                self.heartbeat_ttl, self.lease
            ));
        }
        Ok(())
    }

    /// The join token of `--token-file` (which wins) or `--token`, checked for form.
    fn join_token(&self) -> Result<Option<String>, String> {
        let token = match (&self.token_file, &self.token) {
            (Some(tf), _) => {
                let text = std::fs::read_to_string(tf).map_err(|e| format!("--token-file {}: {e}", tf.display()))?;
                Some(text.trim().to_string())
            }
            (None, Some(t)) => Some(t.trim().to_string()),
            (None, None) => None,
        };
        if let Some(t) = &token {
            crate::net::pki::JoinToken::parse(t).map_err(|e| e.to_string())?;
        }
        Ok(token)
    }

    /// The flags that need `--manager`, and how a manager starts: a new one needs
    /// `--bootstrap` or `--join`, a restarted one neither.
    fn check_manager_flags(&self) -> Result<(), String> {
        if self.force_new_cluster && (!self.manager || self.bootstrap) {
            return Err("--force-new-cluster restarts an existing manager from its data: it needs --manager \
                        and no --bootstrap"
                .into());
        }
        if self.event_sink.is_some() && !self.manager {
            return Err("--event-sink forwards a manager's events; it needs --manager".into());
        }
        if self.manager && !self.bootstrap && self.join.is_empty() {
            // A restarted member needs neither; a fresh one needs one of them.
            let fresh = !self.data_dir.join("manager").exists();
            if fresh {
                return Err("a new manager needs --bootstrap (first manager) or --join ADDR".into());
            }
        }
        Ok(())
    }

    /// The manager role, reachable at the advertised addresses.
    fn manager_role(&self, advertise_cluster: String, advertise_api: String) -> ManagerRole {
        ManagerRole {
            api: self.api.clone(),
            cluster: self.cluster.clone(),
            advertise_cluster,
            advertise_api,
            bootstrap: self.bootstrap,
            join: self.join.clone(),
            strategy: self.placement,
            lease: self.lease,
            heartbeat_ttl: self.heartbeat_ttl,
            event_sink: self.event_sink.clone().map(SinkConfig::new),
            force_new_cluster: self.force_new_cluster,
            min_free_mb: self.min_free_mb,
            snapshot_every: self.snapshot_every,
            image_retain: self.image_retain,
            api_tls_files: self.api_cert.clone().zip(self.api_key.clone()),
            retention: self.retention.retention(),
        }
    }

    /// The worker role: it syncs with the `--join` managers, or with this node's own
    /// manager when it is one.
    fn worker_role(&self, adv_host: Option<&str>, advertise_cluster: String) -> Result<WorkerRole, String> {
        let managers = if self.join.is_empty() {
            if !self.manager {
                return Err("a worker needs --join with manager cluster addresses".into());
            }
            vec![advertise_cluster]
        } else {
            self.join.clone()
        };
        Ok(WorkerRole {
            managers,
            advertise_host: adv_host.unwrap_or("127.0.0.1").to_string(),
            labels: self.labels.iter().cloned().collect(),
            resources_override: None,
            image_bandwidth: self.image_bandwidth,
        })
    }
}
