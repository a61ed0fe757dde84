//! File access helpers shared by every format: positioned reads and writes (pread/pwrite, so
//! several threads can read one open file), page-aligned buffers and zero detection.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{DiskError, Extent, ExtentKind};

/// An open image file with its path (for error messages) and its length at open time.
#[derive(Debug)]
pub(crate) struct DiskFile {
    pub file: File,
    pub path: PathBuf,
    pub len: u64,
}

impl DiskFile {
    pub fn open(path: &Path, writable: bool) -> Result<Self, DiskError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| DiskError::io(path, "file", 0, e))?;
        let len = file
            .metadata()
            .map_err(|e| DiskError::io(path, "file", 0, e))?
            .len();
        Ok(DiskFile {
            file,
            path: path.to_path_buf(),
            len,
        })
    }

    /// Creates a new file; refuses to overwrite an existing one.
    pub fn create_new(path: &Path) -> Result<Self, DiskError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    DiskError::AlreadyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    DiskError::io(path, "file", 0, e)
                }
            })?;
        Ok(DiskFile {
            file,
            path: path.to_path_buf(),
            len: 0,
        })
    }

    /// Reads exactly `buf.len()` bytes; a range past the end of the file is a `Truncated`
    /// error naming the structure, never a short read.
    pub fn read_exact_at(
        &self,
        offset: u64,
        buf: &mut [u8],
        structure: &'static str,
    ) -> Result<(), DiskError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(DiskError::Truncated {
                path: self.path.clone(),
                structure,
                offset,
                needed: buf.len() as u64,
                file_len: self.len,
            });
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| DiskError::io(&self.path, structure, offset, e))
    }

    /// Reads what the file holds and zero-fills the part past its end (VHDX allows structures
    /// up to LastFileOffset that a crashed writer never extended the file to).
    pub fn read_or_zero(
        &self,
        offset: u64,
        buf: &mut [u8],
        structure: &'static str,
    ) -> Result<(), DiskError> {
        let avail = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            self.file
                .read_exact_at(head, offset)
                .map_err(|e| DiskError::io(&self.path, structure, offset, e))?;
        }
        tail.fill(0);
        Ok(())
    }

    pub fn write_all_at(
        &mut self,
        offset: u64,
        data: &[u8],
        structure: &'static str,
    ) -> Result<(), DiskError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| DiskError::io(&self.path, structure, offset, e))?;
        self.len = self.len.max(offset + data.len() as u64);
        Ok(())
    }

    pub fn set_len(&mut self, len: u64) -> Result<(), DiskError> {
        self.file
            .set_len(len)
            .map_err(|e| DiskError::io(&self.path, "file length", len, e))?;
        self.len = len;
        Ok(())
    }

    /// Durability barrier: data and metadata reach the disk before the caller goes on.
    pub fn sync(&self) -> Result<(), DiskError> {
        self.file
            .sync_all()
            .map_err(|e| DiskError::io(&self.path, "file sync", 0, e))
    }
}

/// A heap buffer whose start is page aligned: the kernel copies from the page cache several
/// times faster into aligned memory (DESIGN §6), and O_DIRECT-style callers need it too.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

pub const PAGE: usize = 4096;

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + PAGE];
        let start = raw.as_ptr().align_offset(PAGE).min(PAGE);
        AlignedBuf { raw, start, len }
    }
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// True if every byte is zero; word-at-a-time so it vectorises.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    for c in &mut chunks {
        let mut w = [0u8; 16];
        w.copy_from_slice(c);
        if u128::from_ne_bytes(w) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Appends a run to an extent list, merging with the previous run when kinds match.
pub fn push_extent(v: &mut Vec<Extent>, offset: u64, len: u64, kind: ExtentKind) {
    if len == 0 {
        return;
    }
    if let Some(last) = v.last_mut()
        && last.kind == kind
        && last.offset + last.len == offset
    {
        last.len += len;
        return;
    }
    v.push(Extent { offset, len, kind });
}

pub fn le_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}
pub fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
pub fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
pub fn be_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}
pub fn be_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}
pub fn put_le_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_le_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_le_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn put_be_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
pub fn put_be_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Checks a read request against the virtual size.
pub fn check_range(offset: u64, len: usize, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange {
            offset,
            len: len as u64,
            size,
        }),
    }
}
