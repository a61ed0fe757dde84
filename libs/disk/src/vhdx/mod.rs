//! VHDX images: fixed, dynamic and differencing, 512 and 4096-byte sectors (FORMATS.md §2).

mod alloc;
mod format;
mod log;
mod reader;
mod writer;

pub(crate) use reader::VhdxDisk;
pub use writer::VhdxCreateOptions;
pub(crate) use writer::VhdxWriter;

#[doc(hidden)]
pub use writer::{crash_after_log, crash_after_writes};
