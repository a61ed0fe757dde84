//! Chunk codec: keyed BLAKE3 names, zstd, XChaCha20-Poly1305.
//!
//! Sealed layout (all integers little-endian):
//!
//! ```text
//! 0..4   magic "FCK1"
//! 4      version (1)
//! 5      flags (bit 0: body is zstd-compressed)
//! 6..8   reserved, zero
//! 8..12  plaintext length (u32)
//! 12..   XChaCha20-Poly1305(body) || 16-byte tag
//! ```
//!
//! The header and the chunk id are the AEAD's associated data, so neither can be altered
//! without detection. The nonce is the first 24 bytes of the chunk id: the id is a keyed hash of
//! the plaintext, so a nonce repeats only for the very same plaintext, which then seals to the
//! very same bytes (deterministic, dedup-friendly, and no nonce reuse across different data).

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

use crate::StoreError;

/// A chunk's name: BLAKE3 keyed with the vault's hash key over the plaintext.
pub type ChunkId = [u8; 32];

const MAGIC: &[u8; 4] = b"FCK1";
const VERSION: u8 = 1;
const FLAG_ZSTD: u8 = 1;
const TAG_LEN: usize = 16;
/// Bytes before the ciphertext in a sealed chunk.
pub const CHUNK_HEADER_LEN: usize = 12;
/// Largest plaintext a chunk may hold (256 MiB); bigger headers are rejected as corrupt.
pub const MAX_CHUNK_LEN: usize = 256 << 20;
const ZSTD_LEVEL: i32 = 1;

const HASH_CONTEXT: &str = "ferry 2026 chunk id";
const SEAL_CONTEXT: &str = "ferry 2026 chunk seal";

/// A vault's data key. Only the derived subkeys are used directly: `hash_key` names chunks,
/// `enc_key` seals them. `Debug` never shows key material.
#[derive(Clone)]
pub struct VaultKey {
    root: [u8; 32],
    hash_key: [u8; 32],
    enc_key: [u8; 32],
}

impl VaultKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        VaultKey {
            root: b,
            hash_key: blake3::derive_key(HASH_CONTEXT, &b),
            enc_key: blake3::derive_key(SEAL_CONTEXT, &b),
        }
    }

    /// A fresh random key from the operating system's CSPRNG (via `rand`'s thread rng).
    pub fn generate() -> Self {
        Self::from_bytes(rand::random::<[u8; 32]>())
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.root
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.enc_key.into())
    }
}

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultKey(redacted)")
    }
}

/// Lowercase hex of a chunk id (64 characters).
pub fn chunk_hex(id: &ChunkId) -> String {
    hex::encode(id)
}

/// Parses 64 hex characters (either case) into a chunk id.
pub fn parse_chunk_hex(s: &str) -> Result<ChunkId, StoreError> {
    let mut id = [0u8; 32];
    if s.len() != 64 {
        return Err(StoreError::invalid(
            "chunk id",
            format!("expected 64 hex characters, got {}", s.len()),
        ));
    }
    hex::decode_to_slice(s, &mut id)
        .map_err(|e| StoreError::invalid("chunk id", format!("bad hex: {e}")))?;
    Ok(id)
}

/// Names a block: BLAKE3 keyed with the vault's hash key, so names do not reveal content.
pub fn chunk_id(key: &VaultKey, plaintext: &[u8]) -> ChunkId {
    *blake3::keyed_hash(&key.hash_key, plaintext).as_bytes()
}

/// True if every byte is zero. Written as a branch-free OR-reduction per 4 KiB slice, which the
/// compiler vectorises; it stops at the first non-zero slice.
pub fn is_zero(block: &[u8]) -> bool {
    block
        .chunks(4096)
        .all(|part| part.iter().fold(0u8, |acc, b| acc | b) == 0)
}

fn header(flags: u8, plain_len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = flags;
    h[8..12].copy_from_slice(&plain_len.to_le_bytes());
    h
}

fn aad(header: &[u8], id: &ChunkId) -> [u8; CHUNK_HEADER_LEN + 32] {
    let mut a = [0u8; CHUNK_HEADER_LEN + 32];
    a[..CHUNK_HEADER_LEN].copy_from_slice(&header[..CHUNK_HEADER_LEN]);
    a[CHUNK_HEADER_LEN..].copy_from_slice(id);
    a
}

