//! rustls on the cluster port: certificate verifiers, the hot-swappable certificate
//! resolver, client and server configurations, and the hardened TLS accept loop that
//! hands each request the identity its peer proved (ARCHITECTURE.md "Trust").
//!
//! Verification is webpki's (through rustls); what this module adds is policy:
//! - a client accepts a server only if it proves a *manager* certificate of the
//!   cluster CA (the fixed name [`MANAGER_NAME`] stands in for a host name);
//! - a joining node accepts a server only if the CA it presents hashes to the digest
//!   pinned in its join token, before it sends the token's secret;
//! - a server asks every client for a certificate; a client without one may only join
//!   (the door enforces that), and one whose certificate expired within the grace
//!   window is let through the handshake marked expired, so it can only renew.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};

use super::pki::{self, CertInfo, MANAGER_NAME};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the material.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// A verifier could not be built.
    #[error("TLS verifier: {0}")]
    Verifier(String),
    /// A certificate or key could not be read.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

/// The one crypto provider of the process (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a rustls certified key from a leaf PEM, its key PEM and the CA PEM, which
/// may be a bundle (sent after the leaf, so a joining node can pin the CA; during a CA
/// rotation it also holds the cross-signed new CA and the old one).
pub fn certified_key(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let mut chain = vec![pki::cert_der_from_pem(cert_pem)?];
    chain.extend(pki::cert_ders_from_pem(ca_pem)?);
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| pki::PkiError::Parse { what: "node key", why: e.to_string() })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// The CAs a node trusts, shared by its client and server verifiers and replaced in
/// place during a CA rotation (both CAs while it overlaps, the new one after).
pub struct TrustAnchors {
    current: RwLock<Anchors>,
}

struct Anchors {
    ders: Vec<CertificateDer<'static>>,
    server: Arc<rustls::client::WebPkiServerVerifier>,
    client: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustAnchors({} CAs)", self.ders().len())
    }
}

impl TrustAnchors {
    /// Anchors for the CA(s) `ca_ders`.
    pub fn new(ca_ders: &[CertificateDer<'static>]) -> Result<Arc<TrustAnchors>, TlsError> {
        Ok(Arc::new(TrustAnchors { current: RwLock::new(Self::build(ca_ders)?) }))
    }

    fn build(ca_ders: &[CertificateDer<'static>]) -> Result<Anchors, TlsError> {
        let roots = roots_of(ca_ders)?;
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let client = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(Anchors { ders: ca_ders.to_vec(), server, client })
    }

    /// Trusts exactly `ca_ders` from the next handshake on.
    pub fn set(&self, ca_ders: &[CertificateDer<'static>]) -> Result<(), TlsError> {
        let built = Self::build(ca_ders)?;
        *crate::write(&self.current) = built;
        Ok(())
    }

    /// The CAs trusted now.
    pub fn ders(&self) -> Vec<CertificateDer<'static>> {
        crate::read(&self.current).ders.clone()
    }

    fn server(&self) -> Arc<rustls::client::WebPkiServerVerifier> {
        crate::read(&self.current).server.clone()
    }

    fn client(&self) -> Arc<dyn ClientCertVerifier> {
        crate::read(&self.current).client.clone()
    }
}

/// The node's current certificate, swapped in place on renewal: new handshakes use
/// the new one, connections already open keep going (no failed RPC on rotation).
#[derive(Debug)]
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    /// A resolver serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(CertResolver { current: RwLock::new(key) })
    }

    /// Replaces the certificate for every later handshake.
    pub fn swap(&self, key: Arc<CertifiedKey>) {
        *crate::write(&self.current) = key;
    }

    fn get(&self) -> Arc<CertifiedKey> {
        crate::read(&self.current).clone()
    }
}

impl ResolvesClientCert for CertResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

fn roots_of(ca_ders: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for der in ca_ders {
        roots.add(der.clone())?;
    }
    Ok(Arc::new(roots))
}

fn manager_name() -> ServerName<'static> {
    ServerName::try_from(MANAGER_NAME).unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()))
}

