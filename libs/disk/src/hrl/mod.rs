//! MS-HRL (Hyper-V Replica Log): the change log of a tracked disk (FORMATS.md §3).
//!
//! [`HrlWriter`] appends write records and closes a log cleanly; [`HrlLog::open`] validates
//! every checksum, recovers the valid prefix of a log that was not closed, and replays records
//! onto a disk; [`order_chain`] orders logs by their unique ids.

mod format;
mod reader;
mod writer;

pub use format::{EntryMeta, HrlHeader};
pub use reader::{HrlLog, HrlRecord, order_chain};
pub use writer::{HrlOptions, HrlWriter};
