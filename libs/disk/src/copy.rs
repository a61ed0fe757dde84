//! Streaming copy from any block device into any writer: only data that exists is read, zero
//! chunks are never written (new files read zeros there), and memory is one chunk buffer.

use crate::io::{AlignedBuf, is_zero};
use crate::{BlockDevice, DiskError, DiskWriter, ExtentKind};

/// Bytes per read: large enough for sequential throughput, small enough to bound memory.
pub const COPY_CHUNK: usize = 4 << 20;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes handed to the writer (non-zero chunks).
    pub written: u64,
}

/// Copies the visible content of `src` (its whole chain) into `dst`, which must read zeros
/// wherever it is not written (a new file). Writes arrive in increasing offset order.
pub fn copy_into(src: &dyn BlockDevice, dst: &mut dyn DiskWriter) -> Result<CopyStats, DiskError> {
    let has_parent = src.parent().is_some();
    let mut buf = AlignedBuf::new(COPY_CHUNK);
    let mut stats = CopyStats::default();
    for e in src.extents()? {
        let needed = match e.kind {
            ExtentKind::Allocated => true,
            ExtentKind::Zero => false,
            ExtentKind::Absent => has_parent,
        };
        if !needed {
            continue;
        }
        let mut off = e.offset;
        let end = e.offset + e.len;
        while off < end {
            let n = ((end - off) as usize).min(COPY_CHUNK);
            let b = &mut buf.as_mut_slice()[..n];
            src.read_at(off, b)?;
            stats.read += n as u64;
            if !is_zero(b) {
                dst.write_at(off, b)?;
                stats.written += n as u64;
            }
            off += n as u64;
        }
    }
    Ok(stats)
}
