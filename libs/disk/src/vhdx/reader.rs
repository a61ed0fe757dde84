//! Opening and reading VHDX files. A pending log is replayed into an in-memory overlay; the
//! file is never written by a reader.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::format::*;
use super::log::{LogOp, Replay, active_sequence, overlay};
use crate::io::{DiskFile, check_range, le_u32, le_u64, push_extent};
use crate::layer::{Piece, Reader, bit_runs};
use crate::{BlockDevice, DiskError, DiskInfo, Extent, ExtentKind};

/// Largest log read into memory; Hyper-V and qemu use 1 MiB.
const MAX_LOG: u64 = 256 * MIB;
/// How far LastFileOffset may lie past the end of the file: a crashed writer's last block
/// (at most 256 MiB) plus alignment.
const LOG_SLACK: u64 = 512 * MIB;

pub(crate) struct VhdxDisk {
    pub f: DiskFile,
    pub header: Header,
    /// Which slot (0 or 1) holds the current header.
    pub header_slot: usize,
    /// Replay of a pending log, applied to every metadata read.
    pub ops: Vec<LogOp>,
    pub replay: Option<Replay>,
    pub regions: Vec<Region>,
    pub bat_offset: u64,
    pub bat_length: u64,
    pub meta_offset: u64,
    pub block_size: u32,
    pub leave_allocated: bool,
    pub has_parent: bool,
    pub size: u64,
    pub logical: u32,
    pub physical: u32,
    pub disk_id: Uuid,
    pub locator: Vec<(String, String)>,
    pub chunk_ratio: u64,
    pub bat: Vec<u64>,
    pub parent: Option<Box<dyn BlockDevice>>,
    pub parent_path: Option<PathBuf>,
}

