//! Opening and reading VHD files.

use std::path::{Path, PathBuf};

use super::format::*;
use crate::io::{DiskFile, be_u32, check_range, push_extent};
use crate::layer::{Piece, Reader, bit_runs};
use crate::{BlockDevice, DiskError, DiskInfo, Extent, ExtentKind};

/// Largest block size accepted; the format has no limit but anything larger than this is
/// corruption and would make per-block buffers absurd.
const MAX_BLOCK_SIZE: u32 = 256 << 20;

pub(crate) struct VhdDisk {
    pub f: DiskFile,
    pub footer: Footer,
    pub header: Option<DynHeader>,
    /// Block sector numbers (dynamic and differencing only).
    pub bat: Vec<u32>,
    /// Where the data area ends: the trailing footer's offset (or the file end if it is lost).
    pub data_end: u64,
    pub parent: Option<Box<dyn BlockDevice>>,
    pub parent_path: Option<PathBuf>,
}

impl std::fmt::Debug for VhdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdDisk")
            .field("path", &self.f.path)
            .finish()
    }
}

impl VhdDisk {
    pub fn open(path: &Path, writable: bool) -> Result<Self, DiskError> {
        Self::parse(DiskFile::open(path, writable)?)
    }

    pub fn parse(f: DiskFile) -> Result<Self, DiskError> {
        let path = f.path.clone();
        if f.len < FOOTER_SIZE as u64 {
            return Err(DiskError::Truncated {
                path,
                structure: "vhd footer",
                offset: 0,
                needed: FOOTER_SIZE as u64,
                file_len: f.len,
            });
        }
        let tail_at = f.len - FOOTER_SIZE as u64;
        let mut buf = [0u8; FOOTER_SIZE];
        f.read_exact_at(tail_at, &mut buf, "vhd footer")?;
        let (footer, sum_ok, data_end, at) = match Footer::parse(&buf) {
            Some((ft, ok)) => (ft, ok, tail_at, tail_at),
            None => {
                // Virtual PC before 2004 wrote 511-byte footers (the last reserved byte is
                // missing); the checksum covers the same bytes.
                let mut short = [0u8; FOOTER_SIZE];
                f.read_exact_at(tail_at + 1, &mut short[..FOOTER_SIZE - 1], "vhd footer")?;
                if let Some((ft, ok)) = Footer::parse(&short) {
                    tracing::info!(path = %path.display(), "vhd with a 511-byte footer");
                    let (sum_ok, data_end, at) = (ok, tail_at + 1, tail_at + 1);
                    return Self::finish_parse(f, ft, sum_ok, data_end, at);
                }
                // A dynamic disk keeps a copy at 0; use it if the trailing one is gone.
                f.read_exact_at(0, &mut buf, "vhd footer copy")?;
                match Footer::parse(&buf) {
                    Some((ft, ok)) if ft.disk_type != TYPE_FIXED => {
                        tracing::warn!(path = %path.display(), offset = tail_at, "vhd footer missing at end of file, using the copy at offset 0");
                        (ft, ok, f.len, 0)
                    }
                    _ => {
                        return Err(DiskError::corrupt(
                            &path,
                            "vhd footer",
                            tail_at,
                            "missing conectix cookie",
                        ));
                    }
                }
            }
        };
        Self::finish_parse(f, footer, sum_ok, data_end, at)
    }

    fn finish_parse(
        f: DiskFile,
        footer: Footer,
        sum_ok: bool,
        data_end: u64,
        at: u64,
    ) -> Result<Self, DiskError> {
        let path = f.path.clone();
        if !sum_ok {
            // Never fixed silently: the file may be evidence; reads only warn.
            tracing::warn!(path = %path.display(), offset = at, stored = footer.checksum, "vhd footer checksum mismatch");
        }
        if footer.current_size > MAX_SIZE {
            return Err(DiskError::corrupt(
                &path,
                "vhd footer current size",
                at + 48,
                format!("{} bytes exceeds the 2040 GiB maximum", footer.current_size),
            ));
        }
        let mut disk = VhdDisk {
            f,
            footer,
            header: None,
            bat: Vec::new(),
            data_end,
            parent: None,
            parent_path: None,
        };
        match disk.footer.disk_type {
            TYPE_FIXED => {
                if disk.footer.current_size > data_end {
                    return Err(DiskError::Truncated {
                        path,
                        structure: "vhd fixed data",
                        offset: 0,
                        needed: disk.footer.current_size,
                        file_len: disk.f.len,
                    });
                }
            }
            TYPE_DYNAMIC | TYPE_DIFFERENCING => disk.load_dynamic(at)?,
            t => {
                return Err(DiskError::unsupported(
                    &path,
                    "vhd footer disk type",
                    at + 60,
                    format!("disk type {t}"),
                ));
            }
        }
        Ok(disk)
    }

