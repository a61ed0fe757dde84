use super::*;

const MAX_BLOCK: u32 = 1 << 20;

fn offers(n: usize) -> Vec<Offer> {
    (0..n)
        .map(|i| Offer {
            id: [i as u8; 32],
            plain_len: 4096 + i as u32,
        })
        .collect()
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

#[test]
fn offer_round_trips() {
    let o = offers(3);
    let buf = encode_offer("cycle-1", &o).unwrap();
    let frame = decode_offer(&buf, MAX_BLOCK).unwrap();
    assert_eq!(frame.cycle_id, "cycle-1");
    assert_eq!(frame.offers, o);
}

#[test]
fn offer_max_count_round_trips() {
    let o = offers(MAX_OFFER_COUNT as usize);
    let buf = encode_offer(&"c".repeat(MAX_CYCLE_ID_LEN), &o).unwrap();
    assert_eq!(decode_offer(&buf, MAX_BLOCK).unwrap().offers.len(), 1024);
}

#[test]
fn encode_offer_rejects_bad_bounds() {
    assert!(matches!(
        encode_offer("", &offers(1)),
        Err(FrameError::CycleIdLen(0))
    ));
    assert!(matches!(
        encode_offer(&"x".repeat(129), &offers(1)),
        Err(FrameError::CycleIdLen(129))
    ));
    assert!(matches!(encode_offer("c", &[]), Err(FrameError::Count(0))));
    assert!(matches!(
        encode_offer("c", &offers(1025)),
        Err(FrameError::Count(1025))
    ));
    let zero = [Offer {
        id: [0; 32],
        plain_len: 0,
    }];
    assert!(matches!(
        encode_offer("c", &zero),
        Err(FrameError::PlainLen { index: 0, .. })
    ));
}

#[test]
fn offer_rejects_bad_magic() {
    let mut buf = encode_offer("c", &offers(1)).unwrap();
    buf[..4].copy_from_slice(b"XXXX");
    let err = decode_offer(&buf, MAX_BLOCK).unwrap_err();
    assert!(err.to_string().contains("XXXX"), "{err}");
    buf[..4].copy_from_slice(&[0, 1, 2, 0xff]);
    let err = decode_offer(&buf, MAX_BLOCK).unwrap_err();
    assert!(err.to_string().contains("0x000102ff"), "{err}");
}

#[test]
fn offer_rejects_version_and_flags() {
    let mut buf = encode_offer("c", &offers(1)).unwrap();
    buf[4] = 2;
    reseal(&mut buf);
    assert!(matches!(
        decode_offer(&buf, MAX_BLOCK),
        Err(FrameError::Version(2))
    ));
    let mut buf = encode_offer("c", &offers(1)).unwrap();
    buf[6] = 1;
    reseal(&mut buf);
    assert!(matches!(
        decode_offer(&buf, MAX_BLOCK),
        Err(FrameError::Flags(1))
    ));
}

#[test]
fn offer_checks_bounds_before_checksum() {
    // an absurd count with a garbage checksum: the count is named, nothing is allocated
    let mut buf = encode_offer("c", &offers(1)).unwrap();
    let count_at = 4 + 2 + 2 + 2 + 1;
    buf[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_offer(&buf, MAX_BLOCK),
        Err(FrameError::Count(u32::MAX))
    ));
    let mut buf = encode_offer("c", &offers(1)).unwrap();
    buf[8..10].copy_from_slice(&500u16.to_le_bytes());
    assert!(matches!(
        decode_offer(&buf, MAX_BLOCK),
        Err(FrameError::CycleIdLen(500))
    ));
}

#[test]
fn offer_rejects_plain_len_over_block() {
    let o = [Offer {
        id: [1; 32],
        plain_len: MAX_BLOCK + 1,
    }];
    let buf = encode_offer("c", &o).unwrap();
    let err = decode_offer(&buf, MAX_BLOCK).unwrap_err();
    assert!(matches!(err, FrameError::PlainLen { index: 0, len, .. } if len == MAX_BLOCK + 1));
}