impl VhdxDisk {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        Self::parse(DiskFile::open(path, false)?)
    }

    pub fn parse(f: DiskFile) -> Result<Self, DiskError> {
        let path = f.path.clone();
        let mut ident = [0u8; 8];
        f.read_exact_at(0, &mut ident, "vhdx file identifier")?;
        if &ident != b"vhdxfile" {
            return Err(DiskError::corrupt(
                &path,
                "vhdx file identifier",
                0,
                "missing vhdxfile signature",
            ));
        }
        let (header, header_slot) = read_headers(&f)?;
        let mut d = VhdxDisk {
            f,
            header,
            header_slot,
            ops: Vec::new(),
            replay: None,
            regions: Vec::new(),
            bat_offset: 0,
            bat_length: 0,
            meta_offset: 0,
            block_size: 0,
            leave_allocated: false,
            has_parent: false,
            size: 0,
            logical: 512,
            physical: 512,
            disk_id: Uuid::nil(),
            locator: Vec::new(),
            chunk_ratio: 1,
            bat: Vec::new(),
            parent: None,
            parent_path: None,
        };
        d.load_log()?;
        d.load_regions()?;
        d.load_metadata()?;
        d.load_bat()?;
        Ok(d)
    }

    fn load_log(&mut self) -> Result<(), DiskError> {
        let h = &self.header;
        if h.log_guid.is_nil() {
            return Ok(());
        }
        let hat = HEADER1 + self.header_slot as u64 * (HEADER2 - HEADER1);
        let (lo, ll) = (h.log_offset, h.log_length as u64);
        if lo < MIB || lo % MIB != 0 || ll == 0 || ll % MIB != 0 || ll > MAX_LOG {
            return Err(DiskError::corrupt(
                &self.f.path,
                "vhdx header log location",
                hat + 68,
                format!("log at {lo:#x} length {ll:#x} is not 1 MiB aligned or is too large"),
            ));
        }
        let mut log = vec![0u8; ll as usize];
        self.f.read_exact_at(lo, &mut log, "vhdx log")?;
        let replay = active_sequence(&log, &h.log_guid, &self.f.path, lo)?;
        if self.f.len < replay.flushed_file_offset {
            return Err(DiskError::Truncated {
                path: self.f.path.clone(),
                structure: "vhdx log flushed file offset",
                offset: lo,
                needed: replay.flushed_file_offset,
                file_len: self.f.len,
            });
        }
        // Bound what a replay may touch: everything lies below LastFileOffset, and that may
        // exceed the file only by what a crashed writer had not extended yet.
        let limit = self.f.len.saturating_add(LOG_SLACK);
        if replay.last_file_offset > limit {
            return Err(DiskError::corrupt(
                &self.f.path,
                "vhdx log entry last file offset",
                lo,
                format!(
                    "{:#x} is far beyond the end of the file ({:#x})",
                    replay.last_file_offset, self.f.len
                ),
            ));
        }
        let bound = replay.last_file_offset.max(self.f.len);
        for op in &replay.ops {
            let (o, n) = match op {
                LogOp::Data { offset, sector } => (*offset, sector.len() as u64),
                LogOp::Zero { offset, len } => (*offset, *len),
            };
            // The identifier and the headers are never logged; region tables may be.
            if o.checked_add(n).is_none_or(|e| e > bound) || o < REGION1 {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "vhdx log descriptor",
                    lo,
                    format!(
                        "write of {n:#x} bytes at {o:#x} lies outside {REGION1:#x}..{bound:#x}"
                    ),
                ));
            }
        }
        tracing::info!(path = %self.f.path.display(), seq = replay.head_seq, writes = replay.ops.len(), "vhdx log replayed in memory");
        self.ops = replay.ops.clone();
        self.replay = Some(replay);
        Ok(())
    }

    /// The size the file has once the log is applied.
    pub fn logical_len(&self) -> u64 {
        self.replay
            .as_ref()
            .map_or(self.f.len, |r| self.f.len.max(r.last_file_offset))
    }

    /// Reads metadata (anything the log may carry) through the replay overlay.
    pub fn read_meta(
        &self,
        offset: u64,
        buf: &mut [u8],
        structure: &'static str,
    ) -> Result<(), DiskError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.logical_len()) {
            return Err(DiskError::Truncated {
                path: self.f.path.clone(),
                structure,
                offset,
                needed: buf.len() as u64,
                file_len: self.logical_len(),
            });
        }
        self.f.read_or_zero(offset, buf, structure)?;
        overlay(&self.ops, offset, buf);
        Ok(())
    }

    fn load_regions(&mut self) -> Result<(), DiskError> {
        let mut b = vec![0u8; REGION_SIZE];
        self.read_meta(REGION1, &mut b, "vhdx region table")?;
        let regions = match parse_regions(&b, &self.f.path, REGION1) {
            Ok(r) => r,
            Err(e1) => {
                self.read_meta(REGION2, &mut b, "vhdx region table 2")?;
                let r = parse_regions(&b, &self.f.path, REGION2).map_err(|_| e1)?;
                tracing::warn!(path = %self.f.path.display(), "vhdx region table 1 is damaged, using copy 2");
                r
            }
        };
        let (mut bat, mut meta) = (None, None);
        for (i, r) in regions.iter().enumerate() {
            let at = REGION1 + 16 + i as u64 * 32;
            if r.offset < MIB || r.offset % MIB != 0 || !(r.length as u64).is_multiple_of(MIB) {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "vhdx region table entry",
                    at,
                    format!(
                        "region {} at {:#x} length {:#x} is not 1 MiB aligned",
                        r.guid, r.offset, r.length
                    ),
                ));
            }
            // Regions must exist in the file itself (not only up to a logged LastFileOffset):
            // that also bounds the BAT memory by the file size.
            if r.offset.saturating_add(r.length as u64) > self.f.len {
                return Err(DiskError::Truncated {
                    path: self.f.path.clone(),
                    structure: "vhdx region",
                    offset: r.offset,
                    needed: r.length as u64,
                    file_len: self.f.len,
                });
            }
            if r.guid == BAT_GUID {
                bat = Some(r.clone());
            } else if r.guid == METADATA_GUID {
                meta = Some(r.clone());
            } else if r.required {
                return Err(DiskError::unsupported(
                    &self.f.path,
                    "vhdx region table entry",
                    at,
                    format!("unknown required region {}", r.guid),
                ));
            }
        }
        let bat = bat.ok_or_else(|| {
            DiskError::corrupt(&self.f.path, "vhdx region table", REGION1, "no bat region")
        })?;
        let meta = meta.ok_or_else(|| {
            DiskError::corrupt(
                &self.f.path,
                "vhdx region table",
                REGION1,
                "no metadata region",
            )
        })?;
        let log = (
            self.header.log_offset,
            self.header.log_offset + self.header.log_length as u64,
        );
        let spans = [
            (0, MIB, "header section"),
            (log.0, log.1, "log"),
            (bat.offset, bat.offset + bat.length as u64, "bat"),
            (meta.offset, meta.offset + meta.length as u64, "metadata"),
        ];
        for (i, a) in spans.iter().enumerate() {
            for b in &spans[i + 1..] {
                if a.0 < b.1 && b.0 < a.1 && a.1 > a.0 && b.1 > b.0 {
                    return Err(DiskError::corrupt(
                        &self.f.path,
                        "vhdx region table",
                        REGION1,
                        format!(
                            "{} at {:#x}..{:#x} overlaps {} at {:#x}..{:#x}",
                            a.2, a.0, a.1, b.2, b.0, b.1
                        ),
                    ));
                }
            }
        }
        self.bat_offset = bat.offset;
        self.bat_length = bat.length as u64;
        self.meta_offset = meta.offset;
        self.regions = regions;
        Ok(())
    }

    fn load_metadata(&mut self) -> Result<(), DiskError> {
        let mo = self.meta_offset;
        let mut t = vec![0u8; KIB64 as usize];
        self.read_meta(mo, &mut t, "vhdx metadata table")?;
        let entries = parse_meta_table(&t, &self.f.path, mo)?;
        let item = |id: Uuid, min: u32| -> Result<Option<Vec<u8>>, DiskError> {
            let Some((i, e)) = entries.iter().enumerate().find(|(_, e)| e.id == id) else {
                return Ok(None);
            };
            let at = mo + 32 + i as u64 * 32;
            if e.length < min
                || e.length > MIB as u32
                || (e.offset as u64) < KIB64
                || e.offset as u64 + e.length as u64 > MIB
            {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "vhdx metadata table entry",
                    at,
                    format!(
                        "item {id} at {:#x} length {} is out of bounds",
                        e.offset, e.length
                    ),
                ));
            }
            let mut b = vec![0u8; e.length as usize];
            self.read_meta(mo + e.offset as u64, &mut b, "vhdx metadata item")?;
            Ok(Some(b))
        };
        let known = [
            FILE_PARAMS,
            VIRTUAL_SIZE,
            DISK_ID,
            LOGICAL_SECTOR,
            PHYSICAL_SECTOR,
            PARENT_LOCATOR,
        ];
        for (i, e) in entries.iter().enumerate() {
            if e.is_required && !known.contains(&e.id) {
                return Err(DiskError::unsupported(
                    &self.f.path,
                    "vhdx metadata table entry",
                    mo + 32 + i as u64 * 32,
                    format!("unknown required item {}", e.id),
                ));
            }
        }
        let missing = |what: &str| {
            DiskError::corrupt(
                &self.f.path,
                "vhdx metadata table",
                mo,
                format!("missing {what} item"),
            )
        };
        let fp = item(FILE_PARAMS, 8)?.ok_or_else(|| missing("file parameters"))?;
        let vs = item(VIRTUAL_SIZE, 8)?.ok_or_else(|| missing("virtual disk size"))?;
        let ls = item(LOGICAL_SECTOR, 4)?.ok_or_else(|| missing("logical sector size"))?;
        let ps = item(PHYSICAL_SECTOR, 4)?;
        let id = item(DISK_ID, 16)?;
        let pl = if le_u32(&fp, 4) & 2 != 0 {
            item(PARENT_LOCATOR, 20)?
        } else {
            None
        };
        self.block_size = le_u32(&fp, 0);
        let flags = le_u32(&fp, 4);
        self.leave_allocated = flags & 1 != 0;
        self.has_parent = flags & 2 != 0;
        self.size = le_u64(&vs, 0);
        self.logical = le_u32(&ls, 0);
        self.physical = ps.map_or(self.logical, |p| le_u32(&p, 0));
        self.disk_id = id.map_or(Uuid::nil(), |b| guid_at(&b, 0));
        let bad =
            |what: &'static str, reason: String| DiskError::corrupt(&self.f.path, what, mo, reason);
        if !self.block_size.is_power_of_two()
            || !(MIB as u32..=256 * MIB as u32).contains(&self.block_size)
        {
            return Err(bad(
                "vhdx file parameters",
                format!(
                    "block size {} is not a power of two between 1 and 256 MiB",
                    self.block_size
                ),
            ));
        }
        if self.logical != 512 && self.logical != 4096 {
            return Err(bad(
                "vhdx logical sector size",
                format!("{} is neither 512 nor 4096", self.logical),
            ));
        }
        if self.physical != 512 && self.physical != 4096 {
            return Err(bad(
                "vhdx physical sector size",
                format!("{} is neither 512 nor 4096", self.physical),
            ));
        }
        if self.size == 0 || self.size > MAX_SIZE || !self.size.is_multiple_of(self.logical as u64)
        {
            return Err(bad(
                "vhdx virtual disk size",
                format!(
                    "{} is zero, above 64 TiB or not a multiple of the logical sector",
                    self.size
                ),
            ));
        }
        self.chunk_ratio = chunk_ratio(self.logical, self.block_size);
        if self.has_parent {
            let pl = pl.ok_or_else(|| {
                DiskError::corrupt(
                    &self.f.path,
                    "vhdx metadata table",
                    mo,
                    "missing parent locator item",
                )
            })?;
            self.locator = parse_parent_locator(&pl, &self.f.path, mo)?;
        }
        Ok(())
    }

    pub fn payload_blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size as u64)
    }

    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    fn load_bat(&mut self) -> Result<(), DiskError> {
        let pb = self.payload_blocks();
        let mut needed = self.payload_index(pb - 1) + 1;
        if self.has_parent {
            needed = needed.max(self.bitmap_index((pb - 1) / self.chunk_ratio) + 1);
        }
        if needed * 8 > self.bat_length {
            return Err(DiskError::corrupt(
                &self.f.path,
                "vhdx bat region",
                self.bat_offset,
                format!("{} bytes cannot hold {needed} entries", self.bat_length),
            ));
        }
        let mut raw = vec![0u8; (needed * 8) as usize];
        self.read_meta(self.bat_offset, &mut raw, "vhdx bat")?;
        self.bat = (0..needed as usize).map(|i| le_u64(&raw, i * 8)).collect();
        self.check_bat()
    }

    /// Allocated payload and bitmap blocks lie inside the file, past the metadata, and never
    /// overlap each other or the regions.
    fn check_bat(&self) -> Result<(), DiskError> {
        let bs = self.block_size as u64;
        let mut used: Vec<(u64, u64, usize)> = Vec::new();
        let cr = self.chunk_ratio;
        for (i, &e) in self.bat.iter().enumerate() {
            let state = e & 7;
            let off = e & OFFSET_MASK;
            let at = self.bat_offset + i as u64 * 8;
            let is_bitmap = (i as u64 + 1).is_multiple_of(cr + 1);
            let bad =
                |reason: String| DiskError::corrupt(&self.f.path, "vhdx bat entry", at, reason);
            let len = if is_bitmap {
                match state {
                    0 => continue,
                    ST_FULLY_PRESENT => MIB,
                    s => return Err(bad(format!("sector bitmap entry {i} has state {s}"))),
                }
            } else {
                let block = i as u64 - i as u64 / (cr + 1);
                match state {
                    ST_NOT_PRESENT | ST_UNDEFINED | ST_ZERO | ST_UNMAPPED | ST_UNMAPPED_V095 => {
                        continue;
                    }
                    ST_FULLY_PRESENT => {}
                    ST_PARTIALLY_PRESENT if self.has_parent => {}
                    s => return Err(bad(format!("payload entry {i} has state {s}"))),
                }
                let start = block * bs;
                if start >= self.size {
                    return Err(bad(format!(
                        "payload entry {i} is allocated but its block starts past the virtual size"
                    )));
                }
                bs.min(self.size - start)
            };
            if off < MIB || off.saturating_add(len) > self.f.len {
                return Err(bad(format!(
                    "entry {i} points at {off:#x}..{:#x}, outside the file (length {:#x})",
                    off.saturating_add(len),
                    self.f.len
                )));
            }
            used.push((off, off + len, i));
        }
        let log = (
            self.header.log_offset,
            self.header.log_offset + self.header.log_length as u64,
        );
        let meta = [
            (self.bat_offset, self.bat_offset + self.bat_length),
            (self.meta_offset, self.meta_offset + MIB),
            log,
        ];
        used.sort_unstable();
        for w in used.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "vhdx bat entry",
                    self.bat_offset + w[1].2 as u64 * 8,
                    format!(
                        "entry {} at {:#x} overlaps entry {} at {:#x}",
                        w[1].2, w[1].0, w[0].2, w[0].0
                    ),
                ));
            }
        }
        for (s, e, i) in &used {
            if let Some((ms, me)) = meta.iter().find(|(ms, me)| s < me && ms < e) {
                return Err(DiskError::corrupt(
                    &self.f.path,
                    "vhdx bat entry",
                    self.bat_offset + *i as u64 * 8,
                    format!("entry {i} at {s:#x} overlaps metadata at {ms:#x}..{me:#x}"),
                ));
            }
        }
        Ok(())
    }

    fn bitmap_bytes(
        &self,
        sb_entry: u64,
        first_bit: u64,
        nbits: u64,
    ) -> Result<Vec<u8>, DiskError> {
        let off = (sb_entry & OFFSET_MASK) + first_bit / 8;
        let n = (first_bit % 8 + nbits).div_ceil(8);
        let mut b = vec![0u8; n as usize];
        self.read_meta(off, &mut b, "vhdx sector bitmap")?;
        Ok(b)
    }

    fn block_pieces(
        &self,
        block: u64,
        from: u64,
        len: u64,
        mut emit: impl FnMut(u64, Piece) -> Result<(), DiskError>,
    ) -> Result<(), DiskError> {
        let e = self
            .bat
            .get(self.payload_index(block) as usize)
            .copied()
            .unwrap_or(0);
        let off = e & OFFSET_MASK;
        match e & 7 {
            ST_FULLY_PRESENT => emit(len, Piece::File(off + from)),
            ST_PARTIALLY_PRESENT => {
                let chunk = block / self.chunk_ratio;
                let sb = self
                    .bat
                    .get(self.bitmap_index(chunk) as usize)
                    .copied()
                    .unwrap_or(0);
                if sb & 7 != ST_FULLY_PRESENT {
                    return Err(DiskError::corrupt(
                        &self.f.path,
                        "vhdx bat entry",
                        self.bat_offset + self.bitmap_index(chunk) * 8,
                        format!(
                            "block {block} is partially present but its sector bitmap is not present"
                        ),
                    ));
                }
                let lss = self.logical as u64;
                let vstart = block * self.block_size as u64 + from;
                let s0 = vstart / lss;
                let s1 = (vstart + len).div_ceil(lss);
                let first_bit = s0 % SB_SECTORS;
                let bm = self.bitmap_bytes(sb, first_bit, s1 - s0)?;
                let mut pos = from;
                let end = from + len;
                let base_bit = first_bit - first_bit % 8;
                for (n, present) in bit_runs(&bm, first_bit - base_bit, s1 - s0, false) {
                    let run_end = (((block * self.block_size as u64 + pos) / lss + n) * lss
                        - block * self.block_size as u64)
                        .min(end);
                    emit(
                        run_end - pos,
                        if present {
                            Piece::File(off + pos)
                        } else {
                            Piece::Parent
                        },
                    )?;
                    pos = run_end;
                }
                Ok(())
            }
            ST_NOT_PRESENT => emit(len, Piece::Parent),
            _ => emit(len, Piece::Zero),
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size)?;
        let bs = self.block_size as u64;
        let mut r = Reader::new(&self.f, self.parent.as_deref(), "vhdx payload block");
        let mut done = 0usize;
        while done < buf.len() {
            let v = offset + done as u64;
            let (block, within) = (v / bs, v % bs);
            let n = (bs - within).min((buf.len() - done) as u64);
            let mut at = done;
            self.block_pieces(block, within, n, |len, piece| {
                r.piece(buf, at, len as usize, offset + at as u64, piece)?;
                at += len as usize;
                Ok(())
            })?;
            done += n as usize;
        }
        r.flush(buf)
    }

    pub fn map(&self) -> Result<Vec<Extent>, DiskError> {
        let bs = self.block_size as u64;
        let mut out = Vec::new();
        for block in 0..self.payload_blocks() {
            let mut pos = block * bs;
            let len = bs.min(self.size - pos);
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
        let bs = self.block_size as u64;
        let allocated: u64 = (0..self.payload_blocks())
            .filter(|&b| {
                let s = self
                    .bat
                    .get(self.payload_index(b) as usize)
                    .copied()
                    .unwrap_or(0)
                    & 7;
                s == ST_FULLY_PRESENT || s == ST_PARTIALLY_PRESENT
            })
            .map(|b| bs.min(self.size - b * bs))
            .sum();
        let sub = if self.has_parent {
            "differencing"
        } else if self.leave_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        DiskInfo {
            format: "vhdx".into(),
            subformat: Some(sub.into()),
            virtual_size: self.size,
            block_size: Some(self.block_size),
            logical_sector_size: self.logical,
            physical_sector_size: self.physical,
            allocated_bytes: allocated,
            parent: self
                .parent_path
                .as_ref()
                .map(|p| p.display().to_string())
                .or_else(|| {
                    self.locator
                        .iter()
                        .find(|(k, _)| k == "relative_path" || k == "absolute_win32_path")
                        .map(|(_, v)| v.clone())
                }),
        }
    }

    pub fn has_parent(&self) -> bool {
        self.has_parent
    }

    pub fn data_write_guid(&self) -> Uuid {
        self.header.data_write_guid
    }

    pub fn parent_linkage(&self) -> Vec<Uuid> {
        self.locator
            .iter()
            .filter(|(k, _)| k == "parent_linkage" || k == "parent_linkage2")
            .filter_map(|(_, v)| Uuid::parse_str(v.trim_matches(|c| c == '{' || c == '}')).ok())
            .collect()
    }

    pub fn parent_candidates(&self) -> Vec<PathBuf> {
        let dir = self.f.path.parent().unwrap_or(Path::new("."));
        let mut out = Vec::new();
        for key in ["relative_path", "volume_path", "absolute_win32_path"] {
            for (_, v) in self.locator.iter().filter(|(k, _)| k == key) {
                for p in crate::chain::candidate_paths(dir, v) {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                }
            }
        }
        out
    }

    pub fn set_parent(&mut self, parent: Box<dyn BlockDevice>, path: PathBuf) {
        self.parent = Some(parent);
        self.parent_path = Some(path);
    }
}