/// The signature checks every verifier here shares: the process provider's algorithms,
/// the same ones the webpki verifiers of [`TrustAnchors`] are built with (`provider()`).
macro_rules! provider_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            provider().signature_verification_algorithms.supported_schemes()
        }
    };
}

/// Accepts a server only with a manager certificate of the trusted CA(s).
#[derive(Debug)]
struct ManagerVerifier {
    anchors: Arc<TrustAnchors>,
}

impl ManagerVerifier {
    fn new(ca_ders: &[CertificateDer<'static>]) -> Result<Self, TlsError> {
        Ok(ManagerVerifier { anchors: TrustAnchors::new(ca_ders)? })
    }
}

impl ServerCertVerifier for ManagerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The role is the identity: every manager certificate carries MANAGER_NAME,
        // workers' do not, so a worker can never pose as a manager.
        self.anchors.server().verify_server_cert(end_entity, intermediates, &manager_name(), ocsp, now)
    }

    provider_signatures!();
}

/// Accepts a server whose chain includes a CA hashing to the token's digest, and whose
/// leaf is a manager certificate signed by that CA.
#[derive(Debug)]
struct PinnedVerifier {
    digest: String,
    mismatch: Arc<Mismatch>,
}

/// Set by a joining node's verifier when a manager presented another CA than the
/// token's: the join stops there, without sending the secret.
#[derive(Debug, Default)]
pub struct Mismatch(std::sync::Mutex<Option<String>>);

impl Mismatch {
    /// The reason, if a mismatch was seen (and clears it).
    pub fn take(&self) -> Option<String> {
        crate::lock(&self.0).take()
    }

    fn set(&self, why: String) {
        *crate::lock(&self.0) = Some(why);
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| pki::digest(c) == self.digest) else {
            let offered: Vec<String> = intermediates.iter().map(|c| pki::digest(c)).collect();
            let why = format!(
                "the manager presents CA {offered:?}, not the CA {} named in the join token; \
                 this is another cluster (or an impostor): check the token and --join address",
                self.digest
            );
            self.mismatch.set(why.clone());
            return Err(rustls::Error::General(why));
        };
        ManagerVerifier::new(&[ca.clone().into_owned()])
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    provider_signatures!();
}

/// Client certificates of the cluster CA; none at all is allowed through the handshake
/// (the door lets such a connection only join). A certificate that expired less than
/// `grace` ago passes the handshake too, verified as of its last valid second.
#[derive(Debug)]
struct GraceVerifier {
    anchors: Arc<TrustAnchors>,
    grace: Duration,
}

impl ClientCertVerifier for GraceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The trusted CAs change during a rotation; hints are optional in TLS 1.3.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = self.anchors.client();
        match inner.verify_client_cert(end_entity, intermediates, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                let info = CertInfo::from_der(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
                let now_ms = now.as_secs() * 1000;
                if now_ms.saturating_sub(info.not_after_ms) > self.grace.as_millis() as u64 {
                    return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
                }
                let last_valid =
                    UnixTime::since_unix_epoch(Duration::from_millis(info.not_after_ms.saturating_sub(1000)));
                inner.verify_client_cert(end_entity, intermediates, last_valid)
            }
            other => other,
        }
    }

    provider_signatures!();
}

