//! One error type for every parser and writer in the crate.
//!
//! Every variant that comes from file content carries the name of the structure that was wrong
//! and the file offset where it lives, so an operator can open the file in a hex editor and see
//! the problem without a debugger.

use std::path::PathBuf;

#[derive(thiserror::Error, Debug)]
pub enum DiskError {
    #[error("{path}: i/o error on {structure} at offset {offset:#x}: {source}")]
    Io {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {structure} at offset {offset:#x}: {reason}")]
    Corrupt {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        reason: String,
    },
    #[error(
        "{path}: {structure} at offset {offset:#x} needs {needed} bytes but the file ends at {file_len:#x}"
    )]
    Truncated {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error(
        "{path}: {structure} at offset {offset:#x}: checksum {stored:#010x} does not match computed {computed:#010x}"
    )]
    Checksum {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    #[error("{path}: {structure} at offset {offset:#x}: unsupported: {reason}")]
    Unsupported {
        path: PathBuf,
        structure: &'static str,
        offset: u64,
        reason: String,
    },
    #[error("{path}: parent disk: {reason}")]
    Parent { path: PathBuf, reason: String },
    #[error("{path}: already exists")]
    AlreadyExists { path: PathBuf },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(
        "read of {len} bytes at virtual offset {offset:#x} is beyond the virtual size {size:#x}"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

impl DiskError {
    pub(crate) fn corrupt(
        path: &std::path::Path,
        structure: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        DiskError::Corrupt {
            path: path.to_path_buf(),
            structure,
            offset,
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(
        path: &std::path::Path,
        structure: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        DiskError::Unsupported {
            path: path.to_path_buf(),
            structure,
            offset,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(
        path: &std::path::Path,
        structure: &'static str,
        offset: u64,
        source: std::io::Error,
    ) -> Self {
        DiskError::Io {
            path: path.to_path_buf(),
            structure,
            offset,
            source,
        }
    }
}
