//! Block allocation and metadata commits of the VHDX writer (FORMATS §2.7).
//!
//! Payload and sector-bitmap blocks are appended at the 1 MiB-aligned end of the file; BAT and
//! bitmap changes are committed together: in a new file directly, in an existing file through
//! one log entry (data flushed, log entry flushed, then the sectors in place, flushed).

use std::collections::BTreeMap;

use super::format::*;
use super::log::{SECTOR, build_entry};
use super::writer::VhdxWriter;
use crate::DiskError;
use crate::io::{is_zero, put_le_u64};

impl VhdxWriter {
    /// Reserves `len` bytes at the aligned end of the file (zeros by extension) and writes
    /// `init` at its start. Not durable and not referenced yet.
    fn alloc_space(&mut self, len: u64, init: Option<&[u8]>) -> Result<u64, DiskError> {
        self.begin_session()?;
        let off = self.next_free.max(self.d.f.len.div_ceil(MIB) * MIB);
        self.d.f.set_len(off + len)?;
        if let Some(data) = init {
            self.d.f.write_all_at(off, data, "vhdx payload block")?;
        }
        self.next_free = (off + len).div_ceil(MIB) * MIB;
        Ok(off)
    }

    /// Publishes BAT entries and whole 4 KiB metadata sectors (sector bitmaps).
    fn commit(
        &mut self,
        bat: &[(u64, u64)],
        sectors: BTreeMap<u64, Vec<u8>>,
    ) -> Result<(), DiskError> {
        for &(i, v) in bat {
            if let Some(e) = self.d.bat.get_mut(i as usize) {
                *e = v;
            }
        }
        if self.fresh {
            for (off, s) in &sectors {
                self.d.f.write_all_at(*off, s, "vhdx sector bitmap")?;
            }
            self.bat_dirty |= !bat.is_empty();
            return Ok(());
        }
        let mut sectors = sectors;
        for &(i, v) in bat {
            let at = self.d.bat_offset + i * 8;
            let sat = at / SECTOR as u64 * SECTOR as u64;
            if let std::collections::btree_map::Entry::Vacant(v) = sectors.entry(sat) {
                let mut s = vec![0u8; SECTOR];
                self.d.read_meta(sat, &mut s, "vhdx bat")?;
                v.insert(s);
            }
            if let Some(s) = sectors.get_mut(&sat) {
                put_le_u64(s, (at - sat) as usize, v);
            }
        }
        // New blocks and payload data are durable before the log makes them reachable.
        self.d.f.sync()?;
        self.begin_log()?;
        let writes: Vec<(u64, &[u8])> = sectors.iter().map(|(o, s)| (*o, s.as_slice())).collect();
        let desc_sectors = (writes.len() as u64 + 2).div_ceil(128);
        let need = (desc_sectors + writes.len() as u64) * SECTOR as u64;
        if need > self.d.header.log_length as u64 {
            return Err(DiskError::InvalidArgument(format!(
                "metadata update of {need} bytes does not fit the {} byte log",
                self.d.header.log_length
            )));
        }
        if self.log_pos + need > self.d.header.log_length as u64 {
            self.log_pos = 0;
        }
        let eof = self.d.f.len;
        // Each entry's tail is itself: once its sectors are in place the older ones are dead.
        let entry = build_entry(
            self.log_seq,
            self.log_pos as u32,
            &self.d.header.log_guid,
            eof,
            eof.div_ceil(MIB) * MIB,
            &writes,
        );
        let lo = self.d.header.log_offset + self.log_pos;
        self.d.f.write_all_at(lo, &entry, "vhdx log entry")?;
        self.d.f.sync()?;
        self.log_pos += entry.len() as u64;
        self.log_seq += 1;
        if self.crash_after_log {
            self.crashed = true;
            return Ok(());
        }
        for (off, s) in &sectors {
            self.d.f.write_all_at(*off, s, "vhdx metadata sector")?;
        }
        self.d.f.sync()
    }

    /// Bytes of block `block` that exist (the last block may be short).
    fn block_len(&self, block: u64) -> u64 {
        let bs = self.d.block_size as u64;
        bs.min(self.d.size - block * bs)
    }

