//! The Docker implementation of [`Runtime`](super::Runtime); the only file that imports bollard.
//!
//! Every engine call is wrapped in its own `tokio::time::timeout` (see [`DockerTimeouts`]):
//! a hung dockerd must surface as [`RuntimeError::Unavailable`], never as a stuck worker.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bollard::container::{
    Config, CreateContainerOptions, InspectContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StartContainerOptions, StopContainerOptions, UploadToContainerOptions,
};
use bollard::errors::Error as DockerError;
use bollard::image::{BuildImageOptions, CreateImageOptions, TagImageOptions};
use bollard::models::{
    ContainerInspectResponse, ContainerStateStatusEnum, HostConfig, Mount, MountTypeEnum, MountVolumeOptions,
    NetworkSettings, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::Docker;
use futures::{StreamExt, TryStreamExt};

use super::{ContainerInfo, ContainerSpec, ContainerState, EngineInfo, Runtime, RuntimeError};
use crate::guard::{DEADLINE_DIR, DEADLINE_NAME, GUARD_BIN, GUARD_DIR};

/// Repository of the echo image every worker can build from its own binary.
pub const ECHO_REPOSITORY: &str = "holdfast/echo";

/// Repository of the image that carries only the guard binary; tagged with the first 16
/// hex digits of the binary's SHA-256, so an upgraded worker uses a new one.
pub const GUARD_REPOSITORY: &str = "holdfast/guard";

/// Label on the guard volume's marker container (value: the binary's digest prefix).
pub const GUARD_LABEL: &str = "holdfast.guard";

/// Where the guard image keeps the binary; the volume is mounted there once, empty, so
/// the engine copies the binary into it.
const GUARD_IMAGE_DIR: &str = "/hf";

/// Where the echo image's entrypoint comes from unless configured otherwise.
const SELF_EXE: &str = "/proc/self/exe";

/// How many containers `list` inspects at once; enough to hide latency, few enough not
/// to flood a busy engine.
const LIST_INSPECT_CONCURRENCY: usize = 8;

/// Upper bounds for each kind of engine call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerTimeouts {
    /// Connecting and negotiating the API version.
    pub connect: Duration,
    /// Inspect, list, info, image inspect: cheap reads.
    pub inspect: Duration,
    /// Creating a container.
    pub create: Duration,
    /// Starting a container (network and port setup happen here).
    pub start: Duration,
    /// Added to the caller's grace period for `stop` (Docker kills after the grace).
    pub stop_extra: Duration,
    /// Removing a container.
    pub remove: Duration,
    /// Fetching logs.
    pub logs: Duration,
    /// Building the echo image (the context carries the whole binary).
    pub build: Duration,
    /// Pulling an image from a registry.
    pub pull: Duration,
}

impl Default for DockerTimeouts {
    fn default() -> Self {
        DockerTimeouts {
            connect: Duration::from_secs(10),
            inspect: Duration::from_secs(10),
            create: Duration::from_secs(30),
            start: Duration::from_secs(30),
            stop_extra: Duration::from_secs(10),
            remove: Duration::from_secs(30),
            logs: Duration::from_secs(10),
            build: Duration::from_secs(120),
            pull: Duration::from_secs(300),
        }
    }
}

/// Settings of [`DockerRuntime`].
#[derive(Clone, Debug)]
pub struct DockerConfig {
    /// Per-call upper bounds.
    pub timeouts: DockerTimeouts,
    /// The static binary copied into the echo image; tests point it at the built
    /// `holdfast` because their own `/proc/self/exe` is the test harness.
    pub self_binary: PathBuf,
    /// Unix socket of the engine; `None` follows `DOCKER_HOST` or the default socket.
    /// Tests point it at a fault-injecting proxy.
    pub socket: Option<PathBuf>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig { timeouts: DockerTimeouts::default(), self_binary: PathBuf::from(SELF_EXE), socket: None }
    }
}

/// Docker engine client with per-call timeouts.
pub struct DockerRuntime {
    /// The bollard client, version-negotiated.
    docker: Docker,
    /// Timeouts and the echo binary source.
    config: DockerConfig,
    /// Held while building the echo image, so simultaneous placements build it once.
    echo_build: tokio::sync::Mutex<()>,
    /// How many echo image builds this runtime has completed; observable for metrics and
    /// for tests that check concurrent callers share one build.
    echo_builds: AtomicU64,
    /// SHA-256 of the binary the echo image is built from, once computed.
    self_digest: tokio::sync::OnceCell<String>,
    /// Name of the volume holding the guard binary, once it is ready on this engine.
    guard_volume: tokio::sync::OnceCell<String>,
}

/// Image label recording which binary an echo image was built from: an image left by
/// another build of holdfast (same version tag, other code) is rebuilt, not trusted.
pub const ECHO_BINARY_LABEL: &str = "holdfast.binary.sha256";

/// A parsed image reference: enough to tell the echo image apart and to pull one tag.
#[derive(Debug, PartialEq, Eq)]
struct ImageRef<'a> {
    /// Everything before the tag or digest.
    repository: &'a str,
    /// The tag, if any (no digest).
    tag: Option<&'a str>,
    /// Whether it is pinned by digest (`@sha256:…`).
    digest: bool,
}

impl<'a> ImageRef<'a> {
    /// Splits `repo[:tag][@digest]`; a `:` before the last `/` is a registry port.
    fn parse(image: &'a str) -> Self {
        if let Some((repository, _)) = image.split_once('@') {
            return ImageRef { repository, tag: None, digest: true };
        }
        let name_start = image.rfind('/').map_or(0, |slash| slash + 1);
        match image[name_start..].rfind(':') {
            Some(colon) => ImageRef {
                repository: &image[..name_start + colon],
                tag: Some(&image[name_start + colon + 1..]),
                digest: false,
            },
            None => ImageRef { repository: image, tag: None, digest: false },
        }
    }

