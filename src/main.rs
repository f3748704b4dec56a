//! Thin entry point: parse flags → build a config → run until SIGTERM/SIGINT.

use anyhow::Context;
use holdfast::cli::{
    ApiArgs, Cli, ClusterCommand, Command, DevArgs, EchoArgs, ImageCommand, LogFormat, SnapshotCommand, TokenCommand,
    EXIT_CONFIG,
};

fn main() -> std::process::ExitCode {
    // Configuration errors (flags, config file, values) exit with EXIT_CONFIG, which
    // the units' RestartPreventExitStatus= names.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match holdfast::config_file::parse_from(args.clone()) {
        Ok(cli) => cli,
        Err(e) => {
            e.print();
            // Usage errors of the client commands exit 2; agent and dev keep EXIT_CONFIG.
            return std::process::ExitCode::from(holdfast::cli::parse_error_code(&args, e.code()));
        }
    };
    // The guard is PID 1 of a container: it must run before any thread exists (no
    // tokio runtime, no logger) so its signal mask covers the whole process.
    if let Command::Guard(args) = cli.command {
        let code =
            holdfast::guard::run(holdfast::guard::GuardConfig { argv: args.argv, deadline_file: args.deadline_file });
        return std::process::ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let (format, level) = match &cli.command {
        Command::Dev(a) => (a.service.log_format, a.service.log_level.clone()),
        Command::Agent(a) => (a.service.log_format, a.service.log_level.clone()),
        _ => (LogFormat::Text, None),
    };
    if let Err(e) = holdfast::logging::init(format, level.as_deref()) {
        eprintln!("holdfast: {e}");
        return std::process::ExitCode::from(EXIT_CONFIG);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("holdfast: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let service = match &cli.command {
        Command::Dev(a) => Some(&a.service),
        Command::Agent(a) => Some(&a.service),
        _ => None,
    };
    if let Some(Err(e)) = service.map(|s| s.validate()) {
        eprintln!("holdfast: {e}");
        return std::process::ExitCode::from(EXIT_CONFIG);
    }
    if let Command::Agent(a) = &cli.command {
        if let Err(e) = a.to_config() {
            eprintln!("holdfast: {e}");
            return std::process::ExitCode::from(EXIT_CONFIG);
        }
    }
    let client = !matches!(cli.command, Command::Dev(_) | Command::Agent(_) | Command::Echo(_) | Command::Image { .. });
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("holdfast: {e:#}");
            // Client commands: 3 not found, 4 retryable, 1 otherwise (README "CLI").
            let code = if client { holdfast::client::exit_code(&e) } else { 1 };
            std::process::ExitCode::from(code)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Dev(args) => {
            let config = args.to_config();
            announce_dev_when_ready(&args);
            holdfast::node::run_service(config, None, args.service.options(), holdfast::shutdown_signal()).await?;
            Ok(0)
        }
        Command::Agent(args) => {
            let config = args.to_config().map_err(anyhow::Error::msg)?;
            holdfast::node::run_service(config, None, args.service.options(), holdfast::shutdown_signal()).await?;
            Ok(0)
        }
        Command::Echo(a) => run_echo(a).await,
        Command::Image { which: ImageCommand::Echo, .. } => {
            let docker = holdfast::worker::runtime::docker::DockerRuntime::connect().await?;
            let tags = docker.build_echo_image().await.context("building the echo image")?;
            println!("built {}", tags.join(", "));
            Ok(0)
        }
        Command::Image { which, api } => connect(&api)?.image(which).await.map(|_| 0),
        Command::Guard(_) => anyhow::bail!("the guard runs before the async runtime starts"),
        Command::Task { cmd, api } => connect(&api.api)?.task(cmd, api.output).await.map(|_| 0),
        Command::Node { cmd, api } => connect(&api.api)?.node(cmd, api.output).await.map(|_| 0),
        Command::Cluster { cmd: Some(ClusterCommand::Ca { cmd }), api } => connect(&api.api)?.ca(cmd).await.map(|_| 0),
        Command::Cluster { cmd: None, api } => connect(&api.api)?.cluster(false, api.output).await.map(|_| 0),
        Command::Cluster { cmd: Some(ClusterCommand::Members), api } => {
            connect(&api.api)?.cluster(true, api.output).await.map(|_| 0)
        }
        Command::Completions { shell } => print_completions(shell),
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(0)
        }
        Command::Cluster { cmd: Some(ClusterCommand::Snapshot { cmd }), api } => match cmd {
            SnapshotCommand::Save { file } => connect(&api.api)?.snapshot_save(&file).await.map(|_| 0),
            SnapshotCommand::Restore { file, node_id } => {
                holdfast::client::snapshot_restore(&file, &api.api.auth.data_dir, &node_id).map(|_| 0)
            }
        },
        Command::Token { cmd: TokenCommand::Join { role, rotate: false, .. }, api } => {
            holdfast::client::print_join_token(&api.api.auth.data_dir, role).map(|_| 0)
        }
        Command::Token { cmd, api } => connect(&api.api)?.token(cmd, api.output).await.map(|_| 0),
    }
}

/// The API client of the client commands.
fn connect(api: &ApiArgs) -> anyhow::Result<holdfast::client::Api> {
    holdfast::client::Api::new(&api.api_url, &api.auth)
}

/// Prints how to use the dev cluster once its admin token exists (it does once this
/// single-node cluster has elected itself); gives up quietly after a minute.
fn announce_dev_when_ready(args: &DevArgs) {
    let token_file = args.data_dir.join(holdfast::manager::api::auth::ADMIN_TOKEN_FILE);
    let api = args.api.clone();
    let (cluster, data_dir) = (args.cluster.clone(), args.data_dir.clone());
    tokio::spawn(async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(t) = std::fs::read_to_string(&token_file) {
                let token = t.trim();
                println!(
                    "holdfast dev: API on http://{api} (admin token in {file})\n\
                     Run the echo task:\n  curl -s -H 'Authorization: Bearer {token}' -X POST http://{api}/v1/tasks -d '{{\"image\":\"holdfast/echo:latest\",\"ports\":[{{\"container\":7777}}]}}'\n\
                     Then find its endpoint with: curl -s -H 'Authorization: Bearer {token}' http://{api}/v1/tasks\n\
                     UI: http://{api}/#token={token}\n\
                     Cluster port {cluster}: mutual TLS; join tokens in {data}",
                    cluster = cluster,
                    data = data_dir.display(),
                    file = token_file.display()
                );
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
}

/// `holdfast echo`: the reference task until it exits; its exit code.
async fn run_echo(a: EchoArgs) -> anyhow::Result<u8> {
    let config = holdfast::echo::EchoConfig {
        listen: a.listen,
        exit_after: a.exit_after,
        exit_code: a.exit_code,
        crash_on: a.crash_on,
        startup_delay: a.startup_delay,
        fail_health_after: a.fail_health_after,
    };
    let code = holdfast::echo::run(config, holdfast::shutdown_signal()).await?;
    Ok(u8::try_from(code).unwrap_or(1))
}

/// `holdfast completions SHELL`.
fn print_completions(shell: clap_complete::Shell) -> anyhow::Result<u8> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    // Into memory first: clap_complete panics on a failed write (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "holdfast", &mut script);
    std::io::Write::write_all(&mut std::io::stdout(), &script)?;
    Ok(0)
}
