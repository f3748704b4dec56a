//! Cluster transport: binding and serving with graceful shutdown, and the trust layer
//! of the cluster port: PKI (`pki`), rustls configurations and the TLS accept loop
//! (`tls`), a node's identity files, joining and renewal (`identity`), and the door
//! that checks roles and identities (`door`). Raft's own client lives in
//! `holdfast-raft`, handed its rustls configuration from here.

pub mod door;
pub mod identity;
pub mod pki;
pub mod tls;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// Binds `addr`, with a message that names the address on failure.
pub async fn bind(addr: &str, what: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen for {what} on {addr}: {e} (is another holdfast running?)"))
    })
}

/// Serves `router` on `listener` until `shutdown` fires.
pub fn serve(
    listener: TcpListener,
    router: axum::Router,
    mut shutdown: broadcast::Receiver<()>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = shutdown.recv().await;
            })
            .await
    })
}
