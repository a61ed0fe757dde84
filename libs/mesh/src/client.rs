//! gRPC clients inside the mesh: TLS with the vault CA as the only root, an optional client
//! certificate, and bearer tokens for operators.
//!
//! TLS is done by our own connector (ring provider chosen explicitly) and tonic sees a plain
//! `http://` endpoint on top of it; tonic's own TLS would use whatever process-wide default
//! provider happens to be installed.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::config::MeshConfig;
use crate::error::MeshError;
use crate::pki::PkiError;
use crate::server::read;
use crate::tls;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_secs(30);

/// What a client trusts and who it is.
#[derive(Clone)]
pub struct ClientTls {
    /// The vault CA (PEM), the only root trusted.
    pub ca_pem: String,
    /// Client certificate and key (PEM), if the client has one.
    pub identity: Option<(String, String)>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// A Ferry component calling another: the CA plus the service certificate.
    pub fn service(cfg: &MeshConfig) -> Result<Self, MeshError> {
        Ok(Self {
            ca_pem: read(&cfg.path(&cfg.tls.ca_cert))?,
            identity: Some((
                read(&cfg.path(&cfg.tls.service_cert))?,
                read(&cfg.path(&cfg.tls.service_key))?,
            )),
        })
    }

    /// An operator (CLI): the CA only; authenticate with [`with_token`].
    pub fn operator(cfg: &MeshConfig) -> Result<Self, MeshError> {
        Ok(Self {
            ca_pem: read(&cfg.path(&cfg.tls.ca_cert))?,
            identity: None,
        })
    }

    /// A host (agent) with its registered certificate.
    pub fn host(ca_pem: String, cert_pem: String, key_pem: String) -> Self {
        Self {
            ca_pem,
            identity: Some((cert_pem, key_pem)),
        }
    }

