//! Creating VHD files and writing into them in place.
//!
//! A new file (`fresh`) is streamed: blocks are appended as writes arrive, zero writes to
//! unallocated blocks are skipped, and the BAT, header and footers are written by `flush`/
//! `finish`. An existing file allocates each block crash-safely (FORMATS §1.8): zeroed bitmap
//! and block, footer at the new end, flush, BAT entry, flush, and only then the data.

use std::path::Path;

use super::format::*;
use super::reader::VhdDisk;
use crate::io::{DiskFile, check_range, is_zero, put_be_u32};
use crate::{BlockDevice, CreateOptions, DiskError, DiskInfo, DiskWriter, Extent, Subformat};

const DEFAULT_BLOCK: u32 = 2 << 20;
/// Data areas start on a page boundary so reads land page-aligned in the page cache.
const ALIGN: u64 = 4096;

pub(crate) struct VhdWriter {
    d: VhdDisk,
    /// Where the next block (or, in a fresh file, the footer) goes.
    next_free: u64,
    fresh: bool,
    bat_dirty: bool,
    /// Fixed files: end of the highest write so far; zero writes past it are skipped.
    written_end: u64,
}

fn check_size(size: u64) -> Result<(), DiskError> {
    if !size.is_multiple_of(SECTOR) {
        return Err(DiskError::InvalidArgument(format!(
            "vhd virtual size {size} is not a multiple of 512"
        )));
    }
    if size > MAX_SIZE {
        return Err(DiskError::InvalidArgument(format!(
            "vhd virtual size {size} exceeds the 2040 GiB maximum"
        )));
    }
    Ok(())
}

impl VhdWriter {
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Self, DiskError> {
        check_size(opts.virtual_size)?;
        let size = opts.virtual_size;
        match opts.subformat {
            Subformat::Fixed => {
                // A fixed VHD has no blocks; a requested block size has nothing to apply to.
                let mut f = DiskFile::create_new(path)?;
                let footer = Footer::new(size, TYPE_FIXED, u64::MAX);
                f.set_len(size)?;
                f.write_all_at(size, &footer.to_bytes(), "vhd footer")?;
                let d = VhdDisk::parse(f)?;
                Ok(VhdWriter {
                    d,
                    next_free: size,
                    fresh: true,
                    bat_dirty: false,
                    written_end: 0,
                })
            }
            Subformat::Dynamic => {
                let bs = opts.block_size.unwrap_or(DEFAULT_BLOCK);
                if !bs.is_power_of_two() || !(1 << 20..=256 << 20).contains(&bs) {
                    return Err(DiskError::InvalidArgument(format!(
                        "vhd block size {bs} must be a power of two between 1 MiB and 256 MiB"
                    )));
                }
                let f = DiskFile::create_new(path)?;
                Self::new_sparse(f, size, bs, TYPE_DYNAMIC, None)
            }
            Subformat::Differencing => Err(DiskError::InvalidArgument(
                "differencing disks are made with create_differencing".into(),
            )),
        }
    }

    /// Lays out footer copy, header and BAT of a dynamic or differencing file (qemu's layout:
    /// header at 512, BAT at 1536) and keeps them in memory until `flush`.
    fn new_sparse(
        f: DiskFile,
        size: u64,
        bs: u32,
        disk_type: u32,
        parent: Option<(DynHeader, Box<dyn BlockDevice>, std::path::PathBuf)>,
    ) -> Result<Self, DiskError> {
        let entries = size.div_ceil(bs as u64);
        let entries32 = u32::try_from(entries)
            .map_err(|_| DiskError::InvalidArgument("vhd has too many blocks".into()))?;
        let toff = (FOOTER_SIZE + HEADER_SIZE) as u64;
        let bat_bytes = (entries * 4).div_ceil(SECTOR) * SECTOR;
        let footer = Footer::new(size, disk_type, FOOTER_SIZE as u64);
        let (header, parent, parent_path) = match parent {
            Some((h, p, pp)) => (h, Some(p), Some(pp)),
            None => (
                DynHeader {
                    table_offset: toff,
                    max_table_entries: entries32,
                    block_size: bs,
                    checksum: 0,
                    parent_unique_id: [0; 16],
                    parent_timestamp: 0,
                    parent_name: String::new(),
                    locators: Default::default(),
                },
                None,
                None,
            ),
        };
        let mut next_free = toff + bat_bytes;
        let mut header = header;
        header.table_offset = toff;
        header.max_table_entries = entries32;
        header.block_size = bs;
        let mut f = f;
        // Parent locator data follows the BAT, each in its own 512-byte-aligned space.
        for l in header.locators.iter_mut().filter(|l| l.code != 0) {
            l.data_offset = next_free;
            next_free += l.data_space as u64;
        }
        f.set_len(next_free)?;
        let d = VhdDisk {
            f,
            footer,
            header: Some(header),
            bat: vec![UNALLOCATED; entries as usize],
            data_end: next_free,
            parent,
            parent_path,
        };
        let mut w = VhdWriter {
            d,
            next_free,
            fresh: true,
            bat_dirty: true,
            written_end: 0,
        };
        w.write_metadata()?;
        Ok(w)
    }

