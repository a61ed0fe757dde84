//! Merging shipped logs into block maps: exactness against replay, commits after a merge,
//! the background merger, retention with merged maps, interrupted and failed merges. Real
//! `.hrl` files (`ferry_disk::hrl::HrlWriter`), a local-filesystem store and `redis-server`.
use std::sync::Arc;

use ferry_model::{Consistency, CycleKind};
use ferry_proto::common::v1::{Disk, ShippedLog};
use ferry_proto::storage::v1::{
    BlockEntry, BlockHashesRequest, CommitDisk, CommitPointRequest, MaterializeDiskRequest,
};
use ferry_storage_writer::{Writer, WriterError};
use ferry_store::object_store::ObjectStore;
use ferry_store::{ChunkId, Store, UnreliableStore, chunk_id, chunk_key, is_zero, merged_key};
use tokio_util::sync::CancellationToken;

mod common;
use common::*;

/// Ten full blocks and a partial eleventh (a multiple of 512).
const VSIZE: u64 = 10 * BS as u64 + 12 * 1024;

async fn env() -> Env {
    env_with(VSIZE, local_store).await
}

/// A recognisable, non-zero pattern.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn disk_desc() -> Disk {
    Disk {
        id: DISK.into(),
        path: format!("/vms/{DISK}.raw"),
        format: "raw".into(),
        subformat: String::new(),
        virtual_size: VSIZE,
        logical_sector_size: 512,
        ..Disk::default()
    }
}

fn request(
    blocks: &[(u64, ChunkId)],
    full: bool,
    logs: Vec<ShippedLog>,
    token: u64,
) -> CommitPointRequest {
    CommitPointRequest {
        vm: VM.into(),
        cycle_id: uuid::Uuid::new_v4().to_string(),
        kind: if full {
            CycleKind::Initial
        } else {
            CycleKind::Delta
        }
        .into(),
        consistency: Consistency::Crash.into(),
        disks: vec![CommitDisk {
            disk: Some(disk_desc()),
            block_size: BS,
            blocks: blocks
                .iter()
                .map(|(i, c)| BlockEntry {
                    index: *i,
                    chunk: c.to_vec(),
                })
                .collect(),
            zeroed: vec![],
            logs: vec![],
            full,
            shipped_logs: logs,
        }],
        fencing_tokens: [(DISK.to_string(), token)].into_iter().collect(),
        host: "h1".into(),
        epoch: 0,
        base_point: String::new(),
        cut_id: String::new(),
    }
}

impl Env {
    /// The source disk's block `index` as the agent reads it (the last one is short).
    fn block_of(&self, index: u64) -> &[u8] {
        let off = (index * u64::from(BS)) as usize;
        let end = (off + BSU).min(self.disk.len());
        &self.disk[off..end]
    }

    /// The block map the source disk has now: keyed hashes of its non-zero blocks.
    fn expected_map(&self) -> Vec<(u64, ChunkId)> {
        (0..VSIZE.div_ceil(u64::from(BS)))
            .filter(|&i| !is_zero(self.block_of(i)))
            .map(|i| (i, chunk_id(&self.key, self.block_of(i))))
            .collect()
    }

    /// The initial point: a full map of blocks 0, 3 and the partial last block 10.
    async fn initial(&mut self) {
        let last = (VSIZE - 10 * u64::from(BS)) as usize;
        let mut entries = Vec::new();
        for (index, data) in [
            (0u64, pattern(1, BSU)),
            (3, pattern(2, BSU)),
            (10, pattern(3, last)),
        ] {
            let off = (index * u64::from(BS)) as usize;
            self.disk[off..off + data.len()].copy_from_slice(&data);
            entries.push((index, self.put(&data).await));
        }
        let p = self
            .writer
            .commit_point(request(&entries, true, vec![], self.token))
            .await
            .unwrap();
        assert_eq!(p.seq, 1);
    }

    async fn delta(&self, logs: Vec<ShippedLog>) -> u64 {
        self.writer
            .commit_point(request(&[], false, logs, self.token))
            .await
            .unwrap()
            .seq
    }

    async fn block_map(&self, point: &str) -> Vec<(u64, ChunkId)> {
        let req = BlockHashesRequest {
            vm: VM.into(),
            point: point.into(),
            disk_id: DISK.into(),
            omit_lost: false,
        };
        let map = self.writer.block_map(&req).await.unwrap();
        map.entries.into_iter().collect()
    }

