//! A node's identity on the cluster port: its key and certificate files, how it gets
//! them (a new CA on `--bootstrap`, a CA-pinned token join otherwise), and renewal
//! (ARCHITECTURE.md "Trust").
//!
//! Files in `<dir>` (`<data-dir>/tls`): `ca.pem` (the trusted CAs: the current one
//! first, and during a CA rotation the previous one after it), `ca-cross.pem` (during a
//! rotation only: the new CA signed by the old), `node.pem`, `node.key` (0600) and, on
//! the first manager, `ca.key` (0600). The first manager also writes
//! `join-manager.token` and `join-worker.token` (0600) in the data dir.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::pki::{self, Ca, CertInfo, JoinToken, PkiError, Role};
use super::tls::{self, CertResolver, TlsError, TrustAnchors};

/// Why a node could not get or keep its identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate material is unusable.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The node has no certificate and no way to get one.
    #[error("{0}")]
    NeedToken(String),
    /// A manager refused the join (bad token, other cluster...).
    #[error("join refused by {addr}: {reason}")]
    Refused {
        /// Manager that refused.
        addr: String,
        /// Its reason (never the secret).
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.to_path_buf(), source }
}

/// Writes `text` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, text: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// How a node gets its identity.
#[derive(Clone, Debug)]
pub struct IdentitySettings {
    /// Node name.
    pub node: String,
    /// Role of its certificate.
    pub role: Role,
    /// Data directory (tokens land here; files in `<data_dir>/tls`).
    pub data_dir: PathBuf,
    /// Create a new CA when the node has no identity yet (first manager, `dev`).
    pub bootstrap: bool,
    /// Join token, for a node without an identity (or one expired past the grace).
    pub token: Option<String>,
    /// Managers' cluster addresses to join through.
    pub seeds: Vec<String>,
    /// Life of certificates this node issues itself (first manager).
    pub lifetime: Duration,
    /// How long after expiry a certificate may still renew.
    pub grace: Duration,
}

/// What a new cluster's first manager must put into replicated state.
#[derive(Clone, Debug)]
pub struct Bootstrapped {
    /// The new CA.
    pub ca: Ca,
    /// The join tokens written to the data dir.
    pub tokens: Vec<(Role, JoinToken)>,
}

/// Body of `POST /cluster/v1/join`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's secret (checked by hash).
    pub secret: String,
    /// Signing request for the node's own key.
    pub csr_pem: String,
    /// Node name asked for.
    pub node: String,
    /// Role asked for (must be the token's).
    pub role: Role,
}

/// Body of `POST /cluster/v1/renew`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenewRequest {
    /// Signing request for a new key.
    pub csr_pem: String,
}

/// Answer of join and renew.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Issued {
    /// The new certificate, PEM.
    pub cert_pem: String,
    /// The cluster CA that signed it, PEM (what a join token pins).
    pub ca_pem: String,
    /// Every CA the cluster trusts now (during a CA rotation: both).
    #[serde(default)]
    pub cas: Option<CaSet>,
}

/// The CAs a cluster trusts: the current (signing) one and, during a CA rotation, the
/// previous one and the current one cross-signed by it. Also the answer of
/// `GET /cluster/v1/ca`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaSet {
    /// The CA that signs, PEM.
    pub current: String,
    /// The CA being retired, PEM, while a rotation overlaps.
    #[serde(default)]
    pub previous: Option<String>,
    /// `current` signed by `previous`, PEM, while a rotation overlaps: nodes that trust
    /// only the previous CA verify new leaves through it.
    #[serde(default)]
    pub cross: Option<String>,
}

impl CaSet {
    /// Just one CA.
    pub fn single(current: &str) -> CaSet {
        CaSet { current: current.to_string(), previous: None, cross: None }
    }

    /// The roots to trust: current, then previous.
    pub fn roots(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        let mut out = vec![pki::cert_der_from_pem(&self.current)?];
        if let Some(p) = &self.previous {
            out.push(pki::cert_der_from_pem(p)?);
        }
        Ok(out)
    }

