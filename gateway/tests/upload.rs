//! Well-behaved agents against a real gateway: uploads, dedup, authorization, TLS identity.

mod common;

use common::*;
use ferry_gateway::ErrorCode;
use ferry_gateway::client::{UploadError, Uploader};
use ferry_mesh::{Identity, VaultCa};

#[tokio::test]
async fn round_trip_stores_chunks_byte_identical_and_reports() {
    let (logs, _guard) = capture_logs();
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    let up = h.uploader("host-a").await;
    let (offers, sealed) = chunks(5, 1);

    let batch = up.offer("c1", &offers).await.unwrap();
    assert_eq!(batch.needed, vec![true; 5]);
    let outcome = batch.send(sealed.clone()).await.unwrap();
    assert_eq!(outcome.written, 5);
    assert_eq!(outcome.already_present, 0);
    let sealed_total: u64 = sealed.iter().map(|s| s.len() as u64).sum();
    assert_eq!(outcome.bytes_written, sealed_total);

    for (o, s) in offers.iter().zip(&sealed) {
        assert_eq!(h.store.get_chunk(&o.id).await.unwrap(), *s);
    }
    let reports = h.ingest.reports();
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!(
        (r.cycle_id.as_str(), r.host_name.as_str()),
        ("c1", "host-a")
    );
    assert_eq!((r.chunks_written, r.bytes_written), (5, sealed_total));
    assert_eq!((r.chunks_skipped, r.bytes_skipped), (0, 0));
    let plain_total: u64 = offers.iter().map(|o| u64::from(o.plain_len)).sum();
    assert_eq!(r.plain_bytes_written, plain_total);

    let ms = up.ping().await.unwrap();
    assert!(ms > 1_600_000_000_000, "gateway clock {ms}");
    up.close();
    h.stop().await;
    // a clean session logs nothing at warn
    assert_eq!(warnings(&logs), Vec::<String>::new());
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("batch landed"), "{text}");
}

#[tokio::test]
async fn re_offer_needs_nothing_and_partial_offer_needs_only_new() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    let up = h.uploader("host-a").await;
    let (offers, sealed) = chunks(4, 2);
    up.offer("c1", &offers)
        .await
        .unwrap()
        .send(sealed.clone())
        .await
        .unwrap();

    // same chunks again, on a fresh connection: nothing needed, nothing sent
    let up2 = h.uploader("host-a").await;
    let batch = up2.offer("c1", &offers).await.unwrap();
    assert_eq!(batch.needed, vec![false; 4]);
    let outcome = batch.send(vec![]).await.unwrap();
    assert_eq!(
        (
            outcome.written,
            outcome.already_present,
            outcome.bytes_written
        ),
        (0, 0, 0)
    );

    // two old, two new, and a duplicate of a new one in the same offer
    let (new_offers, new_sealed) = chunks(2, 3);
    let mixed = vec![
        offers[0],
        new_offers[0],
        offers[1],
        new_offers[1],
        new_offers[0],
    ];
    let batch = up2.offer("c1", &mixed).await.unwrap();
    assert_eq!(batch.needed, vec![false, true, false, true, false]);
    let outcome = batch.send(new_sealed.clone()).await.unwrap();
    assert_eq!(outcome.written, 2);
    assert_eq!(
        h.store.get_chunk(&new_offers[1].id).await.unwrap(),
        new_sealed[1]
    );

    let reports = h.ingest.reports();
    assert_eq!(reports.len(), 3);
    let skipped_plain: u64 = offers.iter().map(|o| u64::from(o.plain_len)).sum();
    assert_eq!(
        (reports[1].chunks_skipped, reports[1].bytes_skipped),
        (4, skipped_plain)
    );
    assert_eq!(reports[1].chunks_written, 0);
    let mixed_skipped =
        u64::from(offers[0].plain_len + offers[1].plain_len + new_offers[0].plain_len);
    assert_eq!(
        (reports[2].chunks_skipped, reports[2].bytes_skipped),
        (3, mixed_skipped)
    );
    h.stop().await;
}

#[tokio::test]
async fn concurrent_identical_uploads_are_idempotent() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    let up = h.uploader("host-a").await;
    let (offers, sealed) = chunks(8, 4);
    // both batches are offered before either sends, so both are told to send everything
    let a = up.offer("c1", &offers).await.unwrap();
    let b = up.offer("c1", &offers).await.unwrap();
    assert_eq!((a.needed_count(), b.needed_count()), (8, 8));
    let (ra, rb) = tokio::join!(a.send(sealed.clone()), b.send(sealed.clone()));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.written + rb.written, 8);
    assert_eq!(ra.already_present + rb.already_present, 8);
    for (o, s) in offers.iter().zip(&sealed) {
        assert_eq!(h.store.get_chunk(&o.id).await.unwrap(), *s);
    }
    h.stop().await;
}

