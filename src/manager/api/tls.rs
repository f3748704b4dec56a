//! HTTPS for the public API (ARCHITECTURE.md, "Access"): bound to anything but a
//! loopback address the API speaks only TLS. The certificate comes from
//! `--api-cert/--api-key`, or else from a [`CertSource`] the node picks; until the
//! cluster CA issues API certificates, that is a self-signed stand-in kept (0600) in
//! the data dir as `api-cert.pem`/`api-key.pem`, which clients trust explicitly
//! (`holdfast ... --ca-file <data-dir>/api-cert.pem`).
//!
//! Served with tokio-rustls over hyper's HTTP/1 connection driver (what `axum::serve`
//! does for plain TCP, which has no TLS hook): a bounded handshake, then the router.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// File of the self-signed stand-in certificate in the data dir.
pub const SELF_SIGNED_CERT: &str = "api-cert.pem";
/// File of its key in the data dir.
pub const SELF_SIGNED_KEY: &str = "api-key.pem";

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the API's certificate comes from.
#[derive(Clone, Debug)]
pub enum CertSource {
    /// PEM files given by the operator (`--api-cert`, `--api-key`).
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// A self-signed certificate for `names`, created once in `dir` and reused.
    SelfSigned {
        /// Data directory.
        dir: PathBuf,
        /// DNS names and IP addresses the certificate names.
        names: Vec<String>,
    },
}

/// Why the API's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("API TLS: {0}")]
pub struct TlsError(String);

/// Whether `addr` (`host:port`) binds only a loopback interface.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return sa.ip().is_loopback();
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host == "localhost"
}

/// The source to use for an API bound on `listen`: the operator's files when given,
/// none on loopback, else the self-signed stand-in naming `advertise` and loopback.
pub fn source_for(
    listen: &str,
    advertise: &str,
    files: Option<(PathBuf, PathBuf)>,
    data_dir: &Path,
) -> Option<CertSource> {
    if let Some((cert, key)) = files {
        return Some(CertSource::Files { cert, key });
    }
    if is_loopback(listen) {
        return None;
    }
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    for a in [advertise, listen] {
        let host = a.rsplit_once(':').map_or(a, |(h, _)| h).trim_matches(['[', ']']);
        if !host.is_empty() && host != "0.0.0.0" && host != "::" && !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
    }
    Some(CertSource::SelfSigned { dir: data_dir.to_path_buf(), names })
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{}: no certificate in it", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError(format!("{}: {e}", key.display())))?;
    Ok((certs, key))
}

/// The rustls server configuration for `source` (creating the self-signed files when
/// absent).
pub fn server_config(source: &CertSource) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = match source {
        CertSource::Files { cert, key } => read_pair(cert, key)?,
        CertSource::SelfSigned { dir, names } => {
            let (cert, key) = (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY));
            if !cert.exists() || !key.exists() {
                let made = rcgen::generate_simple_self_signed(names.clone())
                    .map_err(|e| TlsError(format!("cannot make a self-signed certificate: {e}")))?;
                let write = |p: &Path, text: &str| {
                    super::auth::write_private(p, text).map_err(|e| TlsError(format!("{}: {e}", p.display())))
                };
                write(&key, &made.key_pair.serialize_pem())?;
                write(&cert, &made.cert.pem())?;
            }
            read_pair(&cert, &key)?
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("certificate and key do not make a pair: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` over TLS on `listener` until `shutdown` fires; connections still
/// open then get up to 10 s to finish.
pub fn serve(
    listener: TcpListener,
    router: axum::Router,
    config: Arc<rustls::ServerConfig>,
    mut shutdown: broadcast::Receiver<()>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "API accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.recv() => break,
            };
            let acceptor = acceptor.clone();
            let service = hyper_util::service::TowerToHyperService::new(router.clone());
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "API TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                let _ = watcher.watch(conn).await;
            });
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_or_not() {
        for a in ["127.0.0.1:7700", "[::1]:7700", "localhost:7700", "127.1.2.3:1"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["0.0.0.0:7700", "[::]:7700", "10.0.0.5:7700", "example.com:7700"] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn self_signed_is_made_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let src = source_for("0.0.0.0:7700", "10.1.2.3:7700", None, dir.path()).expect("TLS off loopback");
        server_config(&src).unwrap();
        let cert = std::fs::read(dir.path().join(SELF_SIGNED_CERT)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(SELF_SIGNED_KEY)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        server_config(&src).unwrap();
        assert_eq!(std::fs::read(dir.path().join(SELF_SIGNED_CERT)).unwrap(), cert, "reused, not remade");
        assert!(source_for("127.0.0.1:7700", "127.0.0.1:7700", None, dir.path()).is_none());
    }
}
