//! Any bytes as a raw/VHD/VHDX image: open (detected and forced formats), map, read.
#![no_main]

use ferry_disk::{BlockDevice, Format, open, open_as};
use libfuzzer_sys::fuzz_target;

fn exercise(d: &dyn BlockDevice) {
    let _ = d.info();
    let _ = d.extents();
    let size = d.virtual_size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size && off < (8 << 20) {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = d.read_at(off, &mut buf[..n]);
        off += n as u64;
    }
}

fuzz_target!(|data: &[u8]| {
    // The API opens paths: one scratch file per fuzzing process.
    let path = std::env::temp_dir().join(format!("ferry-fuzz-{}.img", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for d in [open(&path), open_as(&path, Format::Vhd), open_as(&path, Format::Vhdx)]
        .into_iter()
        .flatten()
    {
        exercise(d.as_ref());
    }
});
