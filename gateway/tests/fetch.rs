//! The read path against a real gateway: a host fetches the sealed chunks of a recovery point
//! it may read (storage-writer's `PointChunks` played by the harness), and nothing else.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use ferry_gateway::ErrorCode;
use ferry_gateway::MAX_FETCH_COUNT;
use ferry_gateway::client::{ChunkId, UploadError, Uploader};
use ferry_gateway::fetch::{self, FetchAnswer};
use ferry_gateway::frame::{self, Response};
use ferry_mesh::Identity;
use ferry_store::object_store::{ObjectStore, memory::InMemory};
use ferry_store::{Store, UnreliableStore};

/// `n` distinct sealed chunks put into the gateway's store; their ids and bytes.
async fn stored(h: &Harness, n: usize, seed: u8) -> (Vec<ChunkId>, Vec<Bytes>) {
    let (offers, sealed) = chunks(n, seed);
    for (o, s) in offers.iter().zip(&sealed) {
        h.store.put_chunk(&o.id, s.clone()).await.unwrap();
    }
    (offers.iter().map(|o| o.id).collect(), sealed)
}

/// `web` on `host-a`, failing over to `host-r`, with point `p1` of `n` stored chunks.
async fn web_point(h: &Harness, n: usize, seed: u8) -> (Vec<ChunkId>, Vec<Bytes>) {
    let (ids, sealed) = stored(h, n, seed).await;
    h.storage.readers("web", &["host-a", "host-r"]);
    h.storage.point("web", "p1", &ids);
    (ids, sealed)
}

/// Sends a raw FETCH (finishing the stream) and reads how the answer starts.
async fn raw_fetch(conn: &quinn::Connection, bytes: &[u8]) -> Result<FetchAnswer, String> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let read = fetch::read_fetch_answer(&mut recv);
    match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

fn assert_rejected(err: &UploadError, code: ErrorCode, needle: &str) {
    assert_eq!(err.code(), Some(code), "{err}");
    assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
    assert_eq!(err.is_transient(), code.is_transient(), "{err}");
}

#[tokio::test]
async fn fetch_returns_exactly_the_stored_sealed_bytes_in_request_order() {
    let (logs, _guard) = capture_logs();
    let h = Harness::start().await;
    let (ids, sealed) = web_point(&h, 5, 1).await;
    let up = h.uploader("host-a").await;

    let got = up.fetch("web", "p1", &ids).await.unwrap();
    assert_eq!(got, sealed);
    // any order, repeats included
    let got = up
        .fetch("web", "p1", &[ids[3], ids[0], ids[3]])
        .await
        .unwrap();
    assert_eq!(
        got,
        vec![sealed[3].clone(), sealed[0].clone(), sealed[3].clone()]
    );
    // the entitlement is asked for once per connection and point, as the gateway's host
    assert_eq!(h.storage.calls(), 1);
    let call = h.storage.calls.lock().unwrap()[0].clone();
    assert_eq!(
        (
            call.vm.as_str(),
            call.point.as_str(),
            call.host_name.as_str()
        ),
        ("web", "p1", "host-a")
    );

    // the recovery host reads the same point
    let rec = h.uploader("host-r").await;
    assert_eq!(
        rec.fetch("web", "p1", &ids[1..2]).await.unwrap(),
        sealed[1..2]
    );
    assert_eq!(h.storage.calls.lock().unwrap()[1].host_name, "host-r");

    // the gateway never writes on this path: the store holds what it held
    for (id, s) in ids.iter().zip(&sealed) {
        assert_eq!(h.store.get_chunk(id).await.unwrap(), *s);
    }
    up.ping().await.unwrap();
    up.close();
    rec.close();
    h.stop().await;
    assert_eq!(warnings(&logs), Vec::<String>::new());
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("fetch served"), "{text}");
}

