use super::*;
use crate::frame::{ErrorCode, encode_error, max_sealed_len};

fn ids(n: usize) -> Vec<ChunkId> {
    (0..n).map(|i| [i as u8 + 1; 32]).collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

/// Rewrites the trailing checksum so a deliberately broken field reaches its bounds check.
fn reseal(buf: &mut [u8]) {
    let n = buf.len() - 32;
    let sum = blake3::hash(&buf[..n]);
    buf[n..].copy_from_slice(sum.as_bytes());
}

/// Where the vm length field of a FETCH starts.
const VM_LEN_AT: usize = 8;

#[test]
fn fetch_round_trips() {
    let want = ids(3);
    let buf = encode_fetch("web01", "latest", &want).unwrap();
    assert_eq!(buf.len(), 10 + 5 + 2 + 6 + 4 + 3 * 32 + 32);
    let frame = decode_fetch(&buf).unwrap();
    assert_eq!(
        frame,
        FetchFrame {
            vm: "web01".into(),
            point: "latest".into(),
            ids: want
        }
    );
}

#[test]
fn fetch_at_every_maximum_round_trips() {
    let (vm, point) = ("v".repeat(MAX_NAME_LEN), "p".repeat(MAX_NAME_LEN));
    let buf = encode_fetch(&vm, &point, &ids(MAX_FETCH_COUNT as usize)).unwrap();
    assert_eq!(buf.len(), MAX_FETCH_LEN);
    let frame = decode_fetch(&buf).unwrap();
    assert_eq!((frame.vm, frame.point, frame.ids.len()), (vm, point, 64));
}

#[test]
fn encode_fetch_rejects_bad_bounds() {
    let one = ids(1);
    assert!(matches!(
        encode_fetch("", "p", &one),
        Err(FrameError::VmLen(0))
    ));
    assert!(matches!(
        encode_fetch(&"v".repeat(129), "p", &one),
        Err(FrameError::VmLen(129))
    ));
    assert!(matches!(
        encode_fetch("v", "", &one),
        Err(FrameError::PointLen(0))
    ));
    assert!(matches!(
        encode_fetch("v", &"p".repeat(129), &one),
        Err(FrameError::PointLen(129))
    ));
    assert!(matches!(
        encode_fetch("v", "p", &[]),
        Err(FrameError::FetchCount(0))
    ));
    assert!(matches!(
        encode_fetch("v", "p", &ids(65)),
        Err(FrameError::FetchCount(65))
    ));
}

#[test]
fn fetch_rejects_bad_magic_version_and_flags() {
    let mut buf = encode_fetch("v", "p", &ids(1)).unwrap();
    buf[..4].copy_from_slice(b"FRO1");
    let err = decode_fetch(&buf).unwrap_err();
    assert!(err.to_string().contains("FRO1"), "{err}");
    let mut buf = encode_fetch("v", "p", &ids(1)).unwrap();
    buf[4] = 2;
    reseal(&mut buf);
    assert!(matches!(decode_fetch(&buf), Err(FrameError::Version(2))));
    let mut buf = encode_fetch("v", "p", &ids(1)).unwrap();
    buf[6] = 1;
    reseal(&mut buf);
    let err = decode_fetch(&buf).unwrap_err();
    assert!(matches!(err, FrameError::Flags(1)));
    assert_eq!(err.code(), ErrorCode::BadFrame);
}

#[test]
fn fetch_checks_bounds_before_checksum() {
    // Each broken field with a garbage checksum: the field is named, nothing is allocated.
    let base = encode_fetch("vm", "pt", &ids(1)).unwrap();
    let mut buf = base.clone();
    buf[VM_LEN_AT..VM_LEN_AT + 2].copy_from_slice(&0u16.to_le_bytes());
    assert!(matches!(decode_fetch(&buf), Err(FrameError::VmLen(0))));
    buf[VM_LEN_AT..VM_LEN_AT + 2].copy_from_slice(&129u16.to_le_bytes());
    assert!(matches!(decode_fetch(&buf), Err(FrameError::VmLen(129))));
    buf[VM_LEN_AT..VM_LEN_AT + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(matches!(decode_fetch(&buf), Err(FrameError::VmLen(65535))));
    let point_len_at = VM_LEN_AT + 2 + 2;
    let mut buf = base.clone();
    buf[point_len_at..point_len_at + 2].copy_from_slice(&0u16.to_le_bytes());
    assert!(matches!(decode_fetch(&buf), Err(FrameError::PointLen(0))));
    buf[point_len_at..point_len_at + 2].copy_from_slice(&129u16.to_le_bytes());
    assert!(matches!(decode_fetch(&buf), Err(FrameError::PointLen(129))));
    let count_at = point_len_at + 2 + 2;
    for count in [0u32, 65, u32::MAX] {
        let mut buf = base.clone();
        buf[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        let err = decode_fetch(&buf).unwrap_err();
        assert!(
            matches!(err, FrameError::FetchCount(c) if c == count),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::BadFrame);
    }
}

#[test]
fn fetch_rejects_bad_checksum_and_utf8() {
    let mut buf = encode_fetch("vm", "pt", &ids(2)).unwrap();
    let last = buf.len() - 1;
    buf[last] ^= 1;
    let err = decode_fetch(&buf).unwrap_err();
    assert!(matches!(err, FrameError::FetchChecksum));
    assert_eq!(err.code(), ErrorCode::Checksum);
    // a flipped id byte is caught by the checksum too
    let mut buf = encode_fetch("vm", "pt", &ids(2)).unwrap();
    buf[30] ^= 1;
    assert!(matches!(decode_fetch(&buf), Err(FrameError::FetchChecksum)));
    let mut buf = encode_fetch("vm", "pt", &ids(1)).unwrap();
    buf[VM_LEN_AT + 2] = 0xff;
    reseal(&mut buf);
    let err = decode_fetch(&buf).unwrap_err();
    assert!(matches!(err, FrameError::NameUtf8("vm name")), "{err}");
    let mut buf = encode_fetch("vm", "pt", &ids(1)).unwrap();
    buf[VM_LEN_AT + 2 + 2 + 2] = 0xc0;
    reseal(&mut buf);
    let err = decode_fetch(&buf).unwrap_err();
    assert!(matches!(err, FrameError::NameUtf8("point id")), "{err}");
}

#[test]
fn fetch_truncated_at_every_byte() {
    let buf = encode_fetch("web", "latest", &ids(3)).unwrap();
    for cut in 0..buf.len() {
        let err = decode_fetch(&buf[..cut]).unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "cut {cut}: {err}");
        assert_eq!(err.code(), ErrorCode::BadFrame);
    }
    let mut long = buf.clone();
    long.push(0);
    assert!(matches!(decode_fetch(&long), Err(FrameError::Trailing(1))));
    assert!(block_on(expect_fetch_end(&mut &b""[..])).is_ok());
    assert!(matches!(
        block_on(expect_fetch_end(&mut &b"x"[..])),
        Err(FrameError::TrailingFetch)
    ));
}

#[test]
fn answer_round_trips() {
    let chunks = [Bytes::from(vec![7u8; 5000]), Bytes::from_static(b"x")];
    let mut buf = MAGIC_DATA.to_vec();
    for c in &chunks {
        for part in encode_chunk(c.clone()) {
            buf.extend_from_slice(&part);
        }
    }
    let mut r = &buf[..];
    let max = max_sealed_len(4096);
    assert_eq!(
        block_on(read_fetch_answer(&mut r)).unwrap(),
        FetchAnswer::Data
    );
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(block_on(read_fetched_chunk(&mut r, i, 2, max)).unwrap(), *c);
    }
    assert!(r.is_empty());
    // one more than was sent: the stream ended early
    let err = block_on(read_fetched_chunk(&mut r, 2, 3, max)).unwrap_err();
    assert!(
        matches!(err, FrameError::MissingPayloads { got: 2, wanted: 3 }),
        "{err}"
    );

    let buf = encode_error(ErrorCode::NotEntitled, "chunk 0102 is not in point p");
    let answer = block_on(read_fetch_answer(&mut &buf[..])).unwrap();
    assert_eq!(
        answer,
        FetchAnswer::Error(ErrorFrame {
            code: 8,
            message: "chunk 0102 is not in point p".into()
        })
    );
    let err = block_on(read_fetch_answer(&mut &b"FRA1"[..])).unwrap_err();
    assert!(matches!(err, FrameError::BadMagic { .. }), "{err}");
}

#[test]
fn answer_chunks_check_length_and_hash() {
    let max = max_sealed_len(4096);
    for len in [0u32, max + 1, u32::MAX] {
        let buf = frame::encode_payload_len(len);
        let err = block_on(read_fetched_chunk(&mut &buf[..], 5, 9, max)).unwrap_err();
        assert!(
            matches!(err, FrameError::SealedLen { index: 5, .. }),
            "{err}"
        );
    }
    let mut buf = Vec::new();
    for part in encode_chunk(Bytes::from(vec![3u8; 100])) {
        buf.extend_from_slice(&part);
    }
    buf[50] ^= 1;
    let err = block_on(read_fetched_chunk(&mut &buf[..], 1, 2, max)).unwrap_err();
    assert!(matches!(err, FrameError::PayloadHash { index: 1 }), "{err}");
    assert_eq!(err.code(), ErrorCode::Checksum);
}

#[test]
fn not_entitled_is_code_8_and_permanent() {
    assert_eq!(ErrorCode::from_u32(8), Some(ErrorCode::NotEntitled));
    assert_eq!(ErrorCode::NotEntitled.as_u32(), 8);
    assert!(!ErrorCode::NotEntitled.is_transient());
    assert_eq!(ErrorCode::from_u32(9), None);
}

/// Deterministic mutation fuzzing: flipped, cut and spliced FETCH frames and answers never
/// panic and never decode to something out of bounds.
#[test]
fn mutated_fetch_frames_never_panic() {
    let mut answer = MAGIC_DATA.to_vec();
    for part in encode_chunk(Bytes::from(vec![9u8; 300])) {
        answer.extend_from_slice(&part);
    }
    let bases = [
        encode_fetch("vm-under-test", "00000000000000000042", &ids(9)).unwrap(),
        answer,
        encode_error(ErrorCode::NotEntitled, "chunk x"),
    ];
    let mut rng = blake3::Hasher::new().update(b"fetch fuzz").finalize_xof();
    let mut next = || {
        let mut b = [0u8; 8];
        rng.fill(&mut b);
        u64::from_le_bytes(b)
    };
    for _ in 0..20_000 {
        let mut buf = bases[(next() % bases.len() as u64) as usize].clone();
        for _ in 0..=(next() % 4) {
            let at = (next() % buf.len() as u64) as usize;
            match next() % 4 {
                0 => buf[at] ^= 1 << (next() % 8),
                1 => buf[at] = next() as u8,
                2 => buf.truncate(at),
                _ => buf.insert(at, next() as u8),
            }
            if buf.is_empty() {
                break;
            }
        }
        if let Ok(f) = decode_fetch(&buf) {
            assert!(!f.vm.is_empty() && f.vm.len() <= MAX_NAME_LEN);
            assert!(!f.point.is_empty() && f.point.len() <= MAX_NAME_LEN);
            assert!(!f.ids.is_empty() && f.ids.len() <= MAX_FETCH_COUNT as usize);
        }
        let mut r = &buf[..];
        if let Ok(FetchAnswer::Data) = block_on(read_fetch_answer(&mut r)) {
            for i in 0..3 {
                if block_on(read_fetched_chunk(&mut r, i, 3, 1024)).is_err() {
                    break;
                }
            }
        }
    }
}