/// Compresses (zstd level 1, kept only when smaller) and seals a block for storage.
///
/// `id` must be `chunk_id(key, plaintext)`; [`open_chunk`] rejects anything else.
///
/// # Panics
///
/// If `plaintext` is longer than [`MAX_CHUNK_LEN`]: block sizes are configuration, validated
/// long before any data is sealed, so this is a programming error, not bad input.
pub fn seal_chunk(key: &VaultKey, id: &ChunkId, plaintext: &[u8]) -> Vec<u8> {
    assert!(
        plaintext.len() <= MAX_CHUNK_LEN,
        "chunk of {} bytes exceeds the {MAX_CHUNK_LEN} byte limit",
        plaintext.len()
    );
    let compressed = zstd::bulk::compress(plaintext, ZSTD_LEVEL)
        .ok()
        .filter(|c| c.len() < plaintext.len());
    let (flags, body): (u8, &[u8]) = match &compressed {
        Some(c) => (FLAG_ZSTD, c),
        None => (0, plaintext),
    };
    // The length fits: MAX_CHUNK_LEN < u32::MAX.
    let hdr = header(flags, plaintext.len() as u32);
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(body);
    let nonce = XNonce::from_slice(&id[..24]);
    let tag = key
        .cipher()
        .encrypt_in_place_detached(nonce, &aad(&hdr, id), &mut out[CHUNK_HEADER_LEN..])
        // Only fails for messages beyond chacha's 256 GiB limit, far above MAX_CHUNK_LEN.
        .expect("chunk within xchacha20 message limit");
    out.extend_from_slice(&tag);
    out
}

/// Verifies and opens a sealed chunk: checks the header, authenticates (wrong key or any
/// flipped bit fails), decompresses within the declared length, and checks that the plaintext
/// hashes to `id`.
pub fn open_chunk(key: &VaultKey, id: &ChunkId, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
    let what = || format!("chunk {}", chunk_hex(id));
    if sealed.len() < CHUNK_HEADER_LEN + TAG_LEN {
        return Err(StoreError::corrupt(
            what(),
            format!(
                "truncated: {} bytes, a sealed chunk has at least {}",
                sealed.len(),
                CHUNK_HEADER_LEN + TAG_LEN
            ),
        ));
    }
    let (hdr, rest) = sealed.split_at(CHUNK_HEADER_LEN);
    if &hdr[..4] != MAGIC {
        return Err(StoreError::corrupt(what(), "bad magic, not a ferry chunk"));
    }
    if hdr[4] != VERSION {
        return Err(StoreError::corrupt(
            what(),
            format!("unsupported chunk version {}", hdr[4]),
        ));
    }
    let flags = hdr[5];
    if flags & !FLAG_ZSTD != 0 || hdr[6] != 0 || hdr[7] != 0 {
        return Err(StoreError::corrupt(what(), "unknown header flags"));
    }
    let plain_len = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if plain_len > MAX_CHUNK_LEN {
        return Err(StoreError::corrupt(
            what(),
            format!("declared length {plain_len} exceeds {MAX_CHUNK_LEN}"),
        ));
    }
    let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut body = ct.to_vec();
    key.cipher()
        .decrypt_in_place_detached(
            XNonce::from_slice(&id[..24]),
            &aad(hdr, id),
            &mut body,
            Tag::from_slice(tag),
        )
        .map_err(|_| {
            StoreError::corrupt(
                what(),
                "authentication failed (tampered data, wrong vault key or wrong id)",
            )
        })?;
    let plaintext = if flags & FLAG_ZSTD != 0 {
        zstd::bulk::decompress(&body, plain_len)
            .map_err(|e| StoreError::corrupt(what(), format!("zstd: {e}")))?
    } else {
        body
    };
    if plaintext.len() != plain_len {
        return Err(StoreError::corrupt(
            what(),
            format!(
                "length {} does not match header {plain_len}",
                plaintext.len()
            ),
        ));
    }
    if chunk_id(key, &plaintext) != *id {
        return Err(StoreError::corrupt(
            what(),
            "content does not hash to its id",
        ));
    }
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let k = VaultKey::from_bytes([7; 32]);
        assert_eq!(format!("{k:?}"), "VaultKey(redacted)");
    }

    #[test]
    fn subkeys_differ() {
        let k = VaultKey::from_bytes([7; 32]);
        assert_ne!(k.hash_key, k.enc_key);
        assert_ne!(k.hash_key, k.root);
        assert_eq!(VaultKey::from_bytes(k.to_bytes()).hash_key, k.hash_key);
    }

    #[test]
    fn is_zero_edges() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 10_000]));
        let mut b = vec![0u8; 10_000];
        b[9_999] = 1;
        assert!(!is_zero(&b));
        b[9_999] = 0;
        b[0] = 0x80;
        assert!(!is_zero(&b));
    }
}