    /// The tag to use; Docker's own default, and without it a pull would fetch every tag.
    fn tag_or_latest(&self) -> &'a str {
        self.tag.unwrap_or("latest")
    }

    /// Whether this worker can build the image itself.
    fn is_echo(&self) -> bool {
        !self.digest && self.repository == ECHO_REPOSITORY
    }
}

/// Which way an engine refusal (an HTTP error status other than 404) goes.
#[derive(Clone, Copy)]
enum Refusal {
    /// The request was about this task (create/start/stop/remove): the engine's message
    /// is the task's problem → [`RuntimeError::Rejected`].
    Task,
    /// A read failed: the engine is in trouble → [`RuntimeError::Unavailable`].
    Engine,
}

/// Status code of an engine reply, when the error is one.
fn status_of(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's own words, without bollard's wrapping.
fn message_of(error: &DockerError) -> String {
    match error {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// Maps an engine error that is not a 404 the caller handles itself.
fn classify(what: &str, error: DockerError, refusal: Refusal) -> RuntimeError {
    match (status_of(&error), refusal) {
        (Some(404), _) => RuntimeError::NotFound(message_of(&error)),
        (Some(_), Refusal::Task) => RuntimeError::Rejected(message_of(&error)),
        _ => RuntimeError::engine(format!("docker {what}: {}", message_of(&error))),
    }
}

/// Runs one engine call under `limit`; a timeout means the engine is unavailable.
async fn bounded<T>(
    what: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, DockerError>>,
) -> Result<Result<T, DockerError>, RuntimeError> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| RuntimeError::engine(format!("docker {what} did not answer within {limit:?}")))
}

impl DockerRuntime {
    /// Connects to the local engine (`DOCKER_HOST` or the default unix socket) and
    /// negotiates the API version; fails when the engine does not answer in time.
    pub async fn connect() -> Result<Self, RuntimeError> {
        Self::connect_with(DockerConfig::default()).await
    }

    /// [`connect`](Self::connect) with explicit settings.
    pub async fn connect_with(config: DockerConfig) -> Result<Self, RuntimeError> {
        let hint = || match &config.socket {
            Some(path) => format!("is dockerd running and reachable at unix://{}?", path.display()),
            None => {
                let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned());
                format!("is dockerd running and reachable at {host} (DOCKER_HOST)?")
            }
        };
        let docker = match &config.socket {
            // bollard's own timeout is replaced just below, as for the default client.
            Some(path) => Docker::connect_with_unix(&path.to_string_lossy(), 120, bollard::API_DEFAULT_VERSION),
            None => Docker::connect_with_defaults(),
        };
        let docker = docker
            .map_err(|e| RuntimeError::engine(format!("{e}; {}", hint())))?
            // Our per-call timeouts are the real bounds; bollard's single client-wide
            // timeout would otherwise cut builds and long stops short.
            .with_timeout(Duration::from_secs(3600));
        // bollard speaks a newer API than older engines (20.10 = 1.41) accept.
        let docker = bounded("version", config.timeouts.connect, docker.negotiate_version())
            .await?
            .map_err(|e| RuntimeError::engine(format!("{e}; {}", hint())))?;
        Ok(DockerRuntime {
            docker,
            config,
            echo_build: tokio::sync::Mutex::new(()),
            echo_builds: AtomicU64::new(0),
            self_digest: tokio::sync::OnceCell::new(),
            guard_volume: tokio::sync::OnceCell::new(),
        })
    }

    /// `docker save` of one image, as the engine streams it (`holdfast image push
    /// --from-docker`); the caller bounds the whole transfer.
    pub fn export_image(
        &self,
        image: &str,
    ) -> impl futures::Stream<Item = Result<bytes::Bytes, RuntimeError>> + 'static {
        self.docker.export_image(image).map_err(|e| match status_of(&e) {
            Some(404) => RuntimeError::ImageUnavailable { image: String::new(), reason: message_of(&e) },
            _ => RuntimeError::engine(format!("docker save: {}", message_of(&e))),
        })
    }

    /// Removes an image by reference (tests and benchmarks clean up with it).
    pub async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        let options = bollard::image::RemoveImageOptions { force: true, noprune: false };
        match bounded("image remove", self.config.timeouts.remove, self.docker.remove_image(image, Some(options), None))
            .await?
        {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(classify("image remove", e, Refusal::Engine)),
        }
    }

    /// Number of echo image builds this runtime has completed.
    pub fn echo_builds(&self) -> u64 {
        self.echo_builds.load(Ordering::Relaxed)
    }

    /// Builds `holdfast/echo:<version>` and `:latest` FROM scratch out of the configured
    /// static binary; returns the tags. Used by `holdfast image echo`.
    pub async fn build_echo_image(&self) -> Result<Vec<String>, RuntimeError> {
        let _building = self.echo_build.lock().await;
        self.build_echo_locked(None).await
    }

    /// Whether a local image exists.
    /// Digest of the binary echo images are built from (read once).
    async fn self_digest(&self) -> Result<&str, RuntimeError> {
        let path = self.config.self_binary.clone();
        self.self_digest
            .get_or_try_init(|| async move {
                let bytes = tokio::fs::read(&path).await.map_err(|e| RuntimeError::ImageUnavailable {
                    image: ECHO_REPOSITORY.to_owned(),
                    reason: format!("cannot read {}: {e}", path.display()),
                })?;
                let digest = tokio::task::spawn_blocking(move || {
                    use sha2::Digest;
                    sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect::<String>()
                })
                .await
                .map_err(|e| RuntimeError::engine(format!("hashing the binary: {e}")))?;
                Ok(digest)
            })
            .await
            .map(String::as_str)
    }

    /// Whether an echo image is present and was built from this very binary.
    async fn echo_current(&self, image: &str) -> Result<bool, RuntimeError> {
        let found = bounded("image inspect", self.config.timeouts.inspect, self.docker.inspect_image(image)).await?;
        let labels = match found {
            Ok(inspect) => inspect.config.and_then(|c| c.labels).unwrap_or_default(),
            Err(e) if status_of(&e) == Some(404) => return Ok(false),
            Err(e) => return Err(classify("image inspect", e, Refusal::Engine)),
        };
        let digest = self.self_digest().await?;
        Ok(labels.get(ECHO_BINARY_LABEL).map(String::as_str) == Some(digest))
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        let found = bounded("image inspect", self.config.timeouts.inspect, self.docker.inspect_image(image)).await?;
        match found {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(classify("image inspect", e, Refusal::Engine)),
        }
    }

    /// Builds the echo image; the caller holds `echo_build`. `extra_tag` is a requested
    /// tag other than the version and `latest`.
    async fn build_echo_locked(&self, extra_tag: Option<&str>) -> Result<Vec<String>, RuntimeError> {
        let version_tag = format!("{ECHO_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"));
        let unavailable = |reason: String| RuntimeError::ImageUnavailable { image: version_tag.clone(), reason };
        let binary_path = &self.config.self_binary;
        let binary = tokio::fs::read(binary_path)
            .await
            .map_err(|e| unavailable(format!("cannot read {}: {e}", binary_path.display())))?;
        if !is_static_elf(&binary) {
            return Err(unavailable(format!(
                "{} is not a statically linked ELF binary, so it cannot run in a FROM-scratch \
                 image; build the static one with packaging/build-static.sh and run that",
                binary_path.display()
            )));
        }
        let context =
            echo_build_context(&binary).map_err(|e| unavailable(format!("cannot assemble the build context: {e}")))?;
        drop(binary);

        let options = BuildImageOptions {
            dockerfile: "Dockerfile".to_owned(),
            t: version_tag.clone(),
            rm: true,
            forcerm: true,
            labels: HashMap::from([
                ("org.opencontainers.image.version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
                (ECHO_BINARY_LABEL.to_owned(), self.self_digest().await?.to_owned()),
            ]),
            ..Default::default()
        };
        let limit = self.config.timeouts.build;
        let built = bounded(
            "build",
            limit,
            self.docker.build_image(options, None, Some(context.into())).try_for_each(|_progress| async { Ok(()) }),
        )
        .await?;
        built.map_err(|e| match e {
            DockerError::DockerResponseServerError { .. } | DockerError::DockerStreamError { .. } => {
                unavailable(message_of(&e))
            }
            other => RuntimeError::engine(format!("docker build: {other}")),
        })?;

        let mut tags = vec![version_tag.clone()];
        for tag in std::iter::once("latest").chain(extra_tag) {
            let full = format!("{ECHO_REPOSITORY}:{tag}");
            if tags.contains(&full) {
                continue;
            }
            let options = TagImageOptions { repo: ECHO_REPOSITORY, tag };
            bounded("tag", self.config.timeouts.inspect, self.docker.tag_image(&version_tag, Some(options)))
                .await?
                .map_err(|e| unavailable(format!("tagging {full}: {}", message_of(&e))))?;
            tags.push(full);
        }
        self.echo_builds.fetch_add(1, Ordering::Relaxed);
        tracing::info!(?tags, "built the echo image from {}", binary_path.display());
        Ok(tags)
    }

    /// Pulls one tag of `image`; failures carry the engine's reason.
    async fn pull(&self, image: &str, reference: &ImageRef<'_>) -> Result<(), RuntimeError> {
        // A digest travels whole in from_image; otherwise name one tag, because an
        // untagged pull would fetch every tag of the repository.
        let options = if reference.digest {
            CreateImageOptions { from_image: image, ..Default::default() }
        } else {
            CreateImageOptions {
                from_image: reference.repository,
                tag: reference.tag_or_latest(),
                ..Default::default()
            }
        };
        let pulled = bounded(
            "pull",
            self.config.timeouts.pull,
            self.docker.create_image(Some(options), None, None).try_for_each(|_progress| async { Ok(()) }),
        )
        .await
        .map_err(|timeout| RuntimeError::ImageUnavailable { image: image.to_owned(), reason: timeout.to_string() })?;
        pulled.map_err(|e| match e {
            DockerError::DockerResponseServerError { .. } | DockerError::DockerStreamError { .. } => {
                RuntimeError::ImageUnavailable { image: image.to_owned(), reason: message_of(&e) }
            }
            other => RuntimeError::engine(format!("docker pull: {other}")),
        })
    }

    /// Inspects a container; `Ok(None)` when absent.
    async fn inspect_raw(&self, id: &str) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        let inspected = bounded(
            "inspect",
            self.config.timeouts.inspect,
            self.docker.inspect_container(id, None::<InspectContainerOptions>),
        )
        .await?;
        match inspected {
            Ok(response) => Ok(Some(response)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(classify("inspect", e, Refusal::Engine)),
        }
    }

    /// Inspects a container that must exist (we just created or started it).
    async fn inspect_existing(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        self.inspect_raw(id).await?.map(container_info).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))
    }

    /// Best-effort removal after a failed start; the start error is what the caller needs.
    async fn discard(&self, id: &str) {
        if let Err(error) = self.remove(id).await {
            tracing::warn!(container = id, %error, "could not remove a container that failed to start");
        }
    }
}