    async fn materialize(&self, point: &str, name: &str) -> Vec<u8> {
        let out = self.path(name);
        self.writer
            .materialize_disk(
                MaterializeDiskRequest {
                    vm: VM.into(),
                    point: point.into(),
                    disk_id: DISK.into(),
                    target_path: out.display().to_string(),
                    format: "raw".into(),
                    subformat: String::new(),
                },
                CancellationToken::new(),
            )
            .await
            .unwrap();
        let bytes = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        bytes
    }

    async fn manifest(&self, seq: u64) -> ferry_store::PointManifest {
        self.store.get_point(VM, &seq.to_string()).await.unwrap()
    }

    fn spool_files(&self) -> usize {
        std::fs::read_dir(self.path("spool")).unwrap().count()
    }
}

/// Writes that cross block boundaries, rewrite earlier writes, zero a whole block, touch an
/// absent block and the short last block.
fn writes(round: u8) -> Vec<(u64, Vec<u8>)> {
    let bs = u64::from(BS);
    match round {
        0 => vec![
            (bs - 4096, pattern(10, 8192)),        // blocks 0 and 1 (1 was absent)
            (5 * bs + 512, pattern(11, 3 * 4096)), // absent block 5
            (10 * bs + 1024, pattern(12, 2048)),   // the short last block
        ],
        1 => vec![
            (3 * bs, vec![0; BSU]),         // block 3 becomes all zero
            (bs - 2048, pattern(13, 1024)), // over round 0's write
            (5 * bs, pattern(14, 2 * BSU)), // blocks 5 and 6 whole
        ],
        _ => vec![
            (6 * bs + 100 * 512, pattern(15, 512)),
            (6 * bs + 100 * 512, pattern(16, 1024)), // later write in the same log wins
            (8 * bs, pattern(17, 4096)),
            (VSIZE - 512, pattern(18, 512)), // the disk's last sector
        ],
    }
}

