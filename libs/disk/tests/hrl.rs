//! MS-HRL: record, close, replay; recovery of cut logs; chains by unique id; bad logs.

mod common;

use common::*;
use ferry_disk::hrl::{HrlLog, HrlOptions, HrlWriter, order_chain};
use ferry_disk::{DiskError, open_rw};

const MIB: u64 = 1 << 20;

fn random_writes(r: &mut Rng, size: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let len = if i % 3 == 0 {
                1 + r.below(200_000)
            } else {
                512 * (1 + r.below(64))
            } as usize;
            let off = r.below(size - len as u64);
            let mut d = vec![0u8; len];
            r.fill(&mut d);
            (off, d)
        })
        .collect()
}

#[test]
fn round_trip_replay_equals_direct_writes() {
    let dir = tempdir();
    let base = file(&dir, "base.vhdx");
    qemu_create(&base, "vhdx", "subformat=dynamic,block_size=1M", 16 * MIB);
    qemu_io(&base, "vhdx", &["write -P 0x42 0 4194304".to_string()]);
    let direct = file(&dir, "direct.vhdx");
    let replayed = file(&dir, "replayed.vhdx");
    std::fs::copy(&base, &direct).expect("copy");
    std::fs::copy(&base, &replayed).expect("copy");

    let log_path = file(&dir, "a.hrl");
    let mut log = HrlWriter::create(&log_path, &HrlOptions::default()).expect("create log");
    let mut d = open_rw(&direct).expect("open direct");
    let mut r = Rng(99);
    let w = random_writes(&mut r, 16 * MIB, 300);
    for (i, (off, data)) in w.iter().enumerate() {
        log.record(*off, data).expect("record");
        d.write_at(*off, data).expect("write");
        if i % 37 == 0 {
            log.commit().expect("commit");
        }
    }
    d.finish().expect("finish direct");
    let h = log.close().expect("close");
    assert_eq!(h.total_metadata_entries, 300);

    let l = HrlLog::open(&log_path).expect("open log");
    assert!(l.clean);
    assert_eq!(l.records.len(), 300);
    assert_eq!(l.valid_end, h.eol);
    let mut t = open_rw(&replayed).expect("open replay target");
    l.replay_onto(t.as_mut()).expect("replay");
    t.finish().expect("finish");
    let (code, text) = qemu_compare(&direct, "vhdx", &replayed, "vhdx");
    assert_eq!(code, 0, "{text}");
    let (code, _) = qemu_compare(&base, "vhdx", &replayed, "vhdx");
    assert_eq!(code, 1, "the writes changed the disk");
}

#[test]
fn cut_logs_recover_exactly_the_committed_prefix() {
    let dir = tempdir();
    let log_path = file(&dir, "full.hrl");
    let mut log = HrlWriter::create(&log_path, &HrlOptions::default()).expect("create");
    let mut r = Rng(7);
    let w = random_writes(&mut r, 64 * MIB, 60);
    // Durable end of the log after each record's commit.
    let mut ends = Vec::new();
    for (off, data) in &w {
        log.record(*off, data).expect("record");
        ends.push(log.commit().expect("commit"));
    }
    let h = log.close().expect("close");
    let full = std::fs::read(&log_path).expect("read");
    assert_eq!(full.len() as u64, h.eol);
    let mut cuts: Vec<u64> = (0..25)
        .map(|_| 4096 + r.below(full.len() as u64 - 4096))
        .collect();
    cuts.extend([4096, 8192, ends[0], ends[0] - 1, ends[10], ends[10] + 1]);
    for cut in cuts {
        let p = file(&dir, "cut.hrl");
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, &full[..cut as usize]).expect("write cut");
        let l = HrlLog::open(&p).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        let expect = ends.iter().filter(|&&e| e <= cut).count();
        assert!(!l.clean);
        assert_eq!(l.records.len(), expect, "cut at {cut}");
        for (rec, (off, data)) in l.records.iter().zip(&w) {
            assert_eq!((rec.offset, rec.length as usize), (*off, data.len()));
            let mut buf = vec![0u8; data.len()];
            l.read_record(rec, &mut buf).expect("read record");
            assert!(&buf == data);
        }
    }
}

