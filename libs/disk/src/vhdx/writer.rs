//! Creating VHDX files and writing into them in place.
//!
//! A new file is streamed: payload blocks are appended at the 1 MiB-aligned end as writes
//! arrive and the BAT is written by `flush`/`finish`. An existing file is written crash-safely
//! (FORMATS §2.7): a pending log is replayed into the file first, headers get new GUIDs, and a
//! new block becomes visible only through a log entry (data, flush, log, flush, BAT, flush).

use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::format::*;
use super::log::LogOp;
use super::reader::VhdxDisk;
use crate::io::{DiskFile, check_range, put_le_u32, put_le_u64};
use crate::{BlockDevice, DiskError, DiskInfo, DiskWriter, Extent};

/// Options for a new VHDX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhdxCreateOptions {
    pub virtual_size: u64,
    pub fixed: bool,
    /// Default: qemu's choice (8 MiB up to 1 GiB, 16 MiB up to 100 GiB, else 32 MiB).
    pub block_size: Option<u32>,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Makes a differencing disk over this VHDX.
    pub parent: Option<PathBuf>,
}

const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;

const META_OFFSET: u64 = 2 * MIB;
const BAT_OFFSET: u64 = 3 * MIB;

pub(crate) struct VhdxWriter {
    pub(super) d: VhdxDisk,
    pub(super) fresh: bool,
    pub(super) bat_dirty: bool,
    pub(super) next_free: u64,
    /// In-place session state: GUIDs renewed, log position and sequence.
    pub(super) session: bool,
    pub(super) log_pos: u64,
    pub(super) log_seq: u64,
    pub(super) crash_after_log: bool,
    /// Set once the crash hook stopped a commit after its log entry.
    pub(super) crashed: bool,
}

fn default_block(size: u64) -> u32 {
    if size <= 1 << 30 {
        8 << 20
    } else if size <= 100 << 30 {
        16 << 20
    } else {
        32 << 20
    }
}

