//! The agent's side of the gateway protocol: one QUIC connection ([`Uploader`]), one
//! bidirectional stream per batch (OFFER → NEED → payloads → ACK), per fetch (FETCH → FRD1 →
//! sealed chunks) and per PING.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{RecvStream, SendStream};
use tokio::time::timeout;

use crate::fetch::{self, FetchAnswer};
use crate::frame::{self, ErrorCode, FrameError, Response};
pub use crate::frame::{ChunkId, Offer};

/// How long the QUIC handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the gateway may take to answer an OFFER (it HEADs every chunk) or, after the
/// last payload, to write the chunks and ACK.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long sending one sealed payload, or receiving one fetched chunk, may take (flow
/// control can stall it).
const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// The server name the gateway's certificate carries.
const SERVER_NAME: &str = "localhost";
/// The largest vault block size the gateway accepts (256 MiB fits in a u32).
const DEFAULT_MAX_BLOCK: u32 = ferry_store::MAX_CHUNK_LEN as u32;

/// Why an upload failed. [`UploadError::is_transient`] tells retryable failures (network,
/// timeouts, an unavailable dependency behind the gateway) from permanent ones.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot bind a local udp socket: {0}")]
    Bind(#[source] std::io::Error),
    #[error("cannot connect to gateway {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection to the gateway failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("sending to the gateway failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("gateway stream already closed")]
    Closed(#[from] quinn::ClosedStream),
    #[error("reading the gateway's answer failed: {0}")]
    Read(#[source] FrameError),
    #[error("the gateway's answer is malformed: {0}")]
    Protocol(String),
    #[error("the gateway reset the stream with code {0}")]
    Reset(u64),
    #[error("the gateway rejected the upload (code {code}): {message}")]
    Rejected { code: u32, message: String },
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl UploadError {
    /// Whether retrying (on a new stream, possibly a new connection) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Bind(_)
            | Self::Connect { .. }
            | Self::Connection(_)
            | Self::Write(_)
            | Self::Closed(_)
            | Self::Timeout(_) => true,
            Self::Read(e) => matches!(e, FrameError::Truncated | FrameError::Io(_)),
            Self::Reset(code) => u32::try_from(*code)
                .ok()
                .and_then(ErrorCode::from_u32)
                .is_none_or(ErrorCode::is_transient),
            Self::Rejected { code, .. } => {
                ErrorCode::from_u32(*code).is_some_and(ErrorCode::is_transient)
            }
            Self::Protocol(_) | Self::Invalid(_) => false,
        }
    }

    /// The gateway's error code, when it rejected the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Rejected { code, .. } => ErrorCode::from_u32(*code),
            Self::Reset(code) => u32::try_from(*code).ok().and_then(ErrorCode::from_u32),
            _ => None,
        }
    }
}

/// A QUIC connection to a gateway. Cheap to clone; clones share the connection, and batches
/// on it run concurrently, one stream each.
#[derive(Clone, Debug)]
pub struct Uploader {
    conn: quinn::Connection,
    /// The largest block a fetched chunk may seal; bounds what a fetch allocates per chunk.
    max_block: u32,
    // Kept so the endpoint (and its socket) lives as long as any clone of the uploader.
    _endpoint: quinn::Endpoint,
}

/// What the gateway answered to an OFFER: which chunks to send. Finish it with
/// [`PendingBatch::send`] (with an empty list if nothing is needed).
#[derive(Debug)]
pub struct PendingBatch {
    /// `needed[i]`: send the sealed bytes of offer `i`.
    pub needed: Vec<bool>,
    send: SendStream,
    recv: RecvStream,
}

/// The gateway's ACK for a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    /// Chunks this batch wrote.
    pub written: u32,
    /// Chunks sent but already in the store (a concurrent or retried upload won).
    pub already_present: u32,
    /// Sealed bytes written.
    pub bytes_written: u64,
}