    /// What follows a leaf in the chain a node presents: the cross certificate, the
    /// current CA (a joining node pins it), the previous one.
    pub fn chain_pem(&self) -> String {
        let mut out = String::new();
        for p in [self.cross.as_deref(), Some(self.current.as_str()), self.previous.as_deref()].into_iter().flatten() {
            out.push_str(p.trim_end());
            out.push('\n');
        }
        out
    }

    /// `ca.pem`'s text: current, then previous.
    pub fn bundle(&self) -> String {
        let mut out = format!("{}\n", self.current.trim_end());
        if let Some(p) = &self.previous {
            out.push_str(p.trim_end());
            out.push('\n');
        }
        out
    }

    /// Reads `<dir>/ca.pem` (and `ca-cross.pem` when present).
    fn load(dir: &Path) -> Result<CaSet, IdentityError> {
        let pems = split_pems(&read(&dir.join("ca.pem"))?);
        let current = pems.first().cloned().ok_or_else(|| {
            IdentityError::Pki(PkiError::Parse { what: "ca.pem", why: "no certificate in it".into() })
        })?;
        let cross = std::fs::read_to_string(dir.join("ca-cross.pem")).ok().filter(|t| t.contains("BEGIN"));
        Ok(CaSet { current, previous: pems.get(1).cloned(), cross })
    }

    /// Writes `<dir>/ca.pem` and `ca-cross.pem` (removed when there is none).
    fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        match &self.cross {
            Some(c) => write_private(&dir.join("ca-cross.pem"), c)?,
            None => {
                let _ = std::fs::remove_file(dir.join("ca-cross.pem"));
            }
        }
        write_private(&dir.join("ca.pem"), &self.bundle())
    }
}

/// The PEM certificates of a bundle, each as its own text.
pub fn split_pems(text: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter(|p| p.contains("-----BEGIN CERTIFICATE-----"))
        .map(|p| format!("{}\n", p.trim()))
        .collect()
}

