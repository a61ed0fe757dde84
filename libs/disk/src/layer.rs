//! The read path shared by block-based formats: a request is cut into pieces that come from
//! the file, are zero, or come from the parent; file pieces that are contiguous on disk are
//! merged into one pread so a sequential read costs one syscall per run, not per block.

use crate::io::DiskFile;
use crate::{BlockDevice, DiskError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Bytes at this file offset.
    File(u64),
    Zero,
    /// Not in this layer: parent or zeros.
    Parent,
}

pub(crate) struct Reader<'a> {
    pub file: &'a DiskFile,
    pub parent: Option<&'a dyn BlockDevice>,
    pub structure: &'static str,
    /// Pending file run: (file offset, buffer start, length).
    pending: Option<(u64, usize, usize)>,
}

impl<'a> Reader<'a> {
    pub fn new(
        file: &'a DiskFile,
        parent: Option<&'a dyn BlockDevice>,
        structure: &'static str,
    ) -> Self {
        Reader {
            file,
            parent,
            structure,
            pending: None,
        }
    }

    /// Fills `buf[at..at+len]` (virtual offset `voff`) from `piece`.
    pub fn piece(
        &mut self,
        buf: &mut [u8],
        at: usize,
        len: usize,
        voff: u64,
        piece: Piece,
    ) -> Result<(), DiskError> {
        if let Piece::File(foff) = piece {
            if let Some((pf, pb, pl)) = self.pending
                && pf + pl as u64 == foff
                && pb + pl == at
            {
                self.pending = Some((pf, pb, pl + len));
                return Ok(());
            }
            self.flush(buf)?;
            self.pending = Some((foff, at, len));
            return Ok(());
        }
        self.flush(buf)?;
        let dst = &mut buf[at..at + len];
        match (piece, self.parent) {
            (Piece::Parent, Some(p)) => {
                // A child may be larger than its parent: the excess reads as zeros.
                let avail = p.virtual_size().saturating_sub(voff).min(len as u64) as usize;
                let (head, tail) = dst.split_at_mut(avail);
                tail.fill(0);
                if head.is_empty() {
                    Ok(())
                } else {
                    p.read_at(voff, head)
                }
            }
            _ => {
                dst.fill(0);
                Ok(())
            }
        }
    }

    pub fn flush(&mut self, buf: &mut [u8]) -> Result<(), DiskError> {
        if let Some((foff, at, len)) = self.pending.take() {
            self.file
                .read_exact_at(foff, &mut buf[at..at + len], self.structure)?;
        }
        Ok(())
    }
}

/// Runs of equal bits in a sector bitmap, starting at bit `first`, `count` bits long.
/// VHD bitmaps are MSB-first, VHDX LSB-first.
pub(crate) fn bit_runs(bitmap: &[u8], first: u64, count: u64, msb_first: bool) -> Vec<(u64, bool)> {
    let bit = |i: u64| -> bool {
        let byte = bitmap.get((i / 8) as usize).copied().unwrap_or(0);
        let mask = if msb_first {
            0x80u8 >> (i % 8)
        } else {
            1u8 << (i % 8)
        };
        byte & mask != 0
    };
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let mut i = first;
    let end = first + count;
    while i < end {
        let b = bit(i);
        // Whole bytes of equal bits are skipped at once: bitmaps are mostly all-0 or all-1.
        let mut j = i + 1;
        while j < end {
            if j.is_multiple_of(8) && j + 8 <= end {
                let byte = bitmap.get((j / 8) as usize).copied().unwrap_or(0);
                if byte == if b { 0xFF } else { 0 } {
                    j += 8;
                    continue;
                }
            }
            if bit(j) != b {
                break;
            }
            j += 1;
        }
        match runs.last_mut() {
            Some(last) if last.1 == b => last.0 += j - i,
            _ => runs.push((j - i, b)),
        }
        i = j;
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_runs_msb_and_lsb() {
        let bm = [0b1100_0000u8, 0xFF, 0x00];
        assert_eq!(
            bit_runs(&bm, 0, 24, true),
            vec![(2, true), (6, false), (8, true), (8, false)]
        );
        assert_eq!(
            bit_runs(&bm, 0, 24, false),
            vec![(6, false), (10, true), (8, false)]
        );
        assert_eq!(bit_runs(&bm, 1, 2, true), vec![(1, true), (1, false)]);
    }
}
