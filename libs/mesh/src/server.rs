//! The gRPC server every component runs: TLS (client certificates optional, verified against
//! the vault CA), health, reflection v1 and v1alpha, graceful shutdown.
//!
//! TLS is terminated here rather than by tonic's own TLS config so the rustls provider is
//! chosen explicitly; the accepted `tokio_rustls` streams carry their peer certificates into
//! `Request::peer_certs()` all the same.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::config::MeshConfig;
use crate::error::MeshError;
use crate::pki::PkiError;
use crate::tls;

/// A TLS handshake that takes longer than this is dropped, so a stalled peer cannot hold a
/// connection slot.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the gRPC server to pick them up.
const ACCEPT_BACKLOG: usize = 64;
/// TLS handshakes in progress at once; past this, accepting waits (the kernel backlog holds
/// new connections), so a connection flood costs bounded memory and CPU.
const MAX_HANDSHAKES: usize = 256;
/// After shutdown, in-flight calls get this long to finish (see [`serve_with_drain`]). Long-lived streams that do not
/// watch the shutdown token themselves would otherwise keep the server up forever.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings find dead peers (an agent whose host lost power) on long-lived streams.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side of the mesh's TLS: the component's certificate, and the vault CA as the
/// only root for (optional) client certificates.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the server certificate, its key and the CA certificate named in the config.
    pub fn load(cfg: &MeshConfig) -> Result<Self, MeshError> {
        let ca = read(&cfg.path(&cfg.tls.ca_cert))?;
        let cert = read(&cfg.path(&cfg.tls.server_cert))?;
        let key = read(&cfg.path(&cfg.tls.server_key))?;
        Ok(Self::from_pem(&ca, &cert, &key)?)
    }

    /// Builds the TLS config from PEM text.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let provider = tls::provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(tls::root_store(ca_pem)?, provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| PkiError::Tls(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                tls::certs_from_pem(cert_pem, "server certificate")?,
                tls::key_from_pem(key_pem, "server key")?,
            )
            .map_err(|e| PkiError::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// The rustls config, for servers that are not built with [`serve`].
    pub fn rustls_config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }
}

pub(crate) fn read(path: &std::path::Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Serves `routes` plus `grpc.health.v1.Health` (each of `health_names` and "" SERVING) and
/// reflection (v1 and v1alpha, from `ferry_proto::FILE_DESCRIPTOR_SET`) over TLS on
/// `listener`, until `shutdown` is cancelled; then reports NOT_SERVING and drains in-flight
/// calls.
pub async fn serve(
    listener: TcpListener,
    tls: &ServerTls,
    routes: Routes,
    health_names: &[&str],
    shutdown: CancellationToken,
) -> Result<(), MeshError> {
    serve_with_drain(listener, tls, routes, health_names, shutdown, DRAIN_TIMEOUT).await
}

/// [`serve`] with a chosen drain timeout: how long calls still running at shutdown (e.g.
/// server streams that do not watch the token) may go on before the server returns anyway.
pub async fn serve_with_drain(
    listener: TcpListener,
    tls: &ServerTls,
    routes: Routes,
    health_names: &[&str],
    shutdown: CancellationToken,
    drain_timeout: Duration,
) -> Result<(), MeshError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in health_names {
        reporter
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = reflection_builder(health_names)
        .build_v1()
        .map_err(|e| MeshError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection_builder(health_names)
        .build_v1alpha()
        .map_err(|e| MeshError::Reflection(e.to_string()))?;
    let routes = routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let local = listener.local_addr().ok();
    let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
    let acceptor = TlsAcceptor::from(tls.config.clone());
    let accept_task = tokio::spawn(accept_loop(listener, acceptor, tx, shutdown.clone()));
    tracing::info!(addr = ?local, services = ?health_names, "grpc server listening");

    let stop = shutdown.clone();
    let names: Vec<String> = health_names.iter().map(|s| (*s).to_owned()).collect();
    let server = Server::builder()
        // Every log line of a handler names the RPC it belongs to.
        .trace_fn(|req| tracing::info_span!("grpc", method = %req.uri().path()))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_routes(routes)
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), async move {
            stop.cancelled().await;
            for name in names.iter().map(String::as_str).chain([""]) {
                reporter
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            }
        });
    let drain_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain_timeout).await;
    };
    let result = tokio::select! {
        result = server => result.map_err(MeshError::Serve),
        () = drain_deadline => {
            tracing::warn!(addr = ?local, timeout = ?drain_timeout, "calls still running at shutdown were cut off");
            Ok(())
        }
    };
    accept_task.abort();
    tracing::info!(addr = ?local, "grpc server stopped");
    result
}

/// Reflection over every Ferry proto file (so `grpcurl describe` resolves any type), but
/// listing only the services this server runs, health and reflection; all Ferry services
/// when `served` names none.
fn reflection_builder(served: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let served: Vec<&str> = served.iter().copied().filter(|s| !s.is_empty()).collect();
    let listed: &[&str] = if served.is_empty() {
        ferry_proto::SERVICE_NAMES
    } else {
        &served
    };
    for name in listed.iter().chain(&[
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        builder = builder.with_service_name(*name);
    }
    builder
}

/// Accepts TCP connections and hands each to its own handshake task, so one slow client
/// never blocks the others.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = handshakes.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
            drop(permit);
            match handshake {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(tls)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::VaultCa;

    #[test]
    fn mismatched_or_bad_keys_are_refused_without_leaking() {
        let ca = VaultCa::create("v1").unwrap();
        let (cert, key) = ca.issue_server(&[]).unwrap();
        assert!(ServerTls::from_pem(&ca.cert_pem(), &cert, &key).is_ok());

        let (_, other_key) = ca.issue_server(&[]).unwrap();
        let err = ServerTls::from_pem(&ca.cert_pem(), &cert, &other_key).unwrap_err();
        let body = other_key.lines().nth(1).unwrap();
        assert!(!err.to_string().contains(body), "{err}");

        assert!(ServerTls::from_pem(&ca.cert_pem(), &cert, "not a key").is_err());
        assert!(ServerTls::from_pem("not a ca", &cert, &key).is_err());
    }
}
