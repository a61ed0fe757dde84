//! Retention thinning: which points stay (synthetic times, [`select_pruned`]), and on a real
//! store (local filesystem, `redis-server`, real `.hrl` logs) that pruning points in the middle
//! — points whose merged maps later commits were based on — leaves every kept point
//! materialising exactly as before, also after collection really deleted what nothing
//! references. And a cycle that shipped nothing records a point without new index pages.
use std::collections::BTreeSet;
use std::time::Duration;

use ferry_model::{Consistency, CycleKind};
use ferry_proto::common::v1::{Disk, ShippedLog};
use ferry_proto::storage::v1::{
    BlockEntry, BlockHashesRequest, CommitDisk, CommitPointRequest, MaterializeDiskRequest,
};
use ferry_storage_writer::retention::{
    Candidate, DEFAULT_KEEP_ALL, DEFAULT_THIN_TO, RetentionPolicy, select_pruned,
};
use ferry_store::{ChunkId, chunk_id, is_zero};
use tokio_util::sync::CancellationToken;

const S: i64 = 1000;

fn policy(retention_s: u64, keep_all_s: u64, thin_to_s: u64) -> RetentionPolicy {
    RetentionPolicy {
        retention: Duration::from_secs(retention_s),
        keep_all: Duration::from_secs(keep_all_s),
        thin_to: Duration::from_secs(thin_to_s),
    }
}

/// Crash-consistent points at the given seconds, seq 1, 2, ….
fn points_at(secs: impl IntoIterator<Item = i64>) -> Vec<Candidate> {
    secs.into_iter()
        .zip(1..)
        .map(|(t, seq)| Candidate {
            seq,
            time_ms: t * S,
            app: false,
            held: false,
        })
        .collect()
}

/// The times (s) of the points that stay.
fn kept_secs(points: &[Candidate], now_s: i64, p: &RetentionPolicy) -> Vec<i64> {
    let doomed: BTreeSet<u64> = select_pruned(points, now_s * S, p).into_iter().collect();
    points
        .iter()
        .filter(|c| !doomed.contains(&c.seq))
        .map(|c| c.time_ms / S)
        .collect()
}

#[test]
fn greedy_spacing_oldest_first() {
    // A point every 2 s from 0 to 98; now 100: keep all from 80 on, thin 0..78 to 5 s.
    let points = points_at((0..50).map(|i| i * 2));
    let kept = kept_secs(&points, 100, &policy(1000, 20, 5));
    let mut want: Vec<i64> = (0..=13).map(|i| i * 6).collect(); // 0, 6, 12, … 78
    want.extend((40..50).map(|i| i * 2)); // 80 … 98
    assert_eq!(kept, want);
}

#[test]
fn app_points_stay_and_count_as_kept() {
    let mut points = points_at((0..50).map(|i| i * 2));
    for c in points
        .iter_mut()
        .filter(|c| [2, 44].contains(&(c.time_ms / S)))
    {
        c.app = true;
    }
    let kept = kept_secs(&points, 100, &policy(1000, 20, 5));
    let mut want = vec![0, 2];
    want.extend((0..6).map(|i| 8 + i * 6)); // 8, 14, … 38: 5 s after the app point at 2
    want.push(44); // app
    want.extend([50, 56, 62, 68, 74]); // after the app point at 44
    want.extend((40..50).map(|i| i * 2));
    assert_eq!(kept, want);
    // Every crash point of the thinned range is at least thin_to after the point before it.
    for w in kept.windows(2).filter(|w| w[1] < 80) {
        assert!(w[1] - w[0] >= 5 || [2, 44].contains(&w[1]), "{w:?}");
    }
}