/// The node's TLS identity, shared by its server, its Raft client and its worker.
pub struct NodeTls {
    node: String,
    role: Role,
    dir: PathBuf,
    cas: RwLock<CaSet>,
    anchors: Arc<TrustAnchors>,
    /// The current leaf and key (PEM), to re-chain it when the CAs change.
    leaf: RwLock<(String, String)>,
    resolver: Arc<CertResolver>,
    info: RwLock<CertInfo>,
    renew_wanted: AtomicBool,
    wake: tokio::sync::Notify,
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    http: RwLock<reqwest::Client>,
    grace: Duration,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").field("node", &self.node).field("role", &self.role).finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Loads the node's identity from `<data_dir>/tls`, or creates it (new CA when
    /// bootstrapping, token join otherwise). Joining retries unreachable managers until
    /// one answers; a refusal is final.
    pub async fn establish(s: &IdentitySettings) -> Result<(Arc<NodeTls>, Option<Bootstrapped>), IdentityError> {
        let dir = s.data_dir.join("tls");
        let have = dir.join("node.pem").exists() && dir.join("node.key").exists() && dir.join("ca.pem").exists();
        if have {
            let cert = read(&dir.join("node.pem"))?;
            let info = CertInfo::from_der(&pki::cert_der_from_pem(&cert)?)?;
            let past_grace = pki::now_ms() > info.not_after_ms.saturating_add(s.grace.as_millis() as u64);
            let usable = info.node == s.node && info.role == s.role && !past_grace;
            if usable || s.token.is_none() {
                if !usable {
                    return Err(IdentityError::NeedToken(recovery_advice(&s.node, s.role, &info, &s.data_dir)));
                }
                let tls = Self::from_files(&dir, s)?;
                return Ok((tls, None));
            }
            tracing::warn!(node = %s.node, "the certificate in {} is not usable; joining again with the given token", dir.display());
        }
        if let Some(token) = &s.token {
            let token = JoinToken::parse(token)?;
            let issued = token_join(s, &token).await?;
            write_private(&dir.join("node.key"), &issued.1)?;
            write_private(&dir.join("node.pem"), &issued.0.cert_pem)?;
            issued.0.cas.clone().unwrap_or_else(|| CaSet::single(&issued.0.ca_pem)).save(&dir)?;
            tracing::info!(node = %s.node, role = %s.role, ca = %token.ca_digest, "joined the cluster with a token; certificate in {}", dir.display());
            return Ok((Self::from_files(&dir, s)?, None));
        }
        if s.bootstrap && s.role == Role::Manager {
            let ca = Ca::generate()?;
            let (cert, key) = ca.issue(&s.node, Role::Manager, s.lifetime)?;
            write_private(&dir.join("ca.key"), &ca.key_pem)?;
            write_private(&dir.join("ca.pem"), &ca.cert_pem)?;
            write_private(&dir.join("node.key"), &key)?;
            write_private(&dir.join("node.pem"), &cert)?;
            let digest = ca.digest()?;
            let mut tokens = Vec::new();
            for role in [Role::Manager, Role::Worker] {
                let t = JoinToken::generate(&digest);
                let path = s.data_dir.join(format!("join-{role}.token"));
                write_private(&path, &format!("{}\n", t.encode()))?;
                tokens.push((role, t));
            }
            tracing::info!(
                ca = %digest,
                "new cluster CA; join tokens written to {} and {} (holdfast token join --role worker|manager prints them)",
                s.data_dir.join("join-worker.token").display(),
                s.data_dir.join("join-manager.token").display()
            );
            return Ok((Self::from_files(&dir, s)?, Some(Bootstrapped { ca, tokens })));
        }
        Err(IdentityError::NeedToken(format!(
            "node {} has no cluster certificate yet: give it a {} join token with --token-file FILE, --token or \
             HOLDFAST_TOKEN (on the first manager: holdfast token join --role {})",
            s.node, s.role, s.role
        )))
    }

    fn from_files(dir: &Path, s: &IdentitySettings) -> Result<Arc<NodeTls>, IdentityError> {
        let cas = CaSet::load(dir)?;
        let cert = read(&dir.join("node.pem"))?;
        let key = read(&dir.join("node.key"))?;
        Self::build(dir, &s.node, s.role, cas, cert, key, s.grace)
    }

    fn build(
        dir: &Path,
        node: &str,
        role: Role,
        cas: CaSet,
        cert: String,
        key: String,
        grace: Duration,
    ) -> Result<Arc<NodeTls>, IdentityError> {
        let info = CertInfo::from_der(&pki::cert_der_from_pem(&cert)?)?;
        let resolver = CertResolver::new(tls::certified_key(&cert, &key, &cas.chain_pem())?);
        let anchors = TrustAnchors::new(&cas.roots()?)?;
        let client = tls::client_config_with(anchors.clone(), resolver.clone())?;
        let server = tls::server_config_with(anchors.clone(), resolver.clone(), grace)?;
        let http = tls::http_client(client.clone(), Duration::from_secs(3));
        Ok(Arc::new(NodeTls {
            node: node.to_string(),
            role,
            dir: dir.to_path_buf(),
            cas: RwLock::new(cas),
            anchors,
            leaf: RwLock::new((cert, key)),
            resolver,
            info: RwLock::new(info),
            renew_wanted: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
            client,
            server,
            http: RwLock::new(http),
            grace,
        }))
    }

    /// Node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Role of the certificate.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The cluster's current CA, PEM.
    pub fn ca_pem(&self) -> String {
        self.cas().current
    }

    /// The CAs this node trusts now.
    pub fn cas(&self) -> CaSet {
        crate::read(&self.cas).clone()
    }

