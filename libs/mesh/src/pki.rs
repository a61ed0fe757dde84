//! The vault PKI: a CA per vault that issues server certificates for the components, client
//! certificates for services, and signs hosts' CSRs at registration. Identities live in the
//! certificate's common name: `host:<name>` or `service:<name>`.

use std::fmt;
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;

use crate::error::{ErrorCode, ServiceError};

/// Validity of the vault CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Validity of the certificates `issue_server` and `issue_client` make.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// The longest validity `sign_csr` accepts.
pub const MAX_CERT_VALIDITY: Duration = DEFAULT_CERT_VALIDITY;
/// Certificates start this long before now, so peers with a slightly late clock accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// Longest host or service name.
const MAX_NAME_LEN: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("invalid {what} pem: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    #[error(
        "invalid identity {0:?}: expected host:<name> or service:<name> with letters, digits, '.', '_' or '-'"
    )]
    InvalidIdentity(String),
    #[error("the ca key does not match the ca certificate")]
    KeyMismatch,
    #[error("the certificate is not a ca certificate")]
    NotACa,
    #[error("invalid validity {0:?}: must be between 1 second and 5 years")]
    InvalidValidity(Duration),
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("tls configuration failed: {0}")]
    Tls(String),
    #[error("the peer presented no client certificate")]
    NoPeerCertificate,
    #[error("cannot access {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ServiceError for PkiError {
    fn code(&self) -> ErrorCode {
        match self {
            PkiError::Pem { .. }
            | PkiError::InvalidCertificate(_)
            | PkiError::InvalidCsr(_)
            | PkiError::InvalidIdentity(_)
            | PkiError::InvalidValidity(_) => ErrorCode::InvalidArgument,
            PkiError::NoPeerCertificate => ErrorCode::Unauthenticated,
            PkiError::KeyMismatch
            | PkiError::NotACa
            | PkiError::Generate(_)
            | PkiError::Tls(_)
            | PkiError::Io { .. } => ErrorCode::Internal,
        }
    }
}

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError::Generate(e.to_string())
    }
}

/// Who a certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A registered hypervisor host (agent); CN `host:<name>`.
    Host(String),
    /// A Ferry component acting on its own behalf; CN `service:<name>`.
    Service(String),
}

impl Identity {
    /// The certificate common name of this identity.
    pub fn common_name(&self) -> String {
        self.to_string()
    }

    /// The name without its kind.
    pub fn name(&self) -> &str {
        match self {
            Identity::Host(name) | Identity::Service(name) => name,
        }
    }

    /// Checks the name is non-empty, short, and made of `[A-Za-z0-9._-]`.
    pub fn validate(&self) -> Result<(), PkiError> {
        let name = self.name();
        let ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(())
        } else {
            Err(PkiError::InvalidIdentity(self.to_string()))
        }
    }

    /// The identity in a DER certificate's subject common name. Does not verify the
    /// certificate: callers pass certificates rustls has already verified.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .ok_or_else(|| PkiError::InvalidCertificate("no common name".into()))?
            .as_str()
            .map_err(|_| PkiError::InvalidCertificate("common name is not a string".into()))?;
        cn.parse()
    }
}

/// The serial number of a DER certificate, lowercase hex without leading zero bytes.
pub fn cert_serial_hex(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    Ok(cert.tbs_certificate.serial.to_str_radix(16))
}

/// The serial number (hex) of the first certificate in a PEM text.
pub fn cert_serial_hex_pem(pem: &str) -> Result<String, PkiError> {
    let der = crate::tls::certs_from_pem(pem, "certificate")?
        .into_iter()
        .next()
        .ok_or_else(|| PkiError::InvalidCertificate("no certificate in the pem text".into()))?;
    cert_serial_hex(&der)
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Host(name) => write!(f, "host:{name}"),
            Identity::Service(name) => write!(f, "service:{name}"),
        }
    }
}

