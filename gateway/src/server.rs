//! The gateway's side of the protocol: accepts connections, serves one batch, fetch or ping
//! per bidirectional stream, writes uploaded chunks to the store and reports them to ingest,
//! and serves entitled chunks to recovery hosts ([`serve_fetch`]).

mod serve_fetch;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_mesh::Identity;
use ferry_store::{Store, StoreError};
use futures::{StreamExt, TryStreamExt};
use quinn::{RecvStream, SendStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::audit::{QuicAudit, Refusal};
use crate::frame::{self, Ack, ChunkId, ErrorCode, FrameError, Offer, OfferFrame};
use crate::ingest::{Decision, IngestError, IngestLink, Landed};
use crate::storage::{Entitlements, StorageError, StorageLink};

/// How long a peer may take to send a whole OFFER (or a PING) after opening a stream.
const OFFER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a peer may take to send one payload, and to finish its side after the last.
const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long writing an ERROR frame may take before the stream is reset instead.
const ERROR_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long in-flight batches may run on after shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Store HEADs in flight per OFFER.
const HEAD_CONCURRENCY: usize = 32;
/// Chunk writes in flight per stream; the read of the next payload overlaps them.
const WRITES_PER_STREAM: usize = 8;
/// Payload bytes the whole gateway holds in memory at once (received, not yet written).
const MEMORY_BUDGET: usize = 256 << 20;
/// Authorization answers remembered per connection.
const AUTH_CACHE_ENTRIES: usize = 256;

/// Everything the connection handlers share.
pub(crate) struct Gateway {
    store: Store,
    ingest: IngestLink,
    /// Which chunks a host may fetch (the read path).
    storage: StorageLink,
    max_block: u32,
    /// Permits are KiB of payload held in memory; bounds memory across all streams.
    memory: Arc<Semaphore>,
    /// Host certificates the registry no longer accepts.
    revoked: ferry_mesh::RevocationList,
    /// Where refusals are recorded.
    audit: QuicAudit,
}

impl Gateway {
    pub(crate) fn new(
        store: Store,
        ingest: IngestLink,
        storage: StorageLink,
        max_block: u32,
    ) -> Self {
        let max_sealed_kib = kib(frame::max_sealed_len(max_block));
        let budget = (MEMORY_BUDGET >> 10).max(2 * max_sealed_kib as usize);
        Self {
            store,
            ingest,
            storage,
            max_block,
            memory: Arc::new(Semaphore::new(budget)),
            revoked: Default::default(),
            audit: QuicAudit::default(),
        }
    }

    /// Records refusals in the vault's audit trail.
    pub(crate) fn with_audit(mut self, audit: QuicAudit) -> Self {
        self.audit = audit;
        self
    }

    /// Refuses connections with a revoked host certificate (the registry's list).
    pub(crate) fn with_revocation(mut self, revoked: ferry_mesh::RevocationList) -> Self {
        self.revoked = revoked;
        self
    }

    /// Which offers the store lacks. A chunk offered twice is asked for once.
    async fn need(&self, offers: &[Offer]) -> Result<Vec<bool>, StoreError> {
        let mut seen = HashSet::with_capacity(offers.len());
        // Owned ids and store handles keep the futures 'static (and Send for any lifetime).
        let heads: Vec<(ChunkId, bool)> =
            offers.iter().map(|o| (o.id, seen.insert(o.id))).collect();
        let store = self.store.clone();
        let present: Vec<bool> = futures::stream::iter(heads)
            .map(move |(id, first)| {
                let store = store.clone();
                async move {
                    if first {
                        store.chunk_exists(&id).await
                    } else {
                        Ok(true)
                    }
                }
            })
            .buffered(HEAD_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(present.into_iter().map(|p| !p).collect())
    }
}

fn kib(len: u32) -> u32 {
    len.div_ceil(1024)
}

/// Accepts connections until `shutdown`, then lets in-flight batches finish (bounded by a
/// grace period) and closes the endpoint.
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    gw: Arc<Gateway>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        let task = handle_connection(incoming, gw.clone(), tracker.clone(), shutdown.clone());
        tracker.spawn(task);
    }
    info!("gateway shutting down");
    endpoint.set_server_config(None);
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = tracker.len(),
            "batches still running after the shutdown grace period"
        );
    }
    endpoint.close(0u32.into(), b"gateway shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// One agent's connection and what the gateway remembers about it.
struct Conn {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    identity: Identity,
    auth: Mutex<HashMap<String, Decision>>,
    /// The chunk sets of the points this host fetched from.
    entitled: Entitlements,
}

async fn handle_connection(
    incoming: quinn::Incoming,
    gw: Arc<Gateway>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let peer = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            warn!(%peer, error = %e, "quic handshake failed");
            return;
        }
    };
    let identity = match ferry_mesh::quic_peer_identity(&conn) {
        Ok(identity) => identity,
        Err(e) => {
            warn!(%peer, error = %e, "connection without a usable identity");
            conn.close(
                ErrorCode::NotHost.as_u32().into(),
                b"no usable client identity",
            );
            return;
        }
    };
    if let ferry_mesh::Identity::Host(host) = &identity {
        let serial = ferry_mesh::quic_peer_serial(&conn).unwrap_or_default();
        if gw.revoked.is_revoked(host, &serial) {
            warn!(%peer, host = %host, "refused a removed host's certificate");
            conn.close(
                ErrorCode::NotHost.as_u32().into(),
                b"host certificate revoked: the host was removed from the vault",
            );
            let refusal = Refusal {
                caller: &identity,
                operation: "quic/connect",
                target: format!("host:{host}"),
                code: ErrorCode::NotHost,
                message: format!("certificate {serial} was revoked: the host was removed"),
            };
            gw.audit.refused(refusal).await;
            return;
        }
    }
    debug!(%peer, %identity, "connection accepted");
    let ctx = Arc::new(Conn {
        gw,
        peer,
        identity,
        auth: Mutex::new(HashMap::new()),
        entitled: Entitlements::default(),
    });
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = conn.accept_bi() => accepted,
        };
        match accepted {
            Ok((send, recv)) => {
                tracker.spawn(handle_stream(ctx.clone(), send, recv));
            }
            Err(
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::LocallyClosed,
            ) => {
                debug!(%peer, identity = %ctx.identity, "connection closed");
                break;
            }
            Err(e) => {
                warn!(%peer, identity = %ctx.identity, error = %e, "connection lost");
                break;
            }
        }
    }
}