/// The guard: its binary in a volume per engine and binary, and guarded creates.
impl DockerRuntime {
    /// The first 16 hex digits of the binary's SHA-256: names the guard image, volume
    /// and marker container.
    async fn guard_key(&self) -> Result<String, RuntimeError> {
        Ok(self.self_digest().await?.chars().take(16).collect())
    }

    /// Makes sure the volume holding this very binary exists on the engine and returns
    /// its name. A never-started marker container of the guard image, created with the
    /// empty volume mounted, makes the engine copy the binary in (it populates an empty
    /// named volume from the image on create); the marker's name is unique on the
    /// engine, so of several workers sharing one engine exactly one populates the
    /// volume, and the marker's existence says the copy is complete.
    async fn guard_volume(&self) -> Result<&str, RuntimeError> {
        self.guard_volume
            .get_or_try_init(|| async {
                let key = self.guard_key().await?;
                let name = format!("holdfast-guard-{key}");
                if self.inspect_raw(&name).await?.is_none() {
                    self.ensure_guard_image(&key).await?;
                    self.create_guard_marker(&key, &name).await?;
                }
                Ok(name)
            })
            .await
            .map(String::as_str)
    }

    /// Builds `holdfast/guard:<key>` (FROM scratch, only the binary) unless present.
    async fn ensure_guard_image(&self, key: &str) -> Result<(), RuntimeError> {
        let image = format!("{GUARD_REPOSITORY}:{key}");
        if self.image_present(&image).await? {
            return Ok(());
        }
        let unavailable = |reason: String| RuntimeError::ImageUnavailable { image: image.clone(), reason };
        let path = &self.config.self_binary;
        let binary =
            tokio::fs::read(path).await.map_err(|e| unavailable(format!("cannot read {}: {e}", path.display())))?;
        if !is_static_elf(&binary) {
            return Err(unavailable(format!(
                "{} is not a statically linked ELF binary, so it cannot be the guard in other images; \
                 build the static one with packaging/build-static.sh and run that",
                path.display()
            )));
        }
        let context =
            guard_build_context(&binary).map_err(|e| unavailable(format!("cannot assemble the build context: {e}")))?;
        drop(binary);
        let options = BuildImageOptions {
            dockerfile: "Dockerfile".to_owned(),
            t: image.clone(),
            rm: true,
            forcerm: true,
            labels: HashMap::from([(ECHO_BINARY_LABEL.to_owned(), self.self_digest().await?.to_owned())]),
            ..Default::default()
        };
        bounded(
            "build",
            self.config.timeouts.build,
            self.docker.build_image(options, None, Some(context.into())).try_for_each(|_progress| async { Ok(()) }),
        )
        .await?
        .map_err(|e| match e {
            DockerError::DockerResponseServerError { .. } | DockerError::DockerStreamError { .. } => {
                unavailable(message_of(&e))
            }
            other => RuntimeError::engine(format!("docker build: {other}")),
        })?;
        tracing::info!(%image, "built the guard image from {}", path.display());
        Ok(())
    }