impl VhdxWriter {
    pub fn create(path: &Path, o: &VhdxCreateOptions) -> Result<Self, DiskError> {
        let inv = |s: String| Err(DiskError::InvalidArgument(s));
        let bs = o
            .block_size
            .unwrap_or_else(|| default_block(o.virtual_size));
        if !bs.is_power_of_two() || !(MIB as u32..=256 * MIB as u32).contains(&bs) {
            return inv(format!(
                "vhdx block size {bs} must be a power of two between 1 and 256 MiB"
            ));
        }
        for s in [o.logical_sector_size, o.physical_sector_size] {
            if s != 512 && s != 4096 {
                return inv(format!("vhdx sector size {s} must be 512 or 4096"));
            }
        }
        let (parent_info, size) = match &o.parent {
            Some(p) => {
                let pd = VhdxDisk::open(p)?;
                if pd.logical != o.logical_sector_size {
                    return inv(
                        "a differencing vhdx must have its parent's logical sector size".into(),
                    );
                }
                let abs =
                    std::fs::canonicalize(p).map_err(|e| DiskError::io(p, "parent file", 0, e))?;
                (Some((pd.data_write_guid(), abs)), pd.size)
            }
            None => (None, o.virtual_size),
        };
        if size == 0 || size > MAX_SIZE || size % o.logical_sector_size as u64 != 0 {
            return inv(format!(
                "vhdx virtual size {size} must be a non-zero multiple of the logical sector size, at most 64 TiB"
            ));
        }
        let mut f = DiskFile::create_new(path)?;
        let cr = chunk_ratio(o.logical_sector_size, bs);
        let pb = size.div_ceil(bs as u64);
        let sb = pb.div_ceil(cr);
        let bat_len = (sb * (cr + 1) * 8).div_ceil(MIB) * MIB;
        let data_start = BAT_OFFSET + bat_len;
        // File identifier: signature and a UTF-16 creator string.
        let mut ident = vec![0u8; KIB64 as usize];
        ident[0..8].copy_from_slice(b"vhdxfile");
        for (i, u) in "ferry".encode_utf16().enumerate() {
            ident[8 + i * 2..10 + i * 2].copy_from_slice(&u.to_le_bytes());
        }
        f.write_all_at(0, &ident, "vhdx file identifier")?;
        let header = Header {
            seq: 1,
            file_write_guid: Uuid::new_v4(),
            data_write_guid: Uuid::new_v4(),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: LOG_LENGTH as u32,
            log_offset: LOG_OFFSET,
        };
        f.write_all_at(HEADER1, &header.to_bytes(), "vhdx header")?;
        let h2 = Header {
            seq: 2,
            ..header.clone()
        };
        f.write_all_at(HEADER2, &h2.to_bytes(), "vhdx header")?;
        let regions = [
            Region {
                guid: BAT_GUID,
                offset: BAT_OFFSET,
                length: bat_len as u32,
                required: true,
            },
            Region {
                guid: METADATA_GUID,
                offset: META_OFFSET,
                length: MIB as u32,
                required: true,
            },
        ];
        let rt = regions_to_bytes(&regions);
        f.write_all_at(REGION1, &rt, "vhdx region table")?;
        f.write_all_at(REGION2, &rt, "vhdx region table 2")?;
        write_metadata(&mut f, o, bs, size, parent_info.as_ref())?;
        let total = sb * (cr + 1);
        let mut bat = vec![0u64; total as usize];
        let mut next_free = data_start;
        if o.fixed {
            // Every block is present from the start, laid out in order; the file is sparse.
            for b in 0..pb {
                let i = b + b / cr;
                bat[i as usize] = next_free | ST_FULLY_PRESENT;
                next_free += bs as u64;
            }
        }
        f.set_len(next_free)?;
        let d = VhdxDisk::parse(f)?;
        let mut w = VhdxWriter {
            d,
            fresh: true,
            bat_dirty: true,
            next_free,
            session: true,
            log_pos: 0,
            log_seq: 0,
            crash_after_log: false,
            crashed: false,
        };
        w.d.bat = bat;
        if let Some((_, abs)) = parent_info {
            let parent = crate::open(&abs)?;
            w.d.set_parent(parent, abs);
        }
        w.write_bat()?;
        Ok(w)
    }

    pub fn create_differencing(path: &Path, parent: &Path) -> Result<Self, DiskError> {
        let pd = VhdxDisk::open(parent)?;
        Self::create(
            path,
            &VhdxCreateOptions {
                virtual_size: pd.size,
                fixed: false,
                block_size: Some(pd.block_size),
                logical_sector_size: pd.logical,
                physical_sector_size: pd.physical,
                parent: Some(parent.to_path_buf()),
            },
        )
    }

    pub fn open(
        path: &Path,
        parent: Option<(Box<dyn BlockDevice>, PathBuf)>,
    ) -> Result<Self, DiskError> {
        let f = DiskFile::open(path, true)?;
        let mut d = VhdxDisk::parse(f)?;
        if let Some((p, pp)) = parent {
            d.set_parent(p, pp);
        }
        let next_free = d.f.len.div_ceil(MIB) * MIB;
        let mut w = VhdxWriter {
            d,
            fresh: false,
            bat_dirty: false,
            next_free,
            session: false,
            log_pos: 0,
            log_seq: 0,
            crash_after_log: false,
            crashed: false,
        };
        if w.d.replay.is_some() {
            w.replay_into_file()?;
        }
        Ok(w)
    }

