//! The marker file of a recovered VM's folder: which failover made it, and (once finished)
//! what it made, so the same work delivered again is answered without redoing it, while new
//! work of the same failover (a change of point, `repoint.rs`) is told apart by its work id.
use std::path::{Path, PathBuf};

use ferry_proto::scheduler::v1::{FailoverWork, WorkItem};
use serde::{Deserialize, Serialize};

use super::MARKER;
use crate::ReplError;
use crate::driver::RunDisk;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Marker {
    pub(super) failover_id: String,
    /// The work item that made the folder what it is (the failover's, then each change of
    /// point's); "" in markers written before it was recorded.
    #[serde(default)]
    pub(super) work_id: String,
    pub(super) vm: String,
    pub(super) point: String,
    pub(super) kind: String,
    /// "production" or "test".
    pub(super) network: String,
    pub(super) cpus: u32,
    pub(super) memory_mib: u64,
    pub(super) networks: Vec<String>,
    /// An address per NIC ("nic0" -> "10.2.0.7/24") for this run.
    #[serde(default)]
    pub(super) nic_addresses: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub(super) dir: PathBuf,
    #[serde(default)]
    pub(super) disks: Vec<RunDisk>,
    /// The point's disk id of each of `disks`.
    #[serde(default)]
    pub(super) disk_ids: Vec<String>,
    /// Bytes written into the disks: all of the point's blocks when materialised, only
    /// those that differed after a change of point.
    #[serde(default)]
    pub(super) bytes_written: u64,
    /// A change of point, or disks made from the standby copy: blocks compared with the
    /// point, and rewritten (fetched, or zeroed) because they differed. 0 for a folder
    /// materialised whole.
    #[serde(default)]
    pub(super) blocks_compared: u64,
    #[serde(default)]
    pub(super) blocks_rewritten: u64,
    #[serde(default)]
    pub(super) started_at_ms: i64,
    #[serde(default)]
    pub(super) driver: String,
    /// Instant recovery: the disks were served (and the VM started) before their blocks were
    /// local; each disk's fill files say whether its copy is still running.
    #[serde(default)]
    pub(super) instant: bool,
    /// The disks were made from this host's standby copy, which held this point.
    #[serde(default)]
    pub(super) standby_point: String,
    /// The disks are written and served and the driver started the VM.
    #[serde(default)]
    pub(super) finished: bool,
}

impl Marker {
    pub(super) fn new(item: &WorkItem, work: &FailoverWork, dir: &Path) -> Self {
        let hw = work.hardware.clone().unwrap_or_default();
        Self {
            failover_id: work.failover_id.clone(),
            work_id: item.id.clone(),
            vm: item.vm.clone(),
            point: work.point.clone(),
            kind: work.kind.clone(),
            network: work.network.clone(),
            cpus: hw.cpus,
            memory_mib: hw.memory_mib,
            networks: hw.networks,
            nic_addresses: work.nic_addresses.clone().into_iter().collect(),
            dir: dir.to_path_buf(),
            disks: Vec::new(),
            disk_ids: Vec::new(),
            bytes_written: 0,
            blocks_compared: 0,
            blocks_rewritten: 0,
            started_at_ms: 0,
            driver: String::new(),
            instant: work.instant,
            standby_point: String::new(),
            finished: false,
        }
    }

    /// Whether this (finished) marker is the outcome of `item` itself, delivered again,
    /// rather than new work of the same failover. Work ids name the job that dispatched the
    /// work (`recover-<job>`), so a change of point always comes with a new one, even to the
    /// point the folder holds (which reverts what the VM wrote since). A marker without a
    /// work id goes by the point.
    pub(super) fn answers(&self, item: &WorkItem, work: &FailoverWork) -> bool {
        if self.work_id.is_empty() {
            self.point == work.point
        } else {
            self.work_id == item.id
        }
    }
}

/// The folder's marker; None when the folder or its marker does not exist.
pub(super) fn read(dir: &Path) -> Result<Option<Marker>, ReplError> {
    let path = dir.join(MARKER);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ReplError::Permanent(format!(
                "reading {}: {e}",
                path.display()
            )));
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ReplError::Permanent(format!("{} is unreadable: {e}", path.display())))
}

/// Writes the marker whole (temporary file, fsync, rename).
pub(super) fn write(dir: &Path, m: &Marker) -> Result<(), ReplError> {
    let path = dir.join(MARKER);
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let io = |what: &str, e: std::io::Error| {
        ReplError::Permanent(format!("{what} {}: {e}", path.display()))
    };
    let json = serde_json::to_vec_pretty(m)
        .map_err(|e| ReplError::Permanent(format!("encoding {}: {e}", path.display())))?;
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("writing", e))?;
        f.write_all(&json).map_err(|e| io("writing", e))?;
        f.sync_all().map_err(|e| io("syncing", e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| io("renaming into", e))
}