    pub fn create_differencing(path: &Path, parent_path: &Path) -> Result<Self, DiskError> {
        let pdisk = VhdDisk::open(parent_path, false)?;
        let parent_abs = std::fs::canonicalize(parent_path)
            .map_err(|e| DiskError::io(parent_path, "parent file", 0, e))?;
        let mtime = std::fs::metadata(parent_path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs().saturating_sub(VHD_EPOCH) as u32);
        let name = parent_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let child_dir = std::fs::canonicalize(path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| DiskError::io(path, "child folder", 0, e))?;
        let rel = crate::chain::relative_path(&child_dir, &parent_abs);
        let size = pdisk.size();
        drop(pdisk);
        let parent = crate::open(parent_path)?;
        let mut loc_data: Vec<(u32, Vec<u8>)> = Vec::new();
        for (code, s) in [
            (LOC_W2RU, rel),
            (LOC_W2KU, parent_abs.display().to_string()),
        ] {
            let bytes: Vec<u8> = s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
            loc_data.push((code, bytes));
        }
        let mut locators: [Locator; 8] = Default::default();
        for (l, (code, bytes)) in locators.iter_mut().zip(&loc_data) {
            *l = Locator {
                code: *code,
                // Bytes, as Virtual PC and Hyper-V store it (FORMATS §1.4).
                data_space: (bytes.len() as u64).div_ceil(SECTOR).max(1) as u32 * SECTOR as u32,
                data_len: bytes.len() as u32,
                data_offset: 0,
            };
        }
        let header = DynHeader {
            table_offset: 0,
            max_table_entries: 0,
            block_size: DEFAULT_BLOCK,
            checksum: 0,
            parent_unique_id: parent_unique_id(parent_path)?,
            parent_timestamp: mtime,
            parent_name: name,
            locators,
        };
        let f = DiskFile::create_new(path)?;
        let w = Self::new_sparse(
            f,
            size,
            DEFAULT_BLOCK,
            TYPE_DIFFERENCING,
            Some((header, parent, parent_abs)),
        )?;
        let mut w = w;
        let locs =
            w.d.header
                .as_ref()
                .map(|h| h.locators.clone())
                .unwrap_or_default();
        for (l, (_, bytes)) in locs.iter().zip(&loc_data) {
            w.d.f
                .write_all_at(l.data_offset, bytes, "vhd parent locator data")?;
        }
        Ok(w)
    }

    pub fn open(
        path: &Path,
        parent: Option<(Box<dyn BlockDevice>, std::path::PathBuf)>,
    ) -> Result<Self, DiskError> {
        let mut d = VhdDisk::open(path, true)?;
        if let Some((p, pp)) = parent {
            d.parent = Some(p);
            d.parent_path = Some(pp);
        }
        let next_free = d.data_end;
        Ok(VhdWriter {
            d,
            next_free,
            fresh: false,
            bat_dirty: false,
            written_end: 0,
        })
    }

    fn table_offset(&self) -> u64 {
        self.d.header.as_ref().map_or(0, |h| h.table_offset)
    }

    /// Footer copy, header and BAT of a fresh sparse file, and the trailing footer.
    fn write_metadata(&mut self) -> Result<(), DiskError> {
        let footer = self.d.footer.to_bytes();
        if let Some(h) = self.d.header.clone() {
            self.d.f.write_all_at(0, &footer, "vhd footer copy")?;
            self.d
                .f
                .write_all_at(FOOTER_SIZE as u64, &h.to_bytes(), "vhd dynamic header")?;
            if self.bat_dirty {
                let bytes = (self.d.bat.len() * 4).div_ceil(512) * 512;
                let mut bat = vec![0xFFu8; bytes];
                for (i, e) in self.d.bat.iter().enumerate() {
                    put_be_u32(&mut bat, i * 4, *e);
                }
                self.d.f.write_all_at(h.table_offset, &bat, "vhd bat")?;
                self.bat_dirty = false;
            }
        }
        self.d.f.set_len(self.next_free)?;
        self.d
            .f
            .write_all_at(self.next_free, &footer, "vhd footer")?;
        Ok(())
    }

