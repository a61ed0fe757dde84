//! Store, block maps and recovery points on the real local filesystem backend (and memory).

use std::sync::Arc;

use bytes::Bytes;
use ferry_model::{Consistency, CycleKind};
use ferry_store::object_store::memory::InMemory;
use ferry_store::{
    BlockMap, DiskManifest, PAGE_BLOCKS, PageRef, PointManifest, Store, StoreError,
    UnreliableStore, VaultKey, chunk_id, chunk_key, open_chunk, seal_chunk,
};

fn fs_store(dir: &tempfile::TempDir) -> Store {
    let url = format!("file://{}/store", dir.path().display());
    Store::from_url(&url).unwrap()
}

#[tokio::test]
async fn from_url_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let s = fs_store(&dir);
    assert!(s.url().starts_with("file:///"));
    assert!(dir.path().join("store").is_dir());
    Store::from_url("memory://").unwrap();
    let url = format!("file://{}/nofsync?fsync=false", dir.path().display());
    Store::from_url(&url).unwrap();
    // Cloud URLs name a bucket; their credentials come from the environment.
    for bad in [
        "s3://",
        "s3://bucket/a/../b",
        "az://vault?account_key=secret",
        "gs://vault?endpoint=http://x",
        "ftp://host/dir",
        "file://relative/dir",
        "",
        "file:///tmp/x?bogus=1",
    ] {
        let err = Store::from_url(bad).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{bad}: {err}");
    }
}

