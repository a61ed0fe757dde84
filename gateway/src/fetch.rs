//! The read path's codec (see `PROTOCOL.md`, FETCH): a recovery host asks for sealed chunks
//! of one recovery point, the gateway answers FRD1 and the chunks in request order, or ERROR.
//! Like [`crate::frame`], pure encoders over byte buffers and decoders over any
//! [`AsyncRead`]; every length is checked against its bound before anything is allocated.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::frame::{
    self, ChunkId, ErrorFrame, FrameError, MAGIC_ERROR, VERSION, read_u16, read_u32, show_magic,
};

pub const MAGIC_FETCH: [u8; 4] = *b"FRF1";
pub const MAGIC_DATA: [u8; 4] = *b"FRD1";

/// Most chunks one FETCH may ask for. Small, so an answer (and the memory both ends hold for
/// it) stays bounded; callers split longer lists and run several FETCHes concurrently.
pub const MAX_FETCH_COUNT: u32 = 64;
/// Longest VM name or point id in a FETCH, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// The longest FETCH: header, both names at their longest, the ids and the checksum.
pub const MAX_FETCH_LEN: usize =
    4 + 2 + 2 + 2 + MAX_NAME_LEN + 2 + MAX_NAME_LEN + 4 + MAX_FETCH_COUNT as usize * 32 + 32;

/// A decoded FETCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchFrame {
    pub vm: String,
    /// A point id, or `latest`.
    pub point: String,
    /// In the order the answer carries them; an id may repeat.
    pub ids: Vec<ChunkId>,
}

/// How the gateway began its answer to a FETCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchAnswer {
    /// FRD1: the chunks follow, one per requested id, then the end of the stream.
    Data,
    /// The request was refused; nothing else follows.
    Error(ErrorFrame),
}

// ---------------------------------------------------------------------------------------
// encoders

/// Encodes a FETCH including its trailing BLAKE3 checksum, checking every bound the gateway
/// checks.
pub fn encode_fetch(vm: &str, point: &str, ids: &[ChunkId]) -> Result<Vec<u8>, FrameError> {
    let vm_len = name_len(vm).ok_or(FrameError::VmLen(clamp_u16(vm.len())))?;
    let point_len = name_len(point).ok_or(FrameError::PointLen(clamp_u16(point.len())))?;
    let count = u32::try_from(ids.len()).unwrap_or(u32::MAX);
    if ids.is_empty() || count > MAX_FETCH_COUNT {
        return Err(FrameError::FetchCount(count));
    }
    let mut buf = Vec::with_capacity(16 + vm.len() + point.len() + ids.len() * 32 + 32);
    buf.extend_from_slice(&MAGIC_FETCH);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
    buf.extend_from_slice(&vm_len.to_le_bytes());
    buf.extend_from_slice(vm.as_bytes());
    buf.extend_from_slice(&point_len.to_le_bytes());
    buf.extend_from_slice(point.as_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
    for id in ids {
        buf.extend_from_slice(id);
    }
    let sum = blake3::hash(&buf);
    buf.extend_from_slice(sum.as_bytes());
    Ok(buf)
}

fn name_len(name: &str) -> Option<u16> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return None;
    }
    u16::try_from(name.len()).ok()
}

fn clamp_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// One chunk of a FRD1 answer: `u32 sealed_len`, the sealed bytes, BLAKE3 of them. Returned
/// as parts so the sealed bytes are written without a copy.
pub fn encode_chunk(sealed: Bytes) -> [Bytes; 3] {
    let len = u32::try_from(sealed.len()).unwrap_or(u32::MAX);
    let len = Bytes::copy_from_slice(&frame::encode_payload_len(len));
    let hash = Bytes::copy_from_slice(&frame::payload_hash(&sealed));
    [len, sealed, hash]
}

// ---------------------------------------------------------------------------------------
// decoders

