//! Damaged files fail with an error that names the structure and its offset; tolerated
//! quirks (bad VHD footer checksum, equal VHDX header sequence numbers, damaged region table 1)
//! open without touching the file.

mod common;

use std::path::Path;

use common::*;
use ferry_disk::{CreateOptions, DiskError, Format, Subformat, create, open, open_as};

const MIB: u64 = 1 << 20;

fn make(dir: &tempfile::TempDir, name: &str, format: Format, sub: Subformat) -> std::path::PathBuf {
    let p = file(dir, name);
    let mut w = create(
        &p,
        format,
        &CreateOptions {
            virtual_size: 8 * MIB,
            subformat: sub,
            block_size: Some(MIB as u32),
        },
    )
    .expect("create");
    w.write_at(0, &vec![0x61; 3 * MIB as usize]).expect("write");
    w.write_at(5 * MIB, &vec![0x62; 4096]).expect("write");
    w.finish().expect("finish");
    p
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let mut b = std::fs::read(path).expect("read");
    b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).expect("write");
}

fn err_of(r: Result<Box<dyn ferry_disk::BlockDevice>, DiskError>) -> String {
    match r {
        Ok(_) => panic!("damaged file opened"),
        Err(e) => e.to_string(),
    }
}

fn vhdx_crc(path: &Path, start: u64, len: usize) {
    let mut b = std::fs::read(path).expect("read");
    let s = start as usize;
    b[s + 4..s + 8].fill(0);
    let c = crc32c::crc32c(&b[s..s + len]);
    b[s + 4..s + 8].copy_from_slice(&c.to_le_bytes());
    std::fs::write(path, b).expect("write");
}

#[test]
fn vhd_bat_entry_beyond_eof() {
    let dir = tempdir();
    let p = make(&dir, "d.vhd", Format::Vhd, Subformat::Dynamic);
    patch(&p, 1536, &0x00FF_FFFFu32.to_be_bytes());
    let e = err_of(open(&p));
    assert!(
        e.contains("vhd bat entry at offset 0x600") && e.contains("beyond"),
        "{e}"
    );
}

#[test]
fn vhd_bat_entries_overlap() {
    let dir = tempdir();
    let p = make(&dir, "d.vhd", Format::Vhd, Subformat::Dynamic);
    let b = std::fs::read(&p).expect("read");
    patch(&p, 1540, &b[1536..1540]);
    let e = err_of(open(&p));
    assert!(
        e.contains("vhd bat entry at offset 0x604") && e.contains("overlaps"),
        "{e}"
    );
}

#[test]
fn vhd_truncated() {
    let dir = tempdir();
    let p = make(&dir, "d.vhd", Format::Vhd, Subformat::Dynamic);
    let b = std::fs::read(&p).expect("read");
    std::fs::write(&p, &b[..b.len() - 600_000]).expect("write");
    let e = err_of(open(&p));
    assert!(e.contains("vhd bat entry"), "{e}");
    std::fs::write(&p, &b[..300]).expect("write");
    let e = err_of(open_as(&p, Format::Vhd));
    assert!(e.contains("vhd footer") && e.contains("0x12c"), "{e}");
}

#[test]
fn vhd_bad_footer_checksum_is_a_warning() {
    let dir = tempdir();
    let p = make(&dir, "f.vhd", Format::Vhd, Subformat::Fixed);
    let len = std::fs::metadata(&p).expect("meta").len();
    patch(&p, len - 512 + 64, &[0xDE, 0xAD, 0xBE, 0xEF]);
    let before = std::fs::read(&p).expect("read");
    let d = open(&p).expect("a bad footer checksum must not stop reads");
    let mut buf = vec![0u8; 4096];
    d.read_at(5 * MIB, &mut buf).expect("read");
    assert!(buf.iter().all(|&x| x == 0x62));
    drop(d);
    assert!(
        std::fs::read(&p).expect("read") == before,
        "never silently fixed"
    );
}