impl Uploader {
    /// Connects to the gateway at `addr` with `cfg` (from `ferry_mesh::quic_client_config`,
    /// whose ALPN is `ferry/1`). The gateway's tuned transport settings are applied to `cfg`.
    pub async fn connect(addr: SocketAddr, cfg: quinn::ClientConfig) -> Result<Self, UploadError> {
        let bind: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(bind).map_err(UploadError::Bind)?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                .map_err(UploadError::Bind)?;
        let mut cfg = cfg;
        cfg.transport_config(Arc::new(crate::transport_config()));
        let connecting = endpoint
            .connect_with(cfg, addr, SERVER_NAME)
            .map_err(|source| UploadError::Connect { addr, source })?;
        let conn = timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| UploadError::Timeout("connecting to the gateway"))??;
        Ok(Self {
            conn,
            max_block: DEFAULT_MAX_BLOCK,
            _endpoint: endpoint,
        })
    }

    /// Bounds each chunk [`Uploader::fetch`] accepts by the vault's block size (default: the
    /// largest block size a vault may have).
    pub fn with_max_block(mut self, max_block: u32) -> Self {
        self.max_block = max_block;
        self
    }

    /// Wraps an established connection (tests, or callers that build their own endpoint).
    pub fn from_connection(conn: quinn::Connection, endpoint: quinn::Endpoint) -> Self {
        Self {
            conn,
            max_block: DEFAULT_MAX_BLOCK,
            _endpoint: endpoint,
        }
    }

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The gateway's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Closes the connection for every clone (in-flight batches fail).
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }

    /// Opens a batch: sends the OFFER and waits for the NEED bitmap.
    pub async fn offer(
        &self,
        cycle_id: &str,
        offers: &[Offer],
    ) -> Result<PendingBatch, UploadError> {
        let buf = frame::encode_offer(cycle_id, offers)
            .map_err(|e| UploadError::Invalid(e.to_string()))?;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        if let Err(e) = send.write_all(&buf).await {
            return Err(error_after_write_failure(&mut recv, e).await);
        }
        match read_response(&mut recv, offers.len()).await? {
            Response::Need(needed) => Ok(PendingBatch { needed, send, recv }),
            Response::Error(e) => Err(UploadError::Rejected {
                code: e.code,
                message: e.message,
            }),
            other => Err(UploadError::Protocol(format!(
                "expected NEED, got {}",
                response_name(&other)
            ))),
        }
    }

    /// Fetches the sealed chunks `ids` of `point` (an id or `latest`) of `vm`, returned in
    /// request order (an id asked twice comes twice). At most [`crate::MAX_FETCH_COUNT`] ids
    /// a call; split longer lists, and run several calls concurrently for throughput. The
    /// gateway serves only chunks of a point this host may read: a chunk outside it fails
    /// the whole call with [`ErrorCode::NotEntitled`], a VM the host may not read with
    /// [`ErrorCode::Denied`]. Every length and hash is checked; the bytes are still sealed.
    pub async fn fetch(
        &self,
        vm: &str,
        point: &str,
        ids: &[ChunkId],
    ) -> Result<Vec<Bytes>, UploadError> {
        let buf =
            fetch::encode_fetch(vm, point, ids).map_err(|e| UploadError::Invalid(e.to_string()))?;
        let (mut send, mut recv) = self.conn.open_bi().await?;
        if let Err(e) = send.write_all(&buf).await {
            return Err(error_after_write_failure(&mut recv, e).await);
        }
        send.finish()?;
        let answer = timeout(RESPONSE_TIMEOUT, fetch::read_fetch_answer(&mut recv)).await;
        match answer.map_err(|_| UploadError::Timeout("waiting for the gateway's answer"))? {
            Ok(FetchAnswer::Data) => {}
            Ok(FetchAnswer::Error(e)) => {
                return Err(UploadError::Rejected {
                    code: e.code,
                    message: e.message,
                });
            }
            Err(e) => return Err(frame_error(e)),
        }
        let max_sealed = frame::max_sealed_len(self.max_block);
        let mut chunks = Vec::with_capacity(ids.len());
        for index in 0..ids.len() {
            let read = fetch::read_fetched_chunk(&mut recv, index, ids.len(), max_sealed);
            let chunk = timeout(PAYLOAD_TIMEOUT, read)
                .await
                .map_err(|_| UploadError::Timeout("receiving a chunk from the gateway"))?;
            chunks.push(chunk.map_err(frame_error)?);
        }
        // The gateway finishes the stream after the last chunk; anything more is a bug.
        let end = timeout(RESPONSE_TIMEOUT, frame::expect_end(&mut recv)).await;
        end.map_err(|_| UploadError::Timeout("waiting for the end of the gateway's answer"))?
            .map_err(frame_error)?;
        Ok(chunks)
    }

    /// Round trip to the gateway; returns the gateway's clock (unix milliseconds).
    pub async fn ping(&self) -> Result<i64, UploadError> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(&frame::MAGIC_PING).await?;
        send.finish()?;
        match read_response(&mut recv, 0).await? {
            Response::Pong(ms) => Ok(ms),
            Response::Error(e) => Err(UploadError::Rejected {
                code: e.code,
                message: e.message,
            }),
            other => Err(UploadError::Protocol(format!(
                "expected PING, got {}",
                response_name(&other)
            ))),
        }
    }
}

