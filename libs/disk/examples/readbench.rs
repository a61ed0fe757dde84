//! Sequential read benchmark: reads a whole image through ferry-disk the way the agent does
//! (large page-aligned reads, zero detection, a reader per core sharing one open image through
//! `&self` preads) and prints `bytes seconds nonzero_bytes` on stdout.
//!
//! Usage: readbench FILE [CHUNK_MIB] [THREADS]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use ferry_disk::{AlignedBuf, DiskError, is_zero, open};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next()
            .ok_or("usage: readbench FILE [CHUNK_MIB] [THREADS]")?,
    );
    let chunk = args.next().map_or(Ok(8), |s| s.parse::<usize>())? << 20;
    let threads = match args.next() {
        Some(s) => s.parse()?,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    let d = open(&path)?;
    let size = d.virtual_size();
    let next = AtomicU64::new(0);
    let nonzero = AtomicU64::new(0);
    let started = Instant::now();
    // Chunks are handed out in order, so the file is still read front to back.
    std::thread::scope(|s| -> Result<(), DiskError> {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<(), DiskError> {
                    let mut buf = AlignedBuf::new(chunk);
                    loop {
                        let off = next.fetch_add(chunk as u64, Ordering::Relaxed);
                        if off >= size {
                            return Ok(());
                        }
                        let n = ((size - off) as usize).min(chunk);
                        let b = &mut buf.as_mut_slice()[..n];
                        d.read_at(off, b)?;
                        if !is_zero(b) {
                            nonzero.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| DiskError::InvalidArgument("a reader thread panicked".into()))??;
        }
        Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!("{size} {secs:.6} {}", nonzero.load(Ordering::Relaxed));
    Ok(())
}