#[tokio::test]
async fn merged_map_equals_applying_the_logs() {
    let mut e = env().await;
    e.initial().await;
    let mut snapshots = vec![(1u64, e.disk.clone(), e.expected_map())];
    let mut shipped = Vec::new();
    for round in 0..3u8 {
        let log = e.log(&writes(round)).await;
        shipped.push(log.clone());
        let seq = e.delta(vec![log]).await;
        snapshots.push((seq, e.disk.clone(), e.expected_map()));
    }
    let latest = e.manifest(4).await;
    assert_eq!(
        latest.disks[0].logs.len(),
        3,
        "three logs pending before a merge"
    );

    // Replay only (no merged map yet): the source's bytes.
    let replayed = e.materialize("latest", "replayed.raw").await;
    assert!(replayed == e.disk, "replay differs from the source");
    assert!(e.store.get_merged(VM, 4).await.unwrap().is_none());

    let merged = e
        .writer
        .merge_point(VM, "latest", &CancellationToken::new())
        .await
        .unwrap()
        .expect("a point with logs merges");
    assert_eq!((merged.seq, merged.disks[0].logs.len()), (4, 3));
    assert_eq!(
        e.store.get_merged(VM, 4).await.unwrap(),
        Some(merged.clone())
    );
    // Merging again returns the recorded map.
    let again = e
        .writer
        .merge_point(VM, "4", &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(again, Some(merged.clone()));

    // Block hashes are the keyed hashes of the expected blocks; zero blocks are absent.
    assert_eq!(e.block_map("latest").await, e.expected_map());
    assert!(!e.block_map("latest").await.iter().any(|(i, _)| *i == 3));
    // Materialised from the merged map: identical bytes to replay.
    let from_merged = e.materialize("latest", "merged.raw").await;
    assert!(
        from_merged == replayed,
        "merged materialise differs from replay"
    );
    assert_eq!(e.spool_files(), 0, "spooled logs are removed");

    // Older points merge on demand when their hashes are asked for, each as of itself.
    for (seq, bytes, map) in &snapshots {
        assert_eq!(&e.block_map(&seq.to_string()).await, map, "point {seq}");
        assert!(
            &e.materialize(&seq.to_string(), "old.raw").await == bytes,
            "point {seq}"
        );
    }
    assert!(
        e.store.get_merged(VM, 1).await.unwrap().is_none(),
        "no logs, no merged map"
    );
    assert!(e.store.get_merged(VM, 2).await.unwrap().is_some());

    // Merged points are read without their logs: with every log descriptor gone they still
    // materialise. (Not the log's chunks: a piece of a log may be the very same chunk as a
    // merged block.)
    for log in &shipped {
        let key = format!("logs/{DISK}/{}.json", hex(&log.unique_id));
        e.store.delete(&key).await.unwrap();
    }
    for (seq, bytes, _) in &snapshots[1..] {
        assert!(
            &e.materialize(&seq.to_string(), "no-logs.raw").await == bytes,
            "point {seq}"
        );
    }

    // Other output formats from the merged map read back the same.
    let vhdx = e.path("merged.vhdx");
    e.writer
        .materialize_disk(
            MaterializeDiskRequest {
                vm: VM.into(),
                point: "latest".into(),
                disk_id: DISK.into(),
                target_path: vhdx.display().to_string(),
                format: "vhdx".into(),
                subformat: String::new(),
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
    let dev = ferry_disk::open(&vhdx).unwrap();
    let mut buf = vec![0u8; VSIZE as usize];
    dev.read_at(0, &mut buf).unwrap();
    assert!(buf == e.disk, "vhdx from the merged map differs");
}

#[tokio::test]
async fn commits_after_a_merge_list_only_newer_logs() {
    let mut e = env().await;
    e.initial().await;
    let l1 = e.log(&writes(0)).await;
    e.delta(vec![l1]).await;
    let l2 = e.log(&writes(1)).await;
    e.delta(vec![l2]).await;
    let m3 = e
        .writer
        .merge_point(VM, "latest", &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m3.seq, 3);

    // Point 4 bases on the merged map of point 3 and lists only its own log.
    let l3 = e.log(&writes(2)).await;
    let p4 = e
        .writer
        .commit_point(request(&[], false, vec![l3.clone()], e.token))
        .await
        .unwrap();
    let m4 = e.manifest(p4.seq).await;
    let key3 = format!("logs/{DISK}/{}.json", hex(&l3.unique_id));
    assert_eq!(m4.disks[0].logs, [key3]);
    assert_eq!(m4.disks[0].pages, m3.disks[0].pages);
    assert_eq!(p4.disks[0].pending_logs, 1);
    // Not merged yet: merged base + one log replayed.
    assert!(e.materialize("latest", "p4.raw").await == e.disk);
    assert_eq!(e.block_map("latest").await, e.expected_map());

    // Block hashes merged point 4 on demand. The agent ships log 3 again in a new cycle (it
    // could not tell its commit landed): merged already, it is not listed again...
    assert!(e.store.get_merged(VM, 4).await.unwrap().is_some());
    let mut retry = request(&[], false, vec![l3.clone()], e.token);
    retry.cycle_id = "cycle-5".into();
    let first = e.writer.commit_point(retry.clone()).await.unwrap();
    assert_eq!(first.disks[0].pending_logs, 0);
    assert!(e.materialize("latest", "p5.raw").await == e.disk);
    // ...and retrying that very cycle returns its point.
    let second = e.writer.commit_point(retry).await.unwrap();
    assert_eq!((first.seq, second.seq), (5, 5));
    assert_eq!(e.writer.list_points(VM).await.unwrap().len(), 5);

    // A patch over pending logs merges them first: the patch wins, nothing is replayed over it.
    let l4 = e.log(&[(2 * u64::from(BS), pattern(20, 4096))]).await;
    e.delta(vec![l4]).await;
    let patched = pattern(21, BSU);
    let id = e.put(&patched).await;
    e.disk[2 * BSU..3 * BSU].copy_from_slice(&patched);
    let p8 = e
        .writer
        .commit_point(request(&[(2, id)], false, vec![], e.token))
        .await
        .unwrap();
    assert!(e.manifest(p8.seq).await.disks[0].logs.is_empty());
    assert!(e.store.get_merged(VM, p8.seq - 1).await.unwrap().is_some());
    assert!(e.materialize("latest", "p8.raw").await == e.disk);
    assert_eq!(e.block_map("latest").await, e.expected_map());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits (bounded) until point `seq` has a merged map.
async fn wait_merged(store: &Store, seq: u64) {
    for _ in 0..3000 {
        if store.get_merged(VM, seq).await.unwrap().is_some() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("point {seq} was never merged");
}

#[tokio::test]
async fn background_merger_merges_new_points_and_resumes_after_restart() {
    let mut e = env().await;
    e.initial().await;
    // Committed while no merger runs (a storage-writer that stopped before merging).
    let l1 = e.log(&writes(0)).await;
    e.delta(vec![l1]).await;

    let stop = CancellationToken::new();
    let merger = e.writer.spawn_merger(stop.clone());
    // At start it merges the newest point of every vm that lacks a merged map.
    wait_merged(&e.store, 2).await;
    // After a commit with logs it merges the new point.
    let l2 = e.log(&writes(1)).await;
    let seq = e.delta(vec![l2]).await;
    wait_merged(&e.store, seq).await;
    stop.cancel();
    merger.await.unwrap();
    assert_eq!(e.block_map("latest").await, e.expected_map());
    assert!(e.materialize("latest", "bg.raw").await == e.disk);

    // A new writer over the same store (a restart) picks up an unmerged newest point.
    let l3 = e.log(&writes(2)).await;
    let seq = e.delta(vec![l3]).await;
    let restarted = Writer::new(e.store.clone(), e.coord.clone(), e.key.clone())
        .with_spool_dir(e.path("spool"));
    let stop = CancellationToken::new();
    let merger = restarted.spawn_merger(stop.clone());
    wait_merged(&e.store, seq).await;
    stop.cancel();
    merger.await.unwrap();
    // Its next commit bases on that merge.
    let l4 = e.log(&[(7 * u64::from(BS), pattern(30, 8192))]).await;
    let p = restarted
        .commit_point(request(&[], false, vec![l4], e.token))
        .await
        .unwrap();
    assert_eq!(p.disks[0].pending_logs, 1);
    assert_eq!(e.block_map("latest").await, e.expected_map());
}

#[tokio::test]
async fn retention_keeps_what_merged_maps_reference() {
    let mut e = env().await;
    e.initial().await;
    let first_map = e.expected_map();
    let l1 = e.log(&writes(0)).await;
    e.delta(vec![l1.clone()]).await;
    let l2 = e.log(&writes(1)).await;
    e.delta(vec![l2.clone()]).await;
    e.writer
        .merge_point(VM, "latest", &CancellationToken::new())
        .await
        .unwrap();
    let l3 = e.log(&writes(2)).await;
    let seq = e.delta(vec![l3.clone()]).await;
    let merged = e
        .writer
        .merge_point(VM, "latest", &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(merged.seq, seq);

    // Everything but the newest point is past a zero window (points are at least 1 ms old).
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let zero = std::time::Duration::ZERO;
    let out = e.writer.run_retention(VM, zero, zero).await.unwrap();
    assert_eq!(out.points_pruned, 3);
    assert_eq!(
        e.store.merged_seqs(VM).await.unwrap(),
        [seq],
        "pruned points' merged maps go"
    );
    // A merged map recorded for a point pruned while it was being merged is removed too.
    let stray = ferry_store::MergedManifest {
        seq: 2,
        ..merged.clone()
    };
    e.store
        .put_if_absent(
            &merged_key(VM, 2),
            serde_json::to_vec(&stray).unwrap().into(),
        )
        .await
        .unwrap();
    // Two runs: unreferenced objects are condemned, then deleted.
    e.writer.run_retention(VM, zero, zero).await.unwrap();
    let out = e.writer.run_retention(VM, zero, zero).await.unwrap();
    assert_eq!(out.points_pruned, 0);
    assert_eq!(e.store.merged_seqs(VM).await.unwrap(), [seq]);

    // Collected: descriptors of logs only pruned points listed, and a base block every later
    // map replaced (block 3, zeroed by log 2).
    for l in [&l1, &l2] {
        let key = format!("logs/{DISK}/{}.json", hex(&l.unique_id));
        assert!(
            e.store.get(&key).await.unwrap().is_none(),
            "{key} collected"
        );
    }
    let old_block3 = first_map.iter().find(|(i, _)| *i == 3).unwrap().1;
    assert!(
        e.store
            .get(&chunk_key(&old_block3))
            .await
            .unwrap()
            .is_none()
    );
    // Kept: the newest point's pages (the merged map of point 3) with its log, and its own
    // merged map — both ways of reading it still give the source's bytes.
    assert!(e.materialize("latest", "kept-merged.raw").await == e.disk);
    assert_eq!(e.block_map("latest").await, e.expected_map());
    e.store.delete_merged(VM, seq).await.unwrap();
    assert!(e.materialize("latest", "kept-replay.raw").await == e.disk);
    // Merging again after the collection reproduces the same map.
    let again = e
        .writer
        .merge_point(VM, "latest", &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, merged);
}

#[tokio::test]
async fn failed_merge_leaves_nothing_a_reader_uses() {
    let faulty: std::sync::OnceLock<Arc<UnreliableStore>> = Default::default();
    let mut e = env_with(VSIZE, |dir| {
        let inner = local_store(dir).object_store().clone();
        let u = Arc::new(UnreliableStore::new(inner));
        let _ = faulty.set(Arc::clone(&u));
        Store::from_object_store(u as Arc<dyn ObjectStore>, "unreliable")
    })
    .await;
    let faulty = faulty.get().unwrap();
    e.initial().await;
    for round in 0..3 {
        let log = e.log(&writes(round)).await;
        e.delta(vec![log]).await;
    }
    // The third put of the merge fails (a crash or an outage half-way through the blocks).
    faulty.fail_nth_put(3);
    let err = e
        .writer
        .merge_point(VM, "latest", &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, WriterError::Store(_)), "{err}");
    assert_eq!(faulty.pending_faults(), 0);
    assert!(e.store.get_merged(VM, 4).await.unwrap().is_none());
    assert_eq!(e.spool_files(), 0);
    // Readers replay; block hashes merge again from scratch and are exact.
    assert!(e.materialize("latest", "after-fault.raw").await == e.disk);
    assert_eq!(e.block_map("latest").await, e.expected_map());
    assert!(e.store.get_merged(VM, 4).await.unwrap().is_some());
}

#[tokio::test(flavor = "current_thread")]
async fn cancelled_merge_leaves_nothing_a_reader_uses() {
    let faulty: std::sync::OnceLock<Arc<UnreliableStore>> = Default::default();
    let mut e = env_with(VSIZE, |dir| {
        let inner = local_store(dir).object_store().clone();
        let u = Arc::new(UnreliableStore::new(inner));
        let _ = faulty.set(Arc::clone(&u));
        Store::from_object_store(u as Arc<dyn ObjectStore>, "unreliable")
    })
    .await;
    let faulty = faulty.get().unwrap();
    e.initial().await;
    // One log rewriting every block: many block writes for the merge to be cancelled among.
    let all: Vec<(u64, Vec<u8>)> = (0..10u64)
        .map(|i| (i * u64::from(BS) + 512, pattern(40 + i as u8, 4096)))
        .collect();
    let log = e.log(&all).await;
    e.delta(vec![log]).await;

    let cancel = CancellationToken::new();
    let start = faulty.puts();
    let merge = e.writer.merge_point(VM, "latest", &cancel);
    let cancel_after_two_puts = async {
        while faulty.puts() < start + 2 {
            tokio::task::yield_now().await;
        }
        cancel.cancel();
        std::future::pending::<()>().await
    };
    let res = tokio::select! {
        res = merge => res,
        () = cancel_after_two_puts => unreachable!(),
    };
    assert!(matches!(res, Err(WriterError::Cancelled)), "{res:?}");
    assert!(e.store.get_merged(VM, 2).await.unwrap().is_none());
    assert_eq!(e.spool_files(), 0);
    assert!(e.materialize("latest", "after-cancel.raw").await == e.disk);
    assert_eq!(e.block_map("latest").await, e.expected_map());
}

#[tokio::test]
async fn a_corrupt_log_is_an_error_naming_it() {
    let mut e = env().await;
    e.initial().await;
    let log = e.log(&writes(0)).await;
    e.delta(vec![log.clone()]).await;
    // A piece of the shipped log lost from the store: the error names the log.
    let piece: ChunkId = log.chunks[0].clone().try_into().unwrap();
    e.store.delete(&chunk_key(&piece)).await.unwrap();
    let err = e
        .writer
        .merge_point(VM, "latest", &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&hex(&log.unique_id)), "{err}");
    assert!(e.store.get_merged(VM, 2).await.unwrap().is_none());
    let req = BlockHashesRequest {
        vm: VM.into(),
        point: "latest".into(),
        disk_id: DISK.into(),
        omit_lost: false,
    };
    assert!(e.writer.block_map(&req).await.is_err());
    // The previous point is untouched.
    assert_eq!(e.block_map("1").await.len(), 3);
    let first_piece = std::fs::read(e.path("disk.00000001.hrl")).unwrap();
    e.put(&first_piece[..BSU.min(first_piece.len())]).await;
    assert_eq!(e.block_map("latest").await, e.expected_map());

    // A log whose bytes are not a valid MS-HRL file: the error names the log's descriptor.
    let mut garbage = e.log(&writes(1)).await;
    let junk = pattern(99, 8192);
    garbage.chunks = vec![e.put(&junk).await.to_vec()];
    garbage.length = junk.len() as u64;
    let seq = e.delta(vec![garbage.clone()]).await;
    let err = e
        .writer
        .merge_point(VM, &seq.to_string(), &CancellationToken::new())
        .await
        .unwrap_err();
    let key = format!("logs/{DISK}/{}.json", hex(&garbage.unique_id));
    assert!(matches!(err, WriterError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains(&key), "{err}");
    assert_eq!(e.spool_files(), 0);
}

/// Timing, not a check: `cargo test -p ferry-storage-writer --test merge -- --ignored
/// --nocapture merge_timing`. A 64 MiB disk in 1 MiB blocks, 50 logs of 200 random 4 KiB
/// writes each (10 000 writes, 39 MiB), pending on one point: replay vs merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing, not a check: run by hand with --ignored --nocapture"]
async fn merge_timing() {
    const MIB: u64 = 1 << 20;
    let (blocks, logs, writes_per_log) = (64u64, 50usize, 200usize);
    let e = env().await;
    let disk = Disk {
        virtual_size: blocks * MIB,
        ..disk_desc()
    };
    let req = |entries: &[(u64, ChunkId)], full: bool, shipped: Vec<ShippedLog>| {
        let mut r = request(entries, full, shipped, e.token);
        r.disks[0].disk = Some(disk.clone());
        r.disks[0].block_size = MIB as u32;
        r
    };
    let mut source = vec![0u8; (blocks * MIB) as usize];
    let mut entries = Vec::new();
    for i in 0..blocks {
        let data = pattern(i as u8, MIB as usize);
        source[(i * MIB) as usize..((i + 1) * MIB) as usize].copy_from_slice(&data);
        entries.push((i, e.put(&data).await));
    }
    e.writer
        .commit_point(req(&entries, true, vec![]))
        .await
        .unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chain = uuid::Uuid::nil();
    let mut batch = Vec::new();
    for n in 0..logs {
        let path = e.path(&format!("t.{n:08}.hrl"));
        let mut w = ferry_disk::hrl::HrlWriter::create(
            &path,
            &ferry_disk::hrl::HrlOptions {
                previous_unique_id: chain,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..writes_per_log {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % (blocks * MIB / 4096)) * 4096;
            let data = pattern(x as u8, 4096);
            w.record(off, &data).unwrap();
            source[off as usize..off as usize + 4096].copy_from_slice(&data);
        }
        let header = w.close().unwrap();
        let previous = std::mem::replace(&mut chain, header.unique_id);
        let bytes = std::fs::read(&path).unwrap();
        let mut chunks = Vec::new();
        for piece in bytes.chunks(MIB as usize) {
            chunks.push(e.put(piece).await.to_vec());
        }
        batch.push(ShippedLog {
            unique_id: header.unique_id.as_bytes().to_vec(),
            previous_id: previous.as_bytes().to_vec(),
            length: bytes.len() as u64,
            chunks,
            records: writes_per_log as u64,
            write_bytes: (writes_per_log * 4096) as u64,
        });
        if batch.len() == 5 {
            e.writer
                .commit_point(req(&[], false, std::mem::take(&mut batch)))
                .await
                .unwrap();
        }
    }
    let materialize = |name: &str| {
        let out = e.path(name);
        let w = e.writer.clone();
        async move {
            let t = std::time::Instant::now();
            w.materialize_disk(
                MaterializeDiskRequest {
                    vm: VM.into(),
                    point: "latest".into(),
                    disk_id: DISK.into(),
                    target_path: out.display().to_string(),
                    format: "raw".into(),
                    subformat: String::new(),
                },
                CancellationToken::new(),
            )
            .await
            .unwrap();
            (t.elapsed(), std::fs::read(&out).unwrap())
        }
    };
    let (replay, replayed) = materialize("replay.raw").await;
    let t = std::time::Instant::now();
    e.writer
        .merge_point(VM, "latest", &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    let merge = t.elapsed();
    let (merged_t, merged) = materialize("merged.raw").await;
    assert!(replayed == source && merged == source);
    eprintln!(
        "{logs} logs x {writes_per_log} writes of 4 KiB on a {blocks} MiB disk: \
         materialise with replay {replay:?}, merge {merge:?}, materialise merged {merged_t:?}"
    );
}