#[tokio::test]
async fn chunks_put_idempotent_get_exists() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    let key = VaultKey::generate();
    let data = vec![5u8; 65536];
    let id = chunk_id(&key, &data);
    let sealed = Bytes::from(seal_chunk(&key, &id, &data));
    assert!(!store.chunk_exists(&id).await.unwrap());
    assert!(matches!(
        store.get_chunk(&id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(store.put_chunk(&id, sealed.clone()).await.unwrap());
    assert!(!store.put_chunk(&id, sealed.clone()).await.unwrap());
    assert!(store.chunk_exists(&id).await.unwrap());
    let got = store.get_chunk(&id).await.unwrap();
    assert_eq!(open_chunk(&key, &id, &got).unwrap(), data);
    let k = chunk_key(&id);
    assert!(k.starts_with("chunks/") && k.len() == "chunks/aa/".len() + 64);
    assert_eq!(store.list("chunks").await.unwrap(), vec![k.clone()]);
    // The object is on disk where the layout says.
    assert!(dir.path().join("store").join(&k).is_file());
}

#[tokio::test]
async fn raw_key_operations() {
    let dir = tempfile::tempdir().unwrap();
    for store in [fs_store(&dir), Store::from_url("memory://").unwrap()] {
        assert_eq!(store.get("a/b").await.unwrap(), None);
        assert_eq!(
            store.list("nothing/here").await.unwrap(),
            Vec::<String>::new()
        );
        assert!(
            store
                .put_if_absent("a/b", Bytes::from_static(b"1"))
                .await
                .unwrap()
        );
        assert!(
            !store
                .put_if_absent("a/b", Bytes::from_static(b"2"))
                .await
                .unwrap()
        );
        assert_eq!(
            store.get("a/b").await.unwrap().unwrap(),
            Bytes::from_static(b"1")
        );
        store.put_if_absent("a/c", Bytes::new()).await.unwrap();
        store.put_if_absent("ab/x", Bytes::new()).await.unwrap();
        assert_eq!(store.list("a").await.unwrap(), vec!["a/b", "a/c"]);
        assert_eq!(store.list("a/").await.unwrap(), vec!["a/b", "a/c"]);
        store.delete("a/b").await.unwrap();
        store.delete("a/b").await.unwrap();
        assert_eq!(store.get("a/b").await.unwrap(), None);
        for bad in ["", "/abs", "a/../b", "a//b"] {
            assert!(store.get(bad).await.is_err(), "{bad}");
        }
    }
}

fn id(n: u64) -> [u8; 32] {
    *blake3::hash(&n.to_le_bytes()).as_bytes()
}

async fn count(store: &Store, prefix: &str) -> usize {
    store.list(prefix).await.unwrap().len()
}

#[tokio::test]
async fn block_map_rewrites_only_changed_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    let mut map = BlockMap::default();
    // Five pages with data, pages 2 and 5.. empty, one huge block index.
    for p in [0u64, 1, 3, 4] {
        for i in (0..PAGE_BLOCKS).step_by(3) {
            map.entries
                .insert(p * PAGE_BLOCKS + i, id(p * PAGE_BLOCKS + i));
        }
    }
    map.entries.insert(1 << 40, id(7));
    let v1 = store.write_block_map(&map, &[]).await.unwrap();
    assert_eq!(
        v1.iter().map(|r| r.page).collect::<Vec<_>>(),
        vec![0, 1, 3, 4, (1 << 40) / PAGE_BLOCKS]
    );
    assert_eq!(count(&store, "index").await, 5);
    assert_eq!(
        store.read_block_map(&v1).await.unwrap().entries,
        map.entries
    );

    // A small delta touching one page writes exactly one new page.
    let mut map2 = map.clone();
    map2.entries.insert(3 * PAGE_BLOCKS + 1, id(999));
    let v2 = store.write_block_map(&map2, &v1).await.unwrap();
    assert_eq!(count(&store, "index").await, 6);
    let changed: Vec<u64> = v1
        .iter()
        .zip(&v2)
        .filter(|(a, b)| a.key != b.key)
        .map(|(a, _)| a.page)
        .collect();
    assert_eq!(changed, vec![3]);
    assert_eq!(store.read_block_map(&v2).await.unwrap(), map2);
    // Unchanged map: nothing written, same refs.
    assert_eq!(store.write_block_map(&map2, &v2).await.unwrap(), v2);
    // Without `previous`, identical pages are still shared (content-addressed).
    assert_eq!(store.write_block_map(&map2, &[]).await.unwrap(), v2);
    assert_eq!(count(&store, "index").await, 6);
    // A block zeroed out of a page that then becomes empty drops the page.
    let mut map3 = map2.clone();
    map3.entries.remove(&(1 << 40));
    let v3 = store.write_block_map(&map3, &v2).await.unwrap();
    assert_eq!(v3.len(), 4);
    assert_eq!(store.read_block_map(&v3).await.unwrap(), map3);
    // Empty map: no pages.
    assert!(
        store
            .write_block_map(&BlockMap::default(), &v3)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.read_block_map(&[]).await.unwrap().entries.is_empty());
}

#[tokio::test]
async fn identical_pages_at_different_positions_are_stored_once() {
    let store = Store::from_url("memory://").unwrap();
    let mut map = BlockMap::default();
    for p in 0..4u64 {
        for i in 0..PAGE_BLOCKS {
            map.entries.insert(p * PAGE_BLOCKS + i, id(1));
        }
    }
    let refs = store.write_block_map(&map, &[]).await.unwrap();
    assert_eq!(refs.len(), 4);
    assert_eq!(count(&store, "index").await, 1);
    assert_eq!(store.read_block_map(&refs).await.unwrap(), map);
}

#[tokio::test]
async fn read_block_map_validates() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    let mut map = BlockMap::default();
    map.entries.insert(5, id(5));
    map.entries.insert(PAGE_BLOCKS + 5, id(6));
    let refs = store.write_block_map(&map, &[]).await.unwrap();
    // Out of order / duplicate page refs.
    let rev: Vec<PageRef> = refs.iter().rev().cloned().collect();
    assert!(matches!(
        store.read_block_map(&rev).await,
        Err(StoreError::Invalid { .. })
    ));
    // A page ref pointing at another page's content at the wrong position is fine only if
    // hashes match; a bad key shape is rejected before any read.
    let bad = vec![PageRef {
        page: 0,
        key: "chunks/00/xx".into(),
    }];
    assert!(matches!(
        store.read_block_map(&bad).await,
        Err(StoreError::Invalid { .. })
    ));
    // Missing page.
    let missing = vec![PageRef {
        page: 0,
        key: format!("index/ab/ab{}", "0".repeat(62)),
    }];
    assert!(matches!(
        store.read_block_map(&missing).await,
        Err(StoreError::NotFound { .. })
    ));
    // Page bytes replaced on disk: the hash check catches it.
    let path = dir.path().join("store").join(&refs[0].key);
    std::fs::write(&path, b"FIX1garbage").unwrap();
    let err = store.read_block_map(&refs).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

fn disk(id: &str, token: u64) -> DiskManifest {
    DiskManifest {
        disk_id: id.into(),
        path: format!("/vms/{id}.vhdx"),
        format: "vhdx".into(),
        subformat: "dynamic".into(),
        virtual_size: 1 << 30,
        logical_sector_size: 512,
        block_size: 1 << 20,
        pages: vec![],
        stored_blocks: 0,
        logs: vec![],
        fencing_token: token,
    }
}

fn point(vm: &str, seq: u64, tokens: &[(&str, u64)]) -> PointManifest {
    PointManifest {
        id: String::new(),
        vm: vm.into(),
        seq,
        time_ms: 1_700_000_000_000 + seq as i64,
        kind: CycleKind::Delta,
        consistency: Consistency::Crash,
        cycle_id: format!("cycle-{seq}"),
        disks: tokens.iter().map(|(d, t)| disk(d, *t)).collect(),
        host: "h1".into(),
        cut_id: String::new(),
    }
}

#[tokio::test]
async fn commit_point_sequence_conflict_and_fencing() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    assert!(store.latest_point("vm1").await.unwrap().is_none());
    assert!(store.list_points("vm1").await.unwrap().is_empty());
    // Must start at 1.
    assert!(matches!(
        store.commit_point(point("vm1", 2, &[("d1", 1)])).await,
        Err(StoreError::Conflict { .. })
    ));
    let p1 = store
        .commit_point(point("vm1", 1, &[("d1", 10), ("d2", 10)]))
        .await
        .unwrap();
    assert_eq!(p1.id, "00000000000000000001");
    // Retrying the very same commit (ambiguous failure) is fine.
    store
        .commit_point(point("vm1", 1, &[("d1", 10), ("d2", 10)]))
        .await
        .unwrap();
    // A different point at a taken seq is a conflict.
    let err = store
        .commit_point(point("vm1", 1, &[("d1", 11)]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert!(!err.is_transient());
    // Stale token on d2.
    match store
        .commit_point(point("vm1", 2, &[("d1", 10), ("d2", 9)]))
        .await
    {
        Err(StoreError::Fenced {
            disk_id,
            presented,
            latest,
        }) => {
            assert_eq!((disk_id.as_str(), presented, latest), ("d2", 9, 10));
        }
        other => panic!("expected Fenced, got {other:?}"),
    }
    // Equal or higher tokens, and new disks, are accepted.
    store
        .commit_point(point("vm1", 2, &[("d1", 10), ("d2", 12), ("d3", 1)]))
        .await
        .unwrap();
    let mut custom = point("vm1", 3, &[("d1", 11)]);
    custom.id = "6b1c3c1e-custom".into();
    store.commit_point(custom).await.unwrap();
    let mut other_cycle = point("vm1", 3, &[("d1", 11)]);
    other_cycle.cycle_id = "another".into();
    assert!(matches!(
        store.commit_point(other_cycle).await,
        Err(StoreError::Conflict { .. })
    ));

    let all = store.list_points("vm1").await.unwrap();
    assert_eq!(all.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(store.latest_point("vm1").await.unwrap().unwrap().seq, 3);
    assert_eq!(store.get_point("vm1", "latest").await.unwrap().seq, 3);
    assert_eq!(
        store
            .get_point("vm1", "00000000000000000002")
            .await
            .unwrap()
            .seq,
        2
    );
    assert_eq!(store.get_point("vm1", "1").await.unwrap().seq, 1);
    assert_eq!(
        store.get_point("vm1", "6b1c3c1e-custom").await.unwrap().seq,
        3
    );
    let err = store.get_point("vm1", "nope").await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, StoreError::NotFound { .. }) && msg.contains("vm1") && msg.contains("nope"),
        "{msg}"
    );
    assert!(matches!(
        store.get_point("vm2", "latest").await,
        Err(StoreError::NotFound { .. })
    ));
    // VMs are independent; bad names are refused.
    store
        .commit_point(point("vm2", 1, &[("d1", 1)]))
        .await
        .unwrap();
    assert!(matches!(
        store.list_points("../x").await,
        Err(StoreError::Invalid { .. })
    ));
    assert!(store.commit_point(point("a/b", 1, &[])).await.is_err());
}

#[tokio::test]
async fn recommitting_the_latest_cycle_returns_the_existing_point() {
    let store = Store::from_url("memory://").unwrap();
    let first = store
        .commit_point(point("vm", 1, &[("d", 5)]))
        .await
        .unwrap();
    // A retry of cycle-1 built after the first attempt landed: seq 2, a new time.
    let mut retry = point("vm", 2, &[("d", 5)]);
    retry.cycle_id = "cycle-1".into();
    retry.time_ms += 1000;
    assert_eq!(store.commit_point(retry.clone()).await.unwrap(), first);
    assert_eq!(store.list_points("vm").await.unwrap().len(), 1);
    // The same cycle id with other content is a new point, not a silent success.
    retry.disks[0].stored_blocks = 6;
    assert_eq!(store.commit_point(retry).await.unwrap().seq, 2);
    // Points without a cycle id are never deduplicated.
    let mut a = point("vm", 3, &[("d", 5)]);
    a.cycle_id = String::new();
    store.commit_point(a).await.unwrap();
    let mut b = point("vm", 4, &[("d", 5)]);
    b.cycle_id = String::new();
    store.commit_point(b).await.unwrap();
    assert_eq!(store.list_points("vm").await.unwrap().len(), 4);
}

#[tokio::test]
async fn list_points_orders_numerically_past_many_points() {
    let store = Store::from_url("memory://").unwrap();
    for seq in 1..=25 {
        store
            .commit_point(point("vm", seq, &[("d", seq)]))
            .await
            .unwrap();
    }
    let seqs: Vec<u64> = store
        .list_points("vm")
        .await
        .unwrap()
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(seqs, (1..=25).collect::<Vec<_>>());
}

#[tokio::test]
async fn concurrent_point_commits_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let store = fs_store(&dir);
    store
        .commit_point(point("vm", 1, &[("d", 1)]))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.commit_point(point("vm", 2, &[("d", 2 + w)])).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 1);
    assert_eq!(store.list_points("vm").await.unwrap().len(), 2);
}

