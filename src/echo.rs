//! The reference task: an HTTP echo server with failure knobs.

use std::net::SocketAddr;
use std::time::Duration;

/// Settings of `holdfast echo`.
#[derive(Clone, Debug)]
pub struct EchoConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Exit on its own after this long.
    pub exit_after: Option<Duration>,
    /// Exit code used by `exit_after`.
    pub exit_code: i32,
    /// Exit 1 when a request body equals this.
    pub crash_on: Option<String>,
    /// Sleep this long before listening.
    pub startup_delay: Option<Duration>,
    /// `GET /health` answers 500 once this long has passed since start.
    pub fail_health_after: Option<Duration>,
}

/// Runs the echo server until `shutdown` resolves or a knob ends it; returns the exit code.
pub async fn run(
    config: EchoConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<i32> {
    let _ = (config, shutdown);
    todo!("echo")
}