impl PendingBatch {
    /// How many chunks the gateway asked for.
    pub fn needed_count(&self) -> usize {
        self.needed.iter().filter(|n| **n).count()
    }

    /// Sends the sealed bytes of the needed chunks, in offer order, and waits for the ACK.
    pub async fn send(mut self, sealed: Vec<Bytes>) -> Result<BatchOutcome, UploadError> {
        let want = self.needed_count();
        if sealed.len() != want {
            let _ = self.send.reset(ErrorCode::BadFrame.as_u32().into());
            return Err(UploadError::Invalid(format!(
                "the gateway needs {want} chunks, {} given",
                sealed.len()
            )));
        }
        if let Some(i) = sealed
            .iter()
            .position(|s| s.is_empty() || u32::try_from(s.len()).is_err())
        {
            let _ = self.send.reset(ErrorCode::BadFrame.as_u32().into());
            return Err(UploadError::Invalid(format!(
                "sealed chunk {i} has length {}",
                sealed[i].len()
            )));
        }
        for s in sealed {
            let len = Bytes::copy_from_slice(&frame::encode_payload_len(s.len() as u32));
            let hash = Bytes::copy_from_slice(&frame::payload_hash(&s));
            let mut parts = [len, s, hash];
            match timeout(PAYLOAD_TIMEOUT, self.send.write_all_chunks(&mut parts)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(error_after_write_failure(&mut self.recv, e).await),
                Err(_) => return Err(UploadError::Timeout("sending a chunk to the gateway")),
            }
        }
        self.send.finish()?;
        match read_response(&mut self.recv, 0).await? {
            Response::Ack(a) => Ok(BatchOutcome {
                written: a.written,
                already_present: a.already_present,
                bytes_written: a.bytes_written,
            }),
            Response::Error(e) => Err(UploadError::Rejected {
                code: e.code,
                message: e.message,
            }),
            other => Err(UploadError::Protocol(format!(
                "expected ACK, got {}",
                response_name(&other)
            ))),
        }
    }
}

async fn read_response(recv: &mut RecvStream, offered: usize) -> Result<Response, UploadError> {
    match timeout(RESPONSE_TIMEOUT, frame::read_response(recv, offered)).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(frame_error(e)),
        Err(_) => Err(UploadError::Timeout("waiting for the gateway's answer")),
    }
}

/// What a failure to read the gateway's answer means: a reset stream (with the gateway's
/// code) or a lost connection where quinn says so, a cut answer, or a malformed one.
fn frame_error(e: FrameError) -> UploadError {
    match e {
        FrameError::Io(e) => io_to_upload_error(e),
        e @ FrameError::Truncated => UploadError::Read(e),
        e => UploadError::Protocol(e.to_string()),
    }
}

/// Maps an I/O error from a quinn stream back to what happened (reset with a code, lost
/// connection) where quinn tells us.
fn io_to_upload_error(e: std::io::Error) -> UploadError {
    let kind = e.kind();
    match e.downcast::<quinn::ReadError>() {
        Ok(quinn::ReadError::Reset(code)) => UploadError::Reset(code.into_inner()),
        Ok(quinn::ReadError::ConnectionLost(c)) => UploadError::Connection(c),
        Ok(other) => UploadError::Read(FrameError::Io(std::io::Error::new(kind, other))),
        Err(e) => UploadError::Read(FrameError::Io(e)),
    }
}

/// The gateway stops reading when it rejects a batch and says why in an ERROR frame; a write
/// that fails with `Stopped` is therefore best explained by that frame, if it arrives.
async fn error_after_write_failure(recv: &mut RecvStream, e: quinn::WriteError) -> UploadError {
    if !matches!(e, quinn::WriteError::Stopped(_)) {
        return UploadError::Write(e);
    }
    match timeout(Duration::from_secs(5), frame::read_response(recv, 0)).await {
        Ok(Ok(Response::Error(f))) => UploadError::Rejected {
            code: f.code,
            message: f.message,
        },
        Ok(Err(FrameError::Io(io))) => io_to_upload_error(io),
        _ => UploadError::Write(e),
    }
}

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Need(_) => "NEED",
        Response::Ack(_) => "ACK",
        Response::Error(_) => "ERROR",
        Response::Pong(_) => "PING",
    }
}
