//! VHD, VHDX, raw and MS-HRL readers and writers; block iteration.
//!
//! Every image format sits behind [`BlockDevice`] (reads at virtual offsets, allocation map,
//! parent chain) and [`DiskWriter`] (streaming creation and in-place writes). Format details are
//! in `shared/FORMATS.md`; module names follow its sections.

mod chain;
mod copy;
mod error;
pub mod hrl;
mod io;
mod layer;
mod raw;
mod vhd;
mod vhdx;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use copy::{COPY_CHUNK, CopyStats, DataBlocks, copy_into, data_blocks, visible_extents};
pub use error::DiskError;
pub use io::{AlignedBuf, is_zero};
pub use vhdx::VhdxCreateOptions;

/// Hooks for tests that need files only a crash can make.
#[doc(hidden)]
pub mod testing {
    pub use crate::vhdx::{crash_after_log, crash_after_writes};
}

/// Container format of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Vhd,
    Vhdx,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        })
    }
}

impl FromStr for Format {
    type Err = DiskError;
    fn from_str(s: &str) -> Result<Self, DiskError> {
        match s.to_ascii_lowercase().as_str() {
            "raw" => Ok(Format::Raw),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "vhdx" => Ok(Format::Vhdx),
            _ => Err(DiskError::InvalidArgument(format!(
                "unknown disk format {s:?} (expected raw, vhd or vhdx)"
            ))),
        }
    }
}

/// Allocation scheme of a VHD or VHDX file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subformat {
    Fixed,
    Dynamic,
    Differencing,
}

impl fmt::Display for Subformat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Subformat::Fixed => "fixed",
            Subformat::Dynamic => "dynamic",
            Subformat::Differencing => "differencing",
        })
    }
}

impl FromStr for Subformat {
    type Err = DiskError;
    fn from_str(s: &str) -> Result<Self, DiskError> {
        match s.to_ascii_lowercase().as_str() {
            "fixed" => Ok(Subformat::Fixed),
            "dynamic" => Ok(Subformat::Dynamic),
            "differencing" => Ok(Subformat::Differencing),
            _ => Err(DiskError::InvalidArgument(format!(
                "unknown subformat {s:?} (expected fixed, dynamic or differencing)"
            ))),
        }
    }
}

/// What one run of the allocation map holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Data stored in this layer.
    Allocated,
    /// Explicitly zero in this layer (VHDX ZERO/UNMAPPED blocks).
    Zero,
    /// Not in this layer: reads from the parent, or zeros when there is none.
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskInfo {
    pub format: String,
    pub subformat: Option<String>,
    pub virtual_size: u64,
    pub block_size: Option<u32>,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub allocated_bytes: u64,
    pub parent: Option<String>,
}

/// A readable virtual disk.
pub trait BlockDevice: Send + Sync {
    fn info(&self) -> DiskInfo;
    fn virtual_size(&self) -> u64;
    /// Reads exactly buf.len() bytes at a virtual offset; &self so several threads can read (pread).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError>;
    /// Allocation map in virtual offsets, sorted, covering [0, virtual_size) (merged runs).
    fn extents(&self) -> Result<Vec<Extent>, DiskError>;
    /// The parent of a differencing disk, already opened.
    fn parent(&self) -> Option<&dyn BlockDevice> {
        None
    }
}

/// A writable virtual disk.
pub trait DiskWriter: Send {
    /// Writes at a virtual offset; callers write in increasing offset order when streaming a new file, any order for in-place.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), DiskError>;
    fn flush(&mut self) -> Result<(), DiskError>;
    /// Flushes and closes cleanly.
    fn finish(self: Box<Self>) -> Result<(), DiskError>;
}

/// An existing disk opened for reading and writing in place.
pub trait DiskRw: BlockDevice + DiskWriter {}
impl<T: BlockDevice + DiskWriter> DiskRw for T {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub virtual_size: u64,
    pub subformat: Subformat,
    pub block_size: Option<u32>,
}

/// How to open an image: the format (detected when `None`) and an explicit parent path that
/// overrides the parent locators of a differencing disk.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub format: Option<Format>,
    pub parent: Option<PathBuf>,
}