/// Reads both headers and picks the current one (FORMATS §2.2).
fn read_headers(f: &DiskFile) -> Result<(Header, usize), DiskError> {
    let mut h = [None, None];
    let mut raw = [vec![0u8; HEADER_SIZE], vec![0u8; HEADER_SIZE]];
    for (i, at) in [HEADER1, HEADER2].into_iter().enumerate() {
        if f.len >= at + HEADER_SIZE as u64 {
            f.read_exact_at(at, &mut raw[i], "vhdx header")?;
            h[i] = Header::parse(&raw[i]);
        }
    }
    match (h[0].clone(), h[1].clone()) {
        (Some(a), Some(b)) => {
            if a.seq == b.seq && raw[0] != raw[1] {
                // Disk2vhd writes equal numbers; qemu accepts identical twins. Differing twins
                // are ambiguous: take the first and say so.
                tracing::warn!(path = %f.path.display(), seq = a.seq, "vhdx headers have equal sequence numbers but differ, using header 1");
            }
            Ok(if b.seq > a.seq { (b, 1) } else { (a, 0) })
        }
        (Some(a), None) => Ok((a, 0)),
        (None, Some(b)) => Ok((b, 1)),
        (None, None) => Err(DiskError::corrupt(
            &f.path,
            "vhdx header",
            HEADER1,
            "neither header has a valid signature, checksum and version",
        )),
    }
}

impl BlockDevice for VhdxDisk {
    fn info(&self) -> DiskInfo {
        self.disk_info()
    }
    fn virtual_size(&self) -> u64 {
        self.size
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
