//! The wire codec of the gateway protocol (see `PROTOCOL.md`): pure encoders over byte
//! buffers and decoders over any [`AsyncRead`], so the same code serves the QUIC streams, the
//! unit tests and fuzzers. All integers are little-endian.
//!
//! Decoders check every length against its bound *before* allocating, so a hostile peer can
//! make the gateway allocate at most one bounded frame at a time.

use std::io;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::fetch::{MAX_FETCH_COUNT, MAX_NAME_LEN};

/// ALPN protocol id negotiated by gateway and agent.
pub const ALPN: &[u8] = b"ferry/1";
/// Protocol version carried in every OFFER and FETCH.
pub const VERSION: u16 = 1;

pub const MAGIC_OFFER: [u8; 4] = *b"FRO1";
pub const MAGIC_NEED: [u8; 4] = *b"FRN1";
pub const MAGIC_ACK: [u8; 4] = *b"FRA1";
pub const MAGIC_ERROR: [u8; 4] = *b"FRE1";
pub const MAGIC_PING: [u8; 4] = *b"FRP1";

/// Longest cycle id in an OFFER, in bytes.
pub const MAX_CYCLE_ID_LEN: usize = 128;
/// Most chunks in one OFFER.
pub const MAX_OFFER_COUNT: u32 = 1024;
/// A sealed chunk may exceed its block size by at most this much (header, AEAD tag, and
/// zstd's worst case on incompressible blocks).
pub const SEAL_OVERHEAD: u32 = 4096;
/// Longest message the gateway puts in an ERROR frame; longer ones are cut.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// 32-byte content address of a chunk (keyed BLAKE3 of the plaintext block).
pub type ChunkId = [u8; 32];

/// Largest sealed payload accepted for a vault block size.
pub fn max_sealed_len(max_block: u32) -> u32 {
    max_block.saturating_add(SEAL_OVERHEAD)
}

/// Application error codes: carried in ERROR frames and used as QUIC stream reset codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    /// A frame was malformed or out of bounds (bad magic, counts, lengths, truncation).
    BadFrame = 1,
    /// The OFFER checksum or a payload hash did not match.
    Checksum = 2,
    /// Ingest refused the upload (unknown cycle, wrong host, closed cycle), or storage-writer
    /// the read (the host may not read the VM, unknown point).
    Denied = 3,
    /// A dependency (store, ingest, storage-writer) is unavailable; retry later.
    Unavailable = 4,
    /// The gateway failed in a way a retry will not fix.
    Internal = 5,
    /// The peer's certificate is not a host certificate.
    NotHost = 6,
    /// The peer was too slow to send a frame (or, on FETCH, to read the answer).
    Timeout = 7,
    /// A FETCH named a chunk outside the point the host is entitled to read.
    NotEntitled = 8,
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        self as u32
    }

    pub fn from_u32(code: u32) -> Option<Self> {
        Some(match code {
            1 => Self::BadFrame,
            2 => Self::Checksum,
            3 => Self::Denied,
            4 => Self::Unavailable,
            5 => Self::Internal,
            6 => Self::NotHost,
            7 => Self::Timeout,
            8 => Self::NotEntitled,
            _ => return None,
        })
    }

    /// Whether the same request may succeed when retried later.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Unavailable | Self::Timeout)
    }
}

/// Why a frame could not be decoded. Messages name the offending field.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic: expected {expected}, got {got}")]
    BadMagic { expected: &'static str, got: String },
    #[error("unsupported protocol version {0}")]
    Version(u16),
    #[error("unsupported flags {0:#06x}")]
    Flags(u16),
    #[error("cycle id length {0} out of range 1..={MAX_CYCLE_ID_LEN}")]
    CycleIdLen(u16),
    #[error("cycle id is not valid utf-8")]
    CycleIdUtf8,
    #[error("chunk count {0} out of range 1..={MAX_OFFER_COUNT}")]
    Count(u32),
    #[error("chunk {index}: plain length {len} out of range 1..={max}")]
    PlainLen { index: usize, len: u32, max: u32 },
    #[error("offer checksum mismatch")]
    OfferChecksum,
    #[error("chunk {index}: sealed length {len} out of range 1..={max}")]
    SealedLen { index: usize, len: u32, max: u32 },
    #[error("chunk {index}: payload hash mismatch")]
    PayloadHash { index: usize },
    #[error("need bitmap for {got} chunks, expected {expected}")]
    NeedCount { expected: usize, got: u32 },
    #[error("need bitmap has bits set past its count")]
    NeedPadding,
    #[error("error message is not valid utf-8")]
    MessageUtf8,
    #[error("vm name length {0} out of range 1..={MAX_NAME_LEN}")]
    VmLen(u16),
    #[error("point id length {0} out of range 1..={MAX_NAME_LEN}")]
    PointLen(u16),
    #[error("{0} is not valid utf-8")]
    NameUtf8(&'static str),
    #[error("fetch count {0} out of range 1..={MAX_FETCH_COUNT}")]
    FetchCount(u32),
    #[error("fetch checksum mismatch")]
    FetchChecksum,
    #[error("data after the fetch request")]
    TrailingFetch,
    #[error("{0} trailing bytes after the frame")]
    Trailing(usize),
    #[error("data after the last payload")]
    TrailingPayload,
    #[error("stream ended after {got} of {wanted} payloads")]
    MissingPayloads { got: usize, wanted: usize },
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("stream read failed: {0}")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// The code the gateway answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::OfferChecksum | Self::FetchChecksum | Self::PayloadHash { .. } => {
                ErrorCode::Checksum
            }
            _ => ErrorCode::BadFrame,
        }
    }
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Truncated
        } else {
            Self::Io(e)
        }
    }
}