    /// Trusts `cas` from the next handshake on (a CA rotation starting or finishing):
    /// files, verifiers and the chain sent after this node's leaf. `false` when
    /// nothing changed.
    pub fn set_cas(&self, cas: CaSet) -> Result<bool, IdentityError> {
        if self.cas() == cas {
            return Ok(false);
        }
        self.anchors.set(&cas.roots()?)?;
        let (cert, key) = crate::read(&self.leaf).clone();
        let chained = tls::certified_key(&cert, &key, &cas.chain_pem())?;
        cas.save(&self.dir)?;
        self.resolver.swap(chained);
        *crate::write(&self.cas) = cas;
        if !self.leaf_from_current() {
            self.request_renewal();
        }
        tracing::info!(node = %self.node, rotating = self.cas().previous.is_some(), "trusted cluster CAs updated");
        Ok(true)
    }

    /// Whether this node's certificate was issued by the current CA.
    pub fn leaf_from_current(&self) -> bool {
        let (cert, _) = crate::read(&self.leaf).clone();
        match (pki::cert_der_from_pem(&cert), pki::cert_der_from_pem(&self.cas().current)) {
            (Ok(l), Ok(c)) => pki::issued_by(&l, &c),
            _ => false,
        }
    }

    /// Asks the renewal loop to renew now (the CA changed).
    pub fn request_renewal(&self) {
        self.renew_wanted.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn renewal_wanted(&self) -> bool {
        self.renew_wanted.load(Ordering::SeqCst)
    }

    /// The current certificate's details.
    pub fn info(&self) -> CertInfo {
        crate::read(&self.info).clone()
    }

    /// Client configuration (Raft's HTTP client is built from it).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// Server configuration of the cluster port.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// An HTTP client over mutual TLS; a new pool after each renewal, so a connection
    /// opened with an expired certificate is not reused.
    pub fn http(&self) -> reqwest::Client {
        crate::read(&self.http).clone()
    }

    /// The CA key from `<data-dir>/tls/ca.key`, if this is the first manager.
    pub fn local_ca(&self) -> Option<Ca> {
        let key_pem = std::fs::read_to_string(self.dir.join("ca.key")).ok()?;
        // After a CA rotation `ca.pem` names the new CA, whose key is in replicated
        // state only: a pair that does not belong together is no CA.
        Some(Ca { cert_pem: self.ca_pem(), key_pem }).filter(Ca::key_matches)
    }

    /// Installs a new certificate for `key_pem`: written to disk, then swapped in for
    /// every later handshake (connections already open keep going).
    pub fn install(&self, cert_pem: &str, key_pem: &str) -> Result<(), IdentityError> {
        let info = CertInfo::from_der(&pki::cert_der_from_pem(cert_pem)?)?;
        if info.node != self.node || info.role != self.role {
            return Err(IdentityError::Pki(PkiError::Parse {
                what: "renewed certificate",
                why: format!("it names {} ({}), not {} ({})", info.node, info.role, self.node, self.role),
            }));
        }
        let key = tls::certified_key(cert_pem, key_pem, &self.cas().chain_pem())?;
        write_private(&self.dir.join("node.key"), key_pem)?;
        write_private(&self.dir.join("node.pem"), cert_pem)?;
        self.resolver.swap(key);
        *crate::write(&self.leaf) = (cert_pem.to_string(), key_pem.to_string());
        *crate::write(&self.info) = info;
        if self.leaf_from_current() {
            self.renew_wanted.store(false, Ordering::SeqCst);
        }
        *crate::write(&self.http) = tls::http_client(self.client.clone(), Duration::from_secs(3));
        Ok(())
    }

    /// Renews locally with the CA (managers hold it).
    pub fn renew_with(&self, ca: &Ca, lifetime: Duration) -> Result<(), IdentityError> {
        let (key, csr) = pki::new_csr(&self.node)?;
        let cert = ca.sign_csr(&csr, &self.node, self.role, lifetime)?;
        self.install(&cert, &key)
    }

    /// Renews through a manager over the existing mutual-TLS channel.
    pub async fn renew_remote(&self, managers: &[String]) -> Result<(), String> {
        let (key, csr) = pki::new_csr(&self.node).map_err(|e| e.to_string())?;
        let http = self.http();
        let mut last = String::from("no manager address");
        for addr in managers {
            let url = format!("https://{addr}{}", super::door::RENEW_PATH);
            let call =
                http.post(&url).json(&RenewRequest { csr_pem: csr.clone() }).timeout(Duration::from_secs(10)).send();
            match call.await {
                Ok(r) if r.status().is_success() => match r.json::<Issued>().await {
                    Ok(issued) => {
                        // Trust the CAs first: the new leaf may come from a new CA.
                        if let Some(cas) = issued.cas {
                            self.set_cas(cas).map_err(|e| e.to_string())?;
                        }
                        return self.install(&issued.cert_pem, &key).map_err(|e| e.to_string());
                    }
                    Err(e) => last = format!("{addr}: bad answer: {e}"),
                },
                Ok(r) => {
                    let status = r.status();
                    last = format!("{addr}: {status} {}", r.text().await.unwrap_or_default());
                }
                Err(e) => last = format!("{addr}: {}", chain(&e)),
            }
        }
        Err(last)
    }

    /// What to do when this node's certificate is past the grace window.
    pub fn advice(&self, data_dir: &Path) -> String {
        recovery_advice(&self.node, self.role, &self.info(), data_dir)
    }

    /// Whether the certificate is past expiry plus the grace window.
    pub fn past_grace(&self) -> bool {
        pki::now_ms() > self.info().not_after_ms.saturating_add(self.grace.as_millis() as u64)
    }
}

fn recovery_advice(node: &str, role: Role, info: &CertInfo, data_dir: &Path) -> String {
    format!(
        "the cluster certificate of node {node} (role {}, expired at {} ms) is past its renewal grace window or names \
         another node/role ({} as {}); on a manager run `holdfast token join --role {role}` and restart this node \
         with `--token-file FILE` (or HOLDFAST_TOKEN) and the same --data-dir {}",
        info.role,
        info.not_after_ms,
        info.node,
        info.role,
        data_dir.display()
    )
}

/// reqwest's Display omits the cause (refused, reset, bad certificate): walk it.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    why
}

