//! `holdfast`: parse flags, build a config, call the module's `run`. Nothing else lives here.
//!
//! This branch only carries the `echo` subcommand (the task image's entrypoint) and
//! `image echo`; the full CLI lands on `main`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use holdfast::echo::EchoConfig;
use holdfast::worker::runtime::docker::DockerRuntime;

/// Edge-native container orchestrator in one static binary.
#[derive(Parser, Debug)]
#[command(name = "holdfast", version, about)]
struct Cli {
    /// What to run.
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the reference echo API: POST / answers with the same body.
    Echo(EchoArgs),
    /// Manage images holdfast provides itself.
    Image {
        /// Which image.
        #[command(subcommand)]
        image: ImageCommand,
    },
}

/// Images holdfast can build without a registry.
#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build holdfast/echo:<version> and :latest FROM scratch out of this binary.
    Echo,
}

/// Flags of `holdfast echo`.
#[derive(clap::Args, Debug)]
struct EchoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7777")]
    listen: SocketAddr,
    /// Exit on its own after this long (e.g. `2s`, `500ms`).
    #[arg(long, value_parser = humantime::parse_duration)]
    exit_after: Option<Duration>,
    /// Exit code used by `--exit-after`.
    #[arg(long, default_value_t = 0)]
    exit_code: i32,
    /// Crash (exit 1 without answering) when a request body equals this.
    #[arg(long)]
    crash_on: Option<String>,
    /// Sleep this long before listening.
    #[arg(long, value_parser = humantime::parse_duration)]
    startup_delay: Option<Duration>,
    /// `GET /health` answers 500 once this long has passed since start.
    #[arg(long, value_parser = humantime::parse_duration)]
    fail_health_after: Option<Duration>,
}

impl From<EchoArgs> for EchoConfig {
    fn from(args: EchoArgs) -> Self {
        EchoConfig {
            listen: args.listen,
            exit_after: args.exit_after,
            exit_code: args.exit_code,
            crash_on: args.crash_on,
            startup_delay: args.startup_delay,
            fail_health_after: args.fail_health_after,
        }
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Container logs are files, not terminals: no colour codes in them.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Echo(args) => {
                let code = holdfast::echo::run(args.into(), shutdown_signal()).await?;
                // Exit codes outside 0..=255 are truncated by the OS anyway.
                Ok(ExitCode::from(code as u8))
            }
            Command::Image {
                image: ImageCommand::Echo,
            } => {
                let docker = DockerRuntime::connect().await?;
                for tag in docker.build_echo_image().await? {
                    println!("{tag}");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// Resolves on SIGTERM (systemd, `docker stop`) or Ctrl-C. As PID 1 in a container the
/// kernel ignores SIGTERM unless we handle it, so this handler is what makes stops fast.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops echo");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
