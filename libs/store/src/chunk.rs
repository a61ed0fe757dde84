//! Chunk codec: keyed BLAKE3 names, zstd, XChaCha20-Poly1305.
//!
//! Sealed layout (all integers little-endian):
//!
//! ```text
//! 0..4   magic "FCK1"
//! 4      version (1)
//! 5      flags (bit 0: body is zstd-compressed)
//! 6..8   vault key id (u16): the key that sealed it (0 = the vault's first key)
//! 8..12  plaintext length (u32)
//! 12..   XChaCha20-Poly1305(body) || 16-byte tag
//! ```
//!
//! The header and the chunk id are the AEAD's associated data, so neither can be altered
//! without detection. The nonce is the first 24 bytes of the chunk id: the id is a keyed hash of
//! the plaintext, so a nonce repeats only for the very same plaintext, which then seals to the
//! very same bytes (deterministic, dedup-friendly, and no nonce reuse across different data).
//!
//! Key rotation (`ferry vault rotate-key`) adds a sealing key; chunks are named with the first
//! key's hash key for ever, so a chunk stored before a rotation is found (and never sealed
//! again) after it, and an old chunk keeps the key id it was sealed with: rotation rewrites
//! nothing and leaves everything readable to a holder of the keyring.

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
const WRAP_CONTEXT: &str = "ferry 2026 vault key wrap";
const WRAP_NONCE_LEN: usize = 24;
/// A wrapped key: nonce, the sealed 32-byte key, tag.
pub const WRAPPED_KEY_LEN: usize = WRAP_NONCE_LEN + 32 + TAG_LEN;

/// A vault's keyring: its first data key (key 0, the root) and the keys rotations added.
/// Only derived subkeys are used directly: key 0's `hash_key` names chunks for ever, and the
/// newest key's sealing key seals new chunks; every key of the ring opens what it sealed.
/// `Debug` never shows key material.
#[derive(Clone)]
pub struct VaultKey {
    root: [u8; 32],
    hash_key: [u8; 32],
    /// Sealing keys by key id (0 = derived from `root`).
    enc_keys: std::sync::Arc<std::collections::BTreeMap<u16, [u8; 32]>>,
    /// The id new chunks are sealed with: the newest.
    current: u16,
}

impl VaultKey {
    /// The keyring of a vault's first key alone (what a vault holds before any rotation).
    pub fn from_bytes(b: [u8; 32]) -> Self {
        VaultKey {
            root: b,
            hash_key: blake3::derive_key(HASH_CONTEXT, &b),
            enc_keys: std::sync::Arc::new([(0, blake3::derive_key(SEAL_CONTEXT, &b))].into()),
            current: 0,
        }
    }

    /// This keyring with rotated key `id` (1 or more) added; the newest id seals from then on.
    pub fn with_key(&self, id: u16, key: [u8; 32]) -> Result<Self, StoreError> {
        if id == 0 {
            return Err(StoreError::invalid(
                "vault key id",
                "0 is the vault's first key; rotated keys are 1 to 65535",
            ));
        }
        let mut ring = self.clone();
        std::sync::Arc::make_mut(&mut ring.enc_keys)
            .insert(id, blake3::derive_key(SEAL_CONTEXT, &key));
        ring.current = ring.current.max(id);
        Ok(ring)
    }

    /// This keyring with rotated keys as a registry sends them (id, 32 bytes) added; an id
    /// out of range or a key of another length is refused, naming it.
    pub fn with_keys<'a>(
        &self,
        keys: impl IntoIterator<Item = (u32, &'a [u8])>,
    ) -> Result<Self, StoreError> {
        keys.into_iter().try_fold(self.clone(), |ring, (id, key)| {
            let id = u16::try_from(id)
                .map_err(|_| StoreError::invalid("vault key id", format!("{id} is above 65535")))?;
            let key: [u8; 32] = key.try_into().map_err(|_| {
                StoreError::invalid(
                    format!("vault key {id}"),
                    format!("{} bytes, not 32", key.len()),
                )
            })?;
            ring.with_key(id, key)
        })
    }

    /// The id new chunks are sealed with.
    pub fn key_id(&self) -> u16 {
        self.current
    }

    /// Seals rotated key `id` under key 0 for keeping in a catalog (random nonce; the id is
    /// authenticated with it, so a wrapped key cannot be passed off as another id).
    pub fn wrap_key(&self, id: u16, key: &[u8; 32]) -> Vec<u8> {
        let nonce = rand::random::<[u8; WRAP_NONCE_LEN]>();
        let mut body = key.to_vec();
        let tag = self
            .wrap_cipher()
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &id.to_le_bytes(), &mut body)
            .expect("32 bytes within xchacha20 message limit");
        [&nonce[..], &body, &tag].concat()
    }

    /// Opens what [`VaultKey::wrap_key`] sealed for `id`.
    pub fn unwrap_key(&self, id: u16, wrapped: &[u8]) -> Result<[u8; 32], StoreError> {
        let what = || format!("wrapped vault key {id}");
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(StoreError::corrupt(
                what(),
                format!("{} bytes, expected {WRAPPED_KEY_LEN}", wrapped.len()),
            ));
        }
        let (nonce, rest) = wrapped.split_at(WRAP_NONCE_LEN);
        let (body, tag) = rest.split_at(32);
        let mut key = [0u8; 32];
        key.copy_from_slice(body);
        self.wrap_cipher()
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                &id.to_le_bytes(),
                &mut key,
                Tag::from_slice(tag),
            )
            .map_err(|_| {
                StoreError::corrupt(
                    what(),
                    "authentication failed (not wrapped by this vault's key)",
                )
            })?;
        Ok(key)
    }

    fn wrap_cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&blake3::derive_key(WRAP_CONTEXT, &self.root).into())
    }

    /// A fresh random key from the operating system's CSPRNG (via `rand`'s thread rng).
    pub fn generate() -> Self {
        Self::from_bytes(rand::random::<[u8; 32]>())
    }

    /// Key 0's bytes (the vault's first key).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.root
    }

    /// The cipher of key `id`; `what` names the object for the error.
    fn cipher(
        &self,
        id: u16,
        what: impl FnOnce() -> String,
    ) -> Result<XChaCha20Poly1305, StoreError> {
        match self.enc_keys.get(&id) {
            Some(k) => Ok(XChaCha20Poly1305::new(&(*k).into())),
            None => Err(StoreError::UnknownKey {
                what: what(),
                key_id: id,
                newest: self.current,
            }),
        }
    }
}

