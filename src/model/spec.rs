//! `TaskSpec`: what a user asks for, with parsing that names the offending field and
//! validation of every limit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A field-level problem with user input; becomes a 400 naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Dotted path of the offending field (`resources.memory_mb`), or empty for the body.
    pub field: String,
    /// What is wrong, with the value, and what is allowed.
    pub message: String,
}

impl SpecError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError { field: field.into(), message: message.into() }
    }
}

/// Whether a task runs until stopped or until it finishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Long-running; restarted when it exits.
    #[default]
    Service,
    /// Runs to completion; exit code 0 means `completed`.
    Batch,
}

/// One published TCP port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Port inside the container (1–65535).
    pub container: u16,
    /// Host port; 0 (default) lets the engine pick a free one.
    #[serde(default)]
    pub host: u16,
}

/// Resources reserved for the task on its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in thousandths of a core.
    #[serde(default = "default_cpu")]
    pub cpu_millis: u64,
    /// Memory limit in MiB.
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    /// Scratch disk in MiB, on top of the image.
    #[serde(default)]
    pub disk_mb: u64,
}

fn default_cpu() -> u64 {
    100
}
fn default_memory() -> u64 {
    64
}

impl Default for Resources {
    fn default() -> Self {
        Resources { cpu_millis: default_cpu(), memory_mb: default_memory(), disk_mb: 0 }
    }
}

/// When the worker restarts an exited container of the same placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Never restart.
    No,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Restart after any exit.
    Always,
}

/// Local restart policy (worker-side, within one placement).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    /// When to restart.
    pub policy: RestartMode,
    /// Restarts allowed before the placement is `failed`.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First backoff delay; doubles per attempt, with full jitter.
    #[serde(default = "default_delay")]
    pub delay_ms: u64,
    /// Cap on the backoff delay.
    #[serde(default = "default_max_delay")]
    pub max_delay_ms: u64,
}

fn default_attempts() -> u32 {
    3
}
fn default_delay() -> u64 {
    1_000
}
fn default_max_delay() -> u64 {
    60_000
}

/// HTTP health probe target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// Request path.
    pub path: String,
    /// Container port.
    pub port: u16,
}

/// TCP health probe target: a successful connect is healthy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpProbe {
    /// Container port.
    pub port: u16,
}

/// Health checking of a running container; exactly one of `http` and `tcp` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// HTTP GET probe; 2xx is healthy.
    #[serde(default)]
    pub http: Option<HttpProbe>,
    /// TCP connect probe. Omitted when unset so specs stored before it existed keep
    /// their digest (idempotency keys compare digests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    /// Probe period.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Probe timeout.
    #[serde(default = "default_probe_timeout")]
    pub timeout_ms: u64,
    /// Consecutive failures that count as a crash.
    #[serde(default = "default_failures")]
    pub failures: u32,
}

fn default_interval() -> u64 {
    2_000
}
fn default_probe_timeout() -> u64 {
    1_000
}
fn default_failures() -> u32 {
    3
}

impl OfflineMode {
    /// Lower-case name as in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            OfflineMode::Keep => "keep",
            OfflineMode::Finish => "finish",
            OfflineMode::Exclusive => "exclusive",
        }
    }
}

/// What a worker does with the task once its lease has expired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OfflineMode {
    /// Keep running and restarting locally.
    Keep,
    /// Let running work finish, start nothing new.
    Finish,
    /// Stop at lease expiry (fail-closed).
    Exclusive,
}

/// Manager-side rescheduling: a failed placement is replaced by a new one (new node
/// when possible, higher fence) after an exponential delay, a limited number of times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReschedulePolicy {
    /// Replacements allowed after the first placement fails (0 disables).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Delay before the first replacement; doubles each time.
    #[serde(default = "default_reschedule_delay")]
    pub delay_ms: u64,
    /// Cap on the delay.
    #[serde(default = "default_reschedule_max_delay")]
    pub max_delay_ms: u64,
}