/// Reads a length-prefixed name, checking the length (`bad` names the field) before reading.
async fn read_name<R: AsyncRead + Unpin>(
    r: &mut R,
    hasher: &mut blake3::Hasher,
    bad: fn(u16) -> FrameError,
    what: &'static str,
) -> Result<String, FrameError> {
    let len = read_u16(r).await?;
    hasher.update(&len.to_le_bytes());
    if len == 0 || usize::from(len) > MAX_NAME_LEN {
        return Err(bad(len));
    }
    let mut bytes = vec![0u8; usize::from(len)];
    r.read_exact(&mut bytes).await?;
    hasher.update(&bytes);
    String::from_utf8(bytes).map_err(|_| FrameError::NameUtf8(what))
}

/// Reads the rest of a FETCH whose magic ([`MAGIC_FETCH`]) was already consumed, validating
/// every bound before the checksum and the checksum before returning.
pub async fn read_fetch_body<R: AsyncRead + Unpin>(r: &mut R) -> Result<FetchFrame, FrameError> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&MAGIC_FETCH);
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
    let vm = read_name(r, &mut hasher, FrameError::VmLen, "vm name").await?;
    let point = read_name(r, &mut hasher, FrameError::PointLen, "point id").await?;
    let count = read_u32(r).await?;
    hasher.update(&count.to_le_bytes());
    if count == 0 || count > MAX_FETCH_COUNT {
        return Err(FrameError::FetchCount(count));
    }
    // count <= 64, so this is at most 2 KiB.
    let mut raw = vec![0u8; count as usize * 32];
    r.read_exact(&mut raw).await?;
    hasher.update(&raw);
    let mut sum = [0u8; 32];
    r.read_exact(&mut sum).await?;
    if hasher.finalize() != blake3::Hash::from_bytes(sum) {
        return Err(FrameError::FetchChecksum);
    }
    let ids = raw
        .chunks_exact(32)
        .map(|c| {
            let mut id = [0u8; 32];
            id.copy_from_slice(c);
            id
        })
        .collect();
    Ok(FetchFrame { vm, point, ids })
}

/// Decodes a complete FETCH (magic included) from a buffer; trailing bytes are an error.
pub fn decode_fetch(buf: &[u8]) -> Result<FetchFrame, FrameError> {
    let mut r = buf;
    let frame = futures::executor::block_on(async {
        let magic = frame::read_magic(&mut r).await?;
        if magic != MAGIC_FETCH {
            return Err(FrameError::BadMagic {
                expected: "FRF1",
                got: show_magic(&magic),
            });
        }
        read_fetch_body(&mut r).await
    })?;
    if !r.is_empty() {
        return Err(FrameError::Trailing(r.len()));
    }
    Ok(frame)
}

/// Succeeds if the client's side ends right after its FETCH.
pub async fn expect_fetch_end<R: AsyncRead + Unpin>(r: &mut R) -> Result<(), FrameError> {
    let mut b = [0u8; 1];
    match r.read(&mut b).await? {
        0 => Ok(()),
        _ => Err(FrameError::TrailingFetch),
    }
}

/// Reads the first frame of the answer to a FETCH: FRD1, or an ERROR.
pub async fn read_fetch_answer<R: AsyncRead + Unpin>(r: &mut R) -> Result<FetchAnswer, FrameError> {
    match frame::read_magic(r).await? {
        MAGIC_DATA => Ok(FetchAnswer::Data),
        MAGIC_ERROR => Ok(FetchAnswer::Error(frame::read_error_body(r).await?)),
        other => Err(FrameError::BadMagic {
            expected: "FRD1 or FRE1",
            got: show_magic(&other),
        }),
    }
}

/// Reads chunk `index` of `wanted` from a FRD1 answer: the length (1..=`max_sealed`, checked
/// before allocating), the sealed bytes and their hash.
pub async fn read_fetched_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    index: usize,
    wanted: usize,
    max_sealed: u32,
) -> Result<Bytes, FrameError> {
    let Some(len) = frame::read_payload_len(r, index, max_sealed).await? else {
        return Err(FrameError::MissingPayloads { got: index, wanted });
    };
    frame::read_payload_body(r, index, len).await
}

#[cfg(test)]
#[path = "fetch_tests.rs"]
mod tests;
