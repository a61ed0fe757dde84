//! Sequential read benchmark: reads a whole image through ferry-disk the way the agent does
//! (large page-aligned reads, zero detection) and prints `bytes seconds` on stdout.
//!
//! Usage: readbench FILE [CHUNK_MIB]

use std::path::PathBuf;
use std::time::Instant;

use ferry_disk::{AlignedBuf, is_zero, open};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().ok_or("usage: readbench FILE [CHUNK_MIB]")?);
    let chunk: usize = args.next().map_or(Ok(8), |s| s.parse())? << 20;
    let d = open(&path)?;
    let size = d.virtual_size();
    let mut buf = AlignedBuf::new(chunk);
    let started = Instant::now();
    let mut off = 0u64;
    let mut nonzero = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(chunk);
        let b = &mut buf.as_mut_slice()[..n];
        d.read_at(off, b)?;
        if !is_zero(b) {
            nonzero += n as u64;
        }
        off += n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{size} {secs:.6} {nonzero}");
    Ok(())
}