impl FromStr for Identity {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let identity = match s.split_once(':') {
            Some(("host", name)) => Identity::Host(name.to_owned()),
            Some(("service", name)) => Identity::Service(name.to_owned()),
            _ => return Err(PkiError::InvalidIdentity(s.to_owned())),
        };
        identity.validate()?;
        Ok(identity)
    }
}

/// A vault's certificate authority.
pub struct VaultCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for VaultCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultCa").finish_non_exhaustive()
    }
}

impl VaultCa {
    /// Creates a new CA (ECDSA P-256) for the vault.
    pub fn create(vault_id: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("ferry vault {vault_id} ca"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY, CA_VALIDITY)?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA; checks that the key belongs to the certificate and that the
    /// certificate is a CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::Pem {
            what: "ca key",
            reason: "no valid private key found".into(),
        })?;
        let der = crate::tls::certs_from_pem(cert_pem, "ca certificate")?
            .into_iter()
            .next()
            .ok_or(PkiError::NotACa)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
        if !cert.is_ca() {
            return Err(PkiError::NotACa);
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate (PEM); clients and servers trust it as their only root.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key (PEM). Store it with [`write_secret`].
    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// Issues a server certificate for the DNS names / IP addresses in `sans`, always
    /// including `localhost`, `127.0.0.1` and `::1`. Returns (certificate, key) PEM.
    pub fn issue_server(&self, sans: &[String]) -> Result<(String, String), PkiError> {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for san in sans {
            if !names.contains(san) {
                names.push(san.clone());
            }
        }
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = dn("ferry server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = self.sign(params, &key, DEFAULT_CERT_VALIDITY)?;
        Ok((cert, key.serialize_pem()))
    }

    /// Issues a client certificate for `identity`. Returns (certificate, key) PEM.
    pub fn issue_client(&self, identity: &Identity) -> Result<(String, String), PkiError> {
        identity.validate()?;
        let key = KeyPair::generate()?;
        let cert = self.sign(client_params(identity), &key, DEFAULT_CERT_VALIDITY)?;
        Ok((cert, key.serialize_pem()))
    }

    /// Signs a CSR (PEM) as a client certificate for `identity`. The CSR's subject and
    /// requested extensions are ignored: only its (verified) public key is used.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        validity: Duration,
    ) -> Result<String, PkiError> {
        identity.validate()?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
        self.sign(client_params(identity), &csr.public_key, validity)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        validity: Duration,
    ) -> Result<String, PkiError> {
        set_validity(&mut params, validity, MAX_CERT_VALIDITY)?;
        params.serial_number = Some(random_serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(public_key, &self.issuer)?.pem())
    }
}

