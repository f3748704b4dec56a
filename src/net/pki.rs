//! The cluster PKI: the CA, node certificates, signing requests and join tokens
//! (ARCHITECTURE.md "Trust"). Pure functions over bytes; files and sockets live in
//! `net::identity` and `net::tls`.
//!
//! A node certificate names its node in the subject common name and its role in the
//! organizational unit (`manager` | `worker`); manager certificates also carry the DNS
//! name [`MANAGER_NAME`], which is what a client verifies instead of a host name (nodes
//! dial each other by address, and the role is the identity that matters). The serial
//! number carries the issuing time in milliseconds, so a revocation ("nothing issued to
//! node X before T") can be checked without a certificate list.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// DNS name every manager certificate carries; clients verify servers against it.
pub const MANAGER_NAME: &str = "manager.holdfast.cluster";
/// DNS name every worker certificate carries.
pub const WORKER_NAME: &str = "worker.holdfast.cluster";
/// Prefix and version of a join token: `HFTKN-1-<CA sha256 hex>-<secret>`.
pub const TOKEN_PREFIX: &str = "HFTKN-1-";
/// Default life of a leaf certificate.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default window after expiry in which a cut-off worker may still renew by itself.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(90 * 24 * 3600);

/// What a certificate may do on the cluster port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A control-plane member: Raft, membership, signing.
    Manager,
    /// A data-plane node: sync, reports and log replies as itself.
    Worker,
}

impl Role {
    /// `manager` or `worker`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
        }
    }

    /// Parses `manager` or `worker`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "manager" => Some(Role::Manager),
            "worker" => Some(Role::Worker),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen could not build or sign.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A certificate, key or request could not be read.
    #[error("cannot read {what}: {why}")]
    Parse {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        why: String,
    },
    /// A join token is malformed.
    #[error("join token is malformed: {0} (expected HFTKN-1-<64 hex digits>-<secret>)")]
    Token(&'static str),
}

fn parse_err(what: &'static str, why: impl ToString) -> PkiError {
    PkiError::Parse { what, why: why.to_string() }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn datetime(ms: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Lowercase hex SHA-256 of a certificate's DER: what a join token pins.
pub fn digest(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Lowercase hex SHA-256 of a token secret: what replicated state keeps.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The cluster certificate authority: its certificate and private key (PEM).
#[derive(Clone)]
pub struct Ca {
    /// CA certificate, PEM.
    pub cert_pem: String,
    /// CA private key, PEM (managers only).
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA (ECDSA P-256), valid for 10 years. Its name carries its creation time,
    /// so the CAs of a rotation never share a subject.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let tag = hex::encode(rand::random::<[u8; 4]>());
        dn.push(DnType::CommonName, format!("holdfast cluster CA {} {tag}", now_ms()));
        dn.push(DnType::OrganizationName, "holdfast");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = now_ms();
        params.not_before = datetime(now.saturating_sub(3_600_000));
        params.not_after = datetime(now + 10 * 365 * 24 * 3_600_000);
        params.serial_number = Some(serial(now));
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        cert_der_from_pem(&self.cert_pem)
    }

    /// SHA-256 of the CA certificate (hex): the digest join tokens pin.
    pub fn digest(&self) -> Result<String, PkiError> {
        Ok(digest(&self.cert_der()?))
    }

    /// Signs a leaf for `node` in `role` with the public key of `csr_pem`, valid for
    /// `lifetime`. Only the key comes from the request: the name and role are the CA's.
    pub fn sign_csr(&self, csr_pem: &str, node: &str, role: Role, lifetime: Duration) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| parse_err("signing request", e))?;
        let params = leaf_params(node, role, &[], lifetime)?;
        let (issuer, key) = self.issuer()?;
        Ok(params.signed_by(&csr.public_key, &issuer, &key)?.pem())
    }

    /// Issues a leaf with a fresh key: `(cert_pem, key_pem)`.
    pub fn issue(&self, node: &str, role: Role, lifetime: Duration) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let params = leaf_params(node, role, &[], lifetime)?;
        let (issuer, ca_key) = self.issuer()?;
        Ok((params.signed_by(&key, &issuer, &ca_key)?.pem(), key.serialize_pem()))
    }

    /// A certificate for `next`'s key and name signed by this CA: during a CA rotation
    /// nodes that trust only this CA still verify leaves of `next` through it
    /// (ARCHITECTURE.md "Trust", CA rotation).
    pub fn cross_sign(&self, next: &Ca) -> Result<String, PkiError> {
        let next_key = KeyPair::from_pem(&next.key_pem).map_err(|e| parse_err("CA key", e))?;
        let params = CertificateParams::from_ca_cert_pem(&next.cert_pem).map_err(|e| parse_err("CA certificate", e))?;
        let (issuer, key) = self.issuer()?;
        Ok(params.signed_by(&next_key, &issuer, &key)?.pem())
    }

    /// Whether the key is the certificate's (a CA file and a key file that belong
    /// together).
    pub fn key_matches(&self) -> bool {
        use x509_parser::prelude::FromDer;
        let (Ok(key), Ok(der)) = (KeyPair::from_pem(&self.key_pem), self.cert_der()) else {
            return false;
        };
        let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(&der) else {
            return false;
        };
        cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
    }

    fn issuer(&self) -> Result<(rcgen::Certificate, KeyPair), PkiError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(|e| parse_err("CA key", e))?;
        let params = CertificateParams::from_ca_cert_pem(&self.cert_pem).map_err(|e| parse_err("CA certificate", e))?;
        // Re-signing gives the same subject and key identifier, which is all an issuer needs.
        Ok((params.self_signed(&key)?, key))
    }
}