#[tokio::test]
async fn unreliable_store_faults_are_transient_and_retry_safe() {
    let inner = Arc::new(InMemory::new());
    let flaky = Arc::new(UnreliableStore::new(inner));
    let store = Store::from_object_store(flaky.clone(), "memory+unreliable://");
    assert_eq!(store.url(), "memory+unreliable://");
    let key = VaultKey::generate();
    let data = vec![1u8; 4096];
    let cid = chunk_id(&key, &data);
    let sealed = Bytes::from(seal_chunk(&key, &cid, &data));

    flaky.fail_nth_put(1);
    let err = store.put_chunk(&cid, sealed.clone()).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(!store.chunk_exists(&cid).await.unwrap());
    assert!(store.put_chunk(&cid, sealed.clone()).await.unwrap());

    flaky.fail_nth_get(2);
    store.get_chunk(&cid).await.unwrap();
    assert!(store.get_chunk(&cid).await.unwrap_err().is_transient());
    store.get_chunk(&cid).await.unwrap();

    // A commit whose put landed but whose answer was lost: the retry succeeds.
    flaky.fail_nth_put_after_write(1);
    let p = point("vm", 1, &[("d", 1)]);
    assert!(
        store
            .commit_point(p.clone())
            .await
            .unwrap_err()
            .is_transient()
    );
    store.commit_point(p).await.unwrap();
    assert_eq!(store.list_points("vm").await.unwrap().len(), 1);
    assert_eq!(flaky.pending_faults(), 0);
    // Two chunk puts (one failed) and one point put; the retried commit needed no put.
    assert_eq!(flaky.puts(), 3);
    assert!(flaky.gets() >= 4);
}

