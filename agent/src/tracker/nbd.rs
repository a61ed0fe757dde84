//! The NBD server side: fixed newstyle handshake and the transmission phase with simple
//! replies (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).
//!
//! Options: EXPORT_NAME, ABORT, LIST, INFO, GO; everything else (STARTTLS, STRUCTURED_REPLY,
//! META_CONTEXT, EXTENDED_HEADERS) is answered "unsupported", which every client handles.
//! Commands: READ, WRITE, FLUSH, TRIM, WRITE_ZEROES (all with FUA), DISC. Requests are taken
//! in order and answered as they complete; a connection holds at most [`INFLIGHT_BYTES`] of
//! request and reply data. Broken input gets an NBD error when the stream is still in sync
//! (bad range, unknown command) and a disconnect with a warning when it is not (bad magic,
//! a write payload beyond [`MAX_PAYLOAD`]).
//!
//! A connection looks its export up in the registry once, at the handshake, and keeps it: a
//! removed export ends its connections through [`Export::detached`], and a fenced VM's writes,
//! write-zeroes and trims are answered EPERM (reads and flushes still work).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{RwLock, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::export::{BufPool, Export, NBD_EPERM, Op, Reply, ReplyTx, Req, answer};
use super::registry::Registry;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;
const TF_CAN_MULTI_CONN: u16 = 256;
/// Multi-conn is safe: one thread per disk applies every connection's writes in order, and a
/// FLUSH syncs everything it applied before.
const TRANSMISSION_FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_CAN_MULTI_CONN;

const CMD_FLAG_FUA: u16 = 1;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const NBD_EINVAL: u32 = 22;
const NBD_ENOSPC: u32 = 28;
const NBD_EOVERFLOW: u32 = 75;

/// Largest READ or WRITE payload (the protocol's default maximum block size).
pub(crate) const MAX_PAYLOAD: u32 = 32 << 20;
/// Request and reply data a connection may hold at once.
const INFLIGHT_BYTES: usize = 64 << 20;
/// Semaphore permits count 4 KiB units.
const UNIT: usize = 4096;
/// Longest option payload accepted in the handshake (export names are at most 4 KiB).
const MAX_OPTION: u32 = 16 << 10;
const MAX_OPTIONS: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection ended early; logged once by `serve`.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(String),
}

fn proto(msg: impl Into<String>) -> ConnError {
    ConnError::Protocol(msg.into())
}

/// Serves one client until it disconnects, breaks the protocol, or `cancel` fires.
pub(crate) async fn serve<S>(
    stream: S,
    peer: String,
    registry: Arc<Registry>,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    // Small enough that large payloads bypass it (read straight into their buffer).
    let mut r = BufReader::with_capacity(32 << 10, r);
    let mut w = BufWriter::with_capacity(64 << 10, w);
    let hs = tokio::select! {
        _ = cancel.cancelled() => return,
        hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut r, &mut w, &registry)) => hs,
    };
    let export = match hs {
        Err(_) => {
            warn!(peer = %peer, "nbd handshake timed out; disconnecting");
            return;
        }
        Ok(Err(ConnError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!(peer = %peer, "nbd client left during the handshake");
            return;
        }
        Ok(Err(e)) => {
            warn!(peer = %peer, error = %e, "nbd handshake failed; disconnecting");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(e))) => e,
    };
    debug!(peer = %peer, export = %export.name, "nbd client attached");
    let gate = export.vm.gate.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(reply_loop(w, rx, export.pool.clone(), cancel.clone()));
    // Also when the export was removed between the lookup and here: the token is then fired.
    let res = tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        _ = export.detached.cancelled() => {
            debug!(peer = %peer, export = %export.name, "nbd client cut off: the export was removed");
            Ok(())
        }
        res = transmission(&mut r, &export, &gate, tx) => res,
    };
    match res {
        Ok(()) => debug!(peer = %peer, export = %export.name, "nbd client detached"),
        Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            debug!(peer = %peer, export = %export.name, "nbd client disconnected")
        }
        Err(e) => {
            warn!(peer = %peer, export = %export.name, error = %e, "nbd client dropped")
        }
    }
    // The reply loop ends once every queued request was answered (all senders are dropped).
    let _ = writer.await;
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await
}