#[test]
fn outside_the_window_goes_but_never_the_newest() {
    // Retention 60 s at now 200: points 0..=130 are out; the newest (190) is in.
    let points = points_at([0, 10, 130, 141, 150, 190]);
    assert_eq!(kept_secs(&points, 200, &policy(60, 30, 5)), [141, 150, 190]);
    // Everything out of the window but the newest, which stays whatever its age.
    let old = points_at([0, 10, 20]);
    assert_eq!(kept_secs(&old, 10_000, &policy(60, 30, 5)), [20]);
    // An app point outside the window goes too.
    let mut app = points_at([0, 100]);
    app[0].app = true;
    assert_eq!(kept_secs(&app, 120, &policy(60, 30, 5)), [100]);
    assert!(select_pruned(&[], 0, &policy(60, 30, 5)).is_empty());
}

#[test]
fn points_being_read_stay_without_changing_the_choice() {
    let plain = points_at((0..50).map(|i| i * 2));
    let p = policy(1000, 20, 5);
    let base = kept_secs(&plain, 100, &p);
    // Hold points the thinning would drop (2, 4) and one it keeps (6), and one out of the window.
    let mut held = points_at((0..50).map(|i| i * 2));
    for c in held
        .iter_mut()
        .filter(|c| [2, 4, 6].contains(&(c.time_ms / S)))
    {
        c.held = true;
    }
    let with_held = kept_secs(&held, 100, &p);
    let mut want = base.clone();
    want.extend([2, 4]);
    want.sort_unstable();
    assert_eq!(
        with_held, want,
        "held points stay, the rest is chosen as before"
    );
    let mut gone = points_at([0, 500, 990]);
    gone[0].held = true;
    assert_eq!(kept_secs(&gone, 1200, &policy(600, 20, 5)), [0, 990]);
}

#[test]
fn the_choice_is_stable_across_runs() {
    // Two hours of 1 s cycles, retention every 7 s: retention 30 min, keep all 60 s, thin to
    // 5 min. A point kept once goes only when it leaves the window.
    let p = policy(1800, 60, 300);
    let mut live: Vec<Candidate> = Vec::new();
    let mut ever_thinned_kept: BTreeSet<u64> = BTreeSet::new();
    let mut seq = 0u64;
    let mut now = 0i64;
    let mut last_run = 0i64;
    while now < 7200 {
        now += 1;
        seq += 1;
        live.push(Candidate {
            seq,
            time_ms: now * S,
            app: seq.is_multiple_of(997),
            held: false,
        });
        if now - last_run < 7 {
            continue;
        }
        last_run = now;
        let doomed: BTreeSet<u64> = select_pruned(&live, now * S, &p).into_iter().collect();
        for c in live.iter().filter(|c| doomed.contains(&c.seq)) {
            assert!(
                !ever_thinned_kept.contains(&c.seq) || c.time_ms < (now - 1800) * S,
                "point {} at {} s was kept by thinning and pruned at {now} s inside the window",
                c.seq,
                c.time_ms / S
            );
        }
        live.retain(|c| !doomed.contains(&c.seq));
        // Running again at once changes nothing.
        assert!(select_pruned(&live, now * S, &p).is_empty(), "at {now} s");
        let thinned: Vec<&Candidate> = live.iter().filter(|c| c.time_ms < (now - 60) * S).collect();
        ever_thinned_kept.extend(thinned.iter().map(|c| c.seq));
        for w in thinned.windows(2) {
            assert!(
                w[1].app || w[1].time_ms - w[0].time_ms >= 300 * S,
                "at {now} s: {:?}",
                w
            );
        }
        // Bounded: the keep-all window, one per interval of the window, the app points.
        assert!(
            live.len() <= 60 + 1800 / 300 + 2 + 3,
            "{} points",
            live.len()
        );
    }
    assert!(live.len() > 60);
}

