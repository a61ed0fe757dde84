//! The qemu matrix: images made and written by qemu-img/qemu-io read back identical to
//! `qemu-img convert -O raw`, and every file we convert them into is identical per
//! `qemu-img compare`, passes `qemu-img check` (vhdx) and has qemu's virtual size.

mod common;

use common::*;
use ferry_disk::{CreateOptions, ExtentKind, Format, Subformat, copy_into, create, open};

const MIB: u64 = 1 << 20;

/// Pattern writes, zero writes over data and over holes, writes that straddle block
/// boundaries and the last bytes of the disk.
fn qemu_writes(size: u64) -> Vec<String> {
    let mut c = vec![
        "write -P 0xab 0 1048576".to_string(),
        "write -z 524288 65536".to_string(),
        format!("write -P 0xcd {} 8192", 3 * MIB / 2),
        format!("write -P 0x5a {} 12288", 3 * MIB - 4096),
        format!("write -P 0x33 {} 1048576", 12 * MIB),
        format!("write -z {} 1048576", 12 * MIB),
        format!("write -z {} {}", 9 * MIB, 2 * MIB),
        format!("write -P 0x7e {} 1536", 5 * MIB + 512),
    ];
    c.push(format!("write -P 0x77 {} 8192", size - 8192));
    c
}

fn check_source(fmt: &str, opts: &str, size: u64) {
    let dir = tempdir();
    let src = file(&dir, "src.img");
    qemu_create(&src, fmt, opts, size);
    let qsize = qemu_size(&src, fmt);
    qemu_io(&src, fmt, &qemu_writes(qsize));
    let reference = file(&dir, "ref.raw");
    qemu_to_raw(&src, fmt, &reference);
    let want = std::fs::read(&reference).expect("read reference");
    // The oracle really holds the patterns (guards against a no-op qemu-io).
    assert!(want[..512].iter().all(|&b| b == 0xab));
    assert!(want[512 * 1024..576 * 1024].iter().all(|&b| b == 0));
    assert_eq!(want[(5 * MIB + 512) as usize], 0x7e);

    let d = open(&src).expect("open source");
    assert_eq!(d.virtual_size(), qsize, "virtual size of {fmt} {opts}");
    assert_eq!(d.info().virtual_size, qsize);
    let got = read_all(d.as_ref());
    assert!(
        got == want,
        "{fmt} {opts} {size}: our read differs from qemu's raw"
    );
    let ext = d.extents().expect("extents");
    let mut pos = 0;
    for e in &ext {
        assert_eq!(e.offset, pos, "extents must be sorted and contiguous");
        pos += e.len;
    }
    assert_eq!(pos, qsize);
    let allocated: u64 = ext
        .iter()
        .filter(|e| e.kind == ExtentKind::Allocated)
        .map(|e| e.len)
        .sum();
    assert!(allocated >= MIB, "the written megabyte is allocated");

    let outs: [(Format, Subformat, &str); 5] = [
        (Format::Raw, Subformat::Fixed, "raw"),
        (Format::Vhd, Subformat::Dynamic, "vpc"),
        (Format::Vhd, Subformat::Fixed, "vpc"),
        (Format::Vhdx, Subformat::Dynamic, "vhdx"),
        (Format::Vhdx, Subformat::Fixed, "vhdx"),
    ];
    for (i, (format, sub, q)) in outs.into_iter().enumerate() {
        let out = file(&dir, &format!("out{i}.{format}"));
        let mut w = create(
            &out,
            format,
            &CreateOptions {
                virtual_size: qsize,
                subformat: sub,
                block_size: None,
            },
        )
        .expect("create");
        copy_into(d.as_ref(), w.as_mut()).expect("copy");
        w.finish().expect("finish");
        let (code, text) = qemu_compare(&src, fmt, &out, q);
        assert_eq!(
            code, 0,
            "{fmt} {opts} -> {format} {sub}: qemu-img compare: {text}"
        );
        assert_eq!(
            qemu_size(&out, q),
            qsize,
            "{format} {sub}: qemu virtual size"
        );
        if q == "vhdx" {
            let (code, text) = status("qemu-img", &["check", "-f", "vhdx", p(&out)]);
            assert_eq!(code, 0, "{format} {sub}: qemu-img check: {text}");
        }
        let back = open(&out).expect("open our output");
        assert!(
            read_all(back.as_ref()) == want,
            "{format} {sub}: our read of our output differs"
        );
    }
}

#[test]
fn vhdx_dynamic_1m_blocks_multiple() {
    check_source("vhdx", "subformat=dynamic,block_size=1M", 24 * MIB);
}

#[test]
fn vhdx_dynamic_1m_blocks_not_multiple() {
    check_source("vhdx", "subformat=dynamic,block_size=1M", 24 * MIB + 1536);
}

#[test]
fn vhdx_dynamic_2m_blocks_not_multiple() {
    check_source("vhdx", "subformat=dynamic,block_size=2M", 23 * MIB + 4096);
}

#[test]
fn vhdx_dynamic_32m_blocks_not_multiple() {
    check_source("vhdx", "subformat=dynamic,block_size=32M", 40 * MIB);
}

#[test]
fn vhdx_dynamic_32m_blocks_multiple() {
    check_source("vhdx", "subformat=dynamic,block_size=32M", 64 * MIB);
}

#[test]
fn vhdx_fixed_block_state_zero() {
    check_source("vhdx", "subformat=fixed", 24 * MIB);
}

#[test]
fn vhdx_fixed_present_blocks() {
    check_source(
        "vhdx",
        "subformat=fixed,block_state_zero=off",
        20 * MIB + 512,
    );
}

#[test]
fn vpc_dynamic_chs_size() {
    check_source("vpc", "subformat=dynamic", 30 * MIB);
}

#[test]
fn vpc_dynamic_force_size() {
    check_source("vpc", "subformat=dynamic,force_size=on", 24 * MIB + 512);
}

#[test]
fn vpc_fixed_force_size() {
    check_source("vpc", "subformat=fixed,force_size=on", 24 * MIB);
}

#[test]
fn vpc_fixed_chs_size() {
    check_source("vpc", "subformat=fixed", 21 * MIB + 1024);
}

#[test]
fn raw_source() {
    check_source("raw", "", 22 * MIB + 512);
}
