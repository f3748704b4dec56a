//! The container runtime seen by the worker: a small trait, its one real
//! implementation on Docker (`docker.rs`, the only file that imports bollard), and an
//! in-memory fake (`fake.rs`) for scale tests of scheduling.

use std::collections::BTreeMap;
use std::time::Duration;

pub mod docker;
pub mod fake;
pub mod guarded;

/// Label keys holdfast puts on every container it creates.
pub mod labels {
    /// Node name of the worker that owns the container.
    pub const NODE: &str = "holdfast.node";
    /// Task id.
    pub const TASK: &str = "holdfast.task";
    /// Placement id.
    pub const PLACEMENT: &str = "holdfast.placement";
    /// Fence (Raft log index that created the placement), decimal.
    pub const FENCE: &str = "holdfast.fence";
}

/// One port mapping; `host == 0` asks the engine for a free host port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMap {
    /// TCP port inside the container.
    pub container: u16,
    /// Host port; 0 picks a free one.
    pub host: u16,
}

/// Everything needed to create one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Container name (unique on the engine).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Replaces the image's CMD when non-empty.
    pub command: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Published TCP ports.
    pub ports: Vec<PortMap>,
    /// CPU weight in millicores, applied as Docker CPU shares, not a quota (0 = default
    /// weight; ARCHITECTURE.md "CPU is a weight, memory a limit").
    pub cpu_millis: u64,
    /// Memory limit in MiB (0 = unlimited).
    pub memory_mb: u64,
    /// Labels (see [`labels`]).
    pub labels: BTreeMap<String, String>,
    /// Run under the in-container guard (offline mode `exclusive` or `offline.guard`).
    pub guard: Option<GuardSpec>,
}

/// How a guarded container starts (see `crate::guard` and ARCHITECTURE.md, "The fence
/// inside the container").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardSpec {
    /// The first deadline, written into the container before it starts; the worker
    /// moves it on every lease renewal.
    pub deadline: crate::guard::Deadline,
}

/// Coarse container state as reported by the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    /// Created, never started.
    Created,
    /// Running (or restarting/paused: the process exists).
    Running,
    /// Exited with this code.
    Exited {
        /// Process exit code.
        code: i64,
    },
    /// Anything else the engine says (dead, removing...), verbatim.
    Other(String),
}

/// What the engine says about one container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Engine container id.
    pub id: String,
    /// Container name without the leading slash.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Current state.
    pub state: ContainerState,
    /// Published ports as (container port, host port); host port known once started.
    pub ports: Vec<(u16, u16)>,
    /// Error text the engine recorded for the last start, if any.
    pub error: Option<String>,
    /// The container's IP on its engine network, when it has one; health probes dial
    /// it on the container port so unpublished ports can be checked too.
    pub ip: Option<String>,
}

/// Facts about the engine used for resource reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    /// Docker's data root (where images and layers live), for disk checks.
    pub root_dir: String,
    /// Engine version string.
    pub version: String,
}

/// Failures of the runtime, sorted by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be reached or timed out, or the guard in front of it
    /// turned the call away: not the task's fault, retry later. The kind is kept.
    #[error("container engine unavailable: {0}")]
    Unavailable(EngineUnavailable),
    /// The image is absent and cannot be obtained (engine's reason included).
    #[error("image {image} unavailable: {reason}")]
    ImageUnavailable {
        /// Image reference.
        image: String,
        /// The engine's reason.
        reason: String,
    },
    /// The engine refused the request for this task (bad spec, port taken, ...).
    #[error("{0}")]
    Rejected(String),
    /// No such container.
    #[error("no such container {0}")]
    NotFound(String),
}

impl RuntimeError {
    /// The engine's own failure, in its words: [`EngineUnavailable::Engine`].
    pub fn engine(message: impl Into<String>) -> Self {
        RuntimeError::Unavailable(EngineUnavailable::Engine(message.into()))
    }
}