/// Why a stream failed.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("{0}")]
    Frame(FrameError),
    #[error("peer too slow: {0}")]
    Timeout(&'static str),
    #[error("peer is {0}, not a host")]
    NotHost(Identity),
    #[error("upload to cycle {cycle} refused: {reason}")]
    Denied { cycle: String, reason: String },
    #[error("reading point {point} of vm {vm} refused: {reason}")]
    ReadDenied {
        vm: String,
        point: String,
        reason: String,
    },
    #[error("{0}")]
    NotEntitled(String),
    #[error("chunk {chunk} of point {point} of vm {vm} is not in the store")]
    MissingChunk {
        chunk: String,
        vm: String,
        point: String,
    },
    #[error("stored chunk {chunk} is {len} bytes, more than a sealed block may be")]
    OversizedChunk { chunk: String, len: usize },
    #[error("storage-writer: {0}")]
    Storage(#[from] StorageError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("ingest: {0}")]
    Ingest(#[from] IngestError),
    #[error("chunk write task failed: {0}")]
    Task(String),
    #[error("peer went away: {0}")]
    Gone(String),
}

impl From<FrameError> for StreamError {
    fn from(e: FrameError) -> Self {
        match e {
            // A stream the peer reset or a connection that died cannot carry an answer.
            FrameError::Io(io) => Self::Gone(io.to_string()),
            other => Self::Frame(other),
        }
    }
}

impl From<quinn::WriteError> for StreamError {
    fn from(e: quinn::WriteError) -> Self {
        Self::Gone(e.to_string())
    }
}

impl From<quinn::ClosedStream> for StreamError {
    fn from(e: quinn::ClosedStream) -> Self {
        Self::Gone(e.to_string())
    }
}

impl StreamError {
    /// The code to answer with, or `None` when nobody is listening any more.
    fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Self::Frame(e) => e.code(),
            Self::Timeout(_) => ErrorCode::Timeout,
            Self::NotHost(_) => ErrorCode::NotHost,
            Self::Denied { .. } | Self::ReadDenied { .. } => ErrorCode::Denied,
            Self::NotEntitled(_) => ErrorCode::NotEntitled,
            Self::MissingChunk { .. } | Self::OversizedChunk { .. } => ErrorCode::Internal,
            Self::Storage(e) if e.is_transient() => ErrorCode::Unavailable,
            Self::Storage(_) => ErrorCode::Internal,
            Self::Store(e) if e.is_transient() => ErrorCode::Unavailable,
            Self::Store(_) | Self::Task(_) => ErrorCode::Internal,
            Self::Ingest(e) if e.is_transient() => ErrorCode::Unavailable,
            Self::Ingest(_) => ErrorCode::Internal,
            Self::Gone(_) => return None,
        })
    }
}