fn default_reschedule_delay() -> u64 {
    5_000
}
fn default_reschedule_max_delay() -> u64 {
    300_000
}

impl Default for ReschedulePolicy {
    fn default() -> Self {
        ReschedulePolicy {
            attempts: default_attempts(),
            delay_ms: default_reschedule_delay(),
            max_delay_ms: default_reschedule_max_delay(),
        }
    }
}

impl ReschedulePolicy {
    /// Delay before replacement number `n` (0-based): exponential, capped.
    pub fn delay_before(&self, n: u32) -> u64 {
        self.delay_ms.saturating_mul(1u64 << n.min(32)).min(self.max_delay_ms)
    }
}

/// Behaviour while the worker cannot reach a manager.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineSpec {
    /// Mode after lease expiry; default `keep` for services, `finish` for batch.
    pub mode: Option<OfflineMode>,
    /// After this long without the node, the manager may replace the placement.
    #[serde(default = "default_lost_after")]
    pub lost_after_ms: u64,
    /// Whether a lost placement is replaced on another node.
    #[serde(default = "default_true")]
    pub replace: bool,
    /// Run the task under the in-container guard, which stops it when the worker's lease
    /// runs out even if the worker itself is dead or hung. Always on for `exclusive`
    /// (which refuses `false`); off by default for `keep` and `finish`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<bool>,
}

fn default_lost_after() -> u64 {
    60_000
}
fn default_true() -> bool {
    true
}

/// Placement constraints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// Node labels that must all match exactly.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What the user submits with `POST /v1/tasks`. Only `image` is required.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Human name; defaults to the image's last path segment.
    #[serde(default)]
    pub name: Option<String>,
    /// Image reference.
    #[serde(default)]
    pub image: String,
    /// Replaces the image's CMD when non-empty.
    #[serde(default)]
    pub command: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Reserved resources.
    #[serde(default)]
    pub resources: Resources,
    /// `service` or `batch`.
    #[serde(default)]
    pub kind: Kind,
    /// Local restart policy; defaults depend on `kind`.
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
    /// Health probe.
    #[serde(default)]
    pub health: Option<HealthSpec>,
    /// Offline behaviour.
    #[serde(default)]
    pub offline: Option<OfflineSpec>,
    /// Placement constraints.
    #[serde(default)]
    pub constraints: Constraints,
    /// Manager-side rescheduling of failed placements.
    #[serde(default)]
    pub reschedule: Option<ReschedulePolicy>,
}

/// Largest request body accepted for a spec.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

