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