    fn allocate(&mut self, block: usize) -> Result<u32, DiskError> {
        let bm = self.d.bitmap_size();
        let span = self.d.block_span();
        let block_off = (self.next_free + bm).div_ceil(ALIGN) * ALIGN - bm;
        let sector = u32::try_from(block_off / SECTOR)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| {
                DiskError::corrupt(&self.d.f.path, "vhd bat", 0, "file too large for a vhd")
            })?;
        let new_end = block_off + span;
        if !self.fresh && block_off > self.next_free {
            // The old footer sits here: it must not survive inside the block area.
            let gap = vec![0u8; (block_off - self.next_free) as usize];
            self.d
                .f
                .write_all_at(self.next_free, &gap, "vhd block padding")?;
        }
        // Dynamic: all sectors present (qemu ignores the bitmap and so do we); differencing:
        // none yet, each write sets its sectors.
        let fill = if self.d.is_differencing() { 0 } else { 0xFF };
        self.d
            .f
            .write_all_at(block_off, &vec![fill; bm as usize], "vhd block bitmap")?;
        self.d.f.set_len(new_end)?;
        self.next_free = new_end;
        self.d.data_end = new_end;
        if self.fresh {
            self.bat_dirty = true;
        } else {
            let footer = self.d.footer.to_bytes();
            self.d.f.write_all_at(new_end, &footer, "vhd footer")?;
            self.d.f.sync()?;
            let at = self.table_offset() + block as u64 * 4;
            self.d
                .f
                .write_all_at(at, &sector.to_be_bytes(), "vhd bat entry")?;
            self.d.f.sync()?;
        }
        if let Some(e) = self.d.bat.get_mut(block) {
            *e = sector;
        }
        Ok(sector)
    }

    /// Writes `bytes` at `within` of block `block`; sector aligned for differencing files.
    fn write_block(&mut self, block: usize, within: u64, bytes: &[u8]) -> Result<(), DiskError> {
        let diff = self.d.is_differencing();
        let mut e = self.d.bat.get(block).copied().unwrap_or(UNALLOCATED);
        if e == UNALLOCATED {
            if !diff && is_zero(bytes) {
                return Ok(());
            }
            e = self.allocate(block)?;
        }
        let base = e as u64 * SECTOR;
        let bm = self.d.bitmap_size();
        self.d
            .f
            .write_all_at(base + bm + within, bytes, "vhd block data")?;
        if diff {
            let mut bitmap = vec![0u8; bm as usize];
            self.d
                .f
                .read_exact_at(base, &mut bitmap, "vhd block bitmap")?;
            let mut changed = false;
            for s in within / SECTOR..(within + bytes.len() as u64) / SECTOR {
                let (i, m) = ((s / 8) as usize, 0x80u8 >> (s % 8));
                if let Some(b) = bitmap.get_mut(i)
                    && *b & m == 0
                {
                    *b |= m;
                    changed = true;
                }
            }
            if changed {
                if !self.fresh {
                    // Data before the bits that expose it.
                    self.d.f.sync()?;
                }
                self.d.f.write_all_at(base, &bitmap, "vhd block bitmap")?;
            }
        }
        Ok(())
    }
}

fn parent_unique_id(path: &Path) -> Result<[u8; 16], DiskError> {
    Ok(VhdDisk::open(path, false)?.footer.unique_id)
}

impl DiskWriter for VhdWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_range(offset, data.len(), self.d.size())?;
        if self.d.header.is_none() {
            if self.fresh && offset >= self.written_end && is_zero(data) {
                return Ok(());
            }
            self.written_end = self.written_end.max(offset + data.len() as u64);
            return self.d.f.write_all_at(offset, data, "vhd fixed data");
        }
        let bs = self.d.block_size();
        let diff = self.d.is_differencing();
        let mut done = 0usize;
        while done < data.len() {
            let v = offset + done as u64;
            let block = (v / bs) as usize;
            let within = v % bs;
            let n = (bs - within).min((data.len() - done) as u64) as usize;
            let chunk = &data[done..done + n];
            if diff && (!within.is_multiple_of(SECTOR) || !(n as u64).is_multiple_of(SECTOR)) {
                // Sub-sector write: the rest of the sector comes from the chain.
                let s0 = within / SECTOR * SECTOR;
                let s1 = (within + n as u64).div_ceil(SECTOR) * SECTOR;
                let mut tmp = vec![0u8; (s1 - s0) as usize];
                self.d.read(block as u64 * bs + s0, &mut tmp)?;
                let at = (within - s0) as usize;
                tmp[at..at + n].copy_from_slice(chunk);
                self.write_block(block, s0, &tmp)?;
            } else {
                self.write_block(block, within, chunk)?;
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.fresh && self.d.header.is_some() {
            self.write_metadata()?;
        }
        self.d.f.sync()
    }

    fn finish(mut self: Box<Self>) -> Result<(), DiskError> {
        self.flush()
    }
}

impl BlockDevice for VhdWriter {
    fn info(&self) -> DiskInfo {
        self.d.disk_info()
    }
    fn virtual_size(&self) -> u64 {
        self.d.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.d.read(offset, buf)
    }
    fn extents(&self) -> Result<Vec<Extent>, DiskError> {
        self.d.map()
    }
    fn parent(&self) -> Option<&dyn BlockDevice> {
        self.d.parent.as_deref()
    }
}
