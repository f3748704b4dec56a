//! An in-memory [`Runtime`] for scale tests of scheduling: thousands of placements on
//! many simulated workers in one process, with no engine at all.
//!
//! It models only what the worker observes (containers, their states, ports, labels and
//! logs) and none of what Docker does (images, networks, limits, processes): nothing
//! listens on a fake container, so a task with a health check fails it here. The Docker
//! runtime stays covered by the real-engine tests (`tests/docker_runtime.rs`,
//! `tests/e2e_docker.rs`); nothing here stands in for them.
//!
//! One `FakeRuntime` may be shared by several workers: each worker lists its own
//! containers by the `holdfast.node` label, as it does on a shared Docker engine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::{labels, ContainerInfo, ContainerSpec, ContainerState, EngineInfo, Runtime, RuntimeError};

/// First host port handed out for `host: 0` mappings.
const FIRST_HOST_PORT: u64 = 20_000;

/// Size reported for every image the fake "has": it has them all, and no disk.
const FAKE_IMAGE_BYTES: u64 = 0;

/// One simulated container.
#[derive(Clone, Debug)]
struct FakeContainer {
    /// What the worker sees.
    info: ContainerInfo,
    /// Log lines, oldest first.
    logs: Vec<String>,
}

/// The in-memory engine. Cheap: every call is a map operation under one mutex.
#[derive(Debug)]
pub struct FakeRuntime {
    /// Containers by id.
    containers: Mutex<BTreeMap<String, FakeContainer>>,
    /// When set, every call fails with [`RuntimeError::Unavailable`] (a dead engine).
    unavailable: AtomicBool,
    /// Source of container ids and host ports.
    next: AtomicU64,
    /// Images that behave unlike the default (present, pulled at once), set by tests.
    images: Mutex<BTreeMap<String, FakeImage>>,
}