/// Why the container engine could not be used: its own failure, or the worker's guard
/// (`guarded.rs`) turning the call away before or while it ran. Callers and tests
/// match on the variant, never on the text.
#[derive(Debug, thiserror::Error)]
pub enum EngineUnavailable {
    /// The engine failed or did not answer within its own per-call timeout.
    #[error("{0}")]
    Engine(String),
    /// The engine's breaker is open: the call did not run.
    #[error("dependency {name} is failing; retry in {retry_in:?}")]
    BreakerOpen {
        /// Breaker name (`guarded::ENGINE`).
        name: String,
        /// When a probe may be admitted (a hint).
        retry_in: Duration,
    },
    /// Every slot for this kind of call is taken: the call did not run.
    #[error(transparent)]
    BulkheadFull(#[from] crate::resilience::BulkheadFull),
    /// The guard's backstop timeout passed (counted as an engine failure).
    #[error(transparent)]
    TimedOut(#[from] crate::resilience::TimedOut),
    /// The call panicked inside the guard (counted as an engine failure).
    #[error("call through {name} panicked: {message}")]
    Panicked {
        /// Breaker name.
        name: String,
        /// Panic message.
        message: String,
    },
}

/// A `docker load` archive as it is assembled (see `worker::images`).
pub type LoadStream = std::pin::Pin<Box<dyn futures::Stream<Item = bytes::Bytes> + Send>>;

/// The operations the worker needs from a container engine. Every call is bounded by
/// a timeout inside the implementation.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Checks the engine answers.
    async fn ping(&self) -> Result<EngineInfo, RuntimeError>;
    /// Makes sure `image` is present: already there; or `holdfast/echo:*`, built from
    /// this process's own static binary; or pulled. Absent and unobtainable →
    /// [`RuntimeError::ImageUnavailable`].
    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError>;
    /// Size in bytes of a local image, `None` when absent.
    async fn image_size(&self, image: &str) -> Result<Option<u64>, RuntimeError>;
    /// Creates (restart policy `no`) and starts a container; returns it inspected.
    /// On a failed start the created container is removed again.
    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError>;
    /// Starts an existing (exited) container again; used for local restarts.
    async fn start(&self, id: &str) -> Result<ContainerInfo, RuntimeError>;
    /// Inspects one container; `Ok(None)` when it does not exist.
    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError>;
    /// Lists all containers (running or not) carrying every given label `key=value`.
    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<ContainerInfo>, RuntimeError>;
    /// Stops with SIGTERM, then kills after `grace`. Absent or already stopped is fine.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError>;
    /// Removes a (stopped) container, forcing if needed. Absent is fine.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// The last `tail` lines of stdout and stderr, interleaved as the engine stores them.
    async fn logs(&self, id: &str, tail: usize) -> Result<String, RuntimeError>;
    /// Timestamped lines (`<RFC 3339 time> <line>`) written after the engine timestamp
    /// `after` (`""`: the last `tail` lines), for following a container's logs.
    async fn logs_after(&self, id: &str, tail: usize, after: &str) -> Result<String, RuntimeError> {
        let _ = (id, tail, after);
        Err(RuntimeError::Rejected("this engine cannot follow logs".into()))
    }
    /// Makes sure guarded containers can be created here (the guard binary is on the
    /// engine); slow the first time per engine and binary, instant after.
    async fn ensure_guard(&self) -> Result<(), RuntimeError>;
    /// Writes a guarded container's deadline into it through the engine, so its guard
    /// stops the task then unless the deadline moves again.
    async fn set_deadline(&self, id: &str, deadline: crate::guard::Deadline) -> Result<(), RuntimeError>;
    /// Ids (`sha256:` config digests) of the images the engine holds.
    async fn image_ids(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(Vec::new())
    }
    /// The layer chains (`RootFS.Layers`, bottom first) of the images the engine
    /// holds: a layer whose whole chain below it is here need not be fetched again.
    async fn image_chains(&self) -> Result<Vec<Vec<String>>, RuntimeError> {
        Ok(Vec::new())
    }
    /// Loads a `docker save`-format archive, read as it streams.
    async fn load_image(&self, archive: LoadStream) -> Result<(), RuntimeError> {
        drop(archive);
        Err(RuntimeError::Rejected("this engine cannot load images".into()))
    }
}