async fn timed<T>(
    limit: Duration,
    what: &'static str,
    fut: impl Future<Output = Result<T, FrameError>>,
) -> Result<T, StreamError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(StreamError::from),
        Err(_) => Err(StreamError::Timeout(what)),
    }
}

/// What a stream turned out to carry, for its log lines, and how far its answer got.
#[derive(Default)]
struct StreamState {
    /// The OFFER's cycle, once read.
    cycle: Option<String>,
    /// A FETCH (magic read), and its vm and point once read.
    fetch: Option<(String, String)>,
    is_fetch: bool,
    /// FRD1 went out: a failure can only reset the stream, an ERROR frame would read as data.
    data_sent: bool,
}

/// What a refused stream tried, for the audit trail.
fn stream_refusal<'a>(
    ctx: &'a Conn,
    st: &StreamState,
    code: ErrorCode,
    e: &StreamError,
) -> Refusal<'a> {
    let (operation, target) = match (&st.fetch, &st.cycle) {
        (Some((vm, _)), _) => ("quic/fetch", format!("vm:{vm}")),
        (None, Some(cycle)) => ("quic/upload", format!("cycle_id:{cycle}")),
        (None, None) if st.is_fetch => ("quic/fetch", String::new()),
        (None, None) => ("quic/upload", String::new()),
    };
    Refusal {
        caller: &ctx.identity,
        operation,
        target,
        code,
        message: e.to_string(),
    }
}

async fn handle_stream(ctx: Arc<Conn>, mut send: SendStream, mut recv: RecvStream) {
    let mut st = StreamState::default();
    let Err(e) = serve_stream(&ctx, &mut send, &mut recv, &mut st).await else {
        return;
    };
    let Some(code) = e.code() else {
        let cycle = st.cycle.as_deref().unwrap_or("-");
        debug!(peer = %ctx.peer, identity = %ctx.identity, cycle = %cycle, error = %e, "stream abandoned");
        return;
    };
    if st.is_fetch {
        serve_fetch::log_refusal(&ctx, &st, code, &e);
    } else {
        let cycle = st.cycle.as_deref().unwrap_or("-");
        warn!(peer = %ctx.peer, identity = %ctx.identity, cycle = %cycle, code = ?code, error = %e, "stream rejected");
    }
    if QuicAudit::is_refusal(code) {
        ctx.gw
            .audit
            .refused(stream_refusal(&ctx, &st, code, &e))
            .await;
    }
    if st.data_sent {
        let _ = send.reset(code.as_u32().into());
        let _ = recv.stop(code.as_u32().into());
        return;
    }
    let reply = frame::encode_error(code, &e.to_string());
    match tokio::time::timeout(ERROR_REPLY_TIMEOUT, send.write_all(&reply)).await {
        Ok(Ok(())) => {
            let _ = send.finish();
        }
        _ => {
            let _ = send.reset(code.as_u32().into());
        }
    }
    // Tell the peer to stop sending payloads we will not read.
    let _ = recv.stop(code.as_u32().into());
}