/// One chunk offered for upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub id: ChunkId,
    pub plain_len: u32,
}

/// A decoded OFFER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferFrame {
    pub cycle_id: String,
    pub offers: Vec<Offer>,
}

/// A decoded ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ack {
    pub written: u32,
    pub already_present: u32,
    pub bytes_written: u64,
}

/// A decoded ERROR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: u32,
    pub message: String,
}

/// Any frame the gateway sends back on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Need(Vec<bool>),
    Ack(Ack),
    Error(ErrorFrame),
    Pong(i64),
}

// ---------------------------------------------------------------------------------------
// encoders

/// Encodes an OFFER including its trailing BLAKE3 checksum. Checks the bounds a gateway
/// checks, except the plain length maximum, which only the gateway knows for sure.
pub fn encode_offer(cycle_id: &str, offers: &[Offer]) -> Result<Vec<u8>, FrameError> {
    let id_len = u16::try_from(cycle_id.len()).unwrap_or(u16::MAX);
    if cycle_id.is_empty() || cycle_id.len() > MAX_CYCLE_ID_LEN {
        return Err(FrameError::CycleIdLen(id_len));
    }
    let count = u32::try_from(offers.len()).unwrap_or(u32::MAX);
    if offers.is_empty() || count > MAX_OFFER_COUNT {
        return Err(FrameError::Count(count));
    }
    let mut buf = Vec::with_capacity(12 + cycle_id.len() + 4 + offers.len() * 36 + 32);
    buf.extend_from_slice(&MAGIC_OFFER);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&id_len.to_le_bytes());
    buf.extend_from_slice(cycle_id.as_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
    for (index, o) in offers.iter().enumerate() {
        if o.plain_len == 0 {
            return Err(FrameError::PlainLen {
                index,
                len: 0,
                max: u32::MAX,
            });
        }
        buf.extend_from_slice(&o.id);
        buf.extend_from_slice(&o.plain_len.to_le_bytes());
    }
    let sum = blake3::hash(&buf);
    buf.extend_from_slice(sum.as_bytes());
    Ok(buf)
}

/// Encodes a NEED bitmap: bit `i` (LSB-first within each byte) set means "send chunk i".
pub fn encode_need(needed: &[bool]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 + needed.len().div_ceil(8));
    buf.extend_from_slice(&MAGIC_NEED);
    buf.extend_from_slice(&(needed.len() as u32).to_le_bytes());
    let mut bitmap = vec![0u8; needed.len().div_ceil(8)];
    for (i, _) in needed.iter().enumerate().filter(|(_, n)| **n) {
        bitmap[i / 8] |= 1 << (i % 8);
    }
    buf.extend_from_slice(&bitmap);
    buf
}

pub fn encode_ack(ack: &Ack) -> [u8; 20] {
    let mut buf = [0u8; 20];
    buf[..4].copy_from_slice(&MAGIC_ACK);
    buf[4..8].copy_from_slice(&ack.written.to_le_bytes());
    buf[8..12].copy_from_slice(&ack.already_present.to_le_bytes());
    buf[12..20].copy_from_slice(&ack.bytes_written.to_le_bytes());
    buf
}

