//! QUIC data-plane gateway: mTLS termination, framing, checksums, chunk writes and reads.
//!
//! Agents connect over QUIC (ALPN `ferry/1`, a vault host certificate required) and upload
//! batches of sealed chunks, one bidirectional stream per batch; see `PROTOCOL.md` for the
//! wire format. The gateway asks ingest whether the host may upload into the cycle, HEADs the
//! store so chunks already stored are never sent, checks every length and hash, writes the
//! chunks put-if-absent (so retried uploads are idempotent) and reports what landed to ingest.
//!
//! The read path (FETCH): a recovery host asks for sealed chunks of a recovery point; the
//! gateway serves only chunks of a point storage-writer says that host may read.
//!
//! [`run`] is the server; [`client::Uploader`] is the agent's side; [`frame`] and [`fetch`]
//! are the codec.

mod audit;
pub mod client;
pub mod fetch;
pub mod frame;
mod ingest;
mod server;
mod storage;

use anyhow::Context as _;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use ferry_mesh::{Component, MeshConfig};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use fetch::MAX_FETCH_COUNT;
pub use frame::{ALPN, ErrorCode};

/// Concurrent batches (bidirectional streams) per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Bytes one stream may have in flight unread; several MiB-sized chunks, so a single batch
/// is not throttled by flow control on a fast link.
const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;
/// Bytes a whole connection may have in flight unread (also the send window).
const CONNECTION_RECEIVE_WINDOW: u32 = 32 << 20;
/// A connection with no traffic for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keep-alive period, well inside the idle timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Mesh(#[from] ferry_mesh::MeshError),
    #[error(transparent)]
    Pki(#[from] ferry_mesh::PkiError),
    #[error("cannot open the store: {0}")]
    Store(#[from] ferry_store::StoreError),
    #[error("cannot reach ingest: {0}")]
    Ingest(#[from] ingest::IngestError),
    #[error("cannot reach storage-writer: {0}")]
    StorageWriter(#[from] storage::StorageError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the udp socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("invalid vault block size {0}")]
    BlockSize(u32),
}

/// The QUIC transport settings both ends use, tuned for throughput: wide flow-control
/// windows, many concurrent batches, keep-alive and a 30 s idle timeout.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(MAX_CONCURRENT_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.receive_window(CONNECTION_RECEIVE_WINDOW.into());
    t.send_window(u64::from(CONNECTION_RECEIVE_WINDOW));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // 30 s is far below the varint bound, so the conversion cannot fail.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    t
}

/// The gateway's quinn server config from the vault PKI files in `cfg`: its server
/// certificate, client certificates required and verified against the vault CA, ALPN
/// `ferry/1`, and [`transport_config`].
pub fn server_config(cfg: &MeshConfig) -> Result<quinn::ServerConfig, GatewayError> {
    let ca = read(&cfg.tls.ca_cert)?;
    let cert = read(&cfg.tls.server_cert)?;
    let key = read(&cfg.tls.server_key)?;
    let mut server = ferry_mesh::quic_server_config(&ca, &cert, &key)?;
    server.transport_config(Arc::new(transport_config()));
    Ok(server)
}

fn read(path: &std::path::Path) -> Result<String, GatewayError> {
    std::fs::read_to_string(path).map_err(|source| GatewayError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Serves the gateway on `socket` until `shutdown` is cancelled: builds the quinn endpoint
/// from `cfg`'s PKI, opens the store at `cfg.store_url`, and talks to ingest and
/// storage-writer (each connecting on first use) with the service certificate. In-flight
/// batches get a grace period to finish.
pub async fn run(
    cfg: MeshConfig,
    socket: UdpSocket,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = ferry_store::Store::from_url(&cfg.store_url()).map_err(GatewayError::from)?;
    run_with_store(cfg, store, socket, shutdown).await
}

/// [`run`] over a store the caller opened (fault tests wrap one in
/// `ferry_store::UnreliableStore`); `cfg.store_url` is not used.
pub async fn run_with_store(
    cfg: MeshConfig,
    store: ferry_store::Store,
    socket: UdpSocket,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = server_config(&cfg)?;
    let block_size = cfg.vault.block_size;
    if block_size == 0 || block_size > ferry_store::MAX_CHUNK_LEN as u32 {
        return Err(GatewayError::BlockSize(block_size).into());
    }
    let store_url = store.url().to_owned();
    let store_for_audit = store.clone();
    let tls = ferry_mesh::ClientTls::service(&cfg).map_err(GatewayError::from)?;
    let ingest = ingest::IngestLink::new(&cfg.endpoint(Component::Ingest), &tls)
        .map_err(GatewayError::from)?;
    let storage = storage::StorageLink::new(&cfg.endpoint(Component::StorageWriter), &tls)
        .map_err(GatewayError::from)?;
    let revoked = ferry_mesh::RevocationList::watch(&cfg, shutdown.clone()).await;
    let gateway = server::Gateway::new(store, ingest, storage, block_size);
    // The trail is written to the store the gateway serves (the vault's), keyed like every
    // other component's.
    let trail = ferry_store::AuditWriter::spawn(ferry_store::AuditLog::new(
        store_for_audit,
        &cfg.data_key()
            .context("the gateway keys its audit trail with the vault data key")?,
    ));
    let gateway = gateway
        .with_revocation(revoked)
        .with_audit(audit::QuicAudit::new(trail));
    let gateway = Arc::new(gateway);

    socket.set_nonblocking(true).map_err(GatewayError::Socket)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )
    .map_err(GatewayError::Socket)?;
    let addr = endpoint.local_addr().map_err(GatewayError::Socket)?;
    info!(%addr, block_size, store = %store_url, "gateway listening");
    server::serve(endpoint, gateway, shutdown).await;
    info!(%addr, "gateway stopped");
    Ok(())
}