/// Returns the chosen export, or None when the client aborted.
async fn handshake<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Registry,
) -> Result<Option<Arc<Export>>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(&NBDMAGIC.to_be_bytes()).await?;
    w.write_all(&IHAVEOPT.to_be_bytes()).await?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) != 0 {
        return Err(proto(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    for _ in 0..MAX_OPTIONS {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(proto(format!("bad option magic {magic:#x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION {
            return Err(proto(format!("option {opt} of {len} bytes is too long")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(e) = exports.export(name.as_ref()) else {
                    // This option has no error reply: the protocol says close.
                    return Err(proto(format!("unknown export {name:?}")));
                };
                w.write_all(&e.size.to_be_bytes()).await?;
                w.write_all(&TRANSMISSION_FLAGS.to_be_bytes()).await?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124]).await?;
                }
                w.flush().await?;
                return Ok(Some(e));
            }
            OPT_ABORT => {
                let _ = opt_reply(w, opt, REP_ACK, &[]).await;
                let _ = w.flush().await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(w, opt, REP_ERR_INVALID, &[]).await?;
                } else {
                    for n in exports.names() {
                        let mut d = (n.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(n.as_bytes());
                        opt_reply(w, opt, REP_SERVER, &d).await?;
                    }
                    opt_reply(w, opt, REP_ACK, &[]).await?;
                }
            }
            OPT_INFO | OPT_GO => {
                if let Some(e) = info_or_go(w, opt, &data, exports).await?
                    && opt == OPT_GO
                {
                    w.flush().await?;
                    return Ok(Some(e));
                }
            }
            _ => opt_reply(w, opt, REP_ERR_UNSUP, &[]).await?,
        }
        w.flush().await?;
    }
    Err(proto(format!("more than {MAX_OPTIONS} options")))
}

/// Answers INFO or GO; returns the export when it exists.
async fn info_or_go<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    data: &[u8],
    exports: &Registry,
) -> Result<Option<Arc<Export>>, ConnError> {
    let parsed = (|| {
        let nlen = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        let name = data.get(4..4 + nlen)?;
        let rest = data.get(4 + nlen..)?;
        let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
        (rest.len() == 2 + 2 * n).then_some(name)
    })();
    let Some(name) = parsed else {
        opt_reply(w, opt, REP_ERR_INVALID, &[]).await?;
        return Ok(None);
    };
    let name = String::from_utf8_lossy(name);
    let Some(e) = exports.export(name.as_ref()) else {
        debug!(export = %name, "nbd client asked for an unknown export");
        opt_reply(w, opt, REP_ERR_UNKNOWN, &[]).await?;
        return Ok(None);
    };
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&e.size.to_be_bytes());
    d.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
    opt_reply(w, opt, REP_INFO, &d).await?;
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, MAX_PAYLOAD] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    opt_reply(w, opt, REP_INFO, &d).await?;
    opt_reply(w, opt, REP_ACK, &[]).await?;
    Ok(Some(e))
}

/// Writes answers as they come; flushes when none is waiting.
async fn reply_loop<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    pool: Arc<BufPool>,
    cancel: CancellationToken,
) {
    loop {
        let reply = tokio::select! {
            _ = cancel.cancelled() => break,
            r = rx.recv() => r,
        };
        let Some(reply) = reply else { break };
        let mut head = [0u8; 16];
        head[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        head[4..8].copy_from_slice(&reply.error.to_be_bytes());
        head[8..16].copy_from_slice(&reply.handle.to_be_bytes());
        let mut res = w.write_all(&head).await;
        if res.is_ok()
            && let Some(d) = &reply.data
        {
            res = w.write_all(d).await;
        }
        if res.is_ok() && rx.is_empty() {
            res = w.flush().await;
        }
        drop(reply.permit);
        if let Some(d) = reply.data {
            pool.put(d);
        }
        if let Err(e) = res {
            debug!(error = %e, "nbd reply not delivered; client gone");
            break;
        }
    }
    let _ = w.shutdown().await;
}

#[derive(Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, ConnError> {
    let mut b = [0u8; 28];
    r.read_exact(&mut b).await?;
    let be32 = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
    let magic = be32(0);
    if magic != REQUEST_MAGIC {
        return Err(proto(format!("bad request magic {magic:#x}")));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        handle: be64(8),
        offset: be64(16),
        len: be32(24),
    })
}

/// Reads a write payload into a fresh buffer without zero-filling it first.
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    mut data: Vec<u8>,
    len: usize,
) -> std::io::Result<Vec<u8>> {
    while data.len() < len {
        let want = (len - data.len()) as u64;
        if (&mut *r).take(want).read_buf(&mut data).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data)
}

/// A READ on the blocking pool, answered.
fn read(e: &Export, req: Req, q: Request) {
    let mut buf = e.pool.get(q.len as usize);
    buf.resize(q.len as usize, 0);
    match e.read(q.offset, &mut buf) {
        Ok(()) => answer(req, 0, Some(buf)),
        Err(err) => answer(req, err, None),
    }
}

