//! The Docker implementation of [`Runtime`](super::Runtime); the only file that imports bollard.

/// Docker engine client with per-call timeouts.
pub struct DockerRuntime {}

impl DockerRuntime {
    /// Connects to the local engine (`DOCKER_HOST` or the default unix socket) and
    /// negotiates the API version; fails when the engine does not answer in time.
    pub async fn connect() -> Result<Self, super::RuntimeError> {
        todo!("docker runtime")
    }
}

#[async_trait::async_trait]
impl super::Runtime for DockerRuntime {
    async fn ping(&self) -> Result<super::EngineInfo, super::RuntimeError> {
        todo!()
    }
    async fn ensure_image(&self, _image: &str) -> Result<(), super::RuntimeError> {
        todo!()
    }
    async fn image_size(&self, _image: &str) -> Result<Option<u64>, super::RuntimeError> {
        todo!()
    }
    async fn create_and_start(
        &self,
        _spec: &super::ContainerSpec,
    ) -> Result<super::ContainerInfo, super::RuntimeError> {
        todo!()
    }
    async fn start(&self, _id: &str) -> Result<super::ContainerInfo, super::RuntimeError> {
        todo!()
    }
    async fn inspect(&self, _id: &str) -> Result<Option<super::ContainerInfo>, super::RuntimeError> {
        todo!()
    }
    async fn list(&self, _labels: &[(String, String)]) -> Result<Vec<super::ContainerInfo>, super::RuntimeError> {
        todo!()
    }
    async fn stop(&self, _id: &str, _grace: std::time::Duration) -> Result<(), super::RuntimeError> {
        todo!()
    }
    async fn remove(&self, _id: &str) -> Result<(), super::RuntimeError> {
        todo!()
    }
    async fn logs(&self, _id: &str, _tail: usize) -> Result<String, super::RuntimeError> {
        todo!()
    }
}

impl DockerRuntime {
    /// Builds the echo image (placeholder until merged).
    pub async fn build_echo_image(&self) -> Result<Vec<String>, super::RuntimeError> {
        todo!()
    }
}