/// Detects the format by content: `vhdxfile` identifier, `conectix` footer, else raw.
pub fn detect(path: &Path) -> Result<Format, DiskError> {
    let f = io::DiskFile::open(path, false)?;
    let mut sig = [0u8; 8];
    if f.len >= 8 {
        f.read_exact_at(0, &mut sig, "file signature")?;
        if &sig == b"vhdxfile" {
            return Ok(Format::Vhdx);
        }
        if &sig == b"conectix" {
            return Ok(Format::Vhd);
        }
    }
    // 512-byte footers, and the 511-byte ones of Virtual PC before 2004.
    for footer in [512, 511] {
        if f.len >= footer {
            f.read_exact_at(f.len - footer, &mut sig, "vhd footer")?;
            if &sig == b"conectix" {
                return Ok(Format::Vhd);
            }
        }
    }
    Ok(Format::Raw)
}

/// Opens an image read-only, detecting its format; differencing disks open their parents.
pub fn open(path: &Path) -> Result<Box<dyn BlockDevice>, DiskError> {
    open_with(path, &OpenOptions::default())
}

pub fn open_as(path: &Path, format: Format) -> Result<Box<dyn BlockDevice>, DiskError> {
    open_with(
        path,
        &OpenOptions {
            format: Some(format),
            parent: None,
        },
    )
}

pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>, DiskError> {
    chain::open_chain(path, opts, &mut Vec::new())
}

/// Opens an existing image for in-place writes (and reads). Dynamic files allocate blocks
/// crash-safely; a VHDX with a pending log is replayed into the file first.
pub fn open_rw(path: &Path) -> Result<Box<dyn DiskRw>, DiskError> {
    open_rw_with(path, &OpenOptions::default())
}

pub fn open_rw_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskRw>, DiskError> {
    let format = match opts.format {
        Some(f) => f,
        None => detect(path)?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::RawWriter::open(path)?)),
        Format::Vhd => {
            let parent = chain::open_parent_for_rw(path, Format::Vhd, opts)?;
            Ok(Box::new(vhd::VhdWriter::open(path, parent)?))
        }
        Format::Vhdx => {
            let parent = chain::open_parent_for_rw(path, Format::Vhdx, opts)?;
            Ok(Box::new(vhdx::VhdxWriter::open(path, parent)?))
        }
    }
}

/// Creates a new image and returns a streaming writer; fails if `path` exists.
/// Ranges never written read as zeros.
pub fn create(
    path: &Path,
    format: Format,
    opts: &CreateOptions,
) -> Result<Box<dyn DiskWriter>, DiskError> {
    if opts.subformat == Subformat::Differencing {
        return Err(DiskError::InvalidArgument(
            "differencing disks are made with create_differencing".into(),
        ));
    }
    match format {
        Format::Raw => {
            if opts.subformat != Subformat::Fixed && opts.subformat != Subformat::Dynamic {
                return Err(DiskError::InvalidArgument("raw has no subformat".into()));
            }
            Ok(Box::new(raw::RawWriter::create(path, opts.virtual_size)?))
        }
        Format::Vhd => Ok(Box::new(vhd::VhdWriter::create(path, opts)?)),
        Format::Vhdx => Ok(Box::new(vhdx::VhdxWriter::create(
            path,
            &VhdxCreateOptions {
                virtual_size: opts.virtual_size,
                fixed: opts.subformat == Subformat::Fixed,
                block_size: opts.block_size,
                logical_sector_size: 512,
                physical_sector_size: 4096,
                parent: None,
            },
        )?)),
    }
}

/// Creates a VHDX with full control (sector sizes, parent).
pub fn create_vhdx(path: &Path, opts: &VhdxCreateOptions) -> Result<Box<dyn DiskRw>, DiskError> {
    Ok(Box::new(vhdx::VhdxWriter::create(path, opts)?))
}

/// Creates a differencing disk over `parent` (same format as the parent, which must be VHD or
/// VHDX); the child stores a relative and an absolute locator to the parent.
pub fn create_differencing(
    path: &Path,
    format: Format,
    parent: &Path,
) -> Result<Box<dyn DiskRw>, DiskError> {
    match format {
        Format::Vhd => Ok(Box::new(vhd::VhdWriter::create_differencing(path, parent)?)),
        Format::Vhdx => Ok(Box::new(vhdx::VhdxWriter::create_differencing(
            path, parent,
        )?)),
        Format::Raw => Err(DiskError::InvalidArgument(
            "raw images cannot be differencing disks".into(),
        )),
    }
}

/// The DataWriteGuid of a VHDX's current header: what an `.hrl` log records as
/// Vhd2DataWriteGuid and what a differencing child's `parent_linkage` names.
pub fn vhdx_data_write_guid(path: &Path) -> Result<uuid::Uuid, DiskError> {
    Ok(vhdx::VhdxDisk::open(path)?.data_write_guid())
}