/// How one image behaves in the fake engine; every image not configured is present and
/// pulls at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeImage {
    /// Its pull takes this long, then succeeds (a slow registry).
    SlowPull(Duration),
    /// It does not exist: pulls and creates fail with `ImageUnavailable`.
    Missing,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeRuntime {
    /// An engine with no containers.
    pub fn new() -> Self {
        FakeRuntime {
            containers: Mutex::new(BTreeMap::new()),
            unavailable: AtomicBool::new(false),
            next: AtomicU64::new(0),
            images: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FakeContainer>> {
        crate::lock(&self.containers)
    }

    fn check_available(&self) -> Result<(), RuntimeError> {
        if self.unavailable.load(Ordering::Relaxed) {
            return Err(RuntimeError::engine("fake engine set unavailable"));
        }
        Ok(())
    }

    /// Makes a running container exit with `code`, as if its process ended. Returns
    /// whether it existed and was running.
    pub fn exit(&self, container_id: &str, code: i64) -> bool {
        let mut containers = self.lock();
        match containers.get_mut(container_id) {
            Some(c) if c.info.state == ContainerState::Running => {
                c.info.state = ContainerState::Exited { code };
                c.logs.push(format!("exited with code {code}"));
                true
            }
            _ => false,
        }
    }

    /// Simulates a dead (`true`) or recovered (`false`) engine. Containers keep their
    /// state meanwhile, as real ones keep running when dockerd is unreachable.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable.store(unavailable, Ordering::Relaxed);
    }

    /// Makes `image` behave as `behaviour` from now on (a slow pull, a missing image).
    pub fn set_image(&self, image: &str, behaviour: FakeImage) {
        crate::lock(&self.images).insert(image.to_string(), behaviour);
    }

    fn image(&self, image: &str) -> Option<FakeImage> {
        crate::lock(&self.images).get(image).copied()
    }

    fn missing(image: &str) -> RuntimeError {
        RuntimeError::ImageUnavailable { image: image.to_string(), reason: "fake runtime: image set missing".into() }
    }

    /// Running containers of worker `node` (by the `holdfast.node` label).
    pub fn running_count(&self, node: &str) -> usize {
        self.lock()
            .values()
            .filter(|c| c.info.state == ContainerState::Running)
            .filter(|c| c.info.labels.get(labels::NODE).is_some_and(|n| n == node))
            .count()
    }

    /// Every container's id and state, for assertions.
    pub fn containers(&self) -> Vec<ContainerInfo> {
        self.lock().values().map(|c| c.info.clone()).collect()
    }

    /// Appends a line to a container's log; `false` when it does not exist.
    pub fn push_log(&self, container_id: &str, line: &str) -> bool {
        match self.lock().get_mut(container_id) {
            Some(c) => {
                c.logs.push(line.to_string());
                true
            }
            None => false,
        }
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    async fn ping(&self) -> Result<EngineInfo, RuntimeError> {
        self.check_available()?;
        Ok(EngineInfo { root_dir: "/fake".into(), version: "fake".into() })
    }

    async fn ensure_image(&self, image: &str) -> Result<(), RuntimeError> {
        self.check_available()?;
        match self.image(image) {
            Some(FakeImage::SlowPull(delay)) => {
                tokio::time::sleep(delay).await;
                Ok(())
            }
            Some(FakeImage::Missing) => Err(Self::missing(image)),
            None => Ok(()),
        }
    }

    async fn image_size(&self, image: &str) -> Result<Option<u64>, RuntimeError> {
        self.check_available()?;
        Ok((self.image(image) != Some(FakeImage::Missing)).then_some(FAKE_IMAGE_BYTES))
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        self.check_available()?;
        if self.image(&spec.image) == Some(FakeImage::Missing) {
            return Err(Self::missing(&spec.image));
        }
        let mut containers = self.lock();
        if containers.values().any(|c| c.info.name == spec.name) {
            return Err(RuntimeError::Rejected(format!("container name {:?} is already in use", spec.name)));
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("fake{n:012}");
        let ports = spec
            .ports
            .iter()
            .map(|p| {
                let host = match p.host {
                    // Wraps within the dynamic range so a long test cannot overflow u16.
                    0 => (FIRST_HOST_PORT + self.next.fetch_add(1, Ordering::Relaxed) % 40_000) as u16,
                    h => h,
                };
                (p.container, host)
            })
            .collect();
        let info = ContainerInfo {
            id: id.clone(),
            name: spec.name.clone(),
            labels: spec.labels.clone(),
            state: ContainerState::Running,
            ports,
            error: None,
            ip: None,
        };
        containers.insert(id, FakeContainer { info: info.clone(), logs: vec![format!("started {}", spec.image)] });
        Ok(info)
    }

    async fn start(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        self.check_available()?;
        let mut containers = self.lock();
        let c = containers.get_mut(id).ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        c.info.state = ContainerState::Running;
        c.logs.push("started again".into());
        Ok(c.info.clone())
    }

    async fn inspect(&self, id: &str) -> Result<Option<ContainerInfo>, RuntimeError> {
        self.check_available()?;
        Ok(self.lock().get(id).map(|c| c.info.clone()))
    }

    async fn list(&self, labels: &[(String, String)]) -> Result<Vec<ContainerInfo>, RuntimeError> {
        self.check_available()?;
        Ok(self
            .lock()
            .values()
            .filter(|c| labels.iter().all(|(k, v)| c.info.labels.get(k) == Some(v)))
            .map(|c| c.info.clone())
            .collect())
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
        self.check_available()?;
        if let Some(c) = self.lock().get_mut(id) {
            if c.info.state == ContainerState::Running {
                // What a process stopped by SIGTERM usually reports.
                c.info.state = ContainerState::Exited { code: 143 };
            }
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.check_available()?;
        self.lock().remove(id);
        Ok(())
    }

    async fn logs(&self, id: &str, tail: usize) -> Result<String, RuntimeError> {
        self.check_available()?;
        let containers = self.lock();
        let c = containers.get(id).ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        let from = c.logs.len().saturating_sub(tail);
        Ok(c.logs[from..].iter().map(|l| format!("{l}\n")).collect())
    }

    async fn ensure_guard(&self) -> Result<(), RuntimeError> {
        self.check_available()
    }

    async fn set_deadline(&self, id: &str, deadline: crate::guard::Deadline) -> Result<(), RuntimeError> {
        // No process runs here to stop; the deadline is only kept in the log for tests.
        self.check_available()?;
        let mut containers = self.lock();
        let c = containers.get_mut(id).ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        c.logs.push(format!("deadline {}", deadline.at_boot_ms));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::PortMap;
    use super::*;

    fn spec(name: &str, node: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: "holdfast/echo:latest".into(),
            command: vec![],
            env: BTreeMap::new(),
            ports: vec![PortMap { container: 7777, host: 0 }],
            cpu_millis: 1,
            memory_mb: 4,
            labels: BTreeMap::from([(labels::NODE.to_string(), node.to_string())]),
            guard: None,
        }
    }

    #[tokio::test]
    async fn lifecycle_labels_exit_and_outage() {
        let rt = FakeRuntime::new();
        rt.ensure_image("x/missing:1").await.unwrap();
        rt.set_image("x/missing:1", FakeImage::Missing);
        assert!(matches!(rt.ensure_image("x/missing:1").await, Err(RuntimeError::ImageUnavailable { .. })));
        assert_eq!(rt.image_size("x/missing:1").await.unwrap(), None);
        rt.ensure_image("holdfast/echo:latest").await.unwrap();
        let a = rt.create_and_start(&spec("a", "w1")).await.unwrap();
        rt.create_and_start(&spec("b", "w2")).await.unwrap();
        assert!(matches!(rt.create_and_start(&spec("a", "w1")).await, Err(RuntimeError::Rejected(_))));
        assert_ne!(a.ports[0].1, 0, "host 0 gets a port");
        assert_eq!((rt.running_count("w1"), rt.running_count("w2")), (1, 1));
        let only_w1 = rt.list(&[(labels::NODE.into(), "w1".into())]).await.unwrap();
        assert_eq!(only_w1.iter().map(|c| c.id.clone()).collect::<Vec<_>>(), vec![a.id.clone()]);

        assert!(rt.exit(&a.id, 3));
        assert!(!rt.exit(&a.id, 3), "only a running container exits");
        assert_eq!(rt.inspect(&a.id).await.unwrap().unwrap().state, ContainerState::Exited { code: 3 });
        rt.start(&a.id).await.unwrap();
        assert!(rt.logs(&a.id, 2).await.unwrap().ends_with("started again\n"));

        rt.set_unavailable(true);
        assert!(matches!(rt.list(&[]).await, Err(RuntimeError::Unavailable(_))));
        rt.set_unavailable(false);
        rt.stop(&a.id, Duration::ZERO).await.unwrap();
        rt.remove(&a.id).await.unwrap();
        assert_eq!(rt.running_count("w1"), 0);
        assert!(rt.inspect(&a.id).await.unwrap().is_none());
    }
}