    /// Applies a pending log to the file (the writable-open duty), then empties the log.
    fn replay_into_file(&mut self) -> Result<(), DiskError> {
        let Some(r) = self.d.replay.take() else {
            return Ok(());
        };
        // FileWriteGuid is renewed before the first modification, the replay included.
        self.update_header(|h| h.file_write_guid = Uuid::new_v4())?;
        for op in &r.ops {
            match op {
                LogOp::Data { offset, sector } => {
                    self.d.f.write_all_at(*offset, sector, "vhdx log replay")?
                }
                LogOp::Zero { offset, len } => {
                    let z = vec![0u8; (*len).min(MIB) as usize];
                    let mut o = *offset;
                    while o < offset + len {
                        let n = (offset + len - o).min(MIB) as usize;
                        self.d.f.write_all_at(o, &z[..n], "vhdx log replay")?;
                        o += n as u64;
                    }
                }
            }
        }
        if self.d.f.len < r.last_file_offset {
            self.d.f.set_len(r.last_file_offset)?;
        }
        self.d.f.sync()?;
        self.d.ops.clear();
        self.next_free = self.d.f.len.div_ceil(MIB) * MIB;
        tracing::info!(path = %self.d.f.path.display(), seq = r.head_seq, "vhdx log replayed into the file");
        // The log is applied and durable: empty it, as qemu does.
        self.update_header(|h| h.log_guid = Uuid::nil())?;
        self.session = true;
        Ok(())
    }

    /// Writes the changed header over the non-current slot, flushes, and repeats once so both
    /// slots carry it (FORMATS §2.2).
    fn update_header(&mut self, change: impl Fn(&mut Header)) -> Result<(), DiskError> {
        for _ in 0..2 {
            let mut h = self.d.header.clone();
            change(&mut h);
            h.seq = self.d.header.seq + 1;
            let slot = 1 - self.d.header_slot;
            let at = if slot == 0 { HEADER1 } else { HEADER2 };
            self.d.f.write_all_at(at, &h.to_bytes(), "vhdx header")?;
            self.d.f.sync()?;
            self.d.header = h;
            self.d.header_slot = slot;
        }
        Ok(())
    }

    /// First modification of an in-place session: new FileWriteGuid, and a new DataWriteGuid
    /// because the data is about to change (children of this disk no longer match it).
    pub(super) fn begin_session(&mut self) -> Result<(), DiskError> {
        if self.session {
            return Ok(());
        }
        self.update_header(|h| {
            h.file_write_guid = Uuid::new_v4();
            h.data_write_guid = Uuid::new_v4();
        })?;
        self.session = true;
        Ok(())
    }

    /// Before the first log write: a fresh LogGuid, so entries of older sessions never count.
    /// Set only now, so a session that never logs leaves an empty, clean log.
    pub(super) fn begin_log(&mut self) -> Result<(), DiskError> {
        if !self.d.header.log_guid.is_nil() {
            return Ok(());
        }
        let log_guid = Uuid::new_v4();
        self.update_header(|h| h.log_guid = log_guid)?;
        self.log_pos = 0;
        self.log_seq = 1;
        Ok(())
    }

    fn write_bat(&mut self) -> Result<(), DiskError> {
        let mut raw = vec![0u8; self.d.bat.len() * 8];
        for (i, e) in self.d.bat.iter().enumerate() {
            put_le_u64(&mut raw, i * 8, *e);
        }
        let off = self.d.bat_offset;
        self.d.f.write_all_at(off, &raw, "vhdx bat")?;
        self.bat_dirty = false;
        Ok(())
    }
}

