//! One holdfast process: wires the manager and/or worker roles together, serves their
//! ports, and drains cleanly when the shutdown future resolves (SIGTERM from systemd).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::Config;
use crate::manager::{self, Manager, ManagerSettings};
use crate::net::door::Revocations;
use crate::net::identity::{spawn_renewal, IdentitySettings, NodeTls};
use crate::net::pki::Role;
use crate::worker::agent::{self, WorkerConfig};
use crate::worker::runtime::docker::DockerRuntime;
use crate::worker::runtime::guarded::GuardedRuntime;
use crate::worker::runtime::Runtime;

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The replicated database refused to open or join.
    #[error(transparent)]
    Db(#[from] holdfast_raft::DbError),
    /// A port could not be bound.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The data directory could not be created or made private (0700).
    #[error("data directory {}: {source}", dir.display())]
    DataDir {
        /// The directory (`--data-dir`).
        dir: std::path::PathBuf,
        /// What the filesystem said.
        source: std::io::Error,
    },
    /// The API's TLS configuration could not be built.
    #[error(transparent)]
    ApiTls(#[from] manager::api::tls::TlsError),
    /// `--metrics` names an address other than loopback (it has no authentication).
    #[error("--metrics {addr}: loopback addresses only")]
    MetricsNotLoopback {
        /// The address given.
        addr: String,
    },
    /// A role's task panicked or was cancelled.
    #[error(transparent)]
    Task(tokio::task::JoinError),
    /// The worker could not start.
    #[error(transparent)]
    Worker(#[from] agent::WorkerError),
    /// The container engine is unreachable at startup.
    #[error("container engine: {0}")]
    Runtime(#[from] crate::worker::runtime::RuntimeError),
    /// Nothing to run.
    #[error("nothing to run: pass --manager, --worker, or both")]
    NoRole,
    /// The node has no usable cluster certificate and could not get one.
    #[error(transparent)]
    Identity(#[from] crate::net::identity::IdentityError),
    /// Raft stopped on its own: the replicated database's storage failed.
    #[error(transparent)]
    FatalStorage(#[from] FatalStorage),
}

/// Raft stopped on its own because its storage failed (ARCHITECTURE.md: only SQLite/IO
/// failures stop `apply`); the process must end non-zero, naming the file and cause.
#[derive(Debug, thiserror::Error)]
#[error("fatal storage error in {}: {cause}", dir.display())]
pub struct FatalStorage {
    /// The manager's data directory.
    pub dir: std::path::PathBuf,
    /// What Raft reported.
    pub cause: String,
}

/// A role task's error as the node's: the kind it had (worker, fatal storage) is kept
/// through the `io::Error` the serving tasks share, never read back from its text.
fn node_error(e: std::io::Error) -> NodeError {
    let kept = e.get_ref().is_some_and(|inner| inner.is::<FatalStorage>() || inner.is::<agent::WorkerError>());
    if !kept {
        return NodeError::Io(e);
    }
    let kind = e.kind();
    match e.into_inner() {
        Some(inner) => match inner.downcast::<FatalStorage>() {
            Ok(f) => NodeError::FatalStorage(*f),
            Err(inner) => match inner.downcast::<agent::WorkerError>() {
                Ok(w) => NodeError::Worker(*w),
                Err(other) => NodeError::Io(std::io::Error::other(other)),
            },
        },
        None => NodeError::Io(kind.into()),
    }
}

/// Requests in flight on the cluster port at most (long-polls included); more get 503.
const CLUSTER_IN_FLIGHT: usize = 4_096;

/// Runs the node until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    run_with_runtime(config, None, shutdown).await
}

/// Like [`run`], with an injected container runtime (tests of scheduling at scale);
/// `None` connects to the local Docker engine.
pub async fn run_with_runtime(
    config: Config,
    runtime: Option<Arc<dyn Runtime>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    run_service(config, runtime, crate::service::ServiceOptions::default(), shutdown).await
}

/// Like [`run_with_runtime`], with the service options (`--metrics`). Tells systemd
/// when the node is ready, alive and stopping (ARCHITECTURE.md "Running as a service").
pub async fn run_service(
    config: Config,
    runtime: Option<Arc<dyn Runtime>>,
    options: crate::service::ServiceOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    if config.manager.is_none() && config.worker.is_none() {
        return Err(NodeError::NoRole);
    }
    crate::manager::api::auth::private_dir(&config.data_dir)
        .map_err(|source| NodeError::DataDir { dir: config.data_dir.clone(), source })?;
    tokio::pin!(shutdown);
    // The node's certificate first: every cluster-port byte is mutual TLS.
    let identity = identity_settings(&config);
    let (tls, bootstrapped) = tokio::select! {
        r = NodeTls::establish(&identity) => r?,
        _ = &mut shutdown => return Ok(()),
    };
    let (stop_tx, _) = broadcast::channel::<()>(1);
    let node = Wiring {
        config: &config,
        tls,
        // One registry of breakers and bulkheads per process, shown by health and metrics.
        resilience: crate::resilience::Registry::new(),
        stop_tx,
    };
    let mut roles = Roles {
        tasks: Vec::new(),
        db: None,
        watched: crate::service::Watched { max_idle: Duration::from_secs(30), ..Default::default() },
        manager: None,
    };
    if let Some(m) = &config.manager {
        start_manager(&node, m, bootstrapped, &mut roles).await?;
    }
    if let Some(wr) = &config.worker {
        start_worker(&node, wr, runtime, &mut roles).await?;
    }
    if let Some(addr) = &options.metrics {
        serve_metrics(&node, addr, &mut roles).await?;
    }
    tokio::spawn(crate::service::supervise(roles.watched.clone(), crate::service::tick(), node.stop_tx.subscribe()));
    let result = drain(roles.tasks, &node.stop_tx, &mut shutdown).await;
    if let Some(db) = roles.db {
        db.shutdown().await;
    }
    result
}

/// What every role's startup shares.
struct Wiring<'a> {
    /// The node's configuration.
    config: &'a Config,
    /// The node's cluster identity (mutual TLS).
    tls: Arc<NodeTls>,
    /// The process's breakers and bulkheads.
    resilience: crate::resilience::Registry,
    /// Broadcast once when the node stops.
    stop_tx: broadcast::Sender<()>,
}

/// What the started roles hand back to the node.
struct Roles {
    /// Role tasks whose end (an error) ends the node.
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// The manager's replicated database, shut down last.
    db: Option<holdfast_raft::ReplicatedDb>,
    /// What the service watchdog and readiness look at.
    watched: crate::service::Watched,
    /// The manager, for `--metrics`.
    manager: Option<Arc<Manager>>,
}

/// The identity settings of this node: its role and where it may join.
fn identity_settings(config: &Config) -> IdentitySettings {
    IdentitySettings {
        node: config.node_id.clone(),
        role: if config.manager.is_some() { Role::Manager } else { Role::Worker },
        data_dir: config.data_dir.clone(),
        bootstrap: config.manager.as_ref().is_some_and(|m| m.bootstrap),
        token: config.trust.token.clone(),
        seeds: match (&config.manager, &config.worker) {
            (Some(m), _) if !m.join.is_empty() => m.join.clone(),
            (_, Some(w)) => w.managers.clone(),
            _ => Vec::new(),
        },
        lifetime: config.trust.cert_lifetime,
        grace: config.trust.cert_grace,
    }
}

/// The manager role: opens the replicated database, serves the cluster port and the
/// API, and starts the background and leader loops.
async fn start_manager(
    node: &Wiring<'_>,
    m: &crate::config::ManagerRole,
    bootstrapped: Option<crate::net::identity::Bootstrapped>,
    roles: &mut Roles,
) -> Result<(), NodeError> {
    let (rdb, mgr) = open_manager(node, m).await?;
    let cluster_listener = crate::net::bind(&m.cluster, "cluster traffic").await?;
    let api_listener = crate::net::bind(&m.api, "the API").await?;
    let revocations = Revocations::default();
    let trust = manager::trust::Trust::new(node.config.trust.cert_lifetime, revocations.clone(), node.tls.local_ca());
    roles.tasks.push(serve_cluster_port(node, &rdb, &mgr, &trust, &revocations, cluster_listener));
    spawn_trust_loops(node, &mgr, &trust, revocations, bootstrapped);
    roles.tasks.push(serve_api(node, m, &mgr, &trust, api_listener)?);
    if let Some(sink) = &m.event_sink {
        let stop = node.stop_tx.subscribe();
        let (_stats, sink_task) = manager::sink::spawn(&mgr, sink.clone(), &node.config.data_dir, stop);
        roles.tasks.push(sink_task);
    }
    if m.bootstrap {
        rdb.bootstrap().await?;
        let data_dir = node.config.data_dir.clone();
        tokio::spawn(manager::api::auth::ensure_admin_token(mgr.clone(), data_dir, node.stop_tx.subscribe()));
    }
    let manager_dir = node.config.data_dir.join("manager");
    roles.tasks.push(tokio::spawn(watch_fatal(rdb.clone(), mgr.domain.clone(), manager_dir, node.stop_tx.subscribe())));
    if !m.join.is_empty() {
        // Joining needs our own endpoints up first, so it runs beside them.
        tokio::spawn(join_cluster(rdb.clone(), m.join.clone()));
    }
    roles.tasks.push(spawn_manager_loops(node, m, &rdb, &mgr));
    tracing::info!(node = %node.config.node_id, api = %m.api, cluster = %m.cluster, "manager serving");
    roles.watched.db = Some(rdb.clone());
    roles.manager = Some(mgr);
    roles.db = Some(rdb);
    Ok(())
}

/// Opens (or creates) the replicated database under `<data-dir>/manager` and the
/// manager over it.
async fn open_manager(
    node: &Wiring<'_>,
    m: &crate::config::ManagerRole,
) -> Result<(holdfast_raft::ReplicatedDb, Arc<Manager>), NodeError> {
    let config = node.config;
    let (domain, applied) = manager::state::DomainState::new();
    let mut rc = holdfast_raft::Config::new(
        &config.node_id,
        config.data_dir.join("manager"),
        &m.advertise_cluster,
        &m.advertise_api,
        node.tls.client_config(),
    );
    rc.op_timeout = Duration::from_secs(5);
    rc.version = crate::cli::LONG_VERSION.to_string();
    rc.feature_level = manager::state::upgrade::build_level();
    rc.force_new_cluster = m.force_new_cluster;
    rc.min_free_bytes = m.min_free_mb.saturating_mul(1 << 20);
    rc.snapshot_every = m.snapshot_every;
    let rdb = holdfast_raft::ReplicatedDb::open(rc, domain.clone()).await?;
    let settings = ManagerSettings {
        strategy: m.strategy,
        lease: m.lease,
        heartbeat_ttl: m.heartbeat_ttl,
        max_long_poll: (m.heartbeat_ttl / 2).min(std::time::Duration::from_millis(2_500)),
        scratch_dir: config.data_dir.join("scratch"),
        blob_dir: config.data_dir.join("blobs"),
        blob_min_free_bytes: m.min_free_mb.saturating_mul(1 << 20),
        retention: m.retention.clone(),
        ..Default::default()
    };
    let mgr = Manager::new(rdb.clone(), applied, settings, node.resilience.clone(), domain);
    // Set once, here, before anything reads it.
    let _ = mgr.cluster_tls.set(node.tls.clone());
    Ok((rdb, mgr))
}

/// Serves the cluster port: Raft, gateway, trust and image routes behind one door.
fn serve_cluster_port(
    node: &Wiring<'_>,
    rdb: &holdfast_raft::ReplicatedDb,
    mgr: &Arc<Manager>,
    trust: &Arc<manager::trust::Trust>,
    revocations: &Revocations,
    listener: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    // One door in front of every cluster route: Raft, gateway and trust alike.
    let router = rdb
        .cluster_router()
        .merge(manager::gateway::router(mgr.clone()))
        .merge(manager::trust::cluster_router(mgr.clone(), trust.clone()))
        .merge(manager::images::cluster_router(mgr.clone()))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(tokio::sync::Semaphore::new(CLUSTER_IN_FLIGHT)),
            crate::net::door::bounded,
        ))
        .layer(axum::middleware::from_fn_with_state(revocations.clone(), crate::net::door::check));
    crate::net::tls::serve(listener, node.tls.server_config(), router, Default::default(), node.stop_tx.subscribe())
}

/// The manager's trust loops: revocations and trusted CAs follow replicated state,
/// the first manager seeds the CA and tokens, and the node renews its own certificate.
/// They end on the shutdown broadcast; their end is not the node's.
fn spawn_trust_loops(
    node: &Wiring<'_>,
    mgr: &Arc<Manager>,
    trust: &Arc<manager::trust::Trust>,
    revocations: Revocations,
    bootstrapped: Option<crate::net::identity::Bootstrapped>,
) {
    drop(manager::trust::refresh_revocations(mgr.clone(), revocations, node.stop_tx.subscribe()));
    if let Some(boot) = bootstrapped {
        drop(manager::trust::seed(mgr.clone(), boot, node.stop_tx.subscribe()));
    }
    // Managers hold the CA: they renew their own certificate locally.
    let (rm, rt, rtls, lifetime) = (mgr.clone(), trust.clone(), node.tls.clone(), node.config.trust.cert_lifetime);
    let renew = move || manager::trust::renew_self(rm.clone(), rt.clone(), rtls.clone(), lifetime);
    drop(spawn_renewal(node.tls.clone(), node.config.data_dir.clone(), renew, node.stop_tx.subscribe()));
    // The trusted CAs follow replicated state (a CA rotation).
    drop(manager::trust::watch_cas(mgr.clone(), trust.clone(), node.tls.clone(), node.stop_tx.subscribe()));
}

/// Serves the public API: plain HTTP on loopback, HTTPS anywhere else.
fn serve_api(
    node: &Wiring<'_>,
    m: &crate::config::ManagerRole,
    mgr: &Arc<Manager>,
    trust: &Arc<manager::trust::Trust>,
    listener: tokio::net::TcpListener,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, NodeError> {
    // The token check runs inside the limits, so its lookups are bounded too; the
    // stream router gets its own (no route is reached without its role's token).
    let api_routes = manager::api::router(mgr.clone()).merge(manager::trust::api_router(mgr.clone(), trust.clone()));
    let routes = manager::api::auth::layer(api_routes, mgr.clone());
    let streams = manager::api::events::router(mgr.clone(), Default::default(), node.stop_tx.clone());
    let api = manager::api::limits::apply(routes, Default::default())
        // Merged after the limits: a stream must not be cut by the request timeout;
        // it has its own cap on open streams.
        .merge(manager::api::auth::layer(streams, mgr.clone()))
        // Image pushes are long and large: outside the request timeout and body
        // limit, with their own bounds (`api::images`).
        .merge(manager::api::auth::layer(manager::api::images::upload_router(mgr.clone()), mgr.clone()));
    // Off loopback the API speaks only HTTPS (ARCHITECTURE.md, "Access").
    let Some(source) = manager::api::tls::source_for(&m.api, &m.advertise_api, m.api_tls_files.clone()) else {
        return Ok(crate::net::serve(listener, api, node.stop_tx.subscribe()));
    };
    let (tls_config, issued) = manager::api::tls::server_config(&source)?;
    if let (Some(cert), manager::api::tls::CertSource::ClusterCa { names }) = (issued, &source) {
        drop(manager::api::tls::keep_issued(
            mgr.clone(),
            trust.clone(),
            cert,
            node.config.node_id.clone(),
            names.clone(),
            node.config.trust.cert_lifetime,
            node.stop_tx.subscribe(),
        ));
    }
    tracing::info!(api = %m.api, ?source, "the API serves HTTPS");
    Ok(manager::api::tls::serve(listener, api, tls_config, node.stop_tx.subscribe()))
}

/// Joins the manager cluster through `seeds`, retrying with backoff until it works.
async fn join_cluster(db: holdfast_raft::ReplicatedDb, seeds: Vec<String>) {
    let backoff = crate::resilience::retry::RetryPolicy {
        base: Duration::from_millis(200),
        cap: Duration::from_secs(5),
        max_attempts: None,
        deadline: None,
    };
    for failures in 0u32.. {
        match db.join(&seeds).await {
            Ok(()) => {
                tracing::info!(?seeds, "joined the manager cluster");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "join failed; retrying");
                let wait = backoff.delay(failures, &mut rand::thread_rng());
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// The image loop, the leader's loops (planner, liveness, housekeeping) and the member
/// record refresh; the returned task ends when the leader's loops do.
fn spawn_manager_loops(
    node: &Wiring<'_>,
    m: &crate::config::ManagerRole,
    rdb: &holdfast_raft::ReplicatedDb,
    mgr: &Arc<Manager>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let stop = || node.stop_tx.subscribe();
    let image_loop = manager::images::ImageLoop { retain: m.image_retain, ..Default::default() };
    drop(tokio::spawn(manager::images::run_loop(mgr.clone(), node.tls.clone(), image_loop, stop())));
    let planner = tokio::spawn(manager::leader::run_planner(mgr.clone(), stop()));
    let liveness = tokio::spawn(manager::leader::run_liveness(mgr.clone(), stop()));
    let housekeeping = tokio::spawn(manager::leader::housekeeping::run(mgr.clone(), stop()));
    drop(tokio::spawn(refresh_member_record(rdb.clone(), stop())));
    tokio::spawn(async move {
        let _ = tokio::join!(planner, liveness, housekeeping);
        Ok(())
    })
}

/// The worker role: the engine (behind its guard) and the agent's loops.
async fn start_worker(
    node: &Wiring<'_>,
    wr: &crate::config::WorkerRole,
    runtime: Option<Arc<dyn Runtime>>,
    roles: &mut Roles,
) -> Result<(), NodeError> {
    let runtime: Arc<dyn Runtime> = match runtime {
        Some(r) => r,
        None => Arc::new(DockerRuntime::connect().await?),
    };
    // Every engine call goes through one breaker and per-kind bulkheads.
    let runtime: Arc<dyn Runtime> = Arc::new(GuardedRuntime::new(runtime, &node.resilience, Default::default()));
    let config = node.config;
    let mut wc = WorkerConfig::new(&config.node_id, config.data_dir.join("worker"), wr.managers.clone());
    wc.advertise_host = wr.advertise_host.clone();
    wc.labels = wr.labels.clone();
    wc.resources_override = wr.resources_override.clone();
    wc.image_bandwidth = wr.image_bandwidth;
    roles.watched.worker = Some(wc.vitals.clone());
    wc.tls = Some(node.tls.clone());
    let rx = node.stop_tx.subscribe();
    // The worker's error travels as the io::Error the role tasks share and is read
    // back by kind in `node_error`.
    roles.tasks.push(tokio::spawn(async move { agent::run(wc, runtime, rx).await.map_err(std::io::Error::other) }));
    Ok(())
}

/// `--metrics ADDR`: `/metrics` and the health probes on a loopback address.
async fn serve_metrics(node: &Wiring<'_>, addr: &str, roles: &mut Roles) -> Result<(), NodeError> {
    // No authentication on this port: loopback only (ARCHITECTURE.md "Running as a service").
    if !crate::manager::api::tls::is_loopback(addr) {
        return Err(NodeError::MetricsNotLoopback { addr: addr.to_string() });
    }
    let listener = crate::net::bind(addr, "metrics").await?;
    let router = crate::service::metrics_router(roles.manager.clone(), roles.watched.clone(), node.resilience.clone());
    roles.tasks.push(crate::net::serve(listener, router, node.stop_tx.subscribe()));
    Ok(())
}

/// Waits until shutdown is asked for or a role stops on its own (an error), then
/// tells every task to stop and gives them a bounded time to end. A role's error is
/// the node's, with its kind.
async fn drain(
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    stop_tx: &broadcast::Sender<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let mut tasks = futures::future::select_all(tasks);
    let early = tokio::select! {
        _ = shutdown => None,
        (res, _, rest) = &mut tasks => Some((res, rest)),
    };
    crate::service::stopping();
    let _ = stop_tx.send(());
    let Some((res, rest)) = early else {
        let rest = tasks.into_inner();
        let _ = tokio::time::timeout(Duration::from_secs(15), futures::future::join_all(rest)).await;
        return Ok(());
    };
    let fatal = matches!(&res, Ok(Err(e)) if e.get_ref().is_some_and(|i| i.is::<FatalStorage>()));
    // After a fatal storage error the process must end within seconds.
    let grace = if fatal { Duration::from_secs(3) } else { Duration::from_secs(15) };
    let _ = tokio::time::timeout(grace, futures::future::join_all(rest)).await;
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(node_error(e)),
        Err(e) => Err(NodeError::Task(e)),
    }
}

/// Keeps this member's record in the Raft membership (addresses, version, feature
/// level) current after a restart with a new build or new addresses; gives up on
/// shutdown. Retries while the member is still joining or no leader is known.
async fn refresh_member_record(db: holdfast_raft::ReplicatedDb, mut stop: broadcast::Receiver<()>) {
    let mut wait = Duration::from_millis(200);
    loop {
        match db.refresh_record().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "member record refresh failed; retrying"),
        }
        tokio::select! {
            _ = stop.recv() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Ends with an error naming the file and the cause when Raft stops on its own (a
/// fatal storage error), so the process exits non-zero and systemd restarts it.
/// Ends quietly when the node is asked to stop.
async fn watch_fatal(
    db: holdfast_raft::ReplicatedDb,
    domain: Arc<manager::state::DomainState>,
    dir: std::path::PathBuf,
    mut stop: broadcast::Receiver<()>,
) -> Result<(), std::io::Error> {
    let mut status = db.watch_status();
    loop {
        let stopped = {
            let s = status.borrow_and_update();
            (s.role == holdfast_raft::Role::Shutdown)
                .then(|| s.fatal.clone().unwrap_or_else(|| "Raft stopped unexpectedly".into()))
        };
        if let Some(cause) = stopped {
            if domain.upgrade_required().is_some() {
                // A restart of this build cannot get past the entry: stay up, say so in
                // health and logs, and wait for the operator's new binary.
                tracing::error!(dir = %dir.display(), %cause, "this manager stopped applying: upgrade it");
                let _ = stop.recv().await;
                return Ok(());
            }
            tracing::error!(dir = %dir.display(), %cause, "fatal storage error; exiting");
            return Err(std::io::Error::other(FatalStorage { dir, cause }));
        }
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    // The database is closing (our own shutdown): nothing more to watch.
                    return std::future::pending().await;
                }
            }
            _ = stop.recv() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_data_dir_that_cannot_be_created_is_named_with_the_cause() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A regular file where a parent directory should be: mkdir fails for root too.
        let file = tmp.path().join("plain-file");
        std::fs::write(&file, b"").expect("write");
        let dir = file.join("data");
        let config = Config {
            node_id: "m1".into(),
            data_dir: dir.clone(),
            manager: Some(crate::config::ManagerRole::bootstrap("127.0.0.1:0", "127.0.0.1:0")),
            worker: None,
            trust: Default::default(),
        };
        let err = run(config, std::future::pending()).await.expect_err("cannot start");
        assert!(matches!(&err, NodeError::DataDir { dir: d, .. } if d == &dir), "{err:?}");
        assert!(err.to_string().contains(&dir.display().to_string()), "names the directory: {err}");
    }

    #[test]
    fn a_role_task_error_keeps_its_kind() {
        let worker = node_error(std::io::Error::other(agent::WorkerError::NoManagers));
        assert!(matches!(worker, NodeError::Worker(agent::WorkerError::NoManagers)), "{worker:?}");
        let fatal = FatalStorage { dir: "/data/manager".into(), cause: "disk full".into() };
        let fatal = node_error(std::io::Error::other(fatal));
        assert!(matches!(&fatal, NodeError::FatalStorage(f) if f.cause == "disk full"), "{fatal:?}");
        let bind = node_error(std::io::Error::from(std::io::ErrorKind::AddrInUse));
        assert!(matches!(&bind, NodeError::Io(e) if e.kind() == std::io::ErrorKind::AddrInUse), "{bind:?}");
    }
}