#[tokio::test]
async fn authorization_is_cached_per_connection_and_cycle() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    h.ingest.open_cycle("c2", "host-a");
    let up = h.uploader("host-a").await;
    for seed in 10..13 {
        let (offers, sealed) = chunks(2, seed);
        up.offer("c1", &offers)
            .await
            .unwrap()
            .send(sealed)
            .await
            .unwrap();
    }
    assert_eq!(h.ingest.authorize_calls(), 1);
    let (offers, sealed) = chunks(1, 20);
    up.offer("c2", &offers)
        .await
        .unwrap()
        .send(sealed)
        .await
        .unwrap();
    assert_eq!(h.ingest.authorize_calls(), 2);
    let other = h.uploader("host-a").await;
    let (offers, sealed) = chunks(1, 21);
    other
        .offer("c1", &offers)
        .await
        .unwrap()
        .send(sealed)
        .await
        .unwrap();
    assert_eq!(h.ingest.authorize_calls(), 3);
    h.stop().await;
}

#[tokio::test]
async fn denied_and_unknown_cycles_get_error_frames() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c-of-b", "host-b");
    let up = h.uploader("host-a").await;
    let (offers, _) = chunks(2, 5);

    let err = up.offer("c-of-b", &offers).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("another host"), "{err}");

    let err = up.offer("no-such-cycle", &offers).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    assert!(err.to_string().contains("not found"), "{err}");

    // nothing was written, nothing reported, and the connection still works
    assert!(!h.store.chunk_exists(&offers[0].id).await.unwrap());
    assert!(h.ingest.reports().is_empty());
    up.ping().await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn service_identity_may_ping_but_not_upload() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "ferry");
    let cfg = h.client_config(Identity::Service("ferry".into()));
    let up = Uploader::connect(h.addr, cfg).await.unwrap();
    up.ping().await.unwrap();
    let (offers, _) = chunks(1, 6);
    let err = up.offer("c1", &offers).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotHost), "{err}");
    h.stop().await;
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() {
    let (logs, _guard) = capture_logs();
    let h = Harness::start().await;
    let rogue = VaultCa::create("rogue").unwrap();
    let (cert, key) = rogue
        .issue_client(&Identity::Host("host-a".into()))
        .unwrap();
    // trusts the real vault CA (so the server check passes), presents a rogue client cert
    let cfg = ferry_mesh::quic_client_config(&h.ca.cert_pem(), &cert, &key).unwrap();
    // In TLS 1.3 the client may finish its handshake before the server rejects its
    // certificate, so the refusal shows either at connect or on first use.
    let refused = match Uploader::connect(h.addr, cfg).await {
        Err(e) => {
            assert!(matches!(e, UploadError::Connection(_)), "{e}");
            true
        }
        Ok(up) => up.ping().await.is_err(),
    };
    assert!(refused, "a rogue client certificate was accepted");
    let warned = warnings(&logs);
    assert!(
        warned
            .iter()
            .any(|l| l.contains("quic handshake failed") && l.contains("peer=127.0.0.1:")),
        "{warned:#?}"
    );
    // the gateway keeps serving good clients
    h.uploader("host-a").await.ping().await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn ingest_unreachable_is_a_transient_error() {
    let h = Harness::start_with(false).await;
    let up = h.uploader("host-a").await;
    let (offers, _) = chunks(1, 7);
    let err = up.offer("c1", &offers).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
    assert!(err.is_transient());
    h.stop().await;
}

#[tokio::test]
async fn wrong_number_of_payloads_is_refused_locally() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    let up = h.uploader("host-a").await;
    let (offers, sealed) = chunks(3, 8);
    let batch = up.offer("c1", &offers).await.unwrap();
    let err = batch.send(sealed[..2].to_vec()).await.unwrap_err();
    assert!(matches!(err, UploadError::Invalid(_)), "{err}");
    assert!(!err.is_transient());
    // a correct retry on the same connection succeeds
    let batch = up.offer("c1", &offers).await.unwrap();
    assert_eq!(batch.send(sealed).await.unwrap().written, 3);
    h.stop().await;
}

#[tokio::test]
async fn many_concurrent_batches_on_one_connection() {
    let h = Harness::start().await;
    h.ingest.open_cycle("c1", "host-a");
    let up = h.uploader("host-a").await;
    let mut tasks = Vec::new();
    for seed in 0..32u8 {
        let up = up.clone();
        tasks.push(tokio::spawn(async move {
            let (offers, sealed) = chunks(4, 100 + seed);
            up.offer("c1", &offers).await?.send(sealed).await
        }));
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.unwrap().unwrap().written;
    }
    assert_eq!(written, 128);
    assert_eq!(h.ingest.reports().len(), 32);
    h.stop().await;
}

#[tokio::test]
async fn shutdown_stops_the_gateway() {
    let h = Harness::start().await;
    let up = h.uploader("host-a").await;
    up.ping().await.unwrap();
    let addr = h.addr;
    h.stop().await;
    assert!(up.ping().await.is_err());
    let _ = addr;
}