/// Writes the metadata region: table and the five (or six) system items.
fn write_metadata(
    f: &mut DiskFile,
    o: &VhdxCreateOptions,
    bs: u32,
    size: u64,
    parent: Option<&(Uuid, PathBuf)>,
) -> Result<(), DiskError> {
    let mut items: Vec<(Uuid, Vec<u8>, bool)> = Vec::new();
    let mut fp = vec![0u8; 8];
    put_le_u32(&mut fp, 0, bs);
    put_le_u32(&mut fp, 4, o.fixed as u32 | (parent.is_some() as u32) << 1);
    items.push((FILE_PARAMS, fp, false));
    items.push((VIRTUAL_SIZE, size.to_le_bytes().to_vec(), true));
    items.push((DISK_ID, Uuid::new_v4().to_bytes_le().to_vec(), true));
    items.push((
        LOGICAL_SECTOR,
        o.logical_sector_size.to_le_bytes().to_vec(),
        true,
    ));
    items.push((
        PHYSICAL_SECTOR,
        o.physical_sector_size.to_le_bytes().to_vec(),
        true,
    ));
    if let Some((guid, abs)) = parent {
        let child_dir = std::fs::canonicalize(f.path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| DiskError::io(&f.path, "child folder", 0, e))?;
        let pairs = vec![
            ("parent_linkage".to_string(), format!("{{{guid}}}")),
            (
                "relative_path".to_string(),
                crate::chain::relative_path(&child_dir, abs),
            ),
            ("absolute_win32_path".to_string(), abs.display().to_string()),
        ];
        items.push((PARENT_LOCATOR, parent_locator_to_bytes(&pairs), false));
    }
    let mut entries = Vec::new();
    let mut pos = KIB64 as u32;
    for (id, data, vd) in &items {
        f.write_all_at(META_OFFSET + pos as u64, data, "vhdx metadata item")?;
        entries.push(MetaEntry {
            id: *id,
            offset: pos,
            length: data.len() as u32,
            is_user: false,
            is_virtual_disk: *vd,
            is_required: true,
        });
        pos += (data.len() as u32).div_ceil(8) * 8;
    }
    f.write_all_at(
        META_OFFSET,
        &meta_table_to_bytes(&entries),
        "vhdx metadata table",
    )
}

impl DiskWriter for VhdxWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_range(offset, data.len(), self.d.size)?;
        if !self.fresh {
            self.begin_session()?;
        }
        let bs = self.d.block_size as u64;
        let mut done = 0usize;
        while done < data.len() {
            let v = offset + done as u64;
            let (block, within) = (v / bs, v % bs);
            let n = (bs - within).min((data.len() - done) as u64) as usize;
            self.write_block(block, within, &data[done..done + n])?;
            if self.crashed {
                return Ok(());
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        if self.fresh && self.bat_dirty {
            self.write_bat()?;
        }
        self.d.f.sync()
    }

    fn finish(mut self: Box<Self>) -> Result<(), DiskError> {
        self.flush()?;
        if !self.fresh && self.session && !self.d.header.log_guid.is_nil() {
            // Every logged update is in place and flushed: an empty log closes cleanly.
            self.update_header(|h| h.log_guid = Uuid::nil())?;
        }
        Ok(())
    }
}

impl BlockDevice for VhdxWriter {
    fn info(&self) -> DiskInfo {
        self.d.disk_info()
    }
    fn virtual_size(&self) -> u64 {
        self.d.size
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

/// Test hook: writes `data` in place like `open_rw`, but stops after the first log entry is
/// durable and before its BAT update reaches the file, leaving a VHDX whose log must be
/// replayed — what a crash at that instant leaves.
pub fn crash_after_log(path: &Path, offset: u64, data: &[u8]) -> Result<(), DiskError> {
    crash_after_writes(path, &[(offset, data)])
}

/// Test hook: performs all `writes` in one in-place session; the metadata update of the last
/// one stops after its log entry, as a crash would.
pub fn crash_after_writes(path: &Path, writes: &[(u64, &[u8])]) -> Result<(), DiskError> {
    let parent = crate::chain::open_parent_for_rw(
        path,
        crate::Format::Vhdx,
        &crate::OpenOptions::default(),
    )?;
    let mut w = VhdxWriter::open(path, parent)?;
    for (i, (offset, data)) in writes.iter().enumerate() {
        w.crash_after_log = i + 1 == writes.len();
        w.write_at(*offset, data)?;
    }
    w.d.f.sync()
}