    /// Creates the marker container `name` that populates the guard volume `name`; when
    /// another worker is creating it (name conflict), waits until it exists.
    async fn create_guard_marker(&self, key: &str, name: &str) -> Result<(), RuntimeError> {
        let config = Config {
            image: Some(format!("{GUARD_REPOSITORY}:{key}")),
            labels: Some(HashMap::from([(GUARD_LABEL.to_owned(), key.to_owned())])),
            host_config: Some(HostConfig {
                mounts: Some(vec![Mount {
                    target: Some(GUARD_IMAGE_DIR.to_owned()),
                    source: Some(name.to_owned()),
                    typ: Some(MountTypeEnum::VOLUME),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions { name, platform: None };
        let created =
            bounded("create", self.config.timeouts.create, self.docker.create_container(Some(options), config)).await?;
        match created {
            Ok(_) => {
                tracing::info!(volume = name, "guard volume ready");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(409) => {
                // Another worker on this engine is populating it: the marker appears in
                // the engine's list only once its create (and the copy) finished.
                let deadline = tokio::time::Instant::now() + self.config.timeouts.create;
                while tokio::time::Instant::now() < deadline {
                    if self.inspect_raw(name).await?.is_some() {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(RuntimeError::engine(format!("guard volume {name} not ready within the create timeout")))
            }
            Err(e) => Err(classify("create", e, Refusal::Task)),
        }
    }

    /// The argv the guard of `spec` runs, from the image's ENTRYPOINT and CMD; refuses
    /// (as the task's problem) images the guard cannot run in or that have nothing to run.
    async fn guarded_argv(&self, spec: &ContainerSpec) -> Result<Vec<String>, RuntimeError> {
        let inspected =
            bounded("image inspect", self.config.timeouts.inspect, self.docker.inspect_image(&spec.image)).await?;
        let image = match inspected {
            Ok(image) => image,
            Err(e) if status_of(&e) == Some(404) => {
                return Err(RuntimeError::ImageUnavailable { image: spec.image.clone(), reason: message_of(&e) })
            }
            Err(e) => return Err(classify("image inspect", e, Refusal::Engine)),
        };
        let config = image.config.unwrap_or_default();
        guarded_argv(
            &spec.image,
            image.os.as_deref().unwrap_or_default(),
            image.architecture.as_deref().unwrap_or_default(),
            &config.entrypoint.unwrap_or_default(),
            &config.cmd.unwrap_or_default(),
            &spec.command,
        )
        .map_err(RuntimeError::Rejected)
    }

    /// One bounded `docker logs` call, its chunks as text.
    async fn read_logs(&self, id: &str, options: LogsOptions<String>) -> Result<String, RuntimeError> {
        let chunks: Vec<_> =
            bounded("logs", self.config.timeouts.logs, self.docker.logs(id, Some(options)).try_collect::<Vec<_>>())
                .await?
                .map_err(|e| match status_of(&e) {
                    Some(404) => RuntimeError::NotFound(id.to_owned()),
                    _ => classify("logs", e, Refusal::Engine),
                })?;
        let mut text = String::new();
        for chunk in chunks {
            text.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        Ok(text)
    }
}

#[async_trait::async_trait]
impl Runtime for DockerRuntime {
    async fn ping(&self) -> Result<EngineInfo, RuntimeError> {
        let info = bounded("info", self.config.timeouts.inspect, self.docker.info())
            .await?
            .map_err(|e| classify("info", e, Refusal::Engine))?;
        Ok(EngineInfo {
            root_dir: info.docker_root_dir.unwrap_or_default(),
            version: info.server_version.unwrap_or_default(),
        })
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        let reference = ImageRef::parse(image);
        if reference.is_echo() {
            if self.echo_current(image).await? {
                return Ok(());
            }
            let _building = self.echo_build.lock().await;
            // Whoever held the lock before us may have built it already.
            if self.echo_current(image).await? {
                return Ok(());
            }
            let tag = reference.tag_or_latest();
            return self.build_echo_locked(Some(tag)).await.map(|_| ()).map_err(|e| match e {
                RuntimeError::ImageUnavailable { reason, .. } => {
                    RuntimeError::ImageUnavailable { image: image.to_owned(), reason }
                }
                other => other,
            });
        }
        if self.image_present(image).await? {
            return Ok(());
        }
        self.pull(image, &reference).await
    }

    async fn image_ids(&self) -> Result<Vec<String>, RuntimeError> {
        let options = bollard::image::ListImagesOptions::<String> { all: false, ..Default::default() };
        let images = bounded("image list", self.config.timeouts.inspect, self.docker.list_images(Some(options)))
            .await?
            .map_err(|e| classify("image list", e, Refusal::Engine))?;
        Ok(images.into_iter().map(|i| i.id).collect())
    }

    async fn image_chains(&self) -> Result<Vec<Vec<String>>, RuntimeError> {
        let ids = self.image_ids().await?;
        let limit = self.config.timeouts.inspect;
        let chains = futures::stream::iter(ids)
            .map(|id| async move {
                match bounded("image inspect", limit, self.docker.inspect_image(&id)).await {
                    Ok(Ok(i)) => i.root_fs.and_then(|r| r.layers).unwrap_or_default(),
                    _ => Vec::new(),
                }
            })
            .buffer_unordered(LIST_INSPECT_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        Ok(chains.into_iter().filter(|c| !c.is_empty()).collect())
    }

    async fn load_image(&self, archive: super::LoadStream) -> Result<(), RuntimeError> {
        let options = bollard::image::ImportImageOptions { quiet: true };
        let load = self.docker.import_image_stream(options, archive, None).try_for_each(|info| async move {
            match info.error {
                Some(e) => Err(DockerError::DockerStreamError { error: e }),
                None => Ok(()),
            }
        });
        bounded("load", self.config.timeouts.pull, load).await?.map_err(|e| match e {
            DockerError::DockerResponseServerError { .. } | DockerError::DockerStreamError { .. } => {
                RuntimeError::Rejected(format!("docker load: {}", message_of(&e)))
            }
            other => RuntimeError::engine(format!("docker load: {other}")),
        })
    }

    async fn image_size(&self, image: &str) -> Result<Option<u64>, RuntimeError> {
        let found = bounded("image inspect", self.config.timeouts.inspect, self.docker.inspect_image(image)).await?;
        match found {
            Ok(inspect) => Ok(Some(inspect.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(classify("image inspect", e, Refusal::Engine)),
        }
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        let mut config = container_config(spec);
        if spec.guard.is_some() {
            // Everything that can refuse a guarded start is checked before the container
            // exists: nothing ever runs unguarded in its place.
            let volume = self.guard_volume().await?;
            let argv = self.guarded_argv(spec).await?;
            guard_config(&mut config, volume, argv);
        }
        let options = CreateContainerOptions { name: spec.name.as_str(), platform: None };
        let created =
            bounded("create", self.config.timeouts.create, self.docker.create_container(Some(options), config))
                .await?
                .map_err(|e| match status_of(&e) {
                    // The only thing create looks up is the image.
                    Some(404) => RuntimeError::ImageUnavailable { image: spec.image.clone(), reason: message_of(&e) },
                    _ => classify("create", e, Refusal::Task),
                })?;
        for warning in &created.warnings {
            tracing::warn!(container = %spec.name, warning, "docker create");
        }
        if let Some(guard) = &spec.guard {
            if let Err(error) = self.set_deadline(&created.id, guard.deadline).await {
                self.discard(&created.id).await;
                return Err(error);
            }
        }
        match self.start(&created.id).await {
            Ok(info) => Ok(info),
            Err(error) => {
                self.discard(&created.id).await;
                Err(error)
            }
        }
    }

    async fn start(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        bounded(
            "start",
            self.config.timeouts.start,
            self.docker.start_container(id, None::<StartContainerOptions<String>>),
        )
        .await?
        .map_err(|e| match status_of(&e) {
            Some(404) => RuntimeError::NotFound(id.to_owned()),
            _ => classify("start", e, Refusal::Task),
        })?;
        self.inspect_existing(id).await
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        Ok(self.inspect_raw(id).await?.map(container_info))
    }

    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let filters = HashMap::from([("label".to_owned(), labels.iter().map(|(k, v)| format!("{k}={v}")).collect())]);
        let options = ListContainersOptions { all: true, filters, ..Default::default() };
        let summaries = bounded("list", self.config.timeouts.inspect, self.docker.list_containers(Some(options)))
            .await?
            .map_err(|e| classify("list", e, Refusal::Engine))?;
        // The list summary has no exit code, and adoption needs it: inspect each one.
        // A container removed in between simply drops out.
        let inspected: Vec<Option<ContainerInfo>> = futures::stream::iter(summaries.into_iter().filter_map(|s| s.id))
            .map(|id| async move { self.inspect(&id).await })
            .buffered(LIST_INSPECT_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(inspected.into_iter().flatten().collect())
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        // Docker's grace is whole seconds; round up so the task gets at least what was asked.
        let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let options = StopContainerOptions { t: i64::try_from(seconds).unwrap_or(i64::MAX) };
        let stopped =
            bounded("stop", grace + self.config.timeouts.stop_extra, self.docker.stop_container(id, Some(options)))
                .await?;
        match stopped {
            // 304 (already stopped) counts as success in bollard.
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(classify("stop", e, Refusal::Task)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptions {
            force: true,
            // Anonymous volumes belong to the container; leaving them would leak disk.
            v: true,
            ..Default::default()
        };
        let removed =
            bounded("remove", self.config.timeouts.remove, self.docker.remove_container(id, Some(options))).await?;
        match removed {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(classify("remove", e, Refusal::Task)),
        }
    }

    async fn ensure_guard(&self) -> Result<(), RuntimeError> {
        self.guard_volume().await.map(|_| ())
    }

    async fn set_deadline(&self, id: &str, deadline: crate::guard::Deadline) -> Result<(), RuntimeError> {
        let archive = deadline_archive(deadline)
            .map_err(|e| RuntimeError::Rejected(format!("cannot assemble the deadline archive: {e}")))?;
        let options = UploadToContainerOptions { path: DEADLINE_DIR, ..Default::default() };
        bounded(
            "set deadline",
            self.config.timeouts.inspect,
            self.docker.upload_to_container(id, Some(options), archive.into()),
        )
        .await?
        .map_err(|e| match status_of(&e) {
            Some(404) => RuntimeError::NotFound(id.to_owned()),
            _ => classify("set deadline", e, Refusal::Task),
        })
    }

    async fn logs(&self, id: &str, tail: usize) -> Result<String, RuntimeError> {
        let options =
            LogsOptions { follow: false, stdout: true, stderr: true, tail: tail.to_string(), ..Default::default() };
        self.read_logs(id, options).await
    }

    async fn logs_after(&self, id: &str, tail: usize, after: &str) -> Result<String, RuntimeError> {
        // The engine's `since` counts whole seconds: ask from the cursor's second and
        // drop what is not after the cursor itself.
        let since = if after.is_empty() { 0 } else { crate::model::log_time_secs(after).unwrap_or(0) };
        let tail = if after.is_empty() { tail.to_string() } else { "all".to_owned() };
        let options = LogsOptions {
            follow: false,
            stdout: true,
            stderr: true,
            timestamps: true,
            since,
            tail,
            ..Default::default()
        };
        Ok(crate::model::log_lines_after(&self.read_logs(id, options).await?, after))
    }
}

/// Turns a create request into a guarded one: the guard binary (read-only volume) is
/// the entrypoint, the app's full argv its command.
fn guard_config(config: &mut Config<String>, volume: &str, argv: Vec<String>) {
    config.entrypoint = Some(vec![GUARD_BIN.to_owned(), "guard".to_owned(), "--".to_owned()]);
    config.cmd = Some(argv);
    let host = config.host_config.get_or_insert_with(HostConfig::default);
    host.mounts.get_or_insert_with(Vec::new).push(Mount {
        target: Some(GUARD_DIR.to_owned()),
        source: Some(volume.to_owned()),
        typ: Some(MountTypeEnum::VOLUME),
        read_only: Some(true),
        volume_options: Some(MountVolumeOptions { no_copy: Some(true), ..Default::default() }),
        ..Default::default()
    });
}

/// Docker's name for the architecture this binary was built for.
pub fn docker_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        other => other,
    }
}

/// The app a guard runs for `image` (whose own ENTRYPOINT and CMD are given): its
/// ENTRYPOINT followed by the task's command, or by its CMD when the task gives none, as
/// Docker itself would. Refuses images of another OS or architecture, and images with
/// nothing to run.
pub fn guarded_argv(
    image: &str,
    os: &str,
    arch: &str,
    entrypoint: &[String],
    cmd: &[String],
    command: &[String],
) -> Result<Vec<String>, String> {
    if !os.is_empty() && os != "linux" {
        return Err(format!(
            "image {image} is for {os}; the exclusive guard (holdfast, linux/{}) cannot run in it",
            docker_arch()
        ));
    }
    if !arch.is_empty() && arch != docker_arch() {
        return Err(format!(
            "image {image} is built for {arch}; the exclusive guard (holdfast, linux/{}) cannot run in it: \
             use an image for {} or constrain the task to nodes of its architecture",
            docker_arch(),
            docker_arch()
        ));
    }
    let tail = if command.is_empty() { cmd } else { command };
    let argv: Vec<String> = entrypoint.iter().chain(tail).cloned().collect();
    if argv.is_empty() {
        return Err(format!(
            "image {image} has no ENTRYPOINT and no CMD and the task gives no command: nothing for the guard to run"
        ));
    }
    Ok(argv)
}

/// A build context holding only the guard binary, at [`GUARD_IMAGE_DIR`].
fn guard_build_context(binary: &[u8]) -> std::io::Result<Vec<u8>> {
    let dockerfile =
        format!("FROM scratch\nCOPY holdfast {GUARD_IMAGE_DIR}/holdfast\nCMD [\"{GUARD_IMAGE_DIR}/holdfast\"]\n");
    let mut archive = tar::Builder::new(Vec::with_capacity(binary.len() + 4096));
    for (path, mode, data) in [("Dockerfile", 0o644, dockerfile.as_bytes()), ("holdfast", 0o755, binary)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        archive.append_data(&mut header, path, data)?;
    }
    archive.into_inner()
}

/// A one-file tar archive: the deadline the guard reads.
fn deadline_archive(deadline: crate::guard::Deadline) -> std::io::Result<Vec<u8>> {
    let text = deadline.text();
    let mut archive = tar::Builder::new(Vec::with_capacity(2048));
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    // Readable by any user the image runs as; written only through the engine.
    header.set_mode(0o644);
    header.set_cksum();
    archive.append_data(&mut header, DEADLINE_NAME, text.as_bytes())?;
    archive.into_inner()
}

/// The create request for a spec: restart policy `no` because restarts are the worker's
/// decision (it counts them and backs off), never the engine's.
fn container_config(spec: &ContainerSpec) -> Config<String> {
    let port_key = |container: u16| format!("{container}/tcp");
    let exposed_ports = spec.ports.iter().map(|p| (port_key(p.container), HashMap::new())).collect::<HashMap<_, _>>();
    let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for port in &spec.ports {
        port_bindings
            .entry(port_key(port.container))
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some("0.0.0.0".to_owned()),
                // An empty host port makes Docker pick a free one.
                host_port: Some(if port.host == 0 { String::new() } else { port.host.to_string() }),
            });
    }
    let host_config = HostConfig {
        restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
        // CPU is a reservation for the scheduler and a relative weight here (1024 shares
        // per core, min 2), as Nomad does by default: a hard CFS quota of a few
        // millicores throttles even the container's start (a 10-millicore task took 2 s
        // to start on this host; 300 ms unthrottled). Memory stays a hard limit.
        cpu_shares: (spec.cpu_millis > 0)
            .then(|| i64::try_from((spec.cpu_millis.saturating_mul(1024) / 1000).max(2)).unwrap_or(i64::MAX)),
        memory: (spec.memory_mb > 0)
            .then(|| i64::try_from(spec.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX)),
        port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
        ..Default::default()
    };
    Config {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(spec.labels.clone().into_iter().collect()),
        exposed_ports: (!exposed_ports.is_empty()).then_some(exposed_ports),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// Our view of an inspected container.
fn container_info(response: ContainerInspectResponse) -> ContainerInfo {
    let state = response.state.unwrap_or_default();
    let coarse = match state.status {
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        Some(
            ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::PAUSED | ContainerStateStatusEnum::RESTARTING,
        ) => ContainerState::Running,
        Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited { code: state.exit_code.unwrap_or(-1) },
        Some(other) => ContainerState::Other(other.to_string()),
        None => ContainerState::Other(String::new()),
    };
    let mut ports = Vec::new();
    let network = response.network_settings.unwrap_or_default();
    let ip = container_ip(&network);
    let published = network.ports.unwrap_or_default();
    for (key, bindings) in published {
        let Some(container) = key.strip_suffix("/tcp").and_then(|p| p.parse::<u16>().ok()) else {
            continue;
        };
        for binding in bindings.unwrap_or_default() {
            if let Some(host) = binding.host_port.and_then(|p| p.parse::<u16>().ok()) {
                // The IPv4 and IPv6 bindings report the same port; keep one.
                if !ports.contains(&(container, host)) {
                    ports.push((container, host));
                }
            }
        }
    }
    ports.sort_unstable();
    let labels: BTreeMap<String, String> =
        response.config.and_then(|c| c.labels).unwrap_or_default().into_iter().collect();
    ContainerInfo {
        id: response.id.unwrap_or_default(),
        name: response.name.map(|n| n.trim_start_matches('/').to_owned()).unwrap_or_default(),
        labels,
        state: coarse,
        ports,
        error: state.error.filter(|e| !e.is_empty()),
        ip,
    }
}

/// The container's IP: the first network (by name, for a stable answer) that gave it
/// one, else the legacy top-level field. `None` for host networking or a stopped one.
fn container_ip(network: &NetworkSettings) -> Option<String> {
    let mut networks: Vec<_> = network.networks.iter().flatten().collect();
    networks.sort_by(|a, b| a.0.cmp(b.0));
    networks
        .into_iter()
        .filter_map(|(_, endpoint)| endpoint.ip_address.clone())
        .chain(network.ip_address.clone())
        .find(|ip| !ip.is_empty())
}

/// An in-memory build context: the binary and a Dockerfile that makes it the entrypoint.
fn echo_build_context(binary: &[u8]) -> std::io::Result<Vec<u8>> {
    const DOCKERFILE: &str = "FROM scratch\n\
        COPY holdfast /holdfast\n\
        ENTRYPOINT [\"/holdfast\"]\n\
        CMD [\"echo\", \"--listen\", \"0.0.0.0:7777\"]\n";
    let mut archive = tar::Builder::new(Vec::with_capacity(binary.len() + 4096));
    let mut append = |path: &str, mode: u32, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        archive.append_data(&mut header, path, data)
    };
    append("Dockerfile", 0o644, DOCKERFILE.as_bytes())?;
    append("holdfast", 0o755, binary)?;
    archive.into_inner()
}

/// Whether `bytes` is an ELF executable without a program interpreter (`PT_INTERP`),
/// i.e. one that runs with no dynamic loader, as in a FROM-scratch image.
///
/// Written by hand because it is twenty lines of fixed offsets, smaller than any ELF crate.
pub fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if bytes.len() < 0x34 || bytes[..4] != *b"\x7fELF" {
        return false;
    }
    let wide = match bytes[4] {
        1 => false,
        2 => true,
        _ => return false,
    };
    let little = match bytes[5] {
        1 => true,
        2 => false,
        _ => return false,
    };
    let read = |offset: usize, width: usize| -> Option<u64> {
        let field = bytes.get(offset..offset.checked_add(width)?)?;
        let mut value = 0u64;
        for i in 0..width {
            let byte = if little { field[width - 1 - i] } else { field[i] };
            value = (value << 8) | u64::from(byte);
        }
        Some(value)
    };
    let header = if wide {
        (read(0x20, 8), read(0x36, 2), read(0x38, 2))
    } else {
        (read(0x1C, 4), read(0x2A, 2), read(0x2C, 2))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = header else {
        return false;
    };
    let (Ok(phoff), Ok(phentsize)) = (usize::try_from(phoff), usize::try_from(phentsize)) else {
        return false;
    };
    if phentsize < 4 {
        return false;
    }
    for index in 0..phnum as usize {
        let Some(entry) = index.checked_mul(phentsize).and_then(|o| o.checked_add(phoff)) else {
            return false;
        };
        match read(entry, 4) {
            Some(kind) if kind == u64::from(PT_INTERP) => return false,
            Some(_) => {}
            // A truncated table cannot vouch for the file.
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs() {
        let check = |image: &str, repository: &str, tag: Option<&str>, digest: bool| {
            assert_eq!(ImageRef::parse(image), ImageRef { repository, tag, digest }, "{image}");
        };
        check("holdfast/echo", "holdfast/echo", None, false);
        check("holdfast/echo:latest", "holdfast/echo", Some("latest"), false);
        check("localhost:5000/app", "localhost:5000/app", None, false);
        check("localhost:5000/app:1.2", "localhost:5000/app", Some("1.2"), false);
        check("app@sha256:abc", "app", None, true);
        check("nonexistent.invalid/nope:1", "nonexistent.invalid/nope", Some("1"), false);
        assert!(ImageRef::parse("holdfast/echo:x").is_echo());
        assert!(!ImageRef::parse("docker.io/other/echo:x").is_echo());
        assert!(!ImageRef::parse("holdfast/echo@sha256:abc").is_echo());
    }

    /// A minimal 64-bit little-endian ELF header followed by program headers of `kinds`.
    fn elf64(kinds: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64];
        bytes[..4].copy_from_slice(b"\x7fELF");
        bytes[4] = 2;
        bytes[5] = 1;
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        bytes[0x38..0x3A].copy_from_slice(&(kinds.len() as u16).to_le_bytes());
        for kind in kinds {
            let mut entry = vec![0u8; 56];
            entry[..4].copy_from_slice(&kind.to_le_bytes());
            bytes.extend(entry);
        }
        bytes
    }

    #[test]
    fn static_elf_detection() {
        assert!(is_static_elf(&elf64(&[1, 1, 2])), "load/dynamic only");
        assert!(!is_static_elf(&elf64(&[6, 3, 1])), "has PT_INTERP");
        let mut truncated = elf64(&[1, 1]);
        truncated.truncate(100);
        assert!(!is_static_elf(&truncated));
        assert!(!is_static_elf(b"#!/bin/sh\necho hi\n"));
        assert!(!is_static_elf(&[]));
    }

    #[test]
    fn container_ip_prefers_named_networks_then_the_legacy_field() {
        use bollard::models::EndpointSettings;
        let endpoint = |ip: &str| EndpointSettings { ip_address: Some(ip.to_owned()), ..Default::default() };
        let settings = |networks: Vec<(&str, &str)>, legacy: Option<&str>| NetworkSettings {
            networks: Some(networks.into_iter().map(|(n, ip)| (n.to_owned(), endpoint(ip))).collect()),
            ip_address: legacy.map(str::to_owned),
            ..Default::default()
        };
        let check = |n: NetworkSettings, want: Option<&str>| assert_eq!(container_ip(&n).as_deref(), want, "{n:?}");
        check(settings(vec![("bridge", "172.17.0.5")], Some("172.17.0.5")), Some("172.17.0.5"));
        check(settings(vec![("zeta", "10.0.0.9"), ("alpha", "10.1.0.2")], None), Some("10.1.0.2"));
        // Host networking and stopped containers have empty addresses.
        check(settings(vec![("host", "")], Some("")), None);
        check(settings(vec![], Some("172.17.0.7")), Some("172.17.0.7"));
        check(NetworkSettings::default(), None);
    }

    #[test]
    fn the_guard_runs_entrypoint_then_command_or_cmd_and_refuses_what_it_cannot_run() {
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let arch = docker_arch();
        let check = |entry: &[&str], cmd: &[&str], command: &[&str], want: Result<&[&str], &str>| {
            let got = guarded_argv("img", "linux", arch, &v(entry), &v(cmd), &v(command));
            match (got, want) {
                (Ok(argv), Ok(want)) => assert_eq!(argv, v(want)),
                (Err(reason), Err(part)) => assert!(reason.contains(part), "{reason}"),
                (got, want) => panic!("{entry:?} {cmd:?} {command:?}: got {got:?}, want {want:?}"),
            }
        };
        check(&["/app"], &["echo"], &[], Ok(&["/app", "echo"]));
        check(&["/app"], &["echo"], &["other", "-x"], Ok(&["/app", "other", "-x"]));
        check(&[], &["/app", "echo"], &[], Ok(&["/app", "echo"]));
        check(&[], &["/app", "echo"], &["/bin/x"], Ok(&["/bin/x"]));
        check(&["/app", "echo"], &[], &[], Ok(&["/app", "echo"]));
        check(&[], &[], &["/bin/x"], Ok(&["/bin/x"]));
        check(&[], &[], &[], Err("no ENTRYPOINT and no CMD"));
        let other = if arch == "arm64" { "amd64" } else { "arm64" };
        let err = guarded_argv("img", "linux", other, &v(&["/app"]), &[], &[]).unwrap_err();
        assert!(err.contains(&format!("built for {other}")), "{err}");
        assert!(guarded_argv("img", "windows", arch, &v(&["/app"]), &[], &[]).unwrap_err().contains("windows"));
        // Engines that leave the fields empty are taken at their word.
        assert!(guarded_argv("img", "", "", &v(&["/app"]), &[], &[]).is_ok());
    }

    #[test]
    fn a_guarded_config_makes_the_guard_pid_1_over_a_read_only_volume() {
        let mut config = Config::<String> { cmd: Some(vec!["x".into()]), ..Default::default() };
        guard_config(&mut config, "holdfast-guard-abc", vec!["/app".into(), "echo".into()]);
        assert_eq!(config.entrypoint, Some(vec![GUARD_BIN.to_owned(), "guard".into(), "--".into()]));
        assert_eq!(config.cmd, Some(vec!["/app".to_owned(), "echo".into()]));
        let mounts = config.host_config.unwrap_or_default().mounts.unwrap_or_default();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].source.as_deref(), Some("holdfast-guard-abc"));
        assert_eq!(mounts[0].target.as_deref(), Some(GUARD_DIR));
        assert_eq!(mounts[0].read_only, Some(true));
    }

    #[test]
    fn config_maps_limits_and_ports() {
        let spec = ContainerSpec {
            name: "n".into(),
            image: "i".into(),
            command: vec![],
            env: BTreeMap::from([("A".into(), "1".into())]),
            ports: vec![
                super::super::PortMap { container: 7777, host: 0 },
                super::super::PortMap { container: 80, host: 8080 },
            ],
            cpu_millis: 250,
            memory_mb: 64,
            labels: BTreeMap::from([("holdfast.task".into(), "t".into())]),
            guard: None,
        };
        let config = container_config(&spec);
        assert_eq!(config.cmd, None, "an empty command keeps the image's CMD");
        assert_eq!(config.env, Some(vec!["A=1".to_owned()]));
        let host = config.host_config.unwrap_or_default();
        assert_eq!(host.cpu_shares, Some(256));
        assert_eq!(host.nano_cpus, None, "CPU is a weight, not a hard quota");
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        let bindings = host.port_bindings.unwrap_or_default();
        let port = |key: &str| bindings[key].as_ref().map(|b| b[0].host_port.clone().unwrap_or_default());
        assert_eq!(port("7777/tcp"), Some(String::new()));
        assert_eq!(port("80/tcp"), Some("8080".to_owned()));
    }
}
