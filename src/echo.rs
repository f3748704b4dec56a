//! The reference task: an HTTP echo server with failure knobs.
//!
//! `POST /` answers with the request body, `GET /health` answers `ok`. The knobs let
//! tests and demos make the task exit, crash on an input, start slowly or turn unhealthy,
//! so each failure the README's "echo" section lists can be produced on demand.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Largest request body echoed; bigger ones get 413 so a client cannot make us buffer
/// without bound.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long open connections may take to finish after a graceful stop begins; a slow
/// client must not keep a stopping task alive past its orchestrator's kill deadline.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

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

/// How the server ends, requested from inside (knobs) or outside (shutdown).
#[derive(Clone, Copy, Debug)]
enum Exit {
    /// Stop accepting, let open requests finish, return this code.
    Graceful(i32),
    /// Drop every connection at once without answering, like a crashed process.
    Crash(i32),
}

/// State shared by the handlers.
#[derive(Clone)]
struct Shared {
    /// When `run`/`bind` was called, the reference for `fail_health_after`.
    started: Instant,
    /// Copy of the knobs the handlers read.
    config: EchoConfig,
    /// Where a handler reports that the process must end.
    exit: mpsc::Sender<Exit>,
}

/// A listening echo server that has not started serving yet; lets callers (tests,
/// `--listen …:0`) learn the port the OS picked before traffic flows.
pub struct BoundEcho {
    /// The bound socket.
    listener: TcpListener,
    /// Knobs and start time.
    started: Instant,
    /// The configuration it was bound with.
    config: EchoConfig,
}

/// Waits `startup_delay`, then binds `config.listen`; serve with [`BoundEcho::serve`].
pub async fn bind(config: EchoConfig) -> std::io::Result<BoundEcho> {
    let started = Instant::now();
    if let Some(delay) = config.startup_delay {
        tokio::time::sleep(delay).await;
    }
    let listener = TcpListener::bind(config.listen).await?;
    Ok(BoundEcho { listener, started, config })
}

/// Runs the echo server until `shutdown` resolves or a knob ends it; returns the exit code.
pub async fn run(config: EchoConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<i32> {
    bind(config).await?.serve(shutdown).await
}

impl BoundEcho {
    /// The address actually bound (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves (→ `Ok(0)`), `exit_after` passes
    /// (→ `Ok(exit_code)`) or a body equal to `crash_on` arrives (→ `Ok(1)`, the
    /// offending request and every other open connection dropped unanswered).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<i32> {
        // Capacity 1 is enough: the first exit request wins, later ones are moot.
        let (exit_tx, mut exit_rx) = mpsc::channel::<Exit>(1);
        let shared = Shared { started: self.started, config: self.config.clone(), exit: exit_tx.clone() };
        let app = Router::new()
            .route("/", post(echo))
            .route("/health", get(health))
            .layer(tower_http::limit::RequestBodyLimitLayer::new(MAX_BODY_BYTES))
            .with_state(shared);

        if let Some(after) = self.config.exit_after {
            let code = self.config.exit_code;
            let tx = exit_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.try_send(Exit::Graceful(code));
            });
        }
        drop(exit_tx);

        tracing::info!(addr = %self.listener.local_addr()?, "echo listening");
        let graceful = GracefulShutdown::new();
        // Connections live in a JoinSet so a crash can abort them all: axum::serve only
        // offers a graceful stop, and a crash must not answer.
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        let exit = loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let service = TowerToHyperService::new(app.clone());
                        let connection = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service);
                        let watched = graceful.watch(connection);
                        connections.spawn(async move {
                            if let Err(error) = watched.await {
                                tracing::debug!(%error, "echo connection ended with an error");
                            }
                        });
                    }
                    // Running out of descriptors or a reset before accept is transient;
                    // the listener itself stays good.
                    Err(error) => tracing::warn!(%error, "echo accept failed"),
                },
                Some(exit) = exit_rx.recv() => break exit,
                () = &mut shutdown => break Exit::Graceful(0),
                // Reap finished connections so the set does not grow with every request.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        };
        drop(self.listener);
        match exit {
            Exit::Graceful(code) => {
                tracing::info!(code, "echo stopping");
                if tokio::time::timeout(DRAIN_LIMIT, graceful.shutdown()).await.is_err() {
                    tracing::warn!(limit = ?DRAIN_LIMIT, "echo connections did not drain in time");
                }
                Ok(code)
            }
            Exit::Crash(code) => {
                tracing::error!(code, "echo crashing on request");
                connections.shutdown().await;
                Ok(code)
            }
        }
    }
}

/// `POST /`: the body back, with the request's content type.
async fn echo(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    if let Some(poison) = &shared.config.crash_on {
        if body == poison.as_bytes() {
            let _ = shared.exit.try_send(Exit::Crash(1));
            // Never answer: the server aborts this connection while we wait here.
            std::future::pending::<()>().await;
        }
    }
    let content_type =
        headers.get(header::CONTENT_TYPE).cloned().unwrap_or(HeaderValue::from_static("application/octet-stream"));
    ([(header::CONTENT_TYPE, content_type)], body)
}

/// `GET /health`: `ok`, or 500 once `fail_health_after` has passed. Each answer is a
/// log line, so a test can tell that probes really reach the task.
async fn health(State(shared): State<Shared>) -> (StatusCode, &'static str) {
    let failing = shared.config.fail_health_after.is_some_and(|after| shared.started.elapsed() >= after);
    tracing::info!(failing, "health probe answered");
    match shared.config.fail_health_after {
        Some(after) if shared.started.elapsed() >= after => (StatusCode::INTERNAL_SERVER_ERROR, "unhealthy"),
        _ => (StatusCode::OK, "ok"),
    }
}