/// The id of the key that sealed `sealed` (None when it is too short to be a chunk).
pub fn sealed_key_id(sealed: &[u8]) -> Option<u16> {
    (sealed.len() >= CHUNK_HEADER_LEN).then(|| u16::from_le_bytes([sealed[6], sealed[7]]))
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

fn header(flags: u8, key_id: u16, plain_len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = flags;
    h[6..8].copy_from_slice(&key_id.to_le_bytes());
    h[8..12].copy_from_slice(&plain_len.to_le_bytes());
    h
}

fn aad(header: &[u8], id: &ChunkId) -> [u8; CHUNK_HEADER_LEN + 32] {
    let mut a = [0u8; CHUNK_HEADER_LEN + 32];
    a[..CHUNK_HEADER_LEN].copy_from_slice(&header[..CHUNK_HEADER_LEN]);
    a[CHUNK_HEADER_LEN..].copy_from_slice(id);
    a
}

/// Compresses (zstd level 1, kept only when smaller) and seals a block for storage with the
/// keyring's newest key.
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
    let hdr = header(flags, key.current, plaintext.len() as u32);
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + body.len() + TAG_LEN);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(body);
    let nonce = XNonce::from_slice(&id[..24]);
    let tag = key
        .cipher(key.current, String::new)
        .expect("the keyring holds its newest key")
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
    if flags & !FLAG_ZSTD != 0 {
        return Err(StoreError::corrupt(what(), "unknown header flags"));
    }
    let cipher = key.cipher(u16::from_le_bytes([hdr[6], hdr[7]]), what)?;
    let plain_len = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    if plain_len > MAX_CHUNK_LEN {
        return Err(StoreError::corrupt(
            what(),
            format!("declared length {plain_len} exceeds {MAX_CHUNK_LEN}"),
        ));
    }
    let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut body = ct.to_vec();
    cipher
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
        assert_ne!(k.hash_key, k.enc_keys[&0]);
        assert_ne!(k.hash_key, k.root);
        assert_eq!(VaultKey::from_bytes(k.to_bytes()).hash_key, k.hash_key);
    }

    #[test]
    fn rotation_seals_with_the_newest_key_and_opens_every_older_one() {
        let k0 = VaultKey::from_bytes([7; 32]);
        let data = vec![42u8; 5000];
        let id = chunk_id(&k0, &data);
        let old = seal_chunk(&k0, &id, &data);
        assert_eq!(sealed_key_id(&old), Some(0));

        let k1 = k0.with_key(1, [9; 32]).unwrap();
        assert_eq!(k1.key_id(), 1);
        assert_eq!(
            chunk_id(&k1, &data),
            id,
            "names never change with a rotation"
        );
        let new = seal_chunk(&k1, &id, &data);
        assert_eq!(sealed_key_id(&new), Some(1));
        assert_ne!(new, old);
        assert_eq!(open_chunk(&k1, &id, &old).unwrap(), data);
        assert_eq!(open_chunk(&k1, &id, &new).unwrap(), data);

        // A holder of key 0 alone is told which key it lacks; that is not corruption.
        let err = open_chunk(&k0, &id, &new).unwrap_err();
        assert!(
            matches!(err, StoreError::UnknownKey { key_id: 1, .. }),
            "{err}"
        );
        assert!(err.is_transient());
        assert!(err.to_string().contains("vault key 1"), "{err}");
        // The key id is authenticated: relabelling a chunk fails.
        let mut relabelled = new.clone();
        relabelled[6] = 0;
        assert!(matches!(
            open_chunk(&k1, &id, &relabelled),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(k0.with_key(0, [1; 32]).is_err());
        assert!(
            k0.with_keys([(70_000, &[1u8; 32][..])]).is_err(),
            "id out of range"
        );
        assert!(k0.with_keys([(2, &[1u8; 31][..])]).is_err(), "short key");
        assert_eq!(
            k0.with_keys([(1, &[9u8; 32][..]), (2, &[8u8; 32][..])])
                .unwrap()
                .key_id(),
            2
        );
        // Adding an older id later does not move the newest.
        assert_eq!(
            k1.with_key(3, [3; 32])
                .unwrap()
                .with_key(2, [2; 32])
                .unwrap()
                .key_id(),
            3
        );
    }

    #[test]
    fn wrapped_keys_open_only_for_their_id_and_vault() {
        let k0 = VaultKey::from_bytes([7; 32]);
        let w = k0.wrap_key(4, &[5; 32]);
        assert_eq!(w.len(), WRAPPED_KEY_LEN);
        assert_eq!(k0.unwrap_key(4, &w).unwrap(), [5; 32]);
        assert!(k0.unwrap_key(5, &w).is_err(), "another id");
        assert!(
            VaultKey::from_bytes([8; 32]).unwrap_key(4, &w).is_err(),
            "another vault"
        );
        assert!(k0.unwrap_key(4, &w[1..]).is_err(), "truncated");
        assert_ne!(k0.wrap_key(4, &[5; 32]), w, "a fresh nonce each time");
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