    fn rustls_config(&self) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| PkiError::Tls(e.to_string()))?
            .with_root_certificates(tls::root_store(&self.ca_pem)?);
        let mut config = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    tls::certs_from_pem(cert, "client certificate")?,
                    tls::key_from_pem(key, "client key")?,
                )
                .map_err(|e| PkiError::Tls(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Connects to `endpoint` (`https://host:port`, or several comma-separated addresses of
/// replicas: `https://10.0.0.1:7402,10.0.0.2:7402`) and checks the connection works. Addresses
/// are tried in turn and the first that connects wins; so does every reconnection of the
/// channel, which therefore moves to a surviving replica when the one it used goes away.
pub async fn connect(endpoint: &str, tls: &ClientTls) -> Result<Channel, MeshError> {
    let (ep, connector) = prepare(endpoint, tls)?;
    ep.connect_with_connector(tower::service_fn(connector))
        .await
        .map_err(|e| MeshError::Connect {
            endpoint: endpoint.to_owned(),
            reason: crate::error::error_chain(&e),
        })
}

/// Like [`connect`], but connects on first use (and reconnects after failures); use it for
/// peers that may start after this component.
pub fn connect_lazy(endpoint: &str, tls: &ClientTls) -> Result<Channel, MeshError> {
    let (ep, connector) = prepare(endpoint, tls)?;
    Ok(ep.connect_with_connector_lazy(tower::service_fn(connector)))
}

type ConnectFuture = std::pin::Pin<
    Box<
        dyn Future<
                Output = Result<
                    TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                    std::io::Error,
                >,
            > + Send,
    >,
>;

/// One address of an endpoint: where to connect and the name its certificate must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl Target {
    /// `host:port` for a URI authority (IPv6 in brackets).
    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The addresses of an endpoint, in order. The first carries the scheme (`https://`); later
/// ones may repeat it or leave it out.
fn parse_targets(endpoint: &str) -> Result<Vec<Target>, MeshError> {
    let bad = |reason: &str| MeshError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let mut out = Vec::new();
    for (i, part) in endpoint.split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            return Err(bad("an empty address in the list"));
        }
        let url = if i > 0 && !part.contains("://") {
            format!("https://{part}")
        } else {
            part.to_owned()
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a url"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        // Server certificates always carry `localhost`; for an IP address that is the name we
        // check, so a certificate works whichever local address a component listens on.
        let server_name = match host.parse::<IpAddr>() {
            Ok(_) => ServerName::try_from("localhost".to_owned()),
            Err(_) => ServerName::try_from(host.clone()),
        }
        .map_err(|_| bad("invalid host name"))?;
        out.push(Target {
            host,
            port,
            server_name,
        });
    }
    Ok(out)
}

/// TCP + TLS to one address, checking that HTTP/2 was negotiated.
async fn connect_one(
    connector: &TlsConnector,
    t: &Target,
) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error> {
    let tcp = TcpStream::connect((t.host.as_str(), t.port)).await?;
    tcp.set_nodelay(true)?;
    let stream = connector.connect(t.server_name.clone(), tcp).await?;
    if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(std::io::Error::other("the server did not negotiate http/2"));
    }
    Ok(TokioIo::new(stream))
}

fn prepare(
    endpoint: &str,
    tls: &ClientTls,
) -> Result<
    (
        Endpoint,
        impl FnMut(Uri) -> ConnectFuture + Clone + Send + 'static,
    ),
    MeshError,
> {
    let targets = Arc::new(parse_targets(endpoint)?);
    let first = targets.first().ok_or_else(|| MeshError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: "no address".to_owned(),
    })?;
    let connector = TlsConnector::from(tls.rustls_config()?);
    let ep = Endpoint::from_shared(format!("http://{}", first.authority()))
        .map_err(|_| MeshError::InvalidEndpoint {
            endpoint: endpoint.to_owned(),
            reason: "not a url".to_owned(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_while_idle(true);
    // Each address gets its share of the connect timeout, so a dead one cannot use it all.
    let per_target = CONNECT_TIMEOUT / u32::try_from(targets.len()).unwrap_or(u32::MAX).max(1);
    let connect = move |_: Uri| -> ConnectFuture {
        let connector = connector.clone();
        let targets = targets.clone();
        Box::pin(async move {
            let mut errors = Vec::new();
            for t in targets.iter() {
                let res = tokio::time::timeout(per_target, connect_one(&connector, t)).await;
                match res {
                    Ok(Ok(io)) => return Ok(io),
                    Ok(Err(e)) => errors.push(format!("{}: {e}", t.authority())),
                    Err(_) => errors.push(format!("{}: timed out", t.authority())),
                }
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                errors.join("; "),
            ))
        })
    };
    Ok((ep, connect))
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(..)")
    }
}

impl BearerToken {
    pub fn new(token: &str) -> Result<Self, MeshError> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(MeshError::InvalidToken);
        }
        let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| MeshError::InvalidToken)?;
        value.set_sensitive(true);
        Ok(Self(value))
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A channel that sends a bearer token with every call.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// Wraps `channel` so every call carries `token`; pass the result to a generated client's
/// `new`.
pub fn with_token(channel: Channel, token: &str) -> Result<AuthChannel, MeshError> {
    Ok(InterceptedService::new(channel, BearerToken::new(token)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_lists() {
        let t = parse_targets("https://127.0.0.1:7001,127.0.0.1:7101, https://[::1]:7201").unwrap();
        let got: Vec<String> = t.iter().map(Target::authority).collect();
        assert_eq!(got, ["127.0.0.1:7001", "127.0.0.1:7101", "[::1]:7201"]);
        let one = parse_targets("https://reg.example:9000").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(
            one[0].server_name,
            ServerName::try_from("reg.example").unwrap()
        );
        assert!(parse_targets("https://127.0.0.1:7001,").is_err());
        assert!(parse_targets("http://127.0.0.1:7001").is_err());
        assert!(parse_targets("https://127.0.0.1:7001,http://127.0.0.1:7101").is_err());
    }
}