#[tokio::test]
async fn a_quarantined_chunk_is_lost_until_it_is_stored_again() {
    let dir = tempfile::tempdir().unwrap();
    let s = fs_store(&dir);
    let key = VaultKey::generate();
    let block = vec![7u8; 4096];
    let id = chunk_id(&key, &block);
    let sealed = Bytes::from(seal_chunk(&key, &id, &block));
    assert!(s.put_chunk(&id, sealed.clone()).await.unwrap());
    assert!(s.lost_chunks().await.unwrap().is_empty());

    assert!(s.quarantine_chunk(&id).await.unwrap());
    assert!(!s.chunk_exists(&id).await.unwrap());
    assert!(!s.quarantine_chunk(&id).await.unwrap(), "already moved");
    let kept = dir
        .path()
        .join("store")
        .join(ferry_store::layout::quarantine_key(&id));
    assert!(kept.is_file(), "the chunk is kept as found");
    assert!(s.lost_chunks().await.unwrap().contains(&id));

    // An upload stores it again: no longer lost, and the quarantine entry goes.
    assert!(s.put_chunk(&id, sealed).await.unwrap());
    assert!(s.lost_chunks().await.unwrap().is_empty());
    assert!(!kept.exists());
}

/// Two readers of one point put and delete markers in the same folder at once: the local
/// backend removes a folder once empty (automatic cleanup), so a put can find its folder
/// gone under it. Every put must still succeed (seen in CI: "Unable to sync data to disk
/// for .../readers/db01: No such file or directory").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_survive_a_concurrent_cleanup_of_their_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("file://{}", dir.path().display());
    let store = ferry_store::Store::from_url(&url).expect("store");
    let runs: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..1000 {
                    let key = format!("readers/vm/p{}/{w}-{i}", i % 2);
                    store
                        .put_if_absent(&key, bytes::Bytes::from_static(b"1"))
                        .await
                        .unwrap_or_else(|e| panic!("put {key}: {e}"));
                    store.delete(&key).await.expect("delete");
                }
            })
        })
        .collect();
    for r in runs {
        r.await.expect("worker");
    }
}