#[test]
fn offer_rejects_bad_checksum_and_utf8() {
    let mut buf = encode_offer("c", &offers(2)).unwrap();
    let last = buf.len() - 1;
    buf[last] ^= 1;
    let err = decode_offer(&buf, MAX_BLOCK).unwrap_err();
    assert!(matches!(err, FrameError::OfferChecksum));
    assert_eq!(err.code(), ErrorCode::Checksum);
    let mut buf = encode_offer("c", &offers(1)).unwrap();
    buf[10] = 0xff;
    reseal(&mut buf);
    assert!(matches!(
        decode_offer(&buf, MAX_BLOCK),
        Err(FrameError::CycleIdUtf8)
    ));
}

#[test]
fn offer_truncated_at_every_byte() {
    let buf = encode_offer("cycle", &offers(3)).unwrap();
    for cut in 0..buf.len() {
        let err = decode_offer(&buf[..cut], MAX_BLOCK).unwrap_err();
        assert!(matches!(err, FrameError::Truncated), "cut {cut}: {err}");
        assert_eq!(err.code(), ErrorCode::BadFrame);
    }
    let mut long = buf.clone();
    long.push(0);
    assert!(matches!(
        decode_offer(&long, MAX_BLOCK),
        Err(FrameError::Trailing(1))
    ));
}

#[test]
fn need_round_trips() {
    for n in [1usize, 7, 8, 9, 1024] {
        let needed: Vec<bool> = (0..n).map(|i| i % 3 != 1).collect();
        let buf = encode_need(&needed);
        assert_eq!(buf.len(), 8 + n.div_ceil(8));
        let resp = block_on(read_response(&mut &buf[..], n)).unwrap();
        assert_eq!(resp, Response::Need(needed));
    }
}

#[test]
fn need_bitmap_is_lsb_first() {
    let buf = encode_need(&[true, false, false, true, false, false, false, false, true]);
    assert_eq!(&buf[8..], &[0b0000_1001, 0b0000_0001]);
}

#[test]
fn need_rejects_wrong_count_and_padding() {
    let buf = encode_need(&[true; 3]);
    let err = block_on(read_response(&mut &buf[..], 4)).unwrap_err();
    assert!(matches!(
        err,
        FrameError::NeedCount {
            expected: 4,
            got: 3
        }
    ));
    let mut buf = encode_need(&[true; 3]);
    buf[8] |= 0x80;
    let err = block_on(read_response(&mut &buf[..], 3)).unwrap_err();
    assert!(matches!(err, FrameError::NeedPadding));
}

#[test]
fn ack_error_pong_round_trip() {
    let ack = Ack {
        written: 3,
        already_present: 1,
        bytes_written: 1 << 40,
    };
    let buf = encode_ack(&ack);
    assert_eq!(
        block_on(read_response(&mut &buf[..], 0)).unwrap(),
        Response::Ack(ack)
    );
    let buf = encode_error(ErrorCode::Denied, "cycle c is closed");
    let resp = block_on(read_response(&mut &buf[..], 0)).unwrap();
    assert_eq!(
        resp,
        Response::Error(ErrorFrame {
            code: 3,
            message: "cycle c is closed".into()
        })
    );
    let buf = encode_pong(1_700_000_000_123);
    assert_eq!(
        block_on(read_response(&mut &buf[..], 0)).unwrap(),
        Response::Pong(1_700_000_000_123)
    );
}

#[test]
fn error_message_is_cut_on_char_boundary() {
    let long = "é".repeat(MAX_ERROR_MESSAGE);
    let buf = encode_error(ErrorCode::Internal, &long);
    let Response::Error(e) = block_on(read_response(&mut &buf[..], 0)).unwrap() else {
        panic!("not an error frame");
    };
    assert!(e.message.len() <= MAX_ERROR_MESSAGE);
    assert!(e.message.chars().all(|c| c == 'é'));
}

#[test]
fn response_rejects_unknown_magic() {
    let err = block_on(read_response(&mut &b"HTTP/1.1"[..], 0)).unwrap_err();
    assert!(matches!(err, FrameError::BadMagic { .. }));
}

