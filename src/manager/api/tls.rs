//! HTTPS for the public API (ARCHITECTURE.md, "Access"): bound to anything but a
//! loopback address the API speaks only TLS. The certificate comes from
//! `--api-cert/--api-key` when given; otherwise the manager issues its own server
//! certificate from the cluster CA ([`keep_issued`]), naming the bind and advertised
//! addresses, the host name and loopback, and renews it at two thirds of its life by
//! swapping it in for later handshakes (no restart). Clients trust the cluster CA
//! (`<data-dir>/tls/ca.pem`, or `--ca-file`).
//!
//! Served with tokio-rustls over hyper's HTTP/1 connection driver (what `axum::serve`
//! does for plain TCP, which has no TLS hook): a bounded handshake, then the router.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::manager::trust::Trust;
use crate::manager::Manager;
use crate::net::pki;

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
    /// Issued by the manager from the cluster CA for these names, renewed in place.
    ClusterCa {
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

/// This machine's host name, if it has a usable one.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim().to_string();
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then_some(name)
}

/// The names an API certificate carries for an API bound on `listen` and advertised as
/// `advertise`: those hosts (not a wildcard bind), the host name, and loopback.
pub fn names_for(listen: &str, advertise: &str) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let mut add = |host: &str| {
        if !host.is_empty() && host != "0.0.0.0" && host != "::" && !names.iter().any(|n| n == host) {
            names.push(host.to_string());
        }
    };
    for a in [advertise, listen] {
        add(a.rsplit_once(':').map_or(a, |(h, _)| h).trim_matches(['[', ']']));
    }
    if let Some(h) = hostname() {
        add(&h);
    }
    names
}

/// The source to use for an API bound on `listen`: the operator's files when given,
/// none on loopback, else a certificate from the cluster CA.
pub fn source_for(listen: &str, advertise: &str, files: Option<(PathBuf, PathBuf)>) -> Option<CertSource> {
    if let Some((cert, key)) = files {
        return Some(CertSource::Files { cert, key });
    }
    if is_loopback(listen) {
        return None;
    }
    Some(CertSource::ClusterCa { names: names_for(listen, advertise) })
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

/// The API's certificate issued from the cluster CA: empty until the CA is known
/// (handshakes fail until then), swapped in place on renewal.
#[derive(Debug, Default)]
pub struct ApiCert {
    current: RwLock<Option<Issued>>,
}

#[derive(Debug, Clone)]
struct Issued {
    key: Arc<CertifiedKey>,
    renew_at_ms: u64,
    ca_digest: String,
}

impl ApiCert {
    fn get(&self) -> Option<Issued> {
        crate::read(&self.current).clone()
    }

    fn set(&self, issued: Issued) {
        *crate::write(&self.current) = Some(issued);
    }

    /// The served certificate's leaf (DER), if one is issued yet.
    pub fn leaf(&self) -> Option<CertificateDer<'static>> {
        self.get().and_then(|i| i.key.cert.first().cloned())
    }
}

impl ResolvesServerCert for ApiCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = self.get().map(|i| i.key);
        if key.is_none() {
            tracing::warn!("API handshake refused: no API certificate yet (waiting for the cluster CA)");
        }
        key
    }
}

/// The rustls server configuration for `source`, and for [`CertSource::ClusterCa`] the
/// hot-swappable certificate that [`keep_issued`] fills.
pub fn server_config(source: &CertSource) -> Result<(Arc<rustls::ServerConfig>, Option<Arc<ApiCert>>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth();
    let (mut config, api_cert) = match source {
        CertSource::Files { cert, key } => {
            let (certs, key) = read_pair(cert, key)?;
            let config = builder
                .with_single_cert(certs, key)
                .map_err(|e| TlsError(format!("certificate and key do not make a pair: {e}")))?;
            (config, None)
        }
        CertSource::ClusterCa { .. } => {
            let api_cert = Arc::new(ApiCert::default());
            (builder.with_cert_resolver(api_cert.clone()), Some(api_cert))
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), api_cert))
}

