//! Hostile and broken clients, speaking raw QUIC: every bad frame gets an ERROR frame (or a
//! reset), nothing bad reaches the store, and the gateway keeps serving good clients.

mod common;

use common::*;
use ferry_gateway::ErrorCode;
use ferry_gateway::frame::{self, Offer, Response};

fn offer_bytes(cycle: &str, offers: &[Offer]) -> Vec<u8> {
    frame::encode_offer(cycle, offers).unwrap()
}

fn reseal(buf: &mut [u8]) {
    let n = buf.len() - 32;
    let sum = blake3::hash(&buf[..n]);
    buf[n..].copy_from_slice(sum.as_bytes());
}

/// A good client still gets served on a fresh connection.
async fn assert_still_serving(h: &Harness, seed: u8) {
    let up = h.uploader("host-a").await;
    let (offers, sealed) = chunks(2, seed);
    let outcome = up
        .offer("c1", &offers)
        .await
        .unwrap()
        .send(sealed)
        .await
        .unwrap();
    assert_eq!(outcome.written, 2);
}

#[tokio::test]
async fn malformed_offers_get_error_frames() {
    let (logs, _guard) = capture_logs();
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    let (conn, local) = h.raw_with_addr("host-a").await;
    let (offers, _) = chunks(3, 1);
    let good = offer_bytes("c1", &offers);

    let out = exchange(&conn, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_error(&out, ErrorCode::BadFrame, "bad magic");
    let out = exchange(&conn, &[0u8; 4]).await;
    assert_error(&out, ErrorCode::BadFrame, "0x00000000");

    // truncated at several points, including inside the magic
    for cut in [2, 5, 11, 40, good.len() - 1] {
        let out = exchange(&conn, &good[..cut]).await;
        assert_error(&out, ErrorCode::BadFrame, "stream ended");
    }

    let mut bad = good.clone();
    bad[4] = 9;
    reseal(&mut bad);
    assert_error(
        &exchange(&conn, &bad).await,
        ErrorCode::BadFrame,
        "version 9",
    );

    let mut bad = good.clone();
    bad[8..10].copy_from_slice(&0u16.to_le_bytes());
    assert_error(
        &exchange(&conn, &bad).await,
        ErrorCode::BadFrame,
        "cycle id length 0",
    );

    // absurd count: rejected from the header alone, before any allocation or checksum
    let mut bad = good.clone();
    bad[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_error(
        &exchange(&conn, &bad).await,
        ErrorCode::BadFrame,
        "chunk count 4294967295",
    );

    let over = [Offer {
        id: [9; 32],
        plain_len: BLOCK + 1,
    }];
    let out = exchange(&conn, &offer_bytes("c1", &over)).await;
    assert_error(&out, ErrorCode::BadFrame, "plain length 65537");

    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    assert_error(
        &exchange(&conn, &bad).await,
        ErrorCode::Checksum,
        "checksum",
    );

    // every rejection was logged at warn, naming the peer, its identity and the problem
    let warned = warnings(&logs);
    let rejected: Vec<_> = warned
        .iter()
        .filter(|l| l.contains("stream rejected"))
        .collect();
    assert_eq!(rejected.len(), 12, "{warned:#?}");
    for line in &rejected {
        assert!(line.contains(&format!("peer={local}")), "{line}");
        assert!(line.contains("identity=host:host-a"), "{line}");
        assert!(line.contains("error="), "{line}");
    }
    assert!(
        rejected
            .iter()
            .any(|l| l.contains("chunk count 4294967295")),
        "{rejected:#?}"
    );

    // the same connection still works, and no stray authorization was asked for
    assert_eq!(h.ingest.authorize_calls(), 0);
    let out = exchange(&conn, &frame::MAGIC_PING).await;
    assert!(matches!(out, Outcome::Frame(Response::Pong(_))), "{out:?}");
    assert_still_serving(&h, 50).await;
    h.stop().await;
}

/// Sends a valid OFFER for `offers`, checks the NEED, then sends `tail` and finishes.
async fn offer_then(conn: &quinn::Connection, offers: &[Offer], tail: &[u8]) -> Outcome {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&offer_bytes("c1", offers)).await.unwrap();
    match read_outcome(&mut recv, offers.len()).await {
        Outcome::Frame(Response::Need(n)) => assert!(n.iter().all(|x| *x), "{n:?}"),
        other => panic!("expected NEED, got {other:?}"),
    }
    let _ = send.write_all(tail).await;
    let _ = send.finish();
    read_outcome(&mut recv, 0).await
}

#[tokio::test]
async fn corrupted_payload_hash_stores_nothing() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    let conn = h.raw("host-a").await;
    let (offers, sealed) = chunks(1, 2);
    let mut tail = payloads(&sealed);
    tail[100] ^= 1;
    let out = offer_then(&conn, &offers, &tail).await;
    assert_error(&out, ErrorCode::Checksum, "chunk 0: payload hash mismatch");
    assert!(!h.store.chunk_exists(&offers[0].id).await.unwrap());
    assert!(h.ingest.reports().is_empty());

    // the bad chunk, in the middle of a batch, is never stored (nor anything after it)
    let (offers, sealed) = chunks(3, 3);
    let mut tail = payloads(&sealed);
    let second = 4 + sealed[0].len() + 32 + 4 + 10;
    tail[second] ^= 1;
    let out = offer_then(&conn, &offers, &tail).await;
    assert_error(&out, ErrorCode::Checksum, "chunk 1: payload hash mismatch");
    assert!(!h.store.chunk_exists(&offers[1].id).await.unwrap());
    assert!(!h.store.chunk_exists(&offers[2].id).await.unwrap());

    // a retry with the right bytes lands everything
    let up = h.uploader("host-a").await;
    let batch = up.offer("c1", &offers).await.unwrap();
    let needed: Vec<_> = sealed
        .iter()
        .zip(&batch.needed)
        .filter(|(_, n)| **n)
        .map(|(s, _)| s.clone())
        .collect();
    batch.send(needed).await.unwrap();
    for (o, s) in offers.iter().zip(&sealed) {
        assert_eq!(h.store.get_chunk(&o.id).await.unwrap(), *s);
    }
    h.stop().await;
}

