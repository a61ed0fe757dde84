//! QUIC (quinn) configs for the agent ↔ gateway data plane: TLS 1.3, ALPN `ferry/1`, client
//! certificates required and verified against the vault CA, ring provider chosen explicitly.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use crate::pki::{Identity, PkiError};
use crate::tls;

/// The ALPN protocol of Ferry's QUIC data plane.
pub const ALPN_FERRY: &[u8] = b"ferry/1";
/// A connection with no traffic (keep-alives included) for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Clients ping this often so an idle connection survives NAT and the idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

fn tls_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Tls(e.to_string())
}

/// Flow-control window of one stream. quinn's default (1.25 MB) is sized for 100 Mbit/s at
/// 100 ms RTT, which caps one upload stream to ~25 MB/s on a 50 ms WAN link to the recovery
/// site; 8 MiB covers ~1 Gbit/s at 60 ms. Memory is only used while the reader lags.
const STREAM_WINDOW: u32 = 8 << 20;
/// Unacknowledged data a sender keeps in flight across all its streams.
const SEND_WINDOW: u64 = 64 << 20;

/// The transport settings of both ends: idle timeout, keep-alive and WAN-sized windows.
pub fn quic_transport_config() -> Result<Arc<quinn::TransportConfig>, PkiError> {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(tls_err)?));
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    transport.send_window(SEND_WINDOW);
    Ok(Arc::new(transport))
}

/// The gateway's QUIC server config: `cert_pem`/`key_pem` as its identity, and a client
/// certificate signed by the vault CA (`ca_pem`) required from every peer.
pub fn quic_server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<quinn::ServerConfig, PkiError> {
    let provider = tls::provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(tls::root_store(ca_pem)?, provider.clone())
            .build()
            .map_err(tls_err)?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            tls::certs_from_pem(cert_pem, "server certificate")?,
            tls::key_from_pem(key_pem, "server key")?,
        )
        .map_err(tls_err)?;
    crypto.alpn_protocols = vec![ALPN_FERRY.to_vec()];
    let crypto = QuicServerConfig::try_from(crypto).map_err(tls_err)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(quic_transport_config()?);
    Ok(config)
}

/// An agent's QUIC client config: trusts only the vault CA, presents its host certificate.
/// Connect with server name `localhost` or a name in the gateway's certificate.
pub fn quic_client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<quinn::ClientConfig, PkiError> {
    let mut crypto = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(tls::root_store(ca_pem)?)
        .with_client_auth_cert(
            tls::certs_from_pem(cert_pem, "client certificate")?,
            tls::key_from_pem(key_pem, "client key")?,
        )
        .map_err(tls_err)?;
    crypto.alpn_protocols = vec![ALPN_FERRY.to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).map_err(tls_err)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(quic_transport_config()?);
    Ok(config)
}

/// The serial number (hex) of a QUIC connection's client certificate, for revocation checks.
pub fn quic_peer_serial(conn: &quinn::Connection) -> Result<String, PkiError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(PkiError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(PkiError::NoPeerCertificate)?;
    crate::pki::cert_serial_hex(leaf)
}

/// The identity in the (already verified) client certificate of a QUIC connection.
pub fn quic_peer_identity(conn: &quinn::Connection) -> Result<Identity, PkiError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(PkiError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(PkiError::NoPeerCertificate)?;
    Identity::from_cert_der(leaf)
}