#[test]
fn vhd_absurd_size() {
    let dir = tempdir();
    let p = make(&dir, "d.vhd", Format::Vhd, Subformat::Dynamic);
    let len = std::fs::metadata(&p).expect("meta").len();
    patch(&p, len - 512 + 48, &(1u64 << 60).to_be_bytes());
    let e = err_of(open(&p));
    assert!(e.contains("vhd footer current size"), "{e}");
}

#[test]
fn vhdx_wrong_signature() {
    let dir = tempdir();
    let p = make(&dir, "d.vhdx", Format::Vhdx, Subformat::Dynamic);
    patch(&p, 0, b"vhdxfilX");
    let e = err_of(open_as(&p, Format::Vhdx));
    assert!(e.contains("vhdx file identifier at offset 0x0"), "{e}");
}

#[test]
fn vhdx_both_headers_bad() {
    let dir = tempdir();
    let p = make(&dir, "d.vhdx", Format::Vhdx, Subformat::Dynamic);
    patch(&p, 64 * 1024 + 100, &[1]);
    patch(&p, 128 * 1024 + 100, &[1]);
    let e = err_of(open(&p));
    assert!(e.contains("vhdx header at offset 0x10000"), "{e}");
}

#[test]
fn vhdx_equal_header_sequence_numbers_accepted() {
    let dir = tempdir();
    let p = make(&dir, "d.vhdx", Format::Vhdx, Subformat::Dynamic);
    let b = std::fs::read(&p).expect("read");
    // Byte-identical twins, as Disk2vhd writes them.
    let h1 = b[64 * 1024..68 * 1024].to_vec();
    patch(&p, 128 * 1024, &h1);
    let d = open(&p).expect("equal sequence numbers are accepted");
    let mut buf = vec![0u8; 512];
    d.read_at(0, &mut buf).expect("read");
    assert!(buf.iter().all(|&x| x == 0x61));
}

#[test]
fn vhdx_region_table_fallback() {
    let dir = tempdir();
    let p = make(&dir, "d.vhdx", Format::Vhdx, Subformat::Dynamic);
    patch(&p, 192 * 1024 + 40, &[0xFF]);
    open(&p).expect("region table 2 is used when 1 is damaged");
    patch(&p, 256 * 1024 + 40, &[0xFF]);
    let e = err_of(open(&p));
    assert!(
        e.contains("vhdx region table at offset 0x30000") && e.contains("checksum"),
        "{e}"
    );
}

#[test]
fn vhdx_bat_beyond_eof_and_overlap() {
    let dir = tempdir();
    let p = make(&dir, "d.vhdx", Format::Vhdx, Subformat::Dynamic);
    let good = std::fs::read(&p).expect("read");
    patch(&p, 3 * MIB, &((1u64 << 40) | 6).to_le_bytes());
    let e = err_of(open(&p));
    assert!(
        e.contains("vhdx bat entry at offset 0x300000") && e.contains("outside the file"),
        "{e}"
    );
    std::fs::write(&p, &good).expect("restore");
    patch(
        &p,
        3 * MIB + 8,
        &good[3 * MIB as usize..3 * MIB as usize + 8],
    );
    let e = err_of(open(&p));
    assert!(e.contains("overlaps"), "{e}");
    std::fs::write(&p, &good).expect("restore");
    patch(&p, 3 * MIB, &((1u64 << 20) | 6).to_le_bytes());
    let e = err_of(open(&p));
    assert!(
        e.contains("overlaps metadata") || e.contains("overlaps"),
        "{e}"
    );
}