/// Joins with a token: checks the managers' CA against the token's digest before the
/// secret leaves, sends a signing request, gets a certificate. Returns the issued
/// certificate and the new key.
async fn token_join(s: &IdentitySettings, token: &JoinToken) -> Result<(Issued, String), IdentityError> {
    if s.seeds.is_empty() {
        return Err(IdentityError::NeedToken("joining needs --join with a manager's cluster address".into()));
    }
    let (key, csr) = pki::new_csr(&s.node)?;
    let (config, mismatch) = tls::join_client_config(&token.ca_digest)?;
    let http = tls::http_client(config, Duration::from_secs(3));
    let body = JoinRequest { secret: token.secret.clone(), csr_pem: csr, node: s.node.clone(), role: s.role };
    let mut wait = Duration::from_millis(200);
    let mut attempts = 0u32;
    loop {
        for addr in &s.seeds {
            let url = format!("https://{addr}{}", super::door::JOIN_PATH);
            match http.post(&url).json(&body).timeout(Duration::from_secs(15)).send().await {
                Ok(r) if r.status().is_success() => {
                    let issued: Issued = r.json().await.map_err(|e| IdentityError::Refused {
                        addr: addr.clone(),
                        reason: format!("unreadable answer: {e}"),
                    })?;
                    let ca_digest = pki::digest(&pki::cert_der_from_pem(&issued.ca_pem)?);
                    if ca_digest != token.ca_digest {
                        return Err(IdentityError::Refused {
                            addr: addr.clone(),
                            reason: format!("it answered with CA {ca_digest}, not the token's {}", token.ca_digest),
                        });
                    }
                    return Ok((issued, key));
                }
                Ok(r) if r.status().is_client_error() => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    tracing::error!(%addr, %status, "join refused: {text}");
                    return Err(IdentityError::Refused { addr: addr.clone(), reason: format!("{status} {text}") });
                }
                Ok(r) => {
                    let status = r.status();
                    tracing::warn!(%addr, %status, "join: manager not ready; retrying");
                }
                Err(e) => {
                    if let Some(why) = mismatch.take() {
                        tracing::error!(%addr, "join refused before sending the secret: {why}");
                        return Err(IdentityError::Refused { addr: addr.clone(), reason: why });
                    }
                    attempts += 1;
                    if attempts == 1 || attempts % 20 == 0 {
                        tracing::warn!(%addr, error = %chain(&e), "join: cannot reach the manager; retrying");
                    }
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Runs `renew` whenever the node's certificate is two thirds through its life, and
/// keeps retrying (with backoff) while it fails, until `shutdown`. Past the grace
/// window it logs what to do instead.
pub fn spawn_renewal<F, Fut>(
    tls: Arc<NodeTls>,
    data_dir: PathBuf,
    mut renew: F,
    mut shutdown: tokio::sync::broadcast::Receiver<()>,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    tokio::spawn(async move {
        let mut failures = 0u32;
        let mut advised_at = 0u64;
        loop {
            let info = tls.info();
            let now = pki::now_ms();
            let life = info.not_after_ms.saturating_sub(info.issued_ms.max(info.not_before_ms));
            // Retry pace: a twentieth of the life, between 200 ms and 30 s.
            let retry = Duration::from_millis((life / 20).clamp(200, 30_000));
            let wait = if tls.past_grace() {
                if now.saturating_sub(advised_at) > 600_000 {
                    tracing::error!("{}", tls.advice(&data_dir));
                    advised_at = now;
                }
                retry
            } else if now < info.renew_at_ms() && !tls.renewal_wanted() {
                Duration::from_millis((info.renew_at_ms() - now).min(60_000))
            } else {
                match renew().await {
                    Ok(()) => {
                        let n = tls.info();
                        tracing::info!(node = %tls.node(), not_after_ms = n.not_after_ms, "cluster certificate renewed");
                        failures = 0;
                        if !tls.renewal_wanted() {
                            continue;
                        }
                        // Renewed, but not from the current CA yet (the signer had not
                        // seen the rotation): try again at the retry pace.
                        retry
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures % 30 == 0 {
                            tracing::warn!(error = %e, failures, "cannot renew the cluster certificate yet; retrying");
                        }
                        retry
                    }
                }
            };
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = tls.wake.notified() => {}
            }
        }
    })
}

/// A worker's view of the cluster's CAs: asks a manager (`GET /cluster/v1/ca`) every
/// `every`, trusts what it answers, and renews at once when its own certificate is not
/// from the current CA (a CA rotation started). Ends on `shutdown`.
pub fn watch_cas(
    tls: Arc<NodeTls>,
    managers: Vec<String>,
    every: Duration,
    mut shutdown: tokio::sync::broadcast::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut i = 0usize;
        loop {
            if let Some(addr) = managers.get(i % managers.len().max(1)) {
                let url = format!("https://{addr}{}", super::door::CA_PATH);
                let got = tls.http().get(&url).timeout(Duration::from_secs(5)).send().await;
                match got {
                    Ok(r) if r.status().is_success() => match r.json::<CaSet>().await {
                        Ok(cas) => {
                            if let Err(e) = tls.set_cas(cas) {
                                tracing::warn!(error = %e, "cannot trust the cluster's new CAs");
                            }
                            if !tls.leaf_from_current() {
                                tls.request_renewal();
                            }
                        }
                        Err(e) => tracing::debug!(%addr, error = %e, "unreadable CA answer"),
                    },
                    // Unreachable or refused: the sync loop reports that; try another.
                    _ => i += 1,
                }
            }
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}