/// A serial that starts with the issuing time (ms), then random bytes; positive.
fn serial(now: u64) -> SerialNumber {
    let mut bytes = vec![0x01];
    bytes.extend_from_slice(&now.to_be_bytes());
    bytes.extend_from_slice(&rand::random::<[u8; 7]>());
    SerialNumber::from_slice(&bytes)
}

fn leaf_params(
    node: &str,
    role: Role,
    extra_sans: &[String],
    lifetime: Duration,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::OrganizationName, "holdfast");
    params.distinguished_name = dn;
    let role_name = match role {
        Role::Manager => MANAGER_NAME,
        Role::Worker => WORKER_NAME,
    };
    let mut sans = vec![SanType::DnsName(role_name.try_into()?)];
    for s in extra_sans {
        match s.parse::<std::net::IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(s.as_str().try_into()?)),
        }
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = now_ms();
    // Backdated a little: clocks of the nodes are never quite the same.
    params.not_before = datetime(now.saturating_sub(60_000));
    params.not_after = datetime(now + lifetime.as_millis() as u64);
    params.serial_number = Some(serial(now));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Issues a server certificate for the API port from the cluster CA, with the given
/// subject alternative names (IP addresses or DNS names): `(cert_pem, key_pem)`.
/// The certificate is a manager certificate named `node`, valid for `lifetime`.
pub fn issue_server_cert(
    ca: &Ca,
    node: &str,
    sans: &[String],
    lifetime: Duration,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let params = leaf_params(node, Role::Manager, sans, lifetime)?;
    let (issuer, ca_key) = ca.issuer()?;
    Ok((params.signed_by(&key, &issuer, &ca_key)?.pem(), key.serialize_pem()))
}

/// Every certificate of a PEM text (a bundle), in DER.
pub fn cert_ders_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_err("certificates", e))
}

/// Whether the certificate `leaf` (DER) was issued by `ca` (DER): its issuer is the
/// CA's subject (CA subjects are unique per cluster and rotation, see [`Ca::generate`]).
pub fn issued_by(leaf: &[u8], ca: &[u8]) -> bool {
    use x509_parser::prelude::FromDer;
    let parse = |d| x509_parser::certificate::X509Certificate::from_der(d).ok().map(|(_, c)| c);
    match (parse(leaf), parse(ca)) {
        (Some(l), Some(c)) => l.issuer().as_raw() == c.subject().as_raw(),
        _ => false,
    }
}

/// A fresh key pair and a signing request for it: `(key_pem, csr_pem)`. The request
/// names nothing the CA trusts; the CA decides the name and role.
pub fn new_csr(node: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The first certificate of a PEM text, in DER.
pub fn cert_der_from_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| parse_err("certificate", e))
}

/// What a node certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Node name (subject common name).
    pub node: String,
    /// Role (organizational unit).
    pub role: Role,
    /// Issuing time from the serial, ms since the epoch.
    pub issued_ms: u64,
    /// Start of validity, ms since the epoch.
    pub not_before_ms: u64,
    /// End of validity, ms since the epoch.
    pub not_after_ms: u64,
}