#[tokio::test]
async fn full_batches_run_concurrently_and_ask_storage_writer_once() {
    let h = Harness::start().await;
    let n = 4 * MAX_FETCH_COUNT as usize;
    let (ids, sealed) = web_point(&h, n, 2).await;
    let up = h.uploader("host-r").await;
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for batch in 0..ids.len().div_ceil(MAX_FETCH_COUNT as usize) {
        let (up, ids) = (up.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let from = batch * MAX_FETCH_COUNT as usize;
            let to = (from + MAX_FETCH_COUNT as usize).min(ids.len());
            up.fetch("web", "p1", &ids[from..to]).await
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap().unwrap());
    }
    assert_eq!(got, sealed);
    // concurrent FETCHes of one point wait for one PointChunks call
    assert_eq!(h.storage.calls(), 1);

    // more than a batch is refused locally
    let err = up.fetch("web", "p1", &ids[..65]).await.unwrap_err();
    assert!(matches!(err, UploadError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("fetch count 65"), "{err}");
    h.stop().await;
}

#[tokio::test]
async fn a_chunk_outside_the_point_is_not_entitled_and_nothing_is_sent() {
    let (logs, _guard) = capture_logs();
    let h = Harness::start().await;
    let (ids, _) = web_point(&h, 3, 3).await;
    // stored, but referenced only by another VM's point
    let (other, _) = stored(&h, 1, 4).await;
    h.storage.readers("db", &["host-b"]);
    h.storage.point("db", "p9", &other);

    let up = h.uploader("host-a").await;
    let err = up
        .fetch("web", "p1", &[ids[0], other[0], ids[1]])
        .await
        .unwrap_err();
    let short = hex::encode(&other[0][..8]);
    assert_rejected(&err, ErrorCode::NotEntitled, &short);
    assert!(err.to_string().contains("vm web"), "{err}");

    // the answer is the ERROR frame itself: no FRD1, no byte of any chunk before it
    let (conn, local) = h.raw_with_addr("host-a").await;
    let bytes = fetch::encode_fetch("web", "p1", &[ids[2], other[0]]).unwrap();
    match raw_fetch(&conn, &bytes).await {
        Ok(FetchAnswer::Error(e)) => {
            assert_eq!(e.code, ErrorCode::NotEntitled.as_u32());
            assert!(e.message.contains(&short), "{}", e.message);
        }
        other => panic!("expected NOT_ENTITLED, got {other:?}"),
    }
    // the refusal was logged with who asked for what
    let warned = warnings(&logs);
    let refused: Vec<_> = warned
        .iter()
        .filter(|l| l.contains("fetch refused"))
        .collect();
    assert_eq!(refused.len(), 2, "{warned:#?}");
    let line = refused[1];
    for field in [
        format!("peer={local}"),
        "host=host-a".into(),
        "vm=web".into(),
        "point=p1".into(),
        "code=NotEntitled".into(),
        format!("error=chunk {short}"),
    ] {
        assert!(line.contains(&field), "{field} not in {line}");
    }
    // the connection goes on serving entitled chunks
    assert_eq!(up.fetch("web", "p1", &ids[..1]).await.unwrap().len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn hosts_storage_writer_refuses_are_denied() {
    let h = Harness::start().await;
    let (ids, _) = web_point(&h, 2, 5).await;
    let up = h.uploader("host-b").await;
    let err = up.fetch("web", "p1", &ids).await.unwrap_err();
    assert_rejected(&err, ErrorCode::Denied, "may not read the chunks of vm web");
    assert!(err.to_string().contains("point p1 of vm web"), "{err}");

    let owner = h.uploader("host-a").await;
    let err = owner.fetch("web", "p-gone", &ids).await.unwrap_err();
    assert_rejected(&err, ErrorCode::Denied, "not found");
    // refusals are not remembered: each is asked again
    let err = up.fetch("web", "p1", &ids).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied));
    assert_eq!(h.storage.calls(), 3);
    up.ping().await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_service_certificate_is_not_a_host() {
    let h = Harness::start().await;
    let (ids, _) = web_point(&h, 1, 6).await;
    let cfg = h.client_config(Identity::Service("ferry".into()));
    let up = Uploader::connect(h.addr, cfg).await.unwrap();
    let err = up.fetch("web", "p1", &ids).await.unwrap_err();
    assert_rejected(&err, ErrorCode::NotHost, "not a host");
    assert_eq!(h.storage.calls(), 0);
    up.ping().await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn storage_writer_unreachable_is_transient() {
    let h = Harness::start_with(false).await;
    let (ids, _) = stored(&h, 1, 7).await;
    let up = h.uploader("host-a").await;
    let err = up.fetch("web", "p1", &ids).await.unwrap_err();
    assert_rejected(&err, ErrorCode::Unavailable, "storage-writer");
    assert!(err.is_transient());
    h.stop().await;
}

#[tokio::test]
async fn a_referenced_chunk_missing_from_the_store_is_internal() {
    let h = Harness::start().await;
    let (ids, _) = stored(&h, 2, 8).await;
    let ghost = [0x5a; 32];
    h.storage.readers("web", &["host-a"]);
    h.storage.point("web", "p1", &[ids[0], ids[1], ghost]);
    let up = h.uploader("host-a").await;
    // missing first: an ERROR frame, before any data
    let err = up.fetch("web", "p1", &[ghost, ids[0]]).await.unwrap_err();
    assert_rejected(&err, ErrorCode::Internal, "5a5a5a5a5a5a5a5a");
    assert!(err.to_string().contains("not in the store"), "{err}");
    // missing after data went out: the stream is reset with the code
    let err = up
        .fetch("web", "p1", &[ids[0], ids[1], ghost])
        .await
        .unwrap_err();
    assert!(matches!(err, UploadError::Reset(5)), "{err}");
    assert_eq!(err.code(), Some(ErrorCode::Internal));
    assert!(!err.is_transient());
    up.ping().await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_store_failure_is_unavailable_before_and_after_the_data() {
    let faulty = Arc::new(UnreliableStore::new(Arc::new(InMemory::new())));
    let inner: Arc<dyn ObjectStore> = faulty.clone();
    let h = Harness::start_with_store(Store::from_object_store(inner, "memory://faulty")).await;
    let (ids, sealed) = web_point(&h, 3, 9).await;
    let up = h.uploader("host-a").await;

    faulty.fail_nth_get(1);
    let err = up.fetch("web", "p1", &ids).await.unwrap_err();
    assert_rejected(&err, ErrorCode::Unavailable, "store");
    assert!(err.is_transient());

    faulty.fail_nth_get(2);
    let err = up.fetch("web", "p1", &ids).await.unwrap_err();
    assert!(matches!(err, UploadError::Reset(4)), "{err}");
    assert!(err.is_transient());
    // and a retry succeeds
    assert_eq!(up.fetch("web", "p1", &ids).await.unwrap(), sealed);
    h.stop().await;
}

#[tokio::test]
async fn latest_is_asked_again_when_it_moved() {
    let h = Harness::start().await;
    let (old, old_sealed) = stored(&h, 2, 10).await;
    let (new, new_sealed) = stored(&h, 2, 11).await;
    h.storage.readers("web", &["host-r"]);
    h.storage.point("web", "latest", &old);
    let up = h.uploader("host-r").await;
    assert_eq!(up.fetch("web", "latest", &old).await.unwrap(), old_sealed);
    // a newer point was committed: its chunks are fetched under "latest" as well
    h.storage.point("web", "latest", &new);
    assert_eq!(up.fetch("web", "latest", &new).await.unwrap(), new_sealed);
    assert_eq!(h.storage.calls(), 2);
    // a chunk in neither is refused after one more question
    let err = up.fetch("web", "latest", &[[1; 32]]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotEntitled), "{err}");
    assert_eq!(h.storage.calls(), 3);
    h.stop().await;
}

fn reseal(buf: &mut [u8]) {
    let n = buf.len() - 32;
    let sum = blake3::hash(&buf[..n]);
    buf[n..].copy_from_slice(sum.as_bytes());
}

/// Where the vm length of a FETCH for vm "web" starts, and the fields after it.
const VM_LEN_AT: usize = 8;
const POINT_LEN_AT: usize = VM_LEN_AT + 2 + 3;
const COUNT_AT: usize = POINT_LEN_AT + 2 + 2;

#[tokio::test]
async fn hostile_fetch_frames_get_error_frames_and_the_gateway_keeps_serving() {
    let (logs, _guard) = capture_logs();
    let h = Harness::start().await;
    let (ids, sealed) = web_point(&h, 2, 12).await;
    let conn = h.raw("host-a").await;
    let good = fetch::encode_fetch("web", "p1", &ids).unwrap();
    let with = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        reseal(&mut b);
        b
    };

    let mut cases: Vec<(Vec<u8>, ErrorCode, &str)> = vec![
        (with(0, b"FRF9"), ErrorCode::BadFrame, "bad magic"),
        (
            with(4, &9u16.to_le_bytes()),
            ErrorCode::BadFrame,
            "version 9",
        ),
        (
            with(6, &1u16.to_le_bytes()),
            ErrorCode::BadFrame,
            "flags 0x0001",
        ),
        (
            with(VM_LEN_AT, &0u16.to_le_bytes()),
            ErrorCode::BadFrame,
            "vm name length 0",
        ),
        (
            with(VM_LEN_AT, &129u16.to_le_bytes()),
            ErrorCode::BadFrame,
            "vm name length 129",
        ),
        (
            with(POINT_LEN_AT, &0u16.to_le_bytes()),
            ErrorCode::BadFrame,
            "point id length 0",
        ),
        (
            with(COUNT_AT, &0u32.to_le_bytes()),
            ErrorCode::BadFrame,
            "fetch count 0",
        ),
        (
            with(COUNT_AT, &65u32.to_le_bytes()),
            ErrorCode::BadFrame,
            "fetch count 65",
        ),
        (
            with(COUNT_AT, &u32::MAX.to_le_bytes()),
            ErrorCode::BadFrame,
            "fetch count 4294967295",
        ),
    ];
    let mut bad_sum = good.clone();
    let last = bad_sum.len() - 1;
    bad_sum[last] ^= 0x55;
    cases.push((bad_sum, ErrorCode::Checksum, "fetch checksum mismatch"));
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"more");
    cases.push((
        trailing,
        ErrorCode::BadFrame,
        "data after the fetch request",
    ));
    for cut in [2, 5, 9, 14, 30, good.len() - 1] {
        cases.push((good[..cut].to_vec(), ErrorCode::BadFrame, "stream ended"));
    }
    let count = cases.len();
    for (bytes, code, needle) in cases {
        assert_error(&exchange(&conn, &bytes).await, code, needle);
    }

    // nothing reached storage-writer, every refusal was logged, the connection still works
    assert_eq!(h.storage.calls(), 0);
    let warned = warnings(&logs);
    let rejected = warned
        .iter()
        .filter(|l| l.contains("fetch refused") || l.contains("stream rejected"))
        .count();
    assert_eq!(rejected, count, "{warned:#?}");
    let out = exchange(&conn, &frame::MAGIC_PING).await;
    assert!(matches!(out, Outcome::Frame(Response::Pong(_))), "{out:?}");
    let up = h.uploader("host-a").await;
    assert_eq!(up.fetch("web", "p1", &ids).await.unwrap(), sealed);
    h.stop().await;
}