#[test]
fn request_defaults_and_refusals() {
    let p = RetentionPolicy::from_seconds(86_400, 0, 0).unwrap();
    assert_eq!(
        (p.retention, p.keep_all, p.thin_to),
        (
            Duration::from_secs(86_400),
            DEFAULT_KEEP_ALL,
            DEFAULT_THIN_TO
        )
    );
    // The default keep-all window is at most the retention window.
    let p = RetentionPolicy::from_seconds(60, 0, 0).unwrap();
    assert_eq!(p.keep_all, Duration::from_secs(60));
    let p = RetentionPolicy::from_seconds(3600, 10, 5).unwrap();
    assert_eq!(p, policy(3600, 10, 5));
    for (r, k, t, field) in [
        (0, 0, 0, "retention_seconds"),
        (60, 61, 0, "keep_all_seconds"),
        (60, 0, 61, "thin_to_seconds"),
    ] {
        let e = RetentionPolicy::from_seconds(r, k, t)
            .unwrap_err()
            .to_string();
        assert!(e.contains(field), "{e}");
    }
}

// ---- a real store ----

mod common;
use common::*;

const VSIZE: u64 = 8 * BS as u64;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
        .collect()
}

async fn env() -> Env {
    env_with(VSIZE, local_store).await
}

impl Env {
    // `..Default::default()` covers request fields this test does not care about (there may
    // be none).
    #[allow(clippy::needless_update)]
    fn request(
        &self,
        blocks: &[(u64, ChunkId)],
        full: bool,
        logs: Vec<ShippedLog>,
        consistency: Consistency,
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
            consistency: consistency.into(),
            disks: vec![CommitDisk {
                disk: Some(Disk {
                    id: DISK.into(),
                    path: format!("/vms/{DISK}.raw"),
                    format: "raw".into(),
                    virtual_size: VSIZE,
                    logical_sector_size: 512,
                    ..Disk::default()
                }),
                block_size: BS,
                blocks: blocks
                    .iter()
                    .map(|(i, c)| BlockEntry {
                        index: *i,
                        chunk: c.to_vec(),
                    })
                    .collect(),
                full,
                shipped_logs: logs,
                ..Default::default()
            }],
            fencing_tokens: [(DISK.to_string(), self.token)].into_iter().collect(),
            ..Default::default()
        }
    }

    /// A full map of blocks 0 and 3.
    async fn initial(&mut self) -> u64 {
        let mut entries = Vec::new();
        for (index, seed) in [(0u64, 1u8), (3, 2)] {
            let data = pattern(seed, BSU);
            let off = index as usize * BSU;
            self.disk[off..off + BSU].copy_from_slice(&data);
            entries.push((index, self.put(&data).await));
        }
        let req = self.request(&entries, true, vec![], Consistency::Crash);
        self.writer.commit_point(req).await.unwrap().seq
    }

    async fn delta(&self, logs: Vec<ShippedLog>, consistency: Consistency) -> u64 {
        let req = self.request(&[], false, logs, consistency);
        self.writer.commit_point(req).await.unwrap().seq
    }

    /// A delta whose blocks changed on top of the previous map (a resync's patch).
    async fn patch(&mut self, index: u64, seed: u8) -> u64 {
        let data = pattern(seed, BSU);
        let off = index as usize * BSU;
        self.disk[off..off + BSU].copy_from_slice(&data);
        let id = self.put(&data).await;
        let req = self.request(&[(index, id)], false, vec![], Consistency::Crash);
        self.writer.commit_point(req).await.unwrap().seq
    }

    async fn materialize(&self, seq: u64) -> Vec<u8> {
        let out = self.path(&format!("point-{seq}.raw"));
        self.writer
            .materialize_disk(
                MaterializeDiskRequest {
                    vm: VM.into(),
                    point: format!("{seq:020}"),
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

    async fn block_map(&self, seq: u64) -> Vec<(u64, ChunkId)> {
        let req = BlockHashesRequest {
            vm: VM.into(),
            point: format!("{seq:020}"),
            disk_id: DISK.into(),
            omit_lost: false,
        };
        let map = self.writer.block_map(&req).await.unwrap();
        map.entries.into_iter().collect()
    }

    /// The keyed hashes of a disk image's non-zero blocks.
    fn map_of(&self, disk: &[u8]) -> Vec<(u64, ChunkId)> {
        disk.chunks(BSU)
            .enumerate()
            .filter(|(_, b)| !is_zero(b))
            .map(|(i, b)| (i as u64, chunk_id(&self.key, b)))
            .collect()
    }

    async fn seqs(&self) -> Vec<u64> {
        let points = self.store.list_points(VM).await.unwrap();
        points.iter().map(|p| p.seq).collect()
    }

    async fn count(&self, prefix: &str) -> usize {
        self.store.list(prefix).await.unwrap().len()
    }

    /// How many index pages, chunks and log descriptors are stored.
    async fn objects(&self) -> (usize, usize, usize) {
        (
            self.count("index/").await,
            self.count("chunks/").await,
            self.count("logs/").await,
        )
    }
}

/// A write of 4 KiB into block `i % 8` at an offset that moves with `i`.
fn write_of(i: u8) -> (u64, Vec<u8>) {
    let block = u64::from(i % 8);
    let off = block * u64::from(BS) + u64::from(i) * 4096 % u64::from(BS);
    (off, pattern(40 + i, 4096))
}

#[tokio::test]
async fn thinned_middle_points_leave_every_kept_point_identical() {
    let mut e = env().await;
    let mut snapshots: Vec<(u64, Vec<u8>)> = vec![(e.initial().await, e.disk.clone())];
    let mut app_seqs = Vec::new();
    for i in 0..14u8 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let seq = if i == 7 {
            // A patch: the pending logs are merged first, then the blocks set.
            e.patch(5, 99).await
        } else {
            let w = write_of(i);
            let log = e.log(&[w]).await;
            let consistency = if i == 5 {
                Consistency::App
            } else {
                Consistency::Crash
            };
            e.delta(vec![log], consistency).await
        };
        if i == 5 {
            app_seqs.push(seq);
        }
        snapshots.push((seq, e.disk.clone()));
        // Every third point merged, so later commits build on merged maps of points that
        // thinning then removes.
        if i % 3 == 2 {
            e.writer
                .merge_latest(VM, &CancellationToken::new())
                .await
                .unwrap();
        }
    }
    let merged_before = e.store.merged_seqs(VM).await.unwrap();
    assert!(merged_before.len() >= 4, "{merged_before:?}");

    // Everything older than now is thinned (points are ~60 ms apart, more with a merge). The
    // times are fixed now and nothing is younger than keep_all = 0, so the choice is known:
    // take the shortest interval that prunes a point whose merged map later points built on.
    let points = e.store.list_points(VM).await.unwrap();
    let candidates: Vec<Candidate> = points.iter().map(|p| Candidate::of(p, false)).collect();
    let now = chrono::Utc::now().timestamp_millis() + 1;
    let (thin, expected) = [150u64, 200, 300, 400, 600]
        .into_iter()
        .map(|ms| RetentionPolicy {
            retention: Duration::from_secs(3600),
            keep_all: Duration::ZERO,
            thin_to: Duration::from_millis(ms),
        })
        .map(|p| (p, select_pruned(&candidates, now, &p)))
        .find(|(_, doomed)| doomed.len() >= 3 && doomed.iter().any(|s| merged_before.contains(s)))
        .expect("an interval that prunes a merged point in the middle");
    let zero = Duration::ZERO;
    let out = e.writer.run_retention(VM, thin, zero).await.unwrap();
    let kept = e.seqs().await;
    eprintln!(
        "thin to {:?}: kept {kept:?}, pruned {expected:?}, merged maps were {merged_before:?}",
        thin.thin_to
    );
    assert_eq!(out.points_pruned as usize, expected.len(), "{out:?}");
    assert!(
        kept.iter().all(|s| !expected.contains(s)),
        "{kept:?} {expected:?}"
    );
    assert_eq!(out.points_kept as usize, kept.len());
    assert_eq!(kept.len() + expected.len(), snapshots.len());
    let newest = snapshots.last().unwrap().0;
    assert!(kept.contains(&1) && kept.contains(&newest), "{kept:?}");
    for s in &app_seqs {
        assert!(kept.contains(s), "app point {s} kept: {kept:?}");
    }
    let thin_ms = thin.thin_to.as_millis() as i64;
    let points = e.store.list_points(VM).await.unwrap();
    for w in points.windows(2) {
        assert!(
            w[1].consistency == Consistency::App
                || w[1].seq == newest
                || w[1].time_ms - w[0].time_ms >= thin_ms,
            "{} and {} are {} ms apart",
            w[0].seq,
            w[1].seq,
            w[1].time_ms - w[0].time_ms
        );
    }
    // Merged maps of pruned points went with them; a kept point's stays.
    for s in e.store.merged_seqs(VM).await.unwrap() {
        assert!(kept.contains(&s), "merged map {s} of a pruned point");
    }
    // Run again twice: the choice does not change, and what only pruned points referenced is
    // condemned, then deleted: the descriptors left are exactly the kept points' logs.
    for _ in 0..2 {
        let again = e.writer.run_retention(VM, thin, zero).await.unwrap();
        assert_eq!(again.points_pruned, 0, "{again:?}");
    }
    assert_eq!(e.seqs().await, kept);
    let listed: BTreeSet<String> = points
        .iter()
        .flat_map(|p| p.disks.iter().flat_map(|d| d.logs.iter().cloned()))
        .collect();
    let stored: BTreeSet<String> = e.store.list("logs/").await.unwrap().into_iter().collect();
    assert_eq!(
        stored, listed,
        "descriptors only pruned points listed are collected"
    );

    // Every kept point: materialised (merged or replayed) and its block hashes are the
    // source as it was at that point.
    for (seq, want) in snapshots.iter().filter(|(s, _)| kept.contains(s)) {
        assert!(
            e.materialize(*seq).await == *want,
            "point {seq} materialises identical"
        );
        assert_eq!(
            e.block_map(*seq).await,
            e.map_of(want),
            "point {seq} block hashes"
        );
    }
    // And a commit after the pruning builds on what is left.
    let log = e.log(&[write_of(200)]).await;
    let seq = e.delta(vec![log], Consistency::Crash).await;
    assert!(
        e.materialize(seq).await == e.disk,
        "a new point after pruning"
    );
    e.writer
        .merge_latest(VM, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(e.block_map(seq).await, e.map_of(&e.disk));
}

#[tokio::test]
async fn a_cycle_that_shipped_nothing_writes_no_index_pages() {
    let mut e = env().await;
    e.initial().await;
    let pages = e.count("index/").await;
    assert!(pages > 0);
    // On a point without logs.
    let before = e.objects().await;
    let seq = e.delta(vec![], Consistency::Crash).await;
    assert_eq!(seq, 2, "the empty cycle is a point");
    assert_eq!(e.objects().await, before, "and wrote nothing else");
    // On a point with logs pending (not merged): still the base's pages and logs.
    let log = e.log(&[write_of(1)]).await;
    e.delta(vec![log], Consistency::Crash).await;
    let before = e.objects().await;
    let p3 = e.store.latest_point(VM).await.unwrap().unwrap();
    let seq = e.delta(vec![], Consistency::Crash).await;
    let p4 = e.store.latest_point(VM).await.unwrap().unwrap();
    assert_eq!(seq, 4);
    assert_eq!(e.objects().await, before);
    assert_eq!(p4.disks[0].pages, p3.disks[0].pages);
    assert_eq!(p4.disks[0].logs, p3.disks[0].logs);
    // On a merged base: the merged map's pages, no logs, nothing written.
    e.writer
        .merge_latest(VM, &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    let merged = e.store.get_merged(VM, 4).await.unwrap().unwrap();
    let before = e.objects().await;
    let seq = e.delta(vec![], Consistency::Crash).await;
    assert_eq!(seq, 5);
    assert_eq!(e.objects().await, before);
    let p5 = e.store.latest_point(VM).await.unwrap().unwrap();
    assert_eq!(p5.disks[0].pages, merged.disks[0].pages);
    assert!(p5.disks[0].logs.is_empty());
    assert!(e.materialize(5).await == e.disk);
}