async fn serve_stream(
    ctx: &Conn,
    send: &mut SendStream,
    recv: &mut RecvStream,
    st: &mut StreamState,
) -> Result<(), StreamError> {
    let magic = timed(
        OFFER_TIMEOUT,
        "waiting for a frame",
        frame::read_magic(recv),
    )
    .await?;
    match magic {
        frame::MAGIC_PING => {
            send.write_all(&frame::encode_pong(unix_ms())).await?;
            send.finish()?;
            Ok(())
        }
        frame::MAGIC_OFFER => {
            let max_block = ctx.gw.max_block;
            let read = frame::read_offer_body(recv, max_block);
            let offer = timed(OFFER_TIMEOUT, "sending the offer", read).await?;
            st.cycle = Some(offer.cycle_id.clone());
            serve_offer(ctx, send, recv, offer).await
        }
        crate::fetch::MAGIC_FETCH => {
            st.is_fetch = true;
            serve_fetch::serve_fetch(ctx, send, recv, st).await
        }
        other => Err(StreamError::Frame(FrameError::BadMagic {
            expected: "FRO1, FRF1 or FRP1",
            got: frame::show_magic(&other),
        })),
    }
}

fn unix_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn serve_offer(
    ctx: &Conn,
    send: &mut SendStream,
    recv: &mut RecvStream,
    offer: OfferFrame,
) -> Result<(), StreamError> {
    let Identity::Host(host) = &ctx.identity else {
        return Err(StreamError::NotHost(ctx.identity.clone()));
    };
    authorize(ctx, &offer.cycle_id, host).await?;
    let needed = ctx.gw.need(&offer.offers).await?;
    send.write_all(&frame::encode_need(&needed)).await?;

    let tally = receive_payloads(&ctx.gw, recv, &offer.offers, &needed).await?;
    let landed = Landed {
        cycle_id: offer.cycle_id.clone(),
        host_name: host.clone(),
        chunks_written: tally.ack.written.into(),
        bytes_written: tally.ack.bytes_written,
        chunks_skipped: needed.iter().filter(|n| !**n).count() as u64,
        bytes_skipped: offer
            .offers
            .iter()
            .zip(&needed)
            .filter(|(_, n)| !**n)
            .map(|(o, _)| u64::from(o.plain_len))
            .sum(),
        plain_bytes_written: tally.plain_bytes_written,
    };
    // The chunks are durable whatever ingest says; a lost report only costs accounting.
    if let Err(e) = ctx.gw.ingest.report_landed(&landed).await {
        warn!(peer = %ctx.peer, host = %host, cycle = %offer.cycle_id, error = %e, "reporting landed chunks failed");
    }
    send.write_all(&frame::encode_ack(&tally.ack)).await?;
    send.finish()?;
    debug!(
        peer = %ctx.peer,
        host = %host,
        cycle = %offer.cycle_id,
        offered = offer.offers.len(),
        written = tally.ack.written,
        already_present = tally.ack.already_present,
        skipped = landed.chunks_skipped,
        bytes_written = tally.ack.bytes_written,
        "batch landed"
    );
    Ok(())
}