/// Instant recovery: a write is queued only once every block it touches is local and
/// recorded so (`fill.rs`): in order, before the requests after it.
async fn filled_first(export: &Export, offset: u64, len: u32) -> Result<(), u32> {
    match export.pending_fill() {
        None => Ok(()),
        Some(fill) => {
            fill.ensure(&export.image, offset, u64::from(len), true)
                .await
        }
    }
}

fn in_range(export: &Export, offset: u64, len: u32) -> bool {
    offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= export.size)
}

async fn transmission<R: AsyncRead + Unpin>(
    r: &mut R,
    export: &Arc<Export>,
    gate: &Arc<RwLock<()>>,
    tx: ReplyTx,
) -> Result<(), ConnError> {
    let budget = Arc::new(Semaphore::new(INFLIGHT_BYTES / UNIT));
    loop {
        let q = read_request(r).await?;
        let units = (q.len as usize)
            .div_ceil(UNIT)
            .clamp(1, MAX_PAYLOAD as usize / UNIT) as u32;
        let permit = match q.kind {
            CMD_READ | CMD_WRITE => budget
                .clone()
                .acquire_many_owned(units)
                .await
                .map_err(|_| proto("budget closed"))?,
            _ => budget
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| proto("budget closed"))?,
        };
        let mut req = Req {
            handle: q.handle,
            reply: tx.clone(),
            permit: Some(permit),
            gate: None,
        };
        let fua = q.flags & CMD_FLAG_FUA != 0;
        match q.kind {
            CMD_READ => {
                if q.len > MAX_PAYLOAD {
                    answer(req, NBD_EOVERFLOW, None);
                } else if !in_range(export, q.offset, q.len) {
                    debug!(export = %export.name, offset = q.offset, len = q.len, "read beyond the end of the disk");
                    answer(req, NBD_EINVAL, None);
                } else {
                    let e = export.clone();
                    match export.pending_fill().cloned() {
                        None => drop(tokio::task::spawn_blocking(move || read(&e, req, q))),
                        // Instant recovery: the blocks come first (the read waits for them,
                        // not the requests after it).
                        Some(fill) => drop(tokio::spawn(async move {
                            match fill
                                .ensure(&e.image, q.offset, u64::from(q.len), false)
                                .await
                            {
                                Ok(()) => {
                                    drop(tokio::task::spawn_blocking(move || read(&e, req, q)))
                                }
                                Err(err) => answer(req, err, None),
                            }
                        })),
                    }
                }
            }
            CMD_WRITE => {
                if q.len > MAX_PAYLOAD {
                    // The payload cannot be skipped safely: the stream is lost.
                    return Err(proto(format!(
                        "write of {} bytes exceeds the maximum {MAX_PAYLOAD}",
                        q.len
                    )));
                }
                let data = read_payload(r, export.pool.get(q.len as usize), q.len as usize).await?;
                if !in_range(export, q.offset, q.len) {
                    debug!(export = %export.name, offset = q.offset, len = q.len, "write beyond the end of the disk");
                    answer(req, NBD_ENOSPC, None);
                    continue;
                }
                if export.vm.fence.refuses(&export.vm.name, &export.name) {
                    export.pool.put(data);
                    answer(req, NBD_EPERM, None);
                    continue;
                }
                if q.len == 0 {
                    answer(req, 0, None);
                    continue;
                }
                if let Err(err) = filled_first(export, q.offset, q.len).await {
                    export.pool.put(data);
                    answer(req, err, None);
                    continue;
                }
                req.gate = Some(gate.clone().read_owned().await);
                export.submit(Op::Write {
                    req,
                    offset: q.offset,
                    data,
                    fua,
                });
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if !in_range(export, q.offset, q.len) {
                    debug!(export = %export.name, offset = q.offset, len = q.len, "zero range beyond the end of the disk");
                    answer(req, NBD_ENOSPC, None);
                    continue;
                }
                if export.vm.fence.refuses(&export.vm.name, &export.name) {
                    answer(req, NBD_EPERM, None);
                    continue;
                }
                if q.len == 0 {
                    answer(req, 0, None);
                    continue;
                }
                // The log stage's zero check reads the image: it must hold the point there.
                if let Err(err) = filled_first(export, q.offset, q.len).await {
                    answer(req, err, None);
                    continue;
                }
                // Held until answered: a cut waits for this write, and waits new ones out.
                req.gate = Some(gate.clone().read_owned().await);
                export.submit(Op::Zero {
                    req,
                    offset: q.offset,
                    len: u64::from(q.len),
                    fua,
                });
            }
            CMD_FLUSH => export.submit(Op::Flush { req }),
            CMD_DISC => return Ok(()),
            other => {
                debug!(export = %export.name, command = other, "unsupported nbd command");
                answer(req, NBD_EINVAL, None);
            }
        }
    }
}
