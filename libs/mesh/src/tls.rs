//! Shared rustls plumbing. Every config here is built with the `ring` provider chosen
//! explicitly, so a process-wide default installed by some other crate never changes which
//! cryptography Ferry uses.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::pki::PkiError;

/// The crypto provider of every Ferry TLS config.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// All certificates of a PEM bundle, in order; at least one.
pub(crate) fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            what,
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file. The error never includes the key material.
pub(crate) fn key_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::Pem {
        what,
        reason: "no valid private key found".into(),
    })
}

/// A root store holding the vault CA(s) of a PEM bundle.
pub(crate) fn root_store(ca_pem: &str) -> Result<Arc<RootCertStore>, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, "ca certificate")? {
        roots.add(cert).map_err(|e| PkiError::Pem {
            what: "ca certificate",
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}