/// Makes a key pair and a CSR for `identity`, as a host does before registering.
/// Returns (CSR PEM, private key PEM).
pub fn new_csr(identity: &Identity) -> Result<(String, String), PkiError> {
    identity.validate()?;
    let key = KeyPair::generate()?;
    let csr = client_params(identity).serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Writes a secret (key, token) atomically with mode 0600, creating parent directories.
pub fn write_secret(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_file(path, bytes, 0o600)
}

/// Writes a file atomically (temp file + rename) with `mode`, creating parent directories.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut suffix = [0u8; 8];
    rand::rng().fill_bytes(&mut suffix);
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        hex::encode(suffix)
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits of `mode`; set it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every filesystem lets a directory be synced.
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn client_params(identity: &Identity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&identity.common_name());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(
    params: &mut CertificateParams,
    validity: Duration,
    max: Duration,
) -> Result<(), PkiError> {
    if validity < Duration::from_secs(1) || validity > max {
        return Err(PkiError::InvalidValidity(validity));
    }
    let now = OffsetDateTime::now_utc();
    let span =
        time::Duration::try_from(validity).map_err(|_| PkiError::InvalidValidity(validity))?;
    let skew =
        time::Duration::try_from(CLOCK_SKEW).map_err(|_| PkiError::InvalidValidity(validity))?;
    params.not_before = now - skew;
    params.not_after = now
        .checked_add(span)
        .ok_or(PkiError::InvalidValidity(validity))?;
    Ok(())
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Positive and non-zero, as RFC 5280 wants.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf_der(pem: &str) -> Vec<u8> {
        crate::tls::certs_from_pem(pem, "test").unwrap()[0].to_vec()
    }

    #[test]
    fn identity_parses_and_rejects() {
        assert_eq!(
            "host:hv-01".parse::<Identity>().unwrap(),
            Identity::Host("hv-01".into())
        );
        assert_eq!(
            "service:ferry".parse::<Identity>().unwrap(),
            Identity::Service("ferry".into())
        );
        for bad in [
            "hv-01",
            "host:",
            "user:x",
            "host:a b",
            "host:a/b",
            "service:x:y",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ca_round_trips_and_issues() {
        let ca = VaultCa::create("v1").unwrap();
        let again = VaultCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let host = Identity::Host("hv-01".into());
        let (cert, _key) = again.issue_client(&host).unwrap();
        assert_eq!(Identity::from_cert_der(&leaf_der(&cert)).unwrap(), host);
    }

    #[test]
    fn server_certificates_carry_local_and_extra_names() {
        let ca = VaultCa::create("v1").unwrap();
        let (cert, _key) = ca
            .issue_server(&["gw.example".into(), "10.1.2.3".into()])
            .unwrap();
        let der = leaf_der(&cert);
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = x509.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san.general_names.iter().map(|n| n.to_string()).collect();
        for want in [
            "DNSName(localhost)",
            "DNSName(gw.example)",
            "IPAddress(7f:00:00:01)",
            "IPAddress(0a:01:02:03)",
        ] {
            assert!(
                names.iter().any(|n| n.contains(want)),
                "{want} in {names:?}"
            );
        }
        // A server certificate is no caller identity.
        assert!(Identity::from_cert_der(&der).is_err());
        assert!(Identity::from_cert_der(b"not der").is_err());
    }

    #[test]
    fn from_pem_rejects_a_foreign_key() {
        let a = VaultCa::create("a").unwrap();
        let b = VaultCa::create("b").unwrap();
        assert!(matches!(
            VaultCa::from_pem(&a.cert_pem(), &b.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
        let (leaf, leaf_key) = a.issue_client(&Identity::Service("x".into())).unwrap();
        assert!(matches!(
            VaultCa::from_pem(&leaf, &leaf_key),
            Err(PkiError::NotACa)
        ));
    }

    #[test]
    fn csr_subject_is_ignored() {
        let ca = VaultCa::create("v1").unwrap();
        let (csr, _key) = new_csr(&Identity::Service("evil".into())).unwrap();
        let host = Identity::Host("hv-02".into());
        let cert = ca.sign_csr(&csr, &host, Duration::from_secs(3600)).unwrap();
        assert_eq!(Identity::from_cert_der(&leaf_der(&cert)).unwrap(), host);
        assert!(
            ca.sign_csr("garbage", &host, Duration::from_secs(60))
                .is_err()
        );
        assert!(ca.sign_csr(&csr, &host, Duration::ZERO).is_err());
        // A CSR altered in transit (here: in its signature) is refused.
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let last_body = lines.len() - 2;
        let flipped = if lines[last_body].starts_with('A') {
            "B"
        } else {
            "A"
        };
        lines[last_body].replace_range(0..1, flipped);
        let tampered = lines.join("\n");
        let err = ca
            .sign_csr(&tampered, &host, Duration::from_secs(60))
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidCsr(_)), "{err}");
    }

    #[test]
    fn secrets_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/secret.key");
        write_secret(&path, b"s3cret").unwrap();
        write_secret(&path, b"s3cret2").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"s3cret2");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
