//! Raw images: the file is the disk. Holes (SEEK_HOLE) are reported as absent extents and new
//! raw files are written sparse: zero runs are skipped and the length is set with `set_len`.

use std::os::fd::AsRawFd;
use std::path::Path;

use crate::io::{DiskFile, check_range, is_zero, push_extent};
use crate::{BlockDevice, DiskError, DiskInfo, DiskWriter, Extent, ExtentKind};

#[derive(Debug)]
pub(crate) struct RawDisk {
    f: DiskFile,
}

impl RawDisk {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        Ok(RawDisk {
            f: DiskFile::open(path, false)?,
        })
    }
}

/// Data and hole runs of a file via lseek(SEEK_DATA/SEEK_HOLE); a filesystem that does not
/// support them reports one data run, which is correct, only less sparse.
pub(crate) fn file_extents(f: &DiskFile, size: u64) -> Result<Vec<Extent>, DiskError> {
    let fd = f.file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on an fd we own; it does not touch memory.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                push_extent(&mut out, pos, size - pos, ExtentKind::Absent);
                break;
            }
            push_extent(&mut out, pos, size - pos, ExtentKind::Allocated);
            break;
        }
        let data = (data as u64).min(size);
        push_extent(&mut out, pos, data - pos, ExtentKind::Absent);
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            size
        } else {
            (hole as u64).min(size)
        };
        push_extent(&mut out, data, hole - data, ExtentKind::Allocated);
        pos = hole;
    }
    Ok(out)
}

fn allocated(extents: &[Extent]) -> u64 {
    extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Allocated)
        .map(|e| e.len)
        .sum()
}

fn raw_info(f: &DiskFile) -> DiskInfo {
    let alloc = file_extents(f, f.len)
        .map(|e| allocated(&e))
        .unwrap_or(f.len);
    DiskInfo {
        format: "raw".into(),
        subformat: None,
        virtual_size: f.len,
        block_size: None,
        logical_sector_size: 512,
        physical_sector_size: 512,
        allocated_bytes: alloc,
        parent: None,
    }
}

impl BlockDevice for RawDisk {
    fn info(&self) -> DiskInfo {
        raw_info(&self.f)
    }
    fn virtual_size(&self) -> u64 {
        self.f.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.f.len)?;
        self.f.read_exact_at(offset, buf, "raw data")
    }
    fn extents(&self) -> Result<Vec<Extent>, DiskError> {
        file_extents(&self.f, self.f.len)
    }
}

/// Writes a raw image. A new file skips zero runs (they stay holes); an existing file is written
/// as asked, zeros included, because its old content must be overwritten.
pub(crate) struct RawWriter {
    f: DiskFile,
    size: u64,
    fresh: bool,
    /// End of the highest write so far: only zero writes past it can be skipped, because
    /// nothing was ever written there (a new file reads zeros).
    written_end: u64,
}

impl RawWriter {
    pub fn create(path: &Path, size: u64) -> Result<Self, DiskError> {
        let mut f = DiskFile::create_new(path)?;
        f.set_len(size)?;
        Ok(RawWriter {
            f,
            size,
            fresh: true,
            written_end: 0,
        })
    }

    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let f = DiskFile::open(path, true)?;
        let size = f.len;
        Ok(RawWriter {
            f,
            size,
            fresh: false,
            written_end: 0,
        })
    }
}

impl DiskWriter for RawWriter {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        check_range(offset, data.len(), self.size)?;
        if self.fresh && offset >= self.written_end && is_zero(data) {
            return Ok(());
        }
        self.written_end = self.written_end.max(offset + data.len() as u64);
        self.f.write_all_at(offset, data, "raw data")
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        self.f.sync()
    }
    fn finish(mut self: Box<Self>) -> Result<(), DiskError> {
        self.flush()
    }
}

impl BlockDevice for RawWriter {
    fn info(&self) -> DiskInfo {
        raw_info(&self.f)
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        check_range(offset, buf.len(), self.size)?;
        self.f.read_exact_at(offset, buf, "raw data")
    }
    fn extents(&self) -> Result<Vec<Extent>, DiskError> {
        file_extents(&self.f, self.size)
    }
}