    pub(super) fn write_block(
        &mut self,
        block: u64,
        within: u64,
        bytes: &[u8],
    ) -> Result<(), DiskError> {
        let idx = self.d.payload_index(block);
        let e = self.d.bat.get(idx as usize).copied().unwrap_or(0);
        let state = e & 7;
        if state == ST_FULLY_PRESENT {
            let off = e & OFFSET_MASK;
            return self
                .d
                .f
                .write_all_at(off + within, bytes, "vhdx payload block");
        }
        if self.d.has_parent && (state == ST_NOT_PRESENT || state == ST_PARTIALLY_PRESENT) {
            return self.write_partial(block, within, bytes);
        }
        // Reads zero already (not present without parent, zero, unmapped, undefined).
        if is_zero(bytes) {
            return Ok(());
        }
        let whole = self.block_len(block);
        let off = self.alloc_space(whole, None)?;
        self.d
            .f
            .write_all_at(off + within, bytes, "vhdx payload block")?;
        self.commit(&[(idx, off | ST_FULLY_PRESENT)], BTreeMap::new())
    }

    /// A write into a differencing block that is not (fully) here: the written sectors become
    /// present and the others keep reading from the parent (PARTIALLY_PRESENT + sector bitmap).
    fn write_partial(&mut self, block: u64, within: u64, bytes: &[u8]) -> Result<(), DiskError> {
        let lss = self.d.logical as u64;
        let bs = self.d.block_size as u64;
        if !within.is_multiple_of(lss) || !(bytes.len() as u64).is_multiple_of(lss) {
            // A partial logical sector: the rest of it comes from the chain.
            let s0 = within / lss * lss;
            let s1 = (within + bytes.len() as u64).div_ceil(lss) * lss;
            let mut tmp = vec![0u8; (s1 - s0) as usize];
            self.d.read(block * bs + s0, &mut tmp)?;
            let at = (within - s0) as usize;
            tmp[at..at + bytes.len()].copy_from_slice(bytes);
            return self.write_partial(block, s0, &tmp);
        }
        let idx = self.d.payload_index(block);
        let e = self.d.bat.get(idx as usize).copied().unwrap_or(0);
        let mut bat = Vec::new();
        if e & 7 == ST_NOT_PRESENT && within == 0 && bytes.len() as u64 == self.block_len(block) {
            let off = self.alloc_space(bytes.len() as u64, Some(bytes))?;
            return self.commit(&[(idx, off | ST_FULLY_PRESENT)], BTreeMap::new());
        }
        let off = if e & 7 == ST_PARTIALLY_PRESENT {
            e & OFFSET_MASK
        } else {
            let off = self.alloc_space(self.block_len(block), None)?;
            bat.push((idx, off | ST_PARTIALLY_PRESENT));
            off
        };
        self.d
            .f
            .write_all_at(off + within, bytes, "vhdx payload block")?;
        let chunk = block / self.d.chunk_ratio;
        let sbi = self.d.bitmap_index(chunk);
        let sbe = self.d.bat.get(sbi as usize).copied().unwrap_or(0);
        let sb_off = if sbe & 7 == ST_FULLY_PRESENT {
            sbe & OFFSET_MASK
        } else {
            let o = self.alloc_space(MIB, None)?;
            bat.push((sbi, o | ST_FULLY_PRESENT));
            o
        };
        // Set the bits of the written sectors, one 4 KiB bitmap sector at a time.
        let first = (block * bs + within) / lss % SB_SECTORS;
        let count = bytes.len() as u64 / lss;
        let mut sectors: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for bit in first..first + count {
            let byte = sb_off + bit / 8;
            let sat = byte / SECTOR as u64 * SECTOR as u64;
            if let std::collections::btree_map::Entry::Vacant(v) = sectors.entry(sat) {
                let mut s = vec![0u8; SECTOR];
                self.d.read_meta(sat, &mut s, "vhdx sector bitmap")?;
                v.insert(s);
            }
            if let Some(s) = sectors.get_mut(&sat) {
                s[(byte - sat) as usize] |= 1 << (bit % 8);
            }
        }
        self.commit(&bat, sectors)
    }
}