/// Keeps `cert` issued from the cluster CA for `names` as manager `node`: issues it as
/// soon as the CA is known, again at two thirds of its `lifetime`, and at once when the
/// signing CA changes (a CA rotation). Later handshakes get the new one; connections
/// already open keep going.
pub fn keep_issued(
    m: Arc<Manager>,
    trust: Arc<Trust>,
    cert: Arc<ApiCert>,
    node: String,
    names: Vec<String>,
    lifetime: Duration,
    mut shutdown: broadcast::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut waited = false;
        loop {
            let now = pki::now_ms();
            let mut wait = Duration::from_secs(60);
            match crate::manager::trust::ca(&m, &trust).await {
                None => {
                    if !waited {
                        tracing::info!("the API certificate waits for the cluster CA (this manager is catching up)");
                        waited = true;
                    }
                    wait = Duration::from_millis(200);
                }
                Some(ca) => {
                    let digest = ca.digest().unwrap_or_default();
                    let current = cert.get();
                    let due = current.as_ref().is_none_or(|c| c.ca_digest != digest || now >= c.renew_at_ms);
                    if due {
                        // During a CA rotation the chain carries the cross certificate,
                        // so a client that trusts only the old CA still verifies it.
                        let chain = crate::manager::trust::cas(&m, &trust).await.map(|c| c.chain_pem());
                        let chain = chain.unwrap_or_else(|| ca.cert_pem.clone());
                        match issue(&ca, &chain, &node, &names, lifetime) {
                            Ok(issued) => {
                                tracing::info!(?names, ca = %digest, "API certificate issued from the cluster CA");
                                cert.set(issued);
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot issue the API certificate; retrying");
                                wait = Duration::from_secs(1);
                            }
                        }
                    }
                    if let Some(c) = cert.get() {
                        let until = c.renew_at_ms.saturating_sub(pki::now_ms()).max(100);
                        wait = wait.min(Duration::from_millis(until));
                    }
                }
            }
            // A CA rotation shows within a second (a cheap local read).
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
            }
        }
    })
}

fn issue(ca: &pki::Ca, chain: &str, node: &str, names: &[String], lifetime: Duration) -> Result<Issued, TlsError> {
    let (cert_pem, key_pem) = pki::issue_server_cert(ca, node, names, lifetime).map_err(|e| TlsError(e.to_string()))?;
    let info = pki::CertInfo::from_der(&pki::cert_der_from_pem(&cert_pem).map_err(|e| TlsError(e.to_string()))?)
        .map_err(|e| TlsError(e.to_string()))?;
    let key = crate::net::tls::certified_key(&cert_pem, &key_pem, chain).map_err(|e| TlsError(e.to_string()))?;
    Ok(Issued { key, renew_at_ms: info.renew_at_ms(), ca_digest: ca.digest().map_err(|e| TlsError(e.to_string()))? })
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
    use rustls::client::danger::ServerCertVerifier;

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
    fn off_loopback_the_certificate_names_the_addresses_the_host_and_loopback() {
        let Some(CertSource::ClusterCa { names }) = source_for("0.0.0.0:7700", "10.1.2.3:7700", None) else {
            panic!("off loopback the API certificate comes from the cluster CA");
        };
        for n in ["10.1.2.3", "localhost", "127.0.0.1"] {
            assert!(names.iter().any(|x| x == n), "{n} in {names:?}");
        }
        assert!(!names.iter().any(|x| x == "0.0.0.0"), "a wildcard bind is no name");
        if let Some(h) = hostname() {
            assert!(names.contains(&h), "host name {h} in {names:?}");
        }
        assert!(source_for("127.0.0.1:7700", "127.0.0.1:7700", None).is_none());
    }

    #[test]
    fn an_issued_api_certificate_chains_to_the_cluster_ca_and_names_the_api_address() {
        let ca = pki::Ca::generate().unwrap();
        let issued =
            issue(&ca, &ca.cert_pem, "m1", &names_for("10.1.2.3:7700", "10.1.2.3:7700"), Duration::from_secs(60))
                .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().unwrap()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = issued.key.cert[0].clone();
        let at = rustls::pki_types::UnixTime::now();
        for name in ["10.1.2.3", "localhost", "127.0.0.1"] {
            let sn = rustls::pki_types::ServerName::try_from(name).unwrap();
            assert!(verifier.verify_server_cert(&leaf, &[], &sn, &[], at).is_ok(), "{name}");
        }
        let other = rustls::pki_types::ServerName::try_from("10.9.9.9").unwrap();
        assert!(verifier.verify_server_cert(&leaf, &[], &other, &[], at).is_err(), "an address it does not name");
        assert_eq!(issued.ca_digest, ca.digest().unwrap());
    }
}