#[test]
fn unclosed_log_recovers_all_commits() {
    let dir = tempdir();
    let p = file(&dir, "open.hrl");
    let mut log = HrlWriter::create(&p, &HrlOptions::default()).expect("create");
    log.record(4096, &[1u8; 4096]).expect("record");
    log.record(0, &[2u8; 100]).expect("record");
    log.commit().expect("commit");
    log.record(8192, &[3u8; 512]).expect("uncommitted record");
    drop(log);
    let l = HrlLog::open(&p).expect("open");
    assert!(!l.clean);
    assert_eq!(l.records.len(), 2);
}

#[test]
fn chain_is_ordered_by_unique_ids() {
    let dir = tempdir();
    let mut prev = uuid::Uuid::nil();
    let mut paths = Vec::new();
    let mut r = Rng(5);
    let mut model = vec![0u8; 8 * MIB as usize];
    for i in 0..4 {
        let p = file(&dir, &format!("{i}.hrl"));
        let mut w = HrlWriter::create(
            &p,
            &HrlOptions {
                previous_unique_id: prev,
                ..Default::default()
            },
        )
        .expect("create");
        for (off, data) in random_writes(&mut r, 8 * MIB, 20) {
            w.record(off, &data).expect("record");
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        prev = w.unique_id();
        w.close().expect("close");
        paths.push(p);
    }
    let shuffled = [2, 0, 3, 1];
    let logs: Vec<HrlLog> = shuffled
        .iter()
        .map(|&i| HrlLog::open(&paths[i]).expect("open"))
        .collect();
    let ordered = order_chain(logs).expect("order");
    let got: Vec<_> = ordered.iter().map(|l| l.path().to_path_buf()).collect();
    assert_eq!(got, paths);

    let target = file(&dir, "t.raw");
    let mut t = ferry_disk::create(
        &target,
        ferry_disk::Format::Raw,
        &ferry_disk::CreateOptions {
            virtual_size: 8 * MIB,
            subformat: ferry_disk::Subformat::Fixed,
            block_size: None,
        },
    )
    .expect("target");
    for l in &ordered {
        l.replay_onto(t.as_mut()).expect("replay");
    }
    t.finish().expect("finish");
    assert!(std::fs::read(&target).expect("read") == model);

    // A gap in the chain is refused.
    let gap: Vec<HrlLog> = [0, 2, 3]
        .iter()
        .map(|&i| HrlLog::open(&paths[i]).expect("open"))
        .collect();
    assert!(order_chain(gap).is_err());
}

#[test]
fn corrupt_logs_name_structure_and_offset() {
    let dir = tempdir();
    let p = file(&dir, "c.hrl");
    let mut w = HrlWriter::create(&p, &HrlOptions::default()).expect("create");
    w.record(0, &[9u8; 10_000]).expect("record");
    w.close().expect("close");
    let good = std::fs::read(&p).expect("read");

    // Data byte flipped: the data checksum catches it.
    let mut b = good.clone();
    b[8192 + 5000] ^= 0xFF;
    std::fs::write(&p, &b).expect("write");
    let e = HrlLog::open(&p).expect_err("bad data");
    assert!(
        matches!(
            e,
            DiskError::Checksum {
                structure: "hrl record data",
                offset: 8192,
                ..
            }
        ),
        "{e}"
    );

    // Back distance pointing before the header (checksum fixed so only the pointer is bad).
    let mut b = good.clone();
    let blk = 8192 + 10_000;
    b[blk..blk + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let sum: u32 = b[blk..blk + 32]
        .iter()
        .enumerate()
        .filter(|(i, _)| !(12..16).contains(i))
        .map(|(_, &x)| x as u32)
        .sum();
    b[blk + 12..blk + 16].copy_from_slice(&(!sum).to_le_bytes());
    std::fs::write(&p, &b).expect("write");
    let e = HrlLog::open(&p).expect_err("bad pointer");
    assert!(
        e.to_string()
            .contains("hrl metadata block previous location"),
        "{e}"
    );

    // Header checksum.
    let mut b = good.clone();
    b[24] ^= 1;
    std::fs::write(&p, &b).expect("write");
    let e = HrlLog::open(&p).expect_err("bad header");
    assert!(
        matches!(
            e,
            DiskError::Checksum {
                structure: "hrl header",
                ..
            }
        ),
        "{e}"
    );

    // Not a log at all.
    std::fs::write(&p, vec![0u8; 9000]).expect("write");
    assert!(HrlLog::open(&p).is_err());
}