/// A client configuration presenting `resolver`'s certificate and accepting only
/// managers of the CA(s) `ca_ders`. HTTP/1.1 with pooled, reused connections.
pub fn client_config(
    ca_ders: &[CertificateDer<'static>],
    resolver: Arc<CertResolver>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(TrustAnchors::new(ca_ders)?, resolver)
}

/// Like [`client_config`], trusting whatever `anchors` trusts at each handshake.
pub fn client_config_with(
    anchors: Arc<TrustAnchors>,
    resolver: Arc<CertResolver>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cfg = tls13_client(Arc::new(ManagerVerifier { anchors }))?.with_client_cert_resolver(resolver);
    Ok(Arc::new(no_resumption(cfg)))
}

/// A TLS 1.3 client configuration of the process provider that trusts servers as
/// `verifier` says; the caller adds the client's own certificate (or none).
fn tls13_client(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

/// TLS session resumption would carry the *old* certificate's identity into a new
/// connection after a renewal (the server sees the resumed session's peer), so it is
/// off: connections are pooled anyway, and a full handshake is rare.
fn no_resumption(mut cfg: rustls::ClientConfig) -> rustls::ClientConfig {
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg
}

/// A client configuration for joining: no certificate, and a server is trusted only if
/// its CA hashes to `ca_digest` (from the join token). The [`Mismatch`] tells why a
/// handshake failed on the CA.
pub fn join_client_config(ca_digest: &str) -> Result<(Arc<rustls::ClientConfig>, Arc<Mismatch>), TlsError> {
    let mismatch = Arc::new(Mismatch::default());
    let verifier = PinnedVerifier { digest: ca_digest.to_string(), mismatch: mismatch.clone() };
    let cfg = tls13_client(Arc::new(verifier))?.with_no_client_auth();
    Ok((Arc::new(no_resumption(cfg)), mismatch))
}

/// The cluster port's server configuration: presents `resolver`'s certificate, asks
/// every client for one of the CA(s) `ca_ders` (expired within `grace` allowed).
pub fn server_config(
    ca_ders: &[CertificateDer<'static>],
    resolver: Arc<CertResolver>,
    grace: Duration,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with(TrustAnchors::new(ca_ders)?, resolver, grace)
}

/// Like [`server_config`], trusting whatever `anchors` trusts at each handshake.
pub fn server_config_with(
    anchors: Arc<TrustAnchors>,
    resolver: Arc<CertResolver>,
    grace: Duration,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    // Not a switch: a client without a certificate completes the handshake only so it
    // can present a join token; `net::door` lets such a connection reach the join route
    // and nothing else (tested in `net::door` and `tests/cluster_trust.rs`). Every
    // certificate that is presented is verified against the cluster CA.
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(GraceVerifier { anchors, grace }))
        .with_cert_resolver(resolver);
    // No resumption: every connection proves its peer's current certificate.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A reqwest client over `tls`: no proxy, bounded connect, pooled connections.
pub fn http_client(tls: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> reqwest::Client {
    holdfast_raft::cluster_http_builder(tls, connect_timeout).build().unwrap_or_else(|e| {
        // Fails closed: a default client has no client certificate and does not trust
        // the cluster CA, so every cluster call it makes is refused at the handshake.
        tracing::error!(error = %e, "cannot build the cluster HTTP client; cluster calls will fail");
        reqwest::Client::default()
    })
}

/// Who is on the other end of a cluster-port connection, as proven in its handshake;
/// put in every request's extensions by [`serve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// No client certificate: may only join with a token.
    Anonymous,
    /// A node certificate of the cluster CA.
    Node {
        /// What the certificate says.
        info: CertInfo,
        /// It had expired at the handshake (within the grace window): may only renew.
        expired: bool,
    },
}

/// Limits of the cluster listener.
#[derive(Clone, Debug)]
pub struct ListenerLimits {
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// Time for a TLS handshake.
    pub handshake_timeout: Duration,
    /// Time for a request's headers to arrive.
    pub header_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 1_024,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `router` over TLS only on `listener` until `shutdown` fires. Each request
/// carries the [`Peer`] and its `ConnectInfo<SocketAddr>`. Plain HTTP, a foreign CA or a
/// handshake that does not finish in time never reaches the router.
pub fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    router: axum::Router,
    limits: ListenerLimits,
    mut shutdown: broadcast::Receiver<()>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (stream, remote) = tokio::select! {
                _ = shutdown.recv() => break,
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "cluster port: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%remote, max = limits.max_connections, "cluster port: connection cap reached; closing");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let router = router.clone();
            let limits = limits.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let _slot = slot;
                let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, reason = %e, "cluster port: TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "cluster port: TLS handshake timed out");
                        return;
                    }
                };
                let peer = peer_of(tls.get_ref().1.peer_certificates());
                let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    req.extensions_mut().insert(axum::extract::ConnectInfo(remote));
                    let router = router.clone();
                    async move {
                        use tower::ServiceExt;
                        router.oneshot(req.map(axum::body::Body::new)).await
                    }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout);
                let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                let _ = watcher.watch(conn).await;
            });
        }
        // Let requests in flight finish, within reason; long-polls end on their own.
        let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
        Ok(())
    })
}