impl CertInfo {
    /// Reads a node certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<CertInfo, PkiError> {
        use x509_parser::prelude::FromDer;
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| parse_err("certificate", e))?;
        let subject = cert.subject();
        let node = subject
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .ok_or_else(|| parse_err("certificate", "no common name"))?
            .to_string();
        let role = subject
            .iter_organizational_unit()
            .next()
            .and_then(|a| a.as_str().ok())
            .and_then(Role::parse)
            .ok_or_else(|| parse_err("certificate", "no holdfast role in the organizational unit"))?;
        let raw = cert.raw_serial();
        let issued_ms = if raw.len() >= 9 && raw[0] == 0x01 {
            u64::from_be_bytes(raw[1..9].try_into().unwrap_or_default())
        } else {
            0
        };
        let validity = cert.validity();
        let ms = |t: &x509_parser::time::ASN1Time| (t.timestamp().max(0) as u64) * 1000;
        Ok(CertInfo {
            node,
            role,
            issued_ms,
            not_before_ms: ms(&validity.not_before),
            not_after_ms: ms(&validity.not_after),
        })
    }

    /// When a holder should renew: two thirds into its life.
    pub fn renew_at_ms(&self) -> u64 {
        let start = self.issued_ms.max(self.not_before_ms);
        start + self.not_after_ms.saturating_sub(start) * 2 / 3
    }
}

/// A parsed join token: the CA it trusts and the secret that admits.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Hex SHA-256 of the CA certificate.
    pub ca_digest: String,
    /// The secret (never logged).
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JoinToken(ca {}, secret <hidden>)", self.ca_digest)
    }
}

impl JoinToken {
    /// A new token for the CA with `ca_digest`, with a 128-bit random secret.
    pub fn generate(ca_digest: &str) -> JoinToken {
        JoinToken { ca_digest: ca_digest.to_string(), secret: hex::encode(rand::random::<[u8; 16]>()) }
    }

    /// Parses `HFTKN-1-<digest>-<secret>` (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<JoinToken, PkiError> {
        let rest = text.trim().strip_prefix(TOKEN_PREFIX).ok_or(PkiError::Token("it does not start with HFTKN-1-"))?;
        let (digest, secret) = rest.split_once('-').ok_or(PkiError::Token("no secret after the CA digest"))?;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PkiError::Token("the CA digest is not 64 hex digits"));
        }
        if secret.len() < 16 || !secret.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(PkiError::Token("the secret is too short or has odd characters"));
        }
        Ok(JoinToken { ca_digest: digest.to_ascii_lowercase(), secret: secret.to_string() })
    }

    /// The token's text form.
    pub fn encode(&self) -> String {
        format!("{TOKEN_PREFIX}{}-{}", self.ca_digest, self.secret)
    }

    /// The hash replicated state keeps.
    pub fn hash(&self) -> String {
        secret_hash(&self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_leaf_names_the_ca_chosen_node_and_role_not_the_requested_one() {
        let ca = Ca::generate().unwrap();
        let (_key, csr) = new_csr("evil-wants-m1").unwrap();
        let pem = ca.sign_csr(&csr, "w1", Role::Worker, Duration::from_secs(60)).unwrap();
        let info = CertInfo::from_der(&cert_der_from_pem(&pem).unwrap()).unwrap();
        assert_eq!(info.node, "w1");
        assert_eq!(info.role, Role::Worker);
        let now = now_ms();
        assert!(info.issued_ms <= now && info.issued_ms + 10_000 > now, "issued {} now {now}", info.issued_ms);
        assert!(info.not_after_ms > now && info.not_after_ms <= now + 61_000);
        assert!(info.renew_at_ms() > info.issued_ms && info.renew_at_ms() < info.not_after_ms);
    }

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused_with_a_reason() {
        let t = JoinToken::generate(&"ab".repeat(32));
        assert_eq!(JoinToken::parse(&format!(" {}\n", t.encode())).unwrap(), t);
        assert!(!format!("{t:?}").contains(&t.secret));
        for bad in ["", "HFTKN-1-abc-0123456789abcdef0", "SWMTKN-1-x-y", &format!("HFTKN-1-{}-short", "a".repeat(64))] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
