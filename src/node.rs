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
    crate::manager::api::auth::private_dir(&config.data_dir)?;
    tokio::pin!(shutdown);
    // The node's certificate first: every cluster-port byte is mutual TLS.
    let identity = IdentitySettings {
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
    };
    let (tls, bootstrapped) = tokio::select! {
        r = NodeTls::establish(&identity) => r?,
        _ = &mut shutdown => return Ok(()),
    };
    let (stop_tx, _) = broadcast::channel::<()>(1);
    // One registry of breakers and bulkheads per process, shown by health and metrics.
    let resilience = crate::resilience::Registry::new();
    let mut tasks = Vec::new();
    let mut db = None;
    let mut watched = crate::service::Watched { max_idle: Duration::from_secs(30), ..Default::default() };
    let mut metrics_manager = None;

    if let Some(m) = &config.manager {
        let (domain, applied) = manager::state::DomainState::new();
        let events = domain.events();
        let mut rc = holdfast_raft::Config::new(
            &config.node_id,
            config.data_dir.join("manager"),
            &m.advertise_cluster,
            &m.advertise_api,
            tls.client_config(),
        );
        rc.op_timeout = Duration::from_secs(5);
        rc.version = crate::cli::LONG_VERSION.to_string();
        rc.feature_level = manager::state::upgrade::build_level();
        rc.force_new_cluster = m.force_new_cluster;
        rc.min_free_bytes = m.min_free_mb.saturating_mul(1 << 20);
        let rdb = holdfast_raft::ReplicatedDb::open(rc, domain).await?;
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
        let mgr = Manager::new(rdb.clone(), applied, settings, resilience.clone(), events);
        let _ = mgr.cluster_tls.set(tls.clone());
        let cluster_listener = crate::net::bind(&m.cluster, "cluster traffic").await?;
        let api_listener = crate::net::bind(&m.api, "the API").await?;
        let revocations = Revocations::default();
        let trust = manager::trust::Trust::new(config.trust.cert_lifetime, revocations.clone(), tls.local_ca());
        // One door in front of every cluster route: Raft, gateway and trust alike.
        let cluster_router = rdb
            .cluster_router()
            .merge(manager::gateway::router(mgr.clone()))
            .merge(manager::trust::cluster_router(mgr.clone(), trust.clone()))
            .merge(manager::images::cluster_router(mgr.clone()))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(tokio::sync::Semaphore::new(CLUSTER_IN_FLIGHT)),
                crate::net::door::bounded,
            ))
            .layer(axum::middleware::from_fn_with_state(revocations.clone(), crate::net::door::check));
        tasks.push(crate::net::tls::serve(
            cluster_listener,
            tls.server_config(),
            cluster_router,
            Default::default(),
            stop_tx.subscribe(),
        ));
        // Background loops end on the shutdown broadcast; their end is not the node's.
        drop(manager::trust::refresh_revocations(mgr.clone(), revocations.clone(), stop_tx.subscribe()));
        if let Some(boot) = bootstrapped.clone() {
            drop(manager::trust::seed(mgr.clone(), boot, stop_tx.subscribe()));
        }
        // Managers hold the CA: they renew their own certificate locally.
        let (rm, rt, rtls, lifetime) = (mgr.clone(), trust.clone(), tls.clone(), config.trust.cert_lifetime);
        let renew = move || manager::trust::renew_self(rm.clone(), rt.clone(), rtls.clone(), lifetime);
        drop(spawn_renewal(tls.clone(), config.data_dir.clone(), renew, stop_tx.subscribe()));
        // The trusted CAs follow replicated state (a CA rotation).
        drop(manager::trust::watch_cas(mgr.clone(), trust.clone(), tls.clone(), stop_tx.subscribe()));
        // The token check runs inside the limits, so its lookups are bounded too; the
        // stream router gets its own (no route is reached without its role's token).
        let api_routes =
            manager::api::router(mgr.clone()).merge(manager::trust::api_router(mgr.clone(), trust.clone()));
        let routes = manager::api::auth::layer(api_routes, mgr.clone());
        let streams = manager::api::events::router(mgr.clone(), Default::default(), stop_tx.clone());
        let api = manager::api::limits::apply(routes, Default::default())
            // Merged after the limits: a stream must not be cut by the request timeout;
            // it has its own cap on open streams.
            .merge(manager::api::auth::layer(streams, mgr.clone()))
            // Image pushes are long and large: outside the request timeout and body
            // limit, with their own bounds (`api::images`).
            .merge(manager::api::auth::layer(manager::api::images::upload_router(mgr.clone()), mgr.clone()));
        // Off loopback the API speaks only HTTPS (ARCHITECTURE.md, "Access").
        let api_tls = manager::api::tls::source_for(&m.api, &m.advertise_api, m.api_tls_files.clone());
        tasks.push(match api_tls {
            Some(source) => {
                let (tls_config, issued) =
                    manager::api::tls::server_config(&source).map_err(|e| std::io::Error::other(e.to_string()))?;
                if let (Some(cert), manager::api::tls::CertSource::ClusterCa { names }) = (issued, &source) {
                    drop(manager::api::tls::keep_issued(
                        mgr.clone(),
                        trust.clone(),
                        cert,
                        config.node_id.clone(),
                        names.clone(),
                        config.trust.cert_lifetime,
                        stop_tx.subscribe(),
                    ));
                }
                tracing::info!(api = %m.api, ?source, "the API serves HTTPS");
                manager::api::tls::serve(api_listener, api, tls_config, stop_tx.subscribe())
            }
            None => crate::net::serve(api_listener, api, stop_tx.subscribe()),
        });
        if let Some(sink) = &m.event_sink {
            let (_stats, sink_task) = manager::sink::spawn(&mgr, sink.clone(), &config.data_dir, stop_tx.subscribe());
            tasks.push(sink_task);
        }
        if m.bootstrap {
            rdb.bootstrap().await?;
            let ensure =
                manager::api::auth::ensure_admin_token(mgr.clone(), config.data_dir.clone(), stop_tx.subscribe());
            tokio::spawn(ensure);
        }
        tasks.push(tokio::spawn(watch_fatal(rdb.clone(), config.data_dir.join("manager"), stop_tx.subscribe())));
        if !m.join.is_empty() {
            let seeds = m.join.clone();
            let joining = rdb.clone();
            // Joining needs our own endpoints up first, so it runs beside them.
            tokio::spawn(async move {
                let backoff = crate::resilience::retry::RetryPolicy {
                    base: Duration::from_millis(200),
                    cap: Duration::from_secs(5),
                    max_attempts: None,
                    deadline: None,
                };
                for failures in 0u32.. {
                    match joining.join(&seeds).await {
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
            });
        }
        let image_loop = manager::images::ImageLoop { retain: m.image_retain, ..Default::default() };
        drop(tokio::spawn(manager::images::run_loop(mgr.clone(), tls.clone(), image_loop, stop_tx.subscribe())));
        let planner = tokio::spawn(manager::leader::run_planner(mgr.clone(), stop_tx.subscribe()));
        let liveness = tokio::spawn(manager::leader::run_liveness(mgr.clone(), stop_tx.subscribe()));
        let housekeeping = tokio::spawn(manager::leader::housekeeping::run(mgr.clone(), stop_tx.subscribe()));
        drop(tokio::spawn(refresh_member_record(rdb.clone(), stop_tx.subscribe())));
        tasks.push(tokio::spawn(async move {
            let _ = tokio::join!(planner, liveness, housekeeping);
            Ok(())
        }));
        tracing::info!(node = %config.node_id, api = %m.api, cluster = %m.cluster, "manager serving");
        watched.db = Some(rdb.clone());
        metrics_manager = Some(mgr.clone());
        db = Some(rdb);
    }

    if let Some(wr) = &config.worker {
        let runtime: Arc<dyn Runtime> = match runtime {
            Some(r) => r,
            None => Arc::new(DockerRuntime::connect().await?),
        };
        // Every engine call goes through one breaker and per-kind bulkheads.
        let runtime: Arc<dyn Runtime> = Arc::new(GuardedRuntime::new(runtime, &resilience, Default::default()));
        let mut wc = WorkerConfig::new(&config.node_id, config.data_dir.join("worker"), wr.managers.clone());
        wc.advertise_host = wr.advertise_host.clone();
        wc.labels = wr.labels.clone();
        wc.resources_override = wr.resources_override.clone();
        wc.image_bandwidth = wr.image_bandwidth;
        watched.worker = Some(wc.vitals.clone());
        wc.tls = Some(tls.clone());
        let rx = stop_tx.subscribe();
        tasks.push(tokio::spawn(async move { agent::run(wc, runtime, rx).await.map_err(std::io::Error::other) }));
    }

    if let Some(addr) = &options.metrics {
        // No authentication on this port: loopback only (ARCHITECTURE.md "Running as a service").
        if !crate::manager::api::tls::is_loopback(addr) {
            return Err(NodeError::Io(std::io::Error::other(format!("--metrics {addr}: loopback addresses only"))));
        }
        let listener = crate::net::bind(addr, "metrics").await?;
        let router = crate::service::metrics_router(metrics_manager, watched.clone(), resilience.clone());
        tasks.push(crate::net::serve(listener, router, stop_tx.subscribe()));
    }
    tokio::spawn(crate::service::supervise(watched, crate::service::tick(), stop_tx.subscribe()));

    // Either shutdown is asked for, or a role stops on its own (an error).
    let mut tasks = futures::future::select_all(tasks);
    let early = tokio::select! {
        _ = &mut shutdown => None,
        (res, _, rest) = &mut tasks => Some((res, rest)),
    };
    crate::service::stopping();
    let _ = stop_tx.send(());
    let result = match early {
        Some((res, rest)) => {
            let fatal = matches!(&res, Ok(Err(e)) if e.get_ref().is_some_and(|i| i.is::<FatalStorage>()));
            // After a fatal storage error the process must end within seconds.
            let grace = if fatal { Duration::from_secs(3) } else { Duration::from_secs(15) };
            let _ = tokio::time::timeout(grace, futures::future::join_all(rest)).await;
            match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(node_error(e)),
                Err(e) => Err(NodeError::Io(std::io::Error::other(e))),
            }
        }
        None => {
            let rest = tasks.into_inner();
            let _ = tokio::time::timeout(Duration::from_secs(15), futures::future::join_all(rest)).await;
            Ok(())
        }
    };
    if let Some(db) = db {
        db.shutdown().await;
    }
    result
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
            if cause.contains(manager::state::upgrade::UPGRADE_ME) {
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