#[test]
fn payload_round_trips_and_checks_hash() {
    let sealed = vec![7u8; 5000];
    let mut buf = encode_payload_len(5000).to_vec();
    buf.extend_from_slice(&sealed);
    buf.extend_from_slice(&payload_hash(&sealed));
    let mut r = &buf[..];
    let len = block_on(read_payload_len(&mut r, 0, max_sealed_len(4096))).unwrap();
    assert_eq!(len, Some(5000));
    let body = block_on(read_payload_body(&mut r, 0, 5000)).unwrap();
    assert_eq!(&body[..], &sealed[..]);
    assert!(block_on(expect_end(&mut r)).is_ok());

    let mut bad = buf.clone();
    bad[10] ^= 1;
    let mut r = &bad[..];
    block_on(read_payload_len(&mut r, 4, 10_000)).unwrap();
    let err = block_on(read_payload_body(&mut r, 4, 5000)).unwrap_err();
    assert!(matches!(err, FrameError::PayloadHash { index: 4 }));
}

#[test]
fn payload_len_bounds_and_end() {
    let max = max_sealed_len(4096);
    for len in [0u32, max + 1, u32::MAX] {
        let buf = encode_payload_len(len);
        let err = block_on(read_payload_len(&mut &buf[..], 2, max)).unwrap_err();
        assert!(
            matches!(err, FrameError::SealedLen { index: 2, .. }),
            "{err}"
        );
    }
    assert_eq!(
        block_on(read_payload_len(&mut &b""[..], 0, max)).unwrap(),
        None
    );
    let err = block_on(read_payload_len(&mut &b"\x01\x00"[..], 0, max)).unwrap_err();
    assert!(matches!(err, FrameError::Truncated));
    assert!(matches!(
        block_on(expect_end(&mut &b"x"[..])),
        Err(FrameError::TrailingPayload)
    ));
}

#[test]
fn error_codes_round_trip() {
    for c in 1..=7 {
        assert_eq!(ErrorCode::from_u32(c).unwrap().as_u32(), c);
    }
    assert_eq!(ErrorCode::from_u32(0), None);
    assert!(ErrorCode::Unavailable.is_transient());
    assert!(!ErrorCode::Denied.is_transient());
}

/// Deterministic mutation fuzzing: flipped, cut and spliced frames never panic and never
/// decode to something out of bounds.
#[test]
fn mutated_frames_never_panic() {
    let bases = [
        encode_offer("cycle-under-test", &offers(9)).unwrap(),
        encode_need(&[true, false, true, true, false, false, true, false, true]),
        encode_ack(&Ack {
            written: 1,
            already_present: 2,
            bytes_written: 3,
        })
        .to_vec(),
        encode_error(ErrorCode::Denied, "cycle x is closed"),
        encode_pong(42).to_vec(),
    ];
    let mut rng = blake3::Hasher::new().update(b"frame fuzz").finalize_xof();
    let mut next = || {
        let mut b = [0u8; 8];
        rng.fill(&mut b);
        u64::from_le_bytes(b)
    };
    for _ in 0..20_000 {
        let mut buf = bases[(next() % bases.len() as u64) as usize].clone();
        if buf.is_empty() {
            continue;
        }
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
        if let Ok(frame) = decode_offer(&buf, MAX_BLOCK) {
            assert!(!frame.cycle_id.is_empty() && frame.cycle_id.len() <= MAX_CYCLE_ID_LEN);
            assert!(!frame.offers.is_empty() && frame.offers.len() <= MAX_OFFER_COUNT as usize);
            assert!(
                frame
                    .offers
                    .iter()
                    .all(|o| o.plain_len >= 1 && o.plain_len <= MAX_BLOCK)
            );
        }
        let _ = block_on(read_response(&mut &buf[..], (next() % 1025) as usize));
        let mut r = &buf[..];
        if let Ok(Some(len)) = block_on(read_payload_len(&mut r, 0, max_sealed_len(MAX_BLOCK))) {
            let _ = block_on(read_payload_body(&mut r, 0, len));
        }
    }
}
