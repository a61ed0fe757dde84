//! A VM's virtual disk as its host reports it: the one record of a disk that the registry's
//! catalog and ingest's cycles keep. The protobuf `Disk` converts to and from it once, in
//! [`crate::wire`]. (A disk *in a recovery point*, with its block size and map, is
//! `ferry_store::DiskManifest`: a different thing.)
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpec {
    /// Stable id, derived from the VM and the path (`ferry_proto::disk_id`): the storage and
    /// lease key.
    pub id: String,
    /// Path on the host, as named in the agent's config.
    pub path: String,
    /// "raw", "vhd" or "vhdx".
    pub format: String,
    /// "fixed", "dynamic", "differencing", or "" for raw.
    pub subformat: String,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    /// Bytes allocated in the image (what an initial copy reads at most).
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Why the host could not open the disk ("" when it could).
    #[serde(default)]
    pub error: String,
    /// NBD URI the host's tracker serves the disk on ("" when not tracked).
    #[serde(default)]
    pub nbd_uri: String,
}