impl TaskSpec {
    /// Parses JSON, naming the field on a type error or an unknown field.
    pub fn from_json(body: &[u8]) -> Result<TaskSpec, SpecError> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        // `image`, the one required field, defaults to empty so `validate` names it:
        // every other error's path names its field, and no message is parsed.
        let spec: TaskSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            SpecError::new(field, e.into_inner().to_string())
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every limit; the first violation wins.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.check_image_and_name()?;
        self.check_command_and_env()?;
        self.check_ports_and_resources()?;
        self.check_restart()?;
        self.check_health()?;
        self.check_reschedule_and_offline()?;
        Ok(())
    }

    /// Limits of the image reference and the name.
    fn check_image_and_name(&self) -> Result<(), SpecError> {
        let img = self.image.trim();
        if img.is_empty() {
            return Err(SpecError::new("image", "must not be empty, e.g. \"holdfast/echo:latest\""));
        }
        if img.len() > 255 || img.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SpecError::new(
                "image",
                format!("{:?} is not a valid image reference (≤ 255 chars, no spaces)", self.image),
            ));
        }
        if let Some(name) = &self.name {
            let ok = !name.is_empty()
                && name.len() <= 63
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(SpecError::new(
                    "name",
                    format!("{name:?} must be 1–63 chars of letters, digits, '-', '_' or '.'"),
                ));
            }
        }
        Ok(())
    }

    /// Limits of the command line and the environment.
    fn check_command_and_env(&self) -> Result<(), SpecError> {
        if self.command.len() > 256 || self.command.iter().any(|a| a.len() > 4096) {
            return Err(SpecError::new("command", "at most 256 arguments of at most 4096 bytes each"));
        }
        if self.env.len() > 256 {
            return Err(SpecError::new("env", format!("{} variables; at most 256", self.env.len())));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') || v.len() > 32_768 {
                return Err(SpecError::new(
                    format!("env.{k}"),
                    "names must be non-empty without '=' or NUL; values ≤ 32 KiB without NUL",
                ));
            }
        }
        Ok(())
    }

    /// Limits of published ports and reserved resources.
    fn check_ports_and_resources(&self) -> Result<(), SpecError> {
        if self.ports.len() > 64 {
            return Err(SpecError::new("ports", "at most 64 ports"));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.container == 0 {
                return Err(SpecError::new(format!("ports[{i}].container"), "must be 1–65535"));
            }
        }
        let r = &self.resources;
        if r.cpu_millis == 0 || r.cpu_millis > 1_024_000 {
            return Err(SpecError::new(
                "resources.cpu_millis",
                format!("{} is out of range 1–1024000 (thousandths of a core)", r.cpu_millis),
            ));
        }
        if r.memory_mb < 4 || r.memory_mb > 16 * 1024 * 1024 {
            return Err(SpecError::new(
                "resources.memory_mb",
                format!("{} is out of range 4–16777216 MiB (Docker needs at least 4)", r.memory_mb),
            ));
        }
        if r.disk_mb > 64 * 1024 * 1024 {
            return Err(SpecError::new("resources.disk_mb", format!("{} exceeds 67108864 MiB", r.disk_mb)));
        }
        Ok(())
    }

    /// Limits of the local restart policy.
    fn check_restart(&self) -> Result<(), SpecError> {
        if let Some(rp) = &self.restart {
            if rp.max_attempts > 10_000 {
                return Err(SpecError::new("restart.max_attempts", "at most 10000"));
            }
            if rp.delay_ms == 0 || rp.delay_ms > rp.max_delay_ms || rp.max_delay_ms > 3_600_000 {
                return Err(SpecError::new(
                    "restart.delay_ms",
                    format!("need 0 < delay_ms ({}) ≤ max_delay_ms ({}) ≤ 3600000", rp.delay_ms, rp.max_delay_ms),
                ));
            }
        }
        Ok(())
    }

    /// Limits of the health probe.
    fn check_health(&self) -> Result<(), SpecError> {
        if let Some(h) = &self.health {
            if h.interval_ms < 100 || h.timeout_ms == 0 || h.timeout_ms > h.interval_ms || h.failures == 0 {
                return Err(SpecError::new(
                    "health",
                    "need interval_ms ≥ 100, 0 < timeout_ms ≤ interval_ms, failures ≥ 1",
                ));
            }
            match (&h.http, &h.tcp) {
                (Some(p), None) => {
                    if p.port == 0 || !p.path.starts_with('/') || p.path.len() > 2048 {
                        return Err(SpecError::new(
                            "health.http",
                            "port must be 1–65535 and path start with '/' (at most 2048 bytes)",
                        ));
                    }
                }
                (None, Some(p)) => {
                    if p.port == 0 {
                        return Err(SpecError::new("health.tcp.port", "must be 1–65535"));
                    }
                }
                _ => {
                    return Err(SpecError::new(
                        "health",
                        "set exactly one probe: {\"http\":{\"path\",\"port\"}} or {\"tcp\":{\"port\"}}",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Limits of rescheduling and offline behaviour.
    fn check_reschedule_and_offline(&self) -> Result<(), SpecError> {
        if let Some(r) = &self.reschedule {
            if r.attempts > 1_000 || r.delay_ms > r.max_delay_ms || r.max_delay_ms > 24 * 3_600_000 {
                return Err(SpecError::new(
                    "reschedule",
                    format!(
                        "need attempts ≤ 1000 and delay_ms ({}) ≤ max_delay_ms ({}) ≤ 86400000",
                        r.delay_ms, r.max_delay_ms
                    ),
                ));
            }
        }
        if let Some(o) = &self.offline {
            if o.lost_after_ms < 1_000 || o.lost_after_ms > 30 * 24 * 3_600_000 {
                return Err(SpecError::new("offline.lost_after_ms", "must be 1000 ms to 30 days"));
            }
            if o.guard == Some(false) && self.offline_mode() == OfflineMode::Exclusive {
                return Err(SpecError::new(
                    "offline.guard",
                    "offline mode exclusive always runs under the guard; drop `guard` or set it to true",
                ));
            }
        }
        Ok(())
    }

    /// The task's display name.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let last = self.image.rsplit('/').next().unwrap_or(&self.image);
            last.split([':', '@']).next().unwrap_or(last).to_string()
        })
    }

    /// The effective restart policy (explicit, or the default for the kind).
    pub fn restart_policy(&self) -> RestartPolicy {
        self.restart.clone().unwrap_or(RestartPolicy {
            policy: match self.kind {
                Kind::Service => RestartMode::Always,
                Kind::Batch => RestartMode::OnFailure,
            },
            max_attempts: default_attempts(),
            delay_ms: default_delay(),
            max_delay_ms: default_max_delay(),
        })
    }

    /// The effective reschedule policy.
    pub fn reschedule_policy(&self) -> ReschedulePolicy {
        self.reschedule.clone().unwrap_or_default()
    }

    /// How long a disconnected node may hold this task before it counts as lost.
    pub fn lost_after_ms(&self) -> u64 {
        self.offline.as_ref().map_or_else(default_lost_after, |o| o.lost_after_ms)
    }

    /// Whether a lost placement is replaced elsewhere.
    pub fn replace_when_lost(&self) -> bool {
        self.offline.as_ref().is_none_or(|o| o.replace)
    }

    /// The effective offline mode.
    pub fn offline_mode(&self) -> OfflineMode {
        self.offline.as_ref().and_then(|o| o.mode).unwrap_or(match self.kind {
            Kind::Service => OfflineMode::Keep,
            Kind::Batch => OfflineMode::Finish,
        })
    }

    /// Whether placements of this task run under the in-container guard: always for
    /// `exclusive`, otherwise only when `offline.guard` asks for it.
    pub fn guarded(&self) -> bool {
        self.offline_mode() == OfflineMode::Exclusive || self.offline.as_ref().and_then(|o| o.guard) == Some(true)
    }

    /// A stable digest of the canonical JSON, to compare specs under one idempotency key.
    pub fn digest(&self) -> String {
        Self::digest_of_json(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// [`TaskSpec::digest`] of a spec already serialized with `serde_json`, so a caller
    /// that stores the JSON serializes it once.
    pub fn digest_of_json(json: &[u8]) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(json);
        d.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(body: &str, expect: Result<(), &str>) {
        match (TaskSpec::from_json(body.as_bytes()), expect) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(field)) => assert_eq!(e.field, field, "body {body}: {e}"),
            (got, want) => panic!("body {body}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parsing_names_the_field() {
        check(r#"{"image":"holdfast/echo:latest"}"#, Ok(()));
        check(r#"{}"#, Err("image"));
        check(r#"{"image":""}"#, Err("image"));
        check(r#"{"image":"a","bogus":1}"#, Err("bogus"));
        check(r#"{"image":"a","resources":{"memory_mb":-1}}"#, Err("resources.memory_mb"));
        check(r#"{"image":"a","resources":{"memory_mb":0}}"#, Err("resources.memory_mb"));
        check(r#"{"image":"a","resources":{"cpu_millis":0}}"#, Err("resources.cpu_millis"));
        check(r#"{"image":"a","resources":{"gpus":1}}"#, Err("resources.gpus"));
        check(r#"{"image":"a","ports":[{"container":0}]}"#, Err("ports[0].container"));
        check(r#"{"image":"a","ports":[{"container":70000}]}"#, Err("ports[0].container"));
        check(r#"{"image":"a","kind":"cron"}"#, Err("kind"));
        check(r#"{"image":"a","name":"bad name"}"#, Err("name"));
        check(r#"{"image":"a","restart":{"policy":"always","delay_ms":5,"max_delay_ms":1}}"#, Err("restart.delay_ms"));
        check(r#"not json"#, Err(""));
    }

    #[test]
    fn health_needs_exactly_one_probe() {
        check(r#"{"image":"a","health":{"http":{"path":"/health","port":7777}}}"#, Ok(()));
        check(r#"{"image":"a","health":{"tcp":{"port":7777},"interval_ms":300,"timeout_ms":200}}"#, Ok(()));
        check(r#"{"image":"a","health":{}}"#, Err("health"));
        check(r#"{"image":"a","health":{"http":{"path":"/","port":1},"tcp":{"port":1}}}"#, Err("health"));
        check(r#"{"image":"a","health":{"tcp":{"port":0}}}"#, Err("health.tcp.port"));
        check(r#"{"image":"a","health":{"tcp":{"port":1,"host":"x"}}}"#, Err("health.tcp.host"));
        check(r#"{"image":"a","health":{"http":{"path":"health","port":1}}}"#, Err("health.http"));
        check(r#"{"image":"a","health":{"tcp":{"port":1},"timeout_ms":5000}}"#, Err("health"));
    }

    #[test]
    fn defaults_follow_kind() {
        let s = TaskSpec::from_json(br#"{"image":"x/y:1","kind":"batch"}"#).unwrap();
        assert_eq!(s.restart_policy().policy, RestartMode::OnFailure);
        assert_eq!(s.offline_mode(), OfflineMode::Finish);
        assert_eq!(s.display_name(), "y");
        let s = TaskSpec::from_json(br#"{"image":"x/y:1"}"#).unwrap();
        assert_eq!(s.restart_policy().policy, RestartMode::Always);
        assert_eq!(s.offline_mode(), OfflineMode::Keep);
    }

    #[test]
    fn guard_is_always_on_for_exclusive_and_asked_for_otherwise() {
        let guarded = |json: &str| TaskSpec::from_json(json.as_bytes()).unwrap().guarded();
        assert!(guarded(r#"{"image":"a","offline":{"mode":"exclusive"}}"#));
        assert!(guarded(r#"{"image":"a","offline":{"mode":"exclusive","guard":true}}"#));
        assert!(!guarded(r#"{"image":"a"}"#));
        assert!(!guarded(r#"{"image":"a","kind":"batch"}"#));
        assert!(!guarded(r#"{"image":"a","offline":{"mode":"keep","guard":false}}"#));
        assert!(guarded(r#"{"image":"a","offline":{"mode":"keep","guard":true}}"#));
        assert!(guarded(r#"{"image":"a","kind":"batch","offline":{"guard":true}}"#));
        check(r#"{"image":"a","offline":{"mode":"exclusive","guard":false}}"#, Err("offline.guard"));
        check(r#"{"image":"a","offline":{"guard":"yes"}}"#, Err("offline.guard"));
        // Additive: a spec without the field keeps its digest.
        let plain = TaskSpec::from_json(br#"{"image":"a","offline":{"mode":"keep"}}"#).unwrap();
        assert!(!serde_json::to_string(&plain).unwrap().contains("guard"));
    }

    #[test]
    fn digest_is_stable_and_discriminating() {
        let a = TaskSpec::from_json(br#"{"image":"a"}"#).unwrap();
        let b = TaskSpec::from_json(br#"{"image":"a","env":{}}"#).unwrap();
        let c = TaskSpec::from_json(br#"{"image":"b"}"#).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), c.digest());
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(TaskSpec::digest_of_json(json.as_bytes()), a.digest());
    }
}