    fn load_dynamic(&mut self, footer_at: u64) -> Result<(), DiskError> {
        let path = self.f.path.clone();
        let hoff = self.footer.data_offset;
        if hoff < FOOTER_SIZE as u64 || hoff.checked_add(HEADER_SIZE as u64).is_none() {
            return Err(DiskError::corrupt(
                &path,
                "vhd footer data offset",
                footer_at + 16,
                format!("dynamic header offset {hoff:#x} is invalid"),
            ));
        }
        let mut hb = [0u8; HEADER_SIZE];
        self.f.read_exact_at(hoff, &mut hb, "vhd dynamic header")?;
        let (h, ok) = DynHeader::parse(&hb, &path, hoff)?;
        if !ok {
            tracing::warn!(path = %path.display(), offset = hoff, "vhd dynamic header checksum mismatch");
        }
        let bs = h.block_size;
        if !bs.is_power_of_two() || (bs as u64) < SECTOR || bs > MAX_BLOCK_SIZE {
            return Err(DiskError::corrupt(
                &path,
                "vhd dynamic header block size",
                hoff + 32,
                format!("block size {bs} is not a power of two between 512 and 256 MiB"),
            ));
        }
        let needed = self.footer.current_size.div_ceil(bs as u64);
        if (h.max_table_entries as u64) < needed {
            return Err(DiskError::corrupt(
                &path,
                "vhd dynamic header max table entries",
                hoff + 28,
                format!(
                    "{} entries cannot cover {} bytes in {} byte blocks",
                    h.max_table_entries, self.footer.current_size, bs
                ),
            ));
        }
        // Only the entries that cover the disk are read: memory follows the virtual size.
        let bat_len = needed * 4;
        let toff = h.table_offset;
        if toff.checked_add(bat_len).is_none_or(|e| e > self.f.len) {
            return Err(DiskError::Truncated {
                path,
                structure: "vhd bat",
                offset: toff,
                needed: bat_len,
                file_len: self.f.len,
            });
        }
        let mut raw = vec![0u8; bat_len as usize];
        self.f.read_exact_at(toff, &mut raw, "vhd bat")?;
        self.bat = (0..needed as usize).map(|i| be_u32(&raw, i * 4)).collect();
        self.header = Some(h);
        self.check_bat(toff, toff + bat_len)
    }

