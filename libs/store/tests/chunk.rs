//! Chunk codec: round trips, tamper and wrong-key detection, clear errors on bad input.

use ferry_store::{
    CHUNK_HEADER_LEN, StoreError, VaultKey, chunk_hex, chunk_id, is_zero, open_chunk,
    parse_chunk_hex, seal_chunk,
};

fn block(seed: u8, len: usize, compressible: bool) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            if compressible {
                (i / 64) as u8 ^ seed
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

#[test]
fn seal_open_round_trip_compressible_and_random() {
    let key = VaultKey::generate();
    for (data, compressible) in [
        (block(1, 1 << 20, true), true),
        (block(2, 1 << 20, false), false),
        (vec![7u8; 10], true),
        (Vec::new(), false),
    ] {
        let id = chunk_id(&key, &data);
        let sealed = seal_chunk(&key, &id, &data);
        if compressible && data.len() > 100 {
            assert!(sealed.len() < data.len() / 2, "compressed {}", sealed.len());
        }
        if !compressible {
            // Stored raw: header + body + tag.
            assert_eq!(sealed.len(), CHUNK_HEADER_LEN + data.len() + 16);
        }
        assert_eq!(&sealed[..4], b"FCK1");
        assert_eq!(open_chunk(&key, &id, &sealed).unwrap(), data);
        // Deterministic: the same block seals to the same bytes (dedup, idempotent uploads).
        assert_eq!(seal_chunk(&key, &id, &data), sealed);
    }
}

#[test]
fn ids_are_keyed() {
    let data = block(3, 4096, false);
    let a = VaultKey::from_bytes([1; 32]);
    let b = VaultKey::from_bytes([2; 32]);
    assert_ne!(chunk_id(&a, &data), chunk_id(&b, &data));
    assert_ne!(chunk_id(&a, &data), *blake3::hash(&data).as_bytes());
    assert_eq!(
        chunk_id(&a, &data),
        chunk_id(&VaultKey::from_bytes(a.to_bytes()), &data)
    );
}

#[test]
fn every_flipped_byte_is_detected() {
    let key = VaultKey::generate();
    let data = block(4, 3000, true);
    let id = chunk_id(&key, &data);
    let sealed = seal_chunk(&key, &id, &data);
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 0x01;
        let err = open_chunk(&key, &id, &bad).unwrap_err();
        // A flip in the key id (bytes 6..8) names a key this keyring lacks: detected, and
        // said as such (a holder cannot tell it from a rotation it has not fetched yet).
        let ok = match err {
            StoreError::UnknownKey { .. } => (6..8).contains(&i),
            StoreError::Corrupt { .. } => true,
            _ => false,
        };
        assert!(ok, "byte {i}: {err}");
    }
}

#[test]
fn wrong_key_or_wrong_id_fails_authentication() {
    let key = VaultKey::generate();
    let data = block(5, 5000, false);
    let id = chunk_id(&key, &data);
    let sealed = seal_chunk(&key, &id, &data);
    let err = open_chunk(&VaultKey::generate(), &id, &sealed).unwrap_err();
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let mut other = id;
    other[31] ^= 1;
    assert!(open_chunk(&key, &other, &sealed).is_err());
    // An id whose nonce part matches but whose hash does not (sealed under the wrong id).
    let forged = seal_chunk(&key, &other, &data);
    let err = open_chunk(&key, &other, &forged).unwrap_err();
    assert!(err.to_string().contains("does not hash to its id"), "{err}");
}

#[test]
fn truncation_and_bad_magic_have_clear_errors() {
    let key = VaultKey::generate();
    let data = block(6, 100, false);
    let id = chunk_id(&key, &data);
    let sealed = seal_chunk(&key, &id, &data);
    for len in [0, 3, CHUNK_HEADER_LEN, CHUNK_HEADER_LEN + 15] {
        let err = open_chunk(&key, &id, &sealed[..len]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{len}: {err}");
    }
    assert!(open_chunk(&key, &id, &sealed[..sealed.len() - 1]).is_err());
    let mut bad = sealed.clone();
    bad[..4].copy_from_slice(b"NOPE");
    assert!(
        open_chunk(&key, &id, &bad)
            .unwrap_err()
            .to_string()
            .contains("bad magic")
    );
    let mut v = sealed.clone();
    v[4] = 9;
    assert!(
        open_chunk(&key, &id, &v)
            .unwrap_err()
            .to_string()
            .contains("version")
    );
    // Errors name the chunk, never key material.
    let msg = open_chunk(&VaultKey::from_bytes([0xAB; 32]), &id, &sealed)
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&chunk_hex(&id)));
    assert!(!msg.contains("abab"));
}

#[test]
fn random_garbage_never_panics() {
    let key = VaultKey::generate();
    let id = [9u8; 32];
    for len in 0..200 {
        let junk = block(len as u8, len, false);
        assert!(open_chunk(&key, &id, &junk).is_err());
        let mut framed = b"FCK1\x01\x01\0\0\xff\xff\xff\xff".to_vec();
        framed.extend_from_slice(&junk);
        assert!(open_chunk(&key, &id, &framed).is_err());
    }
}

#[test]
fn hex_round_trip_and_errors() {
    let id = [0xA5u8; 32];
    let hex = chunk_hex(&id);
    assert_eq!(hex.len(), 64);
    assert_eq!(parse_chunk_hex(&hex).unwrap(), id);
    assert_eq!(parse_chunk_hex(&hex.to_uppercase()).unwrap(), id);
    assert!(parse_chunk_hex("abc").is_err());
    assert!(parse_chunk_hex(&"zz".repeat(32)).is_err());
    assert!(parse_chunk_hex(&"é".repeat(32)).is_err());
}

#[test]
fn is_zero_matches_naive() {
    assert!(is_zero(&vec![0u8; 1 << 20]));
    for pos in [0, 1, 7, 8, 4095, 4096, 100_000, (1 << 20) - 1] {
        let mut b = vec![0u8; 1 << 20];
        b[pos] = 1;
        assert!(!is_zero(&b), "{pos}");
    }
    assert!(is_zero(&[0; 3]));
    assert!(!is_zero(&[0, 0, 2]));
}

#[test]
fn vault_key_debug_is_redacted() {
    let k = VaultKey::from_bytes([0x42; 32]);
    assert_eq!(format!("{k:?}"), "VaultKey(redacted)");
    assert_eq!(k.to_bytes(), [0x42; 32]);
}
