//! VHD (Virtual PC / Hyper-V gen 1) images: fixed, dynamic and differencing (FORMATS.md §1).

mod format;
mod reader;
mod writer;

pub(crate) use format::now_vhd;
pub(crate) use reader::VhdDisk;
pub(crate) use writer::VhdWriter;
