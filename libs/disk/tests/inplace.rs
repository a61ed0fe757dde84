//! In-place writes into existing files of every kind, a VHDX left with a pending log by an
//! interrupted metadata update, and differencing chains built by our writer.

mod common;

use common::*;
use ferry_disk::{
    DiskError, Format, OpenOptions, VhdxCreateOptions, create_differencing, create_vhdx, open,
    open_rw, open_with,
};

const MIB: u64 = 1 << 20;

/// Deterministic writes of assorted sizes and alignments, some of them zeros.
fn writes(seed: u64, size: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    let mut r = Rng(seed);
    (0..n)
        .map(|i| {
            let len = match i % 4 {
                0 => 4096,
                1 => 1 + r.below(70_000) as usize,
                2 => 512 * (1 + r.below(8) as usize),
                _ => (1 + r.below(3) as usize) * MIB as usize,
            };
            let len = len.min(size as usize);
            let off = r.below(size - len as u64 + 1);
            let mut data = vec![0u8; len];
            if i % 5 != 4 {
                r.fill(&mut data);
            }
            (off, data)
        })
        .collect()
}

fn apply(model: &mut [u8], w: &[(u64, Vec<u8>)]) {
    for (off, data) in w {
        model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
}

fn write_all(d: &mut dyn ferry_disk::DiskWriter, w: &[(u64, Vec<u8>)]) {
    for (off, data) in w {
        d.write_at(*off, data).expect("write_at");
    }
}

/// qemu makes and fills an image, we write into it in place, qemu reads it back.
fn inplace(fmt: &str, opts: &str, size: u64) {
    let dir = tempdir();
    let img = file(&dir, "disk.img");
    qemu_create(&img, fmt, opts, size);
    let qsize = qemu_size(&img, fmt);
    qemu_io(
        &img,
        fmt,
        &[
            "write -P 0x11 0 3145728".to_string(),
            format!("write -P 0x22 {} 65536", qsize / 2),
        ],
    );
    let reference = file(&dir, "ref.raw");
    qemu_to_raw(&img, fmt, &reference);
    let mut model = std::fs::read(&reference).expect("reference");
    let w = writes(fmt.len() as u64 * 7 + size, qsize, 40);
    apply(&mut model, &w);
    std::fs::write(&reference, &model).expect("write model");
    let mut d = open_rw(&img).expect("open_rw");
    write_all(d.as_mut(), &w);
    assert!(
        read_all(d.as_ref()) == model,
        "{fmt} {opts}: read-back before finish"
    );
    d.finish().expect("finish");
    let (code, text) = qemu_compare(&img, fmt, &reference, "raw");
    assert_eq!(
        code, 0,
        "{fmt} {opts}: qemu-img compare after in-place writes: {text}"
    );
    if fmt == "vhdx" {
        let (code, text) = status("qemu-img", &["check", "-f", "vhdx", p(&img)]);
        assert_eq!(code, 0, "qemu-img check: {text}");
    }
    assert!(read_all(open(&img).expect("reopen").as_ref()) == model);
}

#[test]
fn inplace_raw() {
    inplace("raw", "", 20 * MIB);
}

#[test]
fn inplace_vhd_fixed() {
    inplace("vpc", "subformat=fixed,force_size=on", 20 * MIB);
}

#[test]
fn inplace_vhd_dynamic() {
    inplace("vpc", "subformat=dynamic", 20 * MIB);
}

#[test]
fn inplace_vhdx_fixed() {
    inplace("vhdx", "subformat=fixed,block_state_zero=off", 20 * MIB);
}

#[test]
fn inplace_vhdx_dynamic() {
    inplace("vhdx", "subformat=dynamic,block_size=1M", 20 * MIB + 512);
}

#[test]
fn inplace_vhdx_zero_state_blocks() {
    inplace("vhdx", "subformat=fixed", 18 * MIB);
}

fn sha(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).expect("read file")
}

