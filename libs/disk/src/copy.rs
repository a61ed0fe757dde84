//! Streaming copy from any block device into any writer: only data that exists is read, zero
//! chunks are never written (new files read zeros there), and memory is one chunk buffer.

use crate::io::{AlignedBuf, is_zero, push_extent};
use crate::{BlockDevice, DiskError, DiskWriter, Extent, ExtentKind};

/// Bytes per read: large enough for sequential throughput, small enough to bound memory.
pub const COPY_CHUNK: usize = 4 << 20;
/// Granularity of zero detection when copying: a sparse file's holes are at least this big.
const ZERO_GRAIN: usize = 64 << 10;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes handed to the writer (non-zero chunks).
    pub written: u64,
}

/// The allocation map of what `dev` shows through its whole chain: a run is Allocated if some
/// layer holds data there, Zero if the topmost layer that decides says zeros, Absent if no
/// layer has it (reads zeros). Covers `[0, virtual_size)`.
pub fn visible_extents(dev: &dyn BlockDevice) -> Result<Vec<Extent>, DiskError> {
    let own = dev.extents()?;
    let Some(parent) = dev.parent() else {
        return Ok(own);
    };
    let below = visible_extents(parent)?;
    let psize = parent.virtual_size();
    let mut out = Vec::with_capacity(own.len());
    let mut j = 0;
    for e in own {
        if e.kind != ExtentKind::Absent {
            push_extent(&mut out, e.offset, e.len, e.kind);
            continue;
        }
        let end = e.offset + e.len;
        let mut pos = e.offset;
        // Both maps are sorted: one sweep over the parent's runs.
        while pos < end {
            while j < below.len() && below[j].offset + below[j].len <= pos {
                j += 1;
            }
            match below.get(j) {
                Some(b) if pos < psize => {
                    let n = (b.offset + b.len).min(end) - pos;
                    push_extent(&mut out, pos, n, b.kind);
                    pos += n;
                }
                // Past the parent's end a child reads zeros.
                _ => {
                    push_extent(&mut out, pos, end - pos, ExtentKind::Absent);
                    pos = end;
                }
            }
        }
    }
    Ok(out)
}

/// Copies the visible content of `src` (its whole chain) into `dst`, which must read zeros
/// wherever it is not written (a new file). Writes arrive in increasing offset order.
pub fn copy_into(src: &dyn BlockDevice, dst: &mut dyn DiskWriter) -> Result<CopyStats, DiskError> {
    let mut buf = AlignedBuf::new(COPY_CHUNK);
    let mut stats = CopyStats::default();
    for e in visible_extents(src)? {
        if e.kind != ExtentKind::Allocated {
            continue;
        }
        let mut off = e.offset;
        let end = e.offset + e.len;
        while off < end {
            let n = ((end - off) as usize).min(COPY_CHUNK);
            let b = &mut buf.as_mut_slice()[..n];
            src.read_at(off, b)?;
            stats.read += n as u64;
            // Write only the runs of non-zero pieces, so zeros inside allocated blocks stay
            // holes in sparse outputs.
            let mut run: Option<usize> = None;
            for p in (0..n).step_by(ZERO_GRAIN).chain(std::iter::once(n)) {
                let zero = p == n || is_zero(&b[p..(p + ZERO_GRAIN).min(n)]);
                match (zero, run) {
                    (false, None) => run = Some(p),
                    (true, Some(start)) => {
                        dst.write_at(off + start as u64, &b[start..p])?;
                        stats.written += (p - start) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            off += n as u64;
        }
    }
    Ok(stats)
}

/// Fixed-size blocks of a device that hold data in some layer of its chain, in order, as
/// `(offset, len)` (the last block may be short). Blocks made only of Zero and Absent runs are
/// skipped, so a reader touches only what exists; an allocated block is listed even if its
/// bytes are zeros (checking content is the reader's job). Memory is the extent list.
pub struct DataBlocks {
    extents: Vec<Extent>,
    idx: usize,
    pos: u64,
    block: u64,
    size: u64,
}

impl Iterator for DataBlocks {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        while let Some(e) = self.extents.get(self.idx) {
            if e.kind != ExtentKind::Allocated || e.offset + e.len <= self.pos {
                self.idx += 1;
                continue;
            }
            let start = self.pos.max(e.offset);
            let b = start / self.block * self.block;
            let len = self.block.min(self.size - b);
            self.pos = b + len;
            return Some((b, len));
        }
        None
    }
}

/// Iterates the `block`-sized blocks of `dev` that hold data (see [`DataBlocks`]).
pub fn data_blocks(dev: &dyn BlockDevice, block: u64) -> Result<DataBlocks, DiskError> {
    if block == 0 {
        return Err(DiskError::InvalidArgument(
            "block size must be positive".into(),
        ));
    }
    Ok(DataBlocks {
        extents: visible_extents(dev)?,
        idx: 0,
        pos: 0,
        block,
        size: dev.virtual_size(),
    })
}
