//! A replication policy's defaults and limits, the same for the CLI that refuses a flag, the
//! registry that refuses a request and the storage-writer that thins points (a 0 on the
//! wire means the default: proto3 cannot tell it from "not given").
pub const DEFAULT_FREQUENCY_SECONDS: u64 = 300;
pub const MAX_FREQUENCY_SECONDS: u64 = 24 * 3600;
pub const DEFAULT_RETENTION_HOURS: u64 = 24;
pub const MAX_RETENTION_HOURS: u64 = 8760;
/// Every point younger than this is kept.
pub const DEFAULT_KEEP_ALL_SECONDS: u64 = 3600;
/// Older points are thinned to one per this interval.
pub const DEFAULT_THIN_TO_SECONDS: u64 = 300;