#[tokio::test]
async fn bad_payload_frames_get_error_frames() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    let conn = h.raw("host-a").await;

    // oversized sealed length: refused from the prefix, never allocated
    let (offers, _) = chunks(1, 4);
    let out = offer_then(&conn, &offers, &u32::MAX.to_le_bytes()).await;
    assert_error(&out, ErrorCode::BadFrame, "sealed length 4294967295");
    let (offers, _) = chunks(1, 5);
    let out = offer_then(&conn, &offers, &0u32.to_le_bytes()).await;
    assert_error(&out, ErrorCode::BadFrame, "sealed length 0");

    // fewer payloads than needed, then a clean finish
    let (offers, sealed) = chunks(2, 6);
    let out = offer_then(&conn, &offers, &payloads(&sealed[..1])).await;
    assert_error(&out, ErrorCode::BadFrame, "after 1 of 2 payloads");

    // a payload cut short
    let (offers, sealed) = chunks(1, 7);
    let tail = payloads(&sealed);
    let out = offer_then(&conn, &offers, &tail[..tail.len() - 5]).await;
    assert_error(&out, ErrorCode::BadFrame, "stream ended");
    assert!(!h.store.chunk_exists(&offers[0].id).await.unwrap());

    // extra bytes after the last payload
    let (offers, sealed) = chunks(1, 8);
    let mut tail = payloads(&sealed);
    tail.extend_from_slice(b"more");
    let out = offer_then(&conn, &offers, &tail).await;
    assert_error(&out, ErrorCode::BadFrame, "after the last payload");

    assert_still_serving(&h, 51).await;
    h.stop().await;
}

#[tokio::test]
async fn resets_and_dropped_connections_do_not_hurt_the_gateway() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");

    // a client that resets its stream in the middle of a payload
    let conn = h.raw("host-a").await;
    let (offers, sealed) = chunks(2, 9);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&offer_bytes("c1", &offers)).await.unwrap();
    assert!(matches!(
        read_outcome(&mut recv, 2).await,
        Outcome::Frame(Response::Need(_))
    ));
    let tail = payloads(&sealed);
    send.write_all(&tail[..tail.len() / 2]).await.unwrap();
    send.reset(77u32.into()).unwrap();
    let out = read_outcome(&mut recv, 0).await;
    assert!(!matches!(out, Outcome::Frame(Response::Ack(_))), "{out:?}");

    // a client that vanishes mid-offer
    let conn2 = h.raw("host-a").await;
    let (mut send2, _recv2) = conn2.open_bi().await.unwrap();
    send2
        .write_all(&offer_bytes("c1", &offers)[..20])
        .await
        .unwrap();
    conn2.close(0u32.into(), b"bye");

    // many streams that open and say nothing useful
    let conn3 = h.raw("host-a").await;
    for _ in 0..50 {
        let out = exchange(&conn3, b"").await;
        assert_error(&out, ErrorCode::BadFrame, "stream ended");
    }

    assert_still_serving(&h, 52).await;
    conn.close(0u32.into(), b"bye");
    h.stop().await;
}
