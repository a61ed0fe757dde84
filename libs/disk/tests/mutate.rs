//! Deterministic mutation testing of every parser (the stable-Rust stand-in for cargo fuzz):
//! valid seed files are damaged in many ways — flipped bytes, boundary integers, truncation —
//! with checksums sometimes re-sealed so the damage reaches the structures behind them. Opening,
//! mapping and reading each result must end in Ok or a DiskError, never a panic or a hang.
//!
//! `FERRY_MUTATE_ITERS=N` raises the per-seed count, `FERRY_MUTATE_SEED=S` picks other mutants;
//! the `#[ignore]`d test runs a long campaign.

mod common;

use std::path::Path;

use common::*;
use ferry_disk::hrl::{HrlLog, HrlOptions, HrlWriter};
use ferry_disk::{
    BlockDevice, CreateOptions, Format, Subformat, create, create_differencing, open, open_as,
};

const MIB: u64 = 1 << 20;

struct Seed {
    name: &'static str,
    bytes: Vec<u8>,
    /// Byte ranges holding metadata, where most mutations go.
    hot: Vec<(usize, usize)>,
    /// Extra file the seed needs next to it (a parent), by name.
    side: Option<(&'static str, Vec<u8>)>,
}

fn fill(w: &mut dyn ferry_disk::DiskWriter, size: u64, seed: u64) {
    let mut r = Rng(seed);
    for _ in 0..12 {
        let len = 512 * (1 + r.below(300)) as usize;
        let off = r.below(size - len as u64) / 512 * 512;
        let mut d = vec![0u8; len];
        r.fill(&mut d);
        w.write_at(off, &d).expect("seed write");
    }
}

fn seeds() -> Vec<Seed> {
    let dir = tempdir();
    let mut out = Vec::new();
    let mk = |name: &str, f: Format, s: Subformat, bs: Option<u32>| {
        let p = dir.path().join(name);
        let mut w = create(
            &p,
            f,
            &CreateOptions {
                virtual_size: 6 * MIB,
                subformat: s,
                block_size: bs,
            },
        )
        .expect("seed");
        fill(w.as_mut(), 6 * MIB, name.len() as u64);
        w.finish().expect("finish");
        std::fs::read(&p).expect("read seed")
    };
    let vhd_dyn = mk("d.vhd", Format::Vhd, Subformat::Dynamic, Some(1 << 20));
    let n = vhd_dyn.len();
    out.push(Seed {
        name: "vhd-dynamic",
        hot: vec![(0, 4096), (n - 512, n)],
        bytes: vhd_dyn.clone(),
        side: None,
    });
    let vhd_fixed = mk("f.vhd", Format::Vhd, Subformat::Fixed, None);
    let n = vhd_fixed.len();
    out.push(Seed {
        name: "vhd-fixed",
        hot: vec![(n - 512, n)],
        bytes: vhd_fixed,
        side: None,
    });
    let vhdx = mk("d.vhdx", Format::Vhdx, Subformat::Dynamic, Some(1 << 20));
    out.push(Seed {
        name: "vhdx-dynamic",
        hot: vec![
            (0, 320 << 10),
            (2 << 20, (2 << 20) + 70_000),
            (3 << 20, (3 << 20) + 4096),
        ],
        bytes: vhdx.clone(),
        side: None,
    });

    // A VHDX with a pending log: the log region is hot too.
    let pl = dir.path().join("pl.vhdx");
    std::fs::write(&pl, &vhdx).expect("write");
    ferry_disk::testing::crash_after_log(&pl, 4 * MIB + 512, &[0x3c; 4096]).expect("crash hook");
    out.push(Seed {
        name: "vhdx-pending-log",
        hot: vec![(64 << 10, 192 << 10), (1 << 20, (1 << 20) + 16384)],
        bytes: std::fs::read(&pl).expect("read"),
        side: None,
    });

    // Differencing children with their parent beside them.
    let vp = dir.path().join("p.vhdx");
    std::fs::write(&vp, &vhdx).expect("write parent");
    let vc = dir.path().join("c.vhdx");
    let mut w = create_differencing(&vc, Format::Vhdx, &vp).expect("child");
    fill(w.as_mut(), 6 * MIB, 77);
    w.finish().expect("finish");
    out.push(Seed {
        name: "vhdx-differencing",
        hot: vec![
            (0, 320 << 10),
            (2 << 20, (2 << 20) + 70_000),
            (3 << 20, (3 << 20) + 4096),
        ],
        bytes: std::fs::read(&vc).expect("read"),
        side: Some(("p.vhdx", vhdx)),
    });
    let hp = dir.path().join("p.vhd");
    std::fs::write(&hp, &vhd_dyn).expect("write parent");
    let hc = dir.path().join("c.vhd");
    let mut w = create_differencing(&hc, Format::Vhd, &hp).expect("child");
    fill(w.as_mut(), 6 * MIB, 78);
    w.finish().expect("finish");
    out.push(Seed {
        name: "vhd-differencing",
        hot: vec![(0, 8192)],
        bytes: std::fs::read(&hc).expect("read"),
        side: Some(("p.vhd", vhd_dyn)),
    });

    let hrl = dir.path().join("a.hrl");
    let mut w = HrlWriter::create(&hrl, &HrlOptions::default()).expect("hrl");
    let mut r = Rng(3);
    for i in 0..20 {
        let mut d = vec![0u8; 1 + r.below(5000) as usize];
        r.fill(&mut d);
        w.record(r.below(1 << 30), &d).expect("record");
        if i % 6 == 0 {
            w.commit().expect("commit");
        }
    }
    w.close().expect("close");
    let b = std::fs::read(&hrl).expect("read");
    let n = b.len();
    out.push(Seed {
        name: "hrl",
        hot: vec![(0, 8192), (n.saturating_sub(8192), n)],
        bytes: b,
        side: None,
    });
    out
}

fn crc_seal(b: &mut [u8], start: usize, len: usize) {
    if start + len > b.len() {
        return;
    }
    b[start + 4..start + 8].fill(0);
    let c = crc32c::crc32c(&b[start..start + len]);
    b[start + 4..start + 8].copy_from_slice(&c.to_le_bytes());
}

fn mutate(seed: &Seed, r: &mut Rng) -> Vec<u8> {
    let mut b = seed.bytes.clone();
    let rounds = 1 + r.below(4);
    for _ in 0..rounds {
        let (lo, hi) = if r.below(4) == 0 || seed.hot.is_empty() {
            (0, b.len())
        } else {
            let h = seed.hot[r.below(seed.hot.len() as u64) as usize];
            (h.0.min(b.len()), h.1.min(b.len()))
        };
        if hi <= lo + 8 {
            continue;
        }
        let at = lo + r.below((hi - lo - 8) as u64) as usize;
        match r.below(6) {
            0 => b[at] ^= 1 << r.below(8),
            1 => b[at] = r.next() as u8,
            2 => {
                let v: [u64; 6] = [0, 1, u64::MAX, 0x8000_0000_0000_0000, 0xFFFF_FFFF, 1 << 40];
                b[at..at + 8].copy_from_slice(&v[r.below(6) as usize].to_le_bytes());
            }
            3 => {
                let v: [u32; 5] = [0, u32::MAX, 0x8000_0000, 4096, 1 << 20];
                b[at..at + 4].copy_from_slice(&v[r.below(5) as usize].to_be_bytes());
            }
            4 => {
                let len = r.below(64) as usize;
                for x in &mut b[at..(at + len).min(hi)] {
                    *x = r.next() as u8;
                }
            }
            _ => {
                let len = r.below(b.len() as u64) as usize;
                b.truncate(len.max(1));
            }
        }
    }
    if r.below(2) == 0 && seed.name.starts_with("vhdx") {
        // Re-seal so damage behind the checksums is reached.
        crc_seal(&mut b, 64 << 10, 4096);
        crc_seal(&mut b, 128 << 10, 4096);
        crc_seal(&mut b, 192 << 10, 64 << 10);
    }
    b
}

/// Opens, maps and reads; only a panic (or a hang) fails.
fn exercise(path: &Path, hrl: bool) {
    if hrl {
        if let Ok(l) = HrlLog::open(path) {
            let mut buf = Vec::new();
            for rec in l.records.iter().take(64) {
                buf.resize(rec.length as usize, 0);
                let _ = l.read_record(rec, &mut buf);
            }
        }
        return;
    }
    for d in [
        open(path),
        open_as(path, Format::Vhdx),
        open_as(path, Format::Vhd),
    ]
    .into_iter()
    .flatten()
    {
        read_some(d.as_ref());
    }
}

/// In-place writes into a damaged file: errors are fine, panics are not.
fn write_some(path: &Path) {
    let Ok(mut w) = ferry_disk::open_rw(path) else {
        return;
    };
    let size = w.virtual_size();
    for (i, off) in [0u64, 4096 + 512, 3 * MIB + 100].into_iter().enumerate() {
        let len = 700 * (i + 1);
        if off + len as u64 <= size {
            let _ = w.write_at(off, &vec![i as u8 + 1; len]);
        }
    }
    let _ = w.finish();
}

fn read_some(d: &dyn BlockDevice) {
    let _ = d.info();
    let size = d.virtual_size();
    if let Ok(ext) = d.extents()
        && ext.len() < 100_000
    {
        let covered: u64 = ext.iter().map(|e| e.len).sum();
        assert_eq!(covered, size, "extents cover the disk");
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    // Bounded work however large the (possibly absurd) virtual size is.
    while off < size && off < 8 * MIB {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = d.read_at(off, &mut buf[..n]);
        off += n as u64;
    }
    if size > 4096 {
        let _ = d.read_at(size - 4096, &mut buf[..4096]);
    }
    let _ = d.read_at(size, &mut buf[..1]);
}

fn campaign(iters: u64) {
    let seeds = seeds();
    let dir = tempdir();
    let mut total = 0;
    for (si, seed) in seeds.iter().enumerate() {
        if let Some((name, bytes)) = &seed.side {
            std::fs::write(dir.path().join(name), bytes).expect("side file");
        }
        // Unmutated seeds must open cleanly: the campaign starts from valid files.
        let path = dir.path().join(format!("m-{}", seed.name));
        std::fs::write(&path, &seed.bytes).expect("write");
        if seed.name == "hrl" {
            HrlLog::open(&path).expect("seed hrl opens");
        } else {
            read_some(open(&path).expect("seed opens").as_ref());
        }
        // FERRY_MUTATE_SEED explores other mutants; the default keeps `cargo test` deterministic.
        let base: u64 = std::env::var("FERRY_MUTATE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut r = Rng((0x9E37_79B9_7F4A_7C15 ^ si as u64)
            .wrapping_add(base.wrapping_mul(0x1000_0000_01B3))
            | 1);
        for i in 0..iters {
            let b = mutate(seed, &mut r);
            std::fs::write(&path, &b).expect("write mutant");
            let res = std::panic::catch_unwind(|| {
                exercise(&path, seed.name == "hrl");
                if i % 10 == 0 && seed.name != "hrl" {
                    write_some(&path);
                }
            });
            assert!(
                res.is_ok(),
                "panic on {} mutant {i}; kept at {}",
                seed.name,
                {
                    let keep = std::env::temp_dir().join(format!("ferry-mutant-{}-{i}", seed.name));
                    let _ = std::fs::write(&keep, &b);
                    keep.display().to_string()
                }
            );
            total += 1;
        }
    }
    eprintln!(
        "mutation campaign: {total} mutants over {} seeds, no panics",
        seeds.len()
    );
}

fn iters(default: u64) -> u64 {
    std::env::var("FERRY_MUTATE_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_inputs_never_panic() {
    campaign(iters(400));
}

#[test]
#[ignore = "long fuzz campaign; run with --release --ignored"]
fn long_mutation_campaign() {
    campaign(iters(50_000));
}