#[test]
fn pending_log_reads_replayed_and_leaves_file_unchanged() {
    let dir = tempdir();
    let img = file(&dir, "d.vhdx");
    qemu_create(&img, "vhdx", "subformat=dynamic,block_size=1M", 16 * MIB);
    qemu_io(&img, "vhdx", &["write -P 0x5c 0 1048576".to_string()]);
    let data = vec![0xA7u8; 8192];
    ferry_disk::testing::crash_after_log(&img, 5 * MIB + 4096, &data).expect("crash hook");

    let before = sha(&img);
    // qemu refuses a read-only open with a pending log: proof the log really is pending.
    let (code, _) = status(
        "qemu-io",
        &["-r", "-f", "vhdx", "-c", "read 0 512", p(&img)],
    );
    assert_ne!(code, 0, "qemu should refuse the dirty file read-only");
    let d = open(&img).expect("open with pending log");
    let mut buf = vec![0u8; 8192];
    d.read_at(5 * MIB + 4096, &mut buf).expect("read");
    assert_eq!(buf, data, "the logged block reads as replayed");
    d.read_at(0, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 0x5c));
    drop(d);
    assert!(sha(&img) == before, "a reader must not change the file");

    // qemu's own replay agrees with ours.
    let copy = file(&dir, "copy.vhdx");
    std::fs::copy(&img, &copy).expect("copy");
    run(
        "qemu-img",
        &["check", "-q", "-r", "all", "-f", "vhdx", p(&copy)],
    );
    let ours = file(&dir, "ours.raw");
    let mut w = ferry_disk::create(
        &ours,
        Format::Raw,
        &ferry_disk::CreateOptions {
            virtual_size: 16 * MIB,
            subformat: ferry_disk::Subformat::Fixed,
            block_size: None,
        },
    )
    .expect("create raw");
    ferry_disk::copy_into(open(&img).expect("open").as_ref(), w.as_mut()).expect("copy");
    w.finish().expect("finish");
    let (code, text) = qemu_compare(&copy, "vhdx", &ours, "raw");
    assert_eq!(code, 0, "{text}");

    // A writable open replays into the file and closes it clean for qemu.
    let rw = open_rw(&img).expect("open_rw replays");
    rw.finish().expect("finish");
    let (code, text) = qemu_compare(&img, "vhdx", &ours, "raw");
    assert_eq!(code, 0, "after writable replay: {text}");
    let (code, text) = status("qemu-img", &["check", "-f", "vhdx", p(&img)]);
    assert_eq!(code, 0, "{text}");
}

/// base (qemu) <- child <- grandchild (ours), written at odd offsets; every layer reads through.
fn chain(fmt: &str, base_opts: &str, ext: &str) {
    let dir = tempdir();
    let base = file(&dir, &format!("base.{ext}"));
    qemu_create(&base, fmt, base_opts, 12 * MIB);
    let size = qemu_size(&base, fmt);
    qemu_io(&base, fmt, &["write -P 0x31 0 6291456".to_string()]);
    let mut model = vec![0u8; size as usize];
    apply(&mut model, &[(0, vec![0x31; 6 * MIB as usize])]);
    let format = if ext == "vhd" {
        Format::Vhd
    } else {
        Format::Vhdx
    };

    let child = file(&dir, &format!("child.{ext}"));
    let mut c = create_differencing(&child, format, &base).expect("create child");
    let w1 = writes(11, size, 25);
    write_all(c.as_mut(), &w1);
    apply(&mut model, &w1);
    assert!(
        read_all(c.as_ref()) == model,
        "child reads through before finish"
    );
    c.finish().expect("finish child");
    let after_child = model.clone();

    let grand = file(&dir, &format!("grand.{ext}"));
    let mut g = create_differencing(&grand, format, &child).expect("create grandchild");
    let w2 = writes(12, size, 25);
    write_all(g.as_mut(), &w2);
    g.finish().expect("finish grandchild");
    apply(&mut model, &w2);

    let d = open(&grand).expect("open grandchild");
    assert_eq!(d.info().subformat.as_deref(), Some("differencing"));
    assert!(d.parent().is_some_and(|p| p.parent().is_some()));
    assert!(
        read_all(d.as_ref()) == model,
        "grandchild reads through the chain"
    );
    // Two threads share the open chain (BlockDevice is Sync; reads are preads).
    std::thread::scope(|sc| {
        for t in 0..2u64 {
            let (d, model) = (&d, &model);
            sc.spawn(move || {
                let mut r = Rng(100 + t);
                for _ in 0..200 {
                    let len = 1 + r.below(300_000) as usize;
                    let off = r.below(size - len as u64);
                    let mut buf = vec![0u8; len];
                    d.read_at(off, &mut buf).expect("concurrent read");
                    assert!(buf[..] == model[off as usize..off as usize + len]);
                }
            });
        }
    });
    assert!(read_all(open(&child).expect("child").as_ref()) == after_child);

    // In-place writes into the child, then the chain moved to another folder: relative
    // locators still find it.
    let mut c = open_rw(&child).expect("open_rw child");
    let w3 = writes(13, size, 10);
    write_all(c.as_mut(), &w3);
    c.finish().expect("finish");
    let mut child_model = after_child.clone();
    apply(&mut child_model, &w3);
    let moved = tempdir();
    for name in ["base", "child"] {
        std::fs::rename(
            file(&dir, &format!("{name}.{ext}")),
            file(&moved, &format!("{name}.{ext}")),
        )
        .expect("move");
    }
    let d = open(&file(&moved, &format!("child.{ext}"))).expect("open moved child");
    assert!(
        read_all(d.as_ref()) == child_model,
        "moved child reads through"
    );

    // An explicit parent overrides the locators.
    let explicit = open_with(
        &file(&moved, &format!("child.{ext}")),
        &OpenOptions {
            format: None,
            parent: Some(file(&moved, &format!("base.{ext}"))),
        },
    )
    .expect("explicit parent");
    assert!(read_all(explicit.as_ref()) == child_model);
    // A wrong explicit parent (the child itself) is refused by identity.
    let wrong = open_with(
        &file(&moved, &format!("child.{ext}")),
        &OpenOptions {
            format: None,
            parent: Some(file(&moved, &format!("child.{ext}"))),
        },
    );
    assert!(matches!(wrong, Err(DiskError::Parent { .. })));
}