/// Asks ingest whether `host` may upload into `cycle_id`, once per connection and cycle.
async fn authorize(ctx: &Conn, cycle_id: &str, host: &str) -> Result<(), StreamError> {
    let cached = ctx
        .auth
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(cycle_id)
        .cloned();
    let decision = match cached {
        Some(d) => d,
        None => {
            let d = ctx.gw.ingest.authorize(cycle_id, host).await?;
            let mut cache = ctx.auth.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= AUTH_CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(cycle_id.to_owned(), d.clone());
            d
        }
    };
    match decision {
        Decision::Allowed => Ok(()),
        Decision::Denied(reason) => Err(StreamError::Denied {
            cycle: cycle_id.to_owned(),
            reason,
        }),
    }
}

#[derive(Default)]
struct Tally {
    ack: Ack,
    plain_bytes_written: u64,
}

/// What one chunk write did: `(written, sealed_len, plain_len)`.
type WriteResult = Result<(bool, u32, u32), StoreError>;

impl Tally {
    fn add(
        &mut self,
        joined: Result<WriteResult, tokio::task::JoinError>,
    ) -> Result<(), StreamError> {
        let (written, sealed_len, plain_len) =
            joined.map_err(|e| StreamError::Task(e.to_string()))??;
        if written {
            self.ack.written += 1;
            self.ack.bytes_written += u64::from(sealed_len);
            self.plain_bytes_written += u64::from(plain_len);
        } else {
            self.ack.already_present += 1;
        }
        Ok(())
    }
}

/// Reads the needed payloads in offer order, checks each, and writes it while the next one
/// arrives. Every chunk is written only after its own hash checked; if a later payload is bad,
/// the chunks already verified stay written (they are content-addressed and valid), and the
/// batch fails.
async fn receive_payloads(
    gw: &Gateway,
    recv: &mut RecvStream,
    offers: &[Offer],
    needed: &[bool],
) -> Result<Tally, StreamError> {
    let mut writes: JoinSet<WriteResult> = JoinSet::new();
    let mut tally = Tally::default();
    if let Err(e) = receive_into(gw, recv, offers, needed, &mut writes, &mut tally).await {
        // Verified chunks still land; nobody waits for them.
        writes.detach_all();
        return Err(e);
    }
    while let Some(joined) = writes.join_next().await {
        if let Err(e) = tally.add(joined) {
            writes.detach_all();
            return Err(e);
        }
    }
    Ok(tally)
}

async fn receive_into(
    gw: &Gateway,
    recv: &mut RecvStream,
    offers: &[Offer],
    needed: &[bool],
    writes: &mut JoinSet<WriteResult>,
    tally: &mut Tally,
) -> Result<(), StreamError> {
    let max_sealed = frame::max_sealed_len(gw.max_block);
    let wanted = needed.iter().filter(|n| **n).count();
    for (got, (index, offer)) in offers
        .iter()
        .enumerate()
        .filter(|(i, _)| needed[*i])
        .enumerate()
    {
        let read = frame::read_payload_len(recv, index, max_sealed);
        let Some(len) = timed(PAYLOAD_TIMEOUT, "sending a payload", read).await? else {
            return Err(StreamError::Frame(FrameError::MissingPayloads {
                got,
                wanted,
            }));
        };
        // Reserve memory before allocating, so all streams together stay within the budget.
        let permit = gw.memory.clone().acquire_many_owned(kib(len)).await;
        let permit = permit.map_err(|e| StreamError::Task(e.to_string()))?;
        let body: Bytes = timed(
            PAYLOAD_TIMEOUT,
            "sending a payload",
            frame::read_payload_body(recv, index, len),
        )
        .await?;
        // Bounded writes in flight; a failed write ends the batch early.
        while writes.len() >= WRITES_PER_STREAM {
            if let Some(joined) = writes.join_next().await {
                tally.add(joined)?;
            }
        }
        let store = gw.store.clone();
        let (id, plain_len) = (offer.id, offer.plain_len);
        writes.spawn(async move {
            let _permit = permit;
            store
                .put_chunk(&id, body)
                .await
                .map(|w| (w, len, plain_len))
        });
    }
    timed(
        PAYLOAD_TIMEOUT,
        "finishing the stream",
        frame::expect_end(recv),
    )
    .await
}