    /// Every allocated block lies inside the data area, after the metadata, and no two overlap.
    fn check_bat(&self, toff: u64, meta_end: u64) -> Result<(), DiskError> {
        let span = self.block_span();
        let hoff = self.footer.data_offset;
        let meta = [
            (0, FOOTER_SIZE as u64),
            (hoff, hoff + HEADER_SIZE as u64),
            (toff, meta_end),
        ];
        let mut used: Vec<(u64, usize)> = Vec::new();
        for (i, &e) in self.bat.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let start = e as u64 * SECTOR;
            let end = start + span;
            let entry_at = toff + i as u64 * 4;
            if end > self.data_end {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "vhd bat entry",
                    entry_at,
                    format!(
                        "block {i} at {start:#x}..{end:#x} lies beyond the data area (ends at {:#x})",
                        self.data_end
                    ),
                ));
            }
            if let Some((ms, me)) = meta.iter().find(|(ms, me)| start < *me && *ms < end) {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "vhd bat entry",
                    entry_at,
                    format!("block {i} at {start:#x} overlaps metadata at {ms:#x}..{me:#x}"),
                ));
            }
            used.push((start, i));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if w[0].0 + span > w[1].0 {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "vhd bat entry",
                    toff + w[1].1 as u64 * 4,
                    format!(
                        "block {} at {:#x} overlaps block {} at {:#x}",
                        w[1].1, w[1].0, w[0].1, w[0].0
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn block_size(&self) -> u64 {
        self.header.as_ref().map_or(0, |h| h.block_size as u64)
    }

    pub fn bitmap_size(&self) -> u64 {
        self.header
            .as_ref()
            .map_or(0, |h| bitmap_size(h.block_size))
    }

    /// Bitmap plus data of one block.
    pub fn block_span(&self) -> u64 {
        self.bitmap_size() + self.block_size()
    }

    pub fn is_differencing(&self) -> bool {
        self.footer.disk_type == TYPE_DIFFERENCING
    }

    pub fn size(&self) -> u64 {
        self.footer.current_size
    }

    fn read_bitmap(&self, sector: u32) -> Result<Vec<u8>, DiskError> {
        let mut bm = vec![0u8; self.bitmap_size() as usize];
        self.f
            .read_exact_at(sector as u64 * SECTOR, &mut bm, "vhd block bitmap")?;
        Ok(bm)
    }

    /// Pieces of one block's byte range `[from, from+len)` within the block.
    fn block_pieces(
        &self,
        block: usize,
        from: u64,
        len: u64,
        mut emit: impl FnMut(u64, Piece) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let e = self.bat.get(block).copied().unwrap_or(UNALLOCATED);
        if e == UNALLOCATED {
            return emit(len, Piece::Parent);
        }
        let data = e as u64 * SECTOR + self.bitmap_size();
        if !self.is_differencing() {
            // qemu and Windows ignore the bitmap of a dynamic disk (FORMATS §1.5).
            return emit(len, Piece::File(data + from));
        }
        let bm = self.read_bitmap(e)?;
        let s0 = from / SECTOR;
        let s1 = (from + len).div_ceil(SECTOR);
        let mut pos = from;
        let end = from + len;
        for (n, present) in bit_runs(&bm, s0, s1 - s0, true) {
            let run_end = ((pos / SECTOR + n) * SECTOR).min(end);
            let piece = if present {
                Piece::File(data + pos)
            } else {
                Piece::Parent
            };
            emit(run_end - pos, piece)?;
            pos = run_end;
        }
        Ok(())
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size())?;
        if self.header.is_none() {
            return self.f.read_exact_at(offset, buf, "vhd fixed data");
        }
        let bs = self.block_size();
        let mut r = Reader::new(&self.f, self.parent.as_deref(), "vhd block data");
        let mut done = 0usize;
        while done < buf.len() {
            let v = offset + done as u64;
            let block = (v / bs) as usize;
            let within = v % bs;
            let n = (bs - within).min((buf.len() - done) as u64);
            let mut at = done;
            self.block_pieces(block, within, n, |len, piece| {
                let voff = offset + at as u64;
                r.piece(buf, at, len as usize, voff, piece)?;
                at += len as usize;
                Ok(())
            })?;
            done += n as usize;
        }
        r.flush(buf)
    }

    pub fn map(&self) -> Result<Vec<Extent>, DiskError> {
        let size = self.size();
        let mut out = Vec::new();
        if self.header.is_none() {
            // Fixed: the data area is the file's first `size` bytes; its holes are absent.
            return crate::raw::file_extents(&self.f, size);
        }
        let bs = self.block_size();
        for block in 0..self.bat.len() {
            let start = block as u64 * bs;
            if start >= size {
                break;
            }
            let len = bs.min(size - start);
            let mut pos = start;
            self.block_pieces(block, 0, len, |n, piece| {
                let kind = match piece {
                    Piece::File(_) => ExtentKind::Allocated,
                    Piece::Zero => ExtentKind::Zero,
                    Piece::Parent => ExtentKind::Absent,
                };
                push_extent(&mut out, pos, n, kind);
                pos += n;
                Ok(())
            })?;
        }
        Ok(out)
    }

    pub fn disk_info(&self) -> DiskInfo {
        let (subformat, block_size, allocated) = match self.footer.disk_type {
            TYPE_FIXED => ("fixed", None, self.size()),
            t => {
                let n = self.bat.iter().filter(|&&e| e != UNALLOCATED).count() as u64;
                let sub = if t == TYPE_DIFFERENCING {
                    "differencing"
                } else {
                    "dynamic"
                };
                (sub, Some(self.block_size() as u32), n * self.block_size())
            }
        };
        DiskInfo {
            format: "vhd".into(),
            subformat: Some(subformat.into()),
            virtual_size: self.size(),
            block_size,
            logical_sector_size: 512,
            physical_sector_size: 512,
            allocated_bytes: allocated.min(self.size()),
            parent: self
                .parent_path
                .as_ref()
                .map(|p| p.display().to_string())
                .or_else(|| {
                    self.header
                        .as_ref()
                        .filter(|_| self.is_differencing())
                        .map(|h| h.parent_name.clone())
                }),
        }
    }

    /// Parent candidates in search order: W2ru (relative to the child), W2ku, MacX, then the
    /// parent's name in the child's folder (FORMATS §1.6).
    pub fn parent_candidates(&self) -> Result<Vec<PathBuf>, DiskError> {
        let Some(h) = self.header.as_ref().filter(|_| self.is_differencing()) else {
            return Ok(Vec::new());
        };
        let dir = self.f.path.parent().unwrap_or(Path::new("."));
        let mut out = Vec::new();
        for code in [LOC_W2RU, LOC_W2KU, LOC_MACX] {
            for l in h.locators.iter().filter(|l| l.code == code) {
                let len = l.data_len.min(64 * 1024) as usize;
                if len == 0 {
                    continue;
                }
                let mut b = vec![0u8; len];
                self.f
                    .read_exact_at(l.data_offset, &mut b, "vhd parent locator data")?;
                let s = if code == LOC_MACX {
                    let t = String::from_utf8_lossy(&b).into_owned();
                    t.trim_start_matches("file://").to_string()
                } else {
                    let units: Vec<u16> = b
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .take_while(|&u| u != 0)
                        .collect();
                    String::from_utf16_lossy(&units)
                };
                out.extend(crate::chain::candidate_paths(dir, &s));
            }
        }
        if !h.parent_name.is_empty() {
            out.extend(crate::chain::candidate_paths(dir, &h.parent_name));
        }
        Ok(out)
    }
}

impl BlockDevice for VhdDisk {
    fn info(&self) -> DiskInfo {
        self.disk_info()
    }
    fn virtual_size(&self) -> u64 {
        self.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.read(offset, buf)
    }
    fn extents(&self) -> Result<Vec<Extent>, DiskError> {
        self.map()
    }
    fn parent(&self) -> Option<&dyn BlockDevice> {
        self.parent.as_deref()
    }
}