#[test]
fn vhdx_differencing_chain() {
    chain("vhdx", "subformat=dynamic,block_size=2M", "vhdx");
}

#[test]
fn vhd_differencing_chain() {
    chain("vpc", "subformat=dynamic", "vhd");
}

#[test]
fn vhdx_4k_sectors_chain() {
    let dir = tempdir();
    let base = file(&dir, "base.vhdx");
    let mut b = create_vhdx(
        &base,
        &VhdxCreateOptions {
            virtual_size: 10 * MIB,
            fixed: false,
            block_size: Some(MIB as u32),
            logical_sector_size: 4096,
            physical_sector_size: 4096,
            parent: None,
        },
    )
    .expect("create 4k base");
    let mut model = vec![0u8; 10 * MIB as usize];
    let w = writes(21, 10 * MIB, 20);
    write_all(b.as_mut(), &w);
    apply(&mut model, &w);
    b.finish().expect("finish");
    // qemu cannot open 4096-byte-sector VHDX. With fewer blocks than a chunk the BAT layout is
    // the same for 512-byte sectors, so a copy relabelled 512 lets qemu check our payload and
    // BAT layout (logical sector size item: metadata region 2 MiB + 64 KiB + 32).
    let relabelled = file(&dir, "as512.vhdx");
    let mut bytes = std::fs::read(&base).expect("read base");
    let at = (2 * MIB + 64 * 1024 + 32) as usize;
    assert_eq!(bytes[at..at + 4], 4096u32.to_le_bytes());
    bytes[at..at + 4].copy_from_slice(&512u32.to_le_bytes());
    std::fs::write(&relabelled, bytes).expect("write");
    let base_raw = file(&dir, "base.raw");
    std::fs::write(&base_raw, &model).expect("model");
    let (code, text) = qemu_compare(&relabelled, "vhdx", &base_raw, "raw");
    assert_eq!(code, 0, "{text}");
    let child = file(&dir, "child.vhdx");
    let mut c = create_differencing(&child, Format::Vhdx, &base).expect("child");
    let w = writes(22, 10 * MIB, 20);
    write_all(c.as_mut(), &w);
    apply(&mut model, &w);
    c.finish().expect("finish");
    let d = open(&child).expect("open");
    let info = d.info();
    assert_eq!(
        (info.logical_sector_size, info.physical_sector_size),
        (4096, 4096)
    );
    assert!(read_all(d.as_ref()) == model);
    let ext = d.extents().expect("extents");
    assert!(ext.iter().any(|e| e.kind == ferry_disk::ExtentKind::Absent));
    assert!(
        ext.iter()
            .any(|e| e.kind == ferry_disk::ExtentKind::Allocated)
    );
}