/// Encodes an ERROR; the message is cut to [`MAX_ERROR_MESSAGE`] bytes on a char boundary.
pub fn encode_error(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut end = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut buf = Vec::with_capacity(10 + msg.len());
    buf.extend_from_slice(&MAGIC_ERROR);
    buf.extend_from_slice(&code.as_u32().to_le_bytes());
    buf.extend_from_slice(&(msg.len() as u16).to_le_bytes());
    buf.extend_from_slice(msg);
    buf
}

pub fn encode_pong(unix_ms: i64) -> [u8; 12] {
    let mut buf = [0u8; 12];
    buf[..4].copy_from_slice(&MAGIC_PING);
    buf[4..].copy_from_slice(&(unix_ms as u64).to_le_bytes());
    buf
}

/// The 4-byte length prefix of a sealed payload.
pub fn encode_payload_len(len: u32) -> [u8; 4] {
    len.to_le_bytes()
}

/// The BLAKE3 trailer of a sealed payload.
pub fn payload_hash(sealed: &[u8]) -> [u8; 32] {
    *blake3::hash(sealed).as_bytes()
}

// ---------------------------------------------------------------------------------------
// decoders

pub(crate) async fn read_u16<R: AsyncRead + Unpin>(r: &mut R) -> Result<u16, FrameError> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b).await?;
    Ok(u16::from_le_bytes(b))
}

pub(crate) async fn read_u32<R: AsyncRead + Unpin>(r: &mut R) -> Result<u32, FrameError> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).await?;
    Ok(u32::from_le_bytes(b))
}

pub(crate) async fn read_u64<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, FrameError> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).await?;
    Ok(u64::from_le_bytes(b))
}

/// Reads the 4-byte magic that opens every frame.
pub async fn read_magic<R: AsyncRead + Unpin>(r: &mut R) -> Result<[u8; 4], FrameError> {
    let mut m = [0u8; 4];
    r.read_exact(&mut m).await?;
    Ok(m)
}

/// Renders a magic for error messages: printable ASCII as is, anything else as hex.
pub fn show_magic(m: &[u8]) -> String {
    if m.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(m).into_owned()
    } else {
        format!("0x{}", hex::encode(m))
    }
}

/// Reads the rest of an OFFER whose magic ([`MAGIC_OFFER`]) was already consumed, validating
/// every bound before the checksum and the checksum before returning.
pub async fn read_offer_body<R: AsyncRead + Unpin>(
    r: &mut R,
    max_block: u32,
) -> Result<OfferFrame, FrameError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&MAGIC_OFFER);
    let version = read_u16(r).await?;
    hasher.update(&version.to_le_bytes());
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let flags = read_u16(r).await?;
    hasher.update(&flags.to_le_bytes());
    if flags != 0 {
        return Err(FrameError::Flags(flags));
    }
    let id_len = read_u16(r).await?;
    hasher.update(&id_len.to_le_bytes());
    if id_len == 0 || usize::from(id_len) > MAX_CYCLE_ID_LEN {
        return Err(FrameError::CycleIdLen(id_len));
    }
    let mut id = vec![0u8; usize::from(id_len)];
    r.read_exact(&mut id).await?;
    hasher.update(&id);
    let cycle_id = String::from_utf8(id).map_err(|_| FrameError::CycleIdUtf8)?;
    let count = read_u32(r).await?;
    hasher.update(&count.to_le_bytes());
    if count == 0 || count > MAX_OFFER_COUNT {
        return Err(FrameError::Count(count));
    }
    // count <= 1024, so this is at most 36 KiB.
    let mut entries = vec![0u8; count as usize * 36];
    r.read_exact(&mut entries).await?;
    hasher.update(&entries);
    let mut offers = Vec::with_capacity(count as usize);
    for (index, e) in entries.chunks_exact(36).enumerate() {
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let plain_len = u32::from_le_bytes([e[32], e[33], e[34], e[35]]);
        if plain_len == 0 || plain_len > max_block {
            return Err(FrameError::PlainLen {
                index,
                len: plain_len,
                max: max_block,
            });
        }
        offers.push(Offer { id, plain_len });
    }
    let mut sum = [0u8; 32];
    r.read_exact(&mut sum).await?;
    if hasher.finalize() != blake3::Hash::from_bytes(sum) {
        return Err(FrameError::OfferChecksum);
    }
    Ok(OfferFrame { cycle_id, offers })
}