#[test]
fn vhdx_absurd_sizes() {
    let dir = tempdir();
    let p = make(&dir, "d.vhdx", Format::Vhdx, Subformat::Dynamic);
    let good = std::fs::read(&p).expect("read");
    // Virtual disk size item (after the 8-byte file parameters at 64 KiB into the region).
    patch(&p, 2 * MIB + 64 * 1024 + 8, &(1u64 << 62).to_le_bytes());
    let e = err_of(open(&p));
    assert!(e.contains("vhdx virtual disk size"), "{e}");
    std::fs::write(&p, &good).expect("restore");
    patch(&p, 2 * MIB + 64 * 1024, &3u32.to_le_bytes());
    let e = err_of(open(&p));
    assert!(
        e.contains("vhdx file parameters") && e.contains("block size 3"),
        "{e}"
    );
}

#[test]
fn vhdx_log_with_bad_sequence_is_refused() {
    let dir = tempdir();
    let p = make(&dir, "d.vhdx", Format::Vhdx, Subformat::Dynamic);
    ferry_disk::testing::crash_after_log(&p, 7 * MIB, &[0x77; 4096]).expect("hook");
    let before = std::fs::read(&p).expect("read");
    open(&p).expect("a valid pending log opens");
    // Entry header sequence number no longer matches its descriptors and data sectors; CRC
    // re-sealed so only the sequence is wrong.
    let entry = MIB;
    let len = u32::from_le_bytes(
        before[entry as usize + 8..entry as usize + 12]
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    patch(&p, entry + 16, &99u64.to_le_bytes());
    vhdx_crc(&p, entry, len);
    let e = err_of(open(&p));
    assert!(
        e.contains("vhdx log at offset 0x100000") && e.contains("no complete entry sequence"),
        "{e}"
    );
}

#[test]
fn raw_of_any_bytes_opens() {
    let dir = tempdir();
    let p = file(&dir, "x.raw");
    std::fs::write(&p, vec![7u8; 1000]).expect("write");
    let d = open(&p).expect("raw");
    assert_eq!(d.virtual_size(), 1000);
    let mut b = [0u8; 10];
    assert!(matches!(
        d.read_at(995, &mut b),
        Err(DiskError::OutOfRange { .. })
    ));
}

#[test]
fn vhd_511_byte_footer_opens() {
    let dir = tempdir();
    let p = make(&dir, "f.vhd", Format::Vhd, Subformat::Fixed);
    let mut b = std::fs::read(&p).expect("read");
    // Drop the last reserved byte, as Virtual PC before 2004 did.
    assert_eq!(b.pop(), Some(0));
    std::fs::write(&p, &b).expect("write");
    let d = open(&p).expect("511-byte footer");
    assert_eq!(d.info().format, "vhd");
    let mut buf = vec![0u8; 4096];
    d.read_at(5 * MIB, &mut buf).expect("read");
    assert!(buf.iter().all(|&x| x == 0x62));
}

#[test]
fn vhdx_log_descriptor_outside_bounds_is_refused() {
    let dir = tempdir();
    let p = make(&dir, "d.vhdx", Format::Vhdx, Subformat::Dynamic);
    ferry_disk::testing::crash_after_log(&p, 7 * MIB, &[0x77; 4096]).expect("hook");
    let b = std::fs::read(&p).expect("read");
    let entry = MIB as usize;
    let len = u32::from_le_bytes(b[entry + 8..entry + 12].try_into().expect("4 bytes")) as usize;
    // First descriptor's FileOffset -> the header section, which is never logged.
    patch(&p, MIB + 64 + 16, &(64u64 << 10).to_le_bytes());
    vhdx_crc(&p, MIB, len);
    let e = err_of(open(&p));
    assert!(e.contains("vhdx log descriptor at offset 0x100000"), "{e}");
    // Zero descriptor reaching far past the file.
    std::fs::write(&p, &b).expect("restore");
    patch(&p, MIB + 64, b"zero");
    patch(&p, MIB + 64 + 8, &(1u64 << 50).to_le_bytes());
    vhdx_crc(&p, MIB, len);
    let e = err_of(open(&p));
    assert!(e.contains("vhdx log"), "{e}");
}