#[test]
fn parent_loop_is_refused() {
    let dir = tempdir();
    let base = file(&dir, "p.vhd");
    qemu_create(&base, "vpc", "subformat=dynamic", 4 * MIB);
    let child = file(&dir, "c.vhd");
    create_differencing(&child, Format::Vhd, &base)
        .expect("child")
        .finish()
        .expect("finish");
    // Point the child at itself: locator names p.vhd -> c.vhd, parent id -> its own id.
    let mut b = std::fs::read(&child).expect("read");
    let own_id: Vec<u8> = b[68..84].to_vec();
    let p16: Vec<u8> = "p.vhd"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let c16: Vec<u8> = "c.vhd"
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let mut i = 0;
    while i + p16.len() <= b.len() {
        if b[i..i + p16.len()] == p16[..] {
            b[i..i + p16.len()].copy_from_slice(&c16);
        }
        i += 1;
    }
    b[512 + 40..512 + 56].copy_from_slice(&own_id);
    std::fs::write(&child, &b).expect("write");
    match open(&child) {
        Err(DiskError::Parent { reason, .. }) => assert!(reason.contains("loop"), "{reason}"),
        Err(e) => panic!("expected a parent loop error, got {e}"),
        Ok(_) => panic!("a self-parented disk must not open"),
    }
}

#[test]
fn pending_log_in_differencing_child_reads_through() {
    let dir = tempdir();
    let base = file(&dir, "base.vhdx");
    qemu_create(&base, "vhdx", "subformat=dynamic,block_size=1M", 8 * MIB);
    qemu_io(&base, "vhdx", &["write -P 0x21 0 8388608".to_string()]);
    let child = file(&dir, "child.vhdx");
    create_differencing(&child, Format::Vhdx, &base)
        .expect("child")
        .finish()
        .expect("finish");
    // A partial-block write: payload block, sector bitmap block and both BAT entries are
    // logged together; the crash leaves all of it in the log only.
    ferry_disk::testing::crash_after_log(&child, 3 * MIB + 1024, &[0x99; 2048]).expect("hook");
    let before = sha(&child);
    let d = open(&child).expect("open");
    let mut buf = vec![0u8; 8192];
    d.read_at(3 * MIB, &mut buf).expect("read");
    assert!(
        buf[..1024].iter().all(|&b| b == 0x21),
        "parent before the write"
    );
    assert!(buf[1024..3072].iter().all(|&b| b == 0x99), "logged write");
    assert!(
        buf[3072..].iter().all(|&b| b == 0x21),
        "parent after the write"
    );
    drop(d);
    assert!(sha(&child) == before);
}

/// More block allocations than the 1 MiB log holds entries: the log wraps and stays valid.
#[test]
fn vhdx_log_wraps_during_in_place_writes() {
    let dir = tempdir();
    let img = file(&dir, "w.vhdx");
    qemu_create(&img, "vhdx", "subformat=dynamic,block_size=1M", 160 * MIB);
    let mut model = vec![0u8; 160 * MIB as usize];
    let mut d = open_rw(&img).expect("open_rw");
    let mut r = Rng(31);
    for b in 0..160u64 {
        let off = b * MIB + r.below(MIB - 4096);
        let data = vec![(b % 250) as u8 + 1; 4096];
        d.write_at(off, &data).expect("write");
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    d.finish().expect("finish");
    let raw = file(&dir, "model.raw");
    std::fs::write(&raw, &model).expect("model");
    let (code, text) = qemu_compare(&img, "vhdx", &raw, "raw");
    assert_eq!(code, 0, "{text}");
    let (code, text) = status("qemu-img", &["check", "-f", "vhdx", p(&img)]);
    assert_eq!(code, 0, "{text}");

    // The same again in a fresh file, but the session ends in a crash after its wrapped last
    // entry: the replayed head is found past the wrap.
    let img2 = file(&dir, "w2.vhdx");
    qemu_create(&img2, "vhdx", "subformat=dynamic,block_size=1M", 160 * MIB);
    let mut r = Rng(31);
    let mut writes = Vec::new();
    for b in 0..160u64 {
        let off = b * MIB + r.below(MIB - 4096);
        writes.push((off, vec![(b % 250) as u8 + 1; 4096]));
    }
    let refs: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, d.as_slice())).collect();
    ferry_disk::testing::crash_after_writes(&img2, &refs).expect("crash hook");
    let before = sha(&img2);
    assert!(read_all(open(&img2).expect("open pending").as_ref()) == model);
    assert!(sha(&img2) == before);
    run(
        "qemu-img",
        &["check", "-q", "-r", "all", "-f", "vhdx", p(&img2)],
    );
    let (code, text) = qemu_compare(&img2, "vhdx", &raw, "raw");
    assert_eq!(code, 0, "qemu replay of the wrapped log: {text}");
}