fn peer_of(certs: Option<&[CertificateDer<'static>]>) -> Peer {
    match certs.and_then(|c| c.first()).map(|c| CertInfo::from_der(c)) {
        Some(Ok(info)) => {
            let expired = pki::now_ms() > info.not_after_ms;
            Peer::Node { info, expired }
        }
        // A CA-signed certificate we cannot read as a node certificate proves nothing.
        Some(Err(_)) | None => Peer::Anonymous,
    }
}

/// The address a request came from, for logs.
pub fn remote_of(req: &axum::extract::Request) -> Option<SocketAddr> {
    req.extensions().get::<axum::extract::ConnectInfo<SocketAddr>>().map(|c| c.0)
}

#[cfg(test)]
mod tests {
    //! The custom verifiers replace rustls' defaults (`dangerous()`): each still checks
    //! the whole chain against the cluster CA; these cases pin what each accepts.
    use super::*;
    use crate::net::pki::{Ca, Role};

    fn der(pem: &str) -> CertificateDer<'static> {
        pki::cert_der_from_pem(pem).unwrap()
    }

    fn leaf(ca: &Ca, node: &str, role: Role, life: Duration) -> CertificateDer<'static> {
        der(&ca.issue(node, role, life).unwrap().0)
    }

    fn later(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_millis(pki::now_ms()) + Duration::from_secs(secs))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_cluster_client_trusts_only_manager_leaves_chained_to_its_ca() {
        let (ca, other) = (Ca::generate().unwrap(), Ca::generate().unwrap());
        let v = ManagerVerifier::new(&[ca.cert_der().unwrap()]).unwrap();
        let check = |leaf: &CertificateDer<'_>, chain: &[CertificateDer<'_>]| {
            // The name a caller dials is ignored: the role is the identity.
            v.verify_server_cert(leaf, chain, &ServerName::try_from("10.9.9.9").unwrap(), &[], UnixTime::now())
        };
        let ca_der = ca.cert_der().unwrap();
        assert!(check(&leaf(&ca, "m1", Role::Manager, HOUR), std::slice::from_ref(&ca_der)).is_ok());
        assert!(check(&leaf(&ca, "w1", Role::Worker, HOUR), std::slice::from_ref(&ca_der)).is_err(), "a worker poses");
        assert!(check(&leaf(&other, "m1", Role::Manager, HOUR), &[]).is_err(), "another CA");
        // The CA certificate is public: carrying it in the chain proves nothing.
        let forged = leaf(&other, "m1", Role::Manager, HOUR);
        assert!(check(&forged, &[ca_der, other.cert_der().unwrap()]).is_err(), "a leaf the CA never signed");
    }

    #[test]
    fn a_pinned_join_trusts_only_a_manager_leaf_signed_by_the_pinned_ca() {
        let (ca, other) = (Ca::generate().unwrap(), Ca::generate().unwrap());
        let mismatch = Arc::new(Mismatch::default());
        let v = PinnedVerifier { digest: ca.digest().unwrap(), mismatch: mismatch.clone() };
        let check = |leaf: &CertificateDer<'_>, chain: &[CertificateDer<'_>]| {
            v.verify_server_cert(leaf, chain, &manager_name(), &[], UnixTime::now())
        };
        let (ca_der, other_der) = (ca.cert_der().unwrap(), other.cert_der().unwrap());
        assert!(check(&leaf(&ca, "m1", Role::Manager, HOUR), std::slice::from_ref(&ca_der)).is_ok());
        assert!(check(&leaf(&ca, "w1", Role::Worker, HOUR), std::slice::from_ref(&ca_der)).is_err());
        // An impostor that presents the (public) pinned CA but signs with its own key.
        let forged = leaf(&other, "m1", Role::Manager, HOUR);
        assert!(check(&forged, &[ca_der, other_der.clone()]).is_err(), "the pinned CA must have signed the leaf");
        assert!(mismatch.take().is_none(), "the CA matched; the signature did not");
        // Another cluster altogether: refused, and the reason is kept for the log.
        assert!(check(&forged, &[other_der]).is_err());
        assert!(mismatch.take().is_some_and(|why| why.contains("not the CA")));
    }

    #[test]
    fn an_expired_client_certificate_passes_the_handshake_only_within_grace_and_only_from_the_ca() {
        let (ca, other) = (Ca::generate().unwrap(), Ca::generate().unwrap());
        let anchors = TrustAnchors::new(&[ca.cert_der().unwrap()]).unwrap();
        let v = GraceVerifier { anchors, grace: Duration::from_secs(60) };
        let short = Duration::from_secs(10);
        let mine = leaf(&ca, "w1", Role::Worker, short);
        let foreign = leaf(&other, "w1", Role::Worker, short);
        assert!(v.verify_client_cert(&mine, &[], UnixTime::now()).is_ok());
        assert!(v.verify_client_cert(&mine, &[], later(30)).is_ok(), "expired 20 s ago, grace 60 s");
        assert!(v.verify_client_cert(&mine, &[], later(120)).is_err(), "past the grace window");
        assert!(v.verify_client_cert(&foreign, &[], UnixTime::now()).is_err(), "another CA");
        assert!(v.verify_client_cert(&foreign, &[], later(30)).is_err(), "another CA, expired within grace");
        // No certificate gets through the handshake (joining needs none); the door then
        // lets such a connection reach only the join route (`net::door` tests).
        assert!(!v.client_auth_mandatory());
    }

    /// A CA rotation: a node that still trusts only the old CA verifies a manager leaf
    /// of the new one through the cross-signed certificate in its chain; anchors swap
    /// in place; once the old CA is retired, its leaves are refused.
    #[test]
    fn during_a_ca_rotation_both_cas_verify_and_after_it_only_the_new_one() {
        let (old, new) = (Ca::generate().unwrap(), Ca::generate().unwrap());
        let cross = old.cross_sign(&new).unwrap();
        let chain_pem = format!("{cross}{}{}", new.cert_pem, old.cert_pem);
        let (cert, key) = new.issue("m1", Role::Manager, HOUR).unwrap();
        let served = certified_key(&cert, &key, &chain_pem).unwrap();
        let (leaf, rest) = served.cert.split_first().unwrap();
        assert_eq!(rest.len(), 3, "cross, new CA, old CA");
        let at = UnixTime::now();
        let name = ServerName::try_from("10.9.9.9").unwrap();
        let old_only = ManagerVerifier::new(&[old.cert_der().unwrap()]).unwrap();
        assert!(old_only.verify_server_cert(leaf, rest, &name, &[], at).is_ok(), "through the cross certificate");
        assert!(old_only.verify_server_cert(leaf, &[], &name, &[], at).is_err(), "not without it");
        let both = TrustAnchors::new(&[new.cert_der().unwrap(), old.cert_der().unwrap()]).unwrap();
        let v = GraceVerifier { anchors: both.clone(), grace: Duration::ZERO };
        let old_leaf = leaf_of(&old, "w1");
        let new_leaf = leaf_of(&new, "w1");
        assert!(v.verify_client_cert(&old_leaf, &[], at).is_ok());
        assert!(v.verify_client_cert(&new_leaf, &[], at).is_ok());
        both.set(&[new.cert_der().unwrap()]).unwrap();
        assert!(v.verify_client_cert(&old_leaf, &[], at).is_err(), "the old CA is retired");
        assert!(v.verify_client_cert(&new_leaf, &[], at).is_ok());
        assert!(pki::issued_by(&new_leaf, &new.cert_der().unwrap()));
        assert!(!pki::issued_by(&old_leaf, &new.cert_der().unwrap()));
        assert!(
            new.key_matches() && !Ca { cert_pem: new.cert_pem.clone(), key_pem: old.key_pem.clone() }.key_matches()
        );
    }

    fn leaf_of(ca: &Ca, node: &str) -> CertificateDer<'static> {
        leaf(ca, node, Role::Worker, HOUR)
    }
}