/// Decodes a complete OFFER (magic included) from a buffer; trailing bytes are an error.
pub fn decode_offer(buf: &[u8], max_block: u32) -> Result<OfferFrame, FrameError> {
    let mut r = buf;
    let frame = futures::executor::block_on(async {
        let magic = read_magic(&mut r).await?;
        if magic != MAGIC_OFFER {
            return Err(FrameError::BadMagic {
                expected: "FRO1",
                got: show_magic(&magic),
            });
        }
        read_offer_body(&mut r, max_block).await
    })?;
    if !r.is_empty() {
        return Err(FrameError::Trailing(r.len()));
    }
    Ok(frame)
}

/// Reads the length prefix of payload `index` and checks it against `max_sealed`.
/// Returns `None` at a clean end of stream (before any byte of the prefix).
pub async fn read_payload_len<R: AsyncRead + Unpin>(
    r: &mut R,
    index: usize,
    max_sealed: u32,
) -> Result<Option<u32>, FrameError> {
    let mut b = [0u8; 4];
    let first = r.read(&mut b).await?;
    if first == 0 {
        return Ok(None);
    }
    r.read_exact(&mut b[first..]).await?;
    let len = u32::from_le_bytes(b);
    if len == 0 || len > max_sealed {
        return Err(FrameError::SealedLen {
            index,
            len,
            max: max_sealed,
        });
    }
    Ok(Some(len))
}

/// Reads `len` sealed bytes (already bounds-checked by [`read_payload_len`]) and their BLAKE3
/// trailer; returns the bytes if the hash matches.
pub async fn read_payload_body<R: AsyncRead + Unpin>(
    r: &mut R,
    index: usize,
    len: u32,
) -> Result<Bytes, FrameError> {
    let mut sealed = vec![0u8; len as usize];
    r.read_exact(&mut sealed).await?;
    let mut sum = [0u8; 32];
    r.read_exact(&mut sum).await?;
    if blake3::hash(&sealed) != blake3::Hash::from_bytes(sum) {
        return Err(FrameError::PayloadHash { index });
    }
    Ok(Bytes::from(sealed))
}

/// Succeeds if the stream ends here; errors if the peer sent more.
pub async fn expect_end<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), FrameError> {
    let mut b = [0u8; 1];
    match r.read(&mut b).await? {
        0 => Ok(()),
        _ => Err(FrameError::TrailingPayload),
    }
}

/// Reads the body of a NEED (magic consumed) for an offer of `expected` chunks.
pub async fn read_need_body<R: AsyncRead + Unpin>(
    r: &mut R,
    expected: usize,
) -> Result<Vec<bool>, FrameError> {
    let count = read_u32(r).await?;
    if count as usize != expected {
        return Err(FrameError::NeedCount {
            expected,
            got: count,
        });
    }
    let mut bitmap = vec![0u8; expected.div_ceil(8)];
    r.read_exact(&mut bitmap).await?;
    if !expected.is_multiple_of(8) && bitmap[expected / 8] >> (expected % 8) != 0 {
        return Err(FrameError::NeedPadding);
    }
    Ok((0..expected)
        .map(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .collect())
}

/// Reads the body of an ACK (magic consumed).
pub async fn read_ack_body<R: AsyncRead + Unpin>(r: &mut R) -> Result<Ack, FrameError> {
    Ok(Ack {
        written: read_u32(r).await?,
        already_present: read_u32(r).await?,
        bytes_written: read_u64(r).await?,
    })
}

/// Reads the body of an ERROR (magic consumed). The u16 length bounds it to 64 KiB.
pub async fn read_error_body<R: AsyncRead + Unpin>(r: &mut R) -> Result<ErrorFrame, FrameError> {
    let code = read_u32(r).await?;
    let len = read_u16(r).await?;
    let mut msg = vec![0u8; usize::from(len)];
    r.read_exact(&mut msg).await?;
    let message = String::from_utf8(msg).map_err(|_| FrameError::MessageUtf8)?;
    Ok(ErrorFrame { code, message })
}

/// Reads whichever response frame comes next. `offered` is the OFFER's chunk count, used to
/// size a NEED bitmap (pass 0 where no NEED is expected).
pub async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    offered: usize,
) -> Result<Response, FrameError> {
    let magic = read_magic(r).await?;
    match magic {
        MAGIC_NEED => Ok(Response::Need(read_need_body(r, offered).await?)),
        MAGIC_ACK => Ok(Response::Ack(read_ack_body(r).await?)),
        MAGIC_ERROR => Ok(Response::Error(read_error_body(r).await?)),
        MAGIC_PING => Ok(Response::Pong(read_u64(r).await? as i64)),
        other => Err(FrameError::BadMagic {
            expected: "FRN1, FRA1, FRE1 or FRP1",
            got: show_magic(&other),
        }),
    }
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