/// New files skip zero writes only where nothing was written: zeros over earlier data stick.
#[test]
fn fresh_writers_honour_zero_overwrites() {
    use ferry_disk::{CreateOptions, Subformat, create};
    let dir = tempdir();
    let size = 9 * MIB;
    let w = [
        (MIB, vec![0x41u8; 3 * MIB as usize]),
        (2 * MIB, vec![0u8; 4096]),
        (3 * MIB, vec![0u8; MIB as usize]),
        (6 * MIB, vec![0u8; 8192]),
        (8 * MIB, vec![0x42u8; 512]),
    ];
    let mut model = vec![0u8; size as usize];
    apply(&mut model, &w);
    let model_raw = file(&dir, "model.raw");
    std::fs::write(&model_raw, &model).expect("model");
    for (i, (format, sub, q)) in [
        (Format::Raw, Subformat::Fixed, "raw"),
        (Format::Vhd, Subformat::Fixed, "vpc"),
        (Format::Vhd, Subformat::Dynamic, "vpc"),
        (Format::Vhdx, Subformat::Fixed, "vhdx"),
        (Format::Vhdx, Subformat::Dynamic, "vhdx"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = file(&dir, &format!("o{i}"));
        let mut d = create(
            &out,
            format,
            &CreateOptions {
                virtual_size: size,
                subformat: sub,
                block_size: Some(MIB as u32),
            },
        )
        .expect("create");
        write_all(d.as_mut(), &w);
        d.finish().expect("finish");
        let (code, text) = qemu_compare(&out, q, &model_raw, "raw");
        assert_eq!(code, 0, "{format} {sub}: {text}");
    }
}

#[test]
fn data_blocks_skip_holes_and_zero_blocks() {
    let dir = tempdir();
    let img = file(&dir, "d.vhdx");
    qemu_create(
        &img,
        "vhdx",
        "subformat=dynamic,block_size=1M",
        10 * MIB + 512,
    );
    qemu_io(
        &img,
        "vhdx",
        &[
            "write -P 1 4096 512".to_string(),
            format!("write -P 2 {} 3145728", 3 * MIB + 100 * 512),
            format!("write -z {} 1048576", 8 * MIB),
            format!("write -P 3 {} 512", 10 * MIB),
        ],
    );
    let d = open(&img).expect("open");
    let blocks: Vec<(u64, u64)> = ferry_disk::data_blocks(d.as_ref(), MIB)
        .expect("blocks")
        .collect();
    assert_eq!(
        blocks,
        vec![
            (0, MIB),
            (3 * MIB, MIB),
            (4 * MIB, MIB),
            (5 * MIB, MIB),
            (6 * MIB, MIB),
            // qemu's zero write allocated this block (with zeros): allocated, so listed.
            (8 * MIB, MIB),
            (10 * MIB, 512)
        ]
    );
    // qemu marks unwritten blocks ZERO (block_state_zero): Zero runs are skipped too.
    assert_eq!(
        d.extents().expect("map")[1].kind,
        ferry_disk::ExtentKind::Zero
    );
    // 4 MiB blocks: the same data, coarser.
    let blocks: Vec<(u64, u64)> = ferry_disk::data_blocks(d.as_ref(), 4 * MIB)
        .expect("blocks")
        .collect();
    assert_eq!(
        blocks,
        vec![(0, 4 * MIB), (4 * MIB, 4 * MIB), (8 * MIB, 2 * MIB + 512)]
    );
}
