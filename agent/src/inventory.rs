//! What the host has: each configured VM's disks, opened read-only to learn format and size.
use ferry_proto::common::v1::Disk;
use ferry_proto::registry::v1::VmInventory;

use crate::config::VmConfig;

/// A disk as reported to the registry; a disk that cannot be opened is reported with its
/// error so the enable-protection prerequisites can name it.
pub fn describe_disk(
    vm: &str,
    path: &std::path::Path,
    tracker: Option<&crate::tracker::Tracker>,
) -> Disk {
    let path_s = path.to_string_lossy().to_string();
    let mut d = Disk {
        id: ferry_proto::disk_id(vm, &path_s),
        path: path_s,
        ..Default::default()
    };
    match ferry_disk::open(path) {
        Ok(dev) => {
            let info = dev.info();
            d.format = info.format.clone();
            d.subformat = info.subformat.clone().unwrap_or_default();
            d.virtual_size = info.virtual_size;
            d.logical_sector_size = info.logical_sector_size;
            d.allocated_bytes = info.allocated_bytes;
        }
        Err(e) => d.error = e.to_string(),
    }
    if let Some(t) = tracker
        && let Some(uri) = t.nbd_uri(path)
    {
        d.nbd_uri = uri;
        // The current log plus sealed ones still waiting for their point.
        let sealed: u64 = crate::delta::sealed_logs(path, Some(t))
            .unwrap_or_default()
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        d.pending_log_bytes = t.pending_bytes(path) + sealed;
    } else if let Some(t) = tracker
        && d.error.is_empty()
    {
        // Readable now, but the tracker could not take it at start: no write to it is
        // recorded, so a delta cycle would miss them.
        d.error = match t.failure(path) {
            Some(why) => format!(
                "change tracking could not open it when the agent started ({why}); restart the agent once it can be opened for writing"
            ),
            None => "change tracking does not serve it (it could not be opened when the agent started); restart the agent".into(),
        };
    }
    d
}

pub fn describe_vm(vm: &VmConfig, tracker: Option<&crate::tracker::Tracker>) -> VmInventory {
    VmInventory {
        name: vm.name.clone(),
        disks: vm
            .disks
            .iter()
            .map(|p| describe_disk(&vm.name, p, tracker))
            .collect(),
        hardware: Some(ferry_proto::common::v1::VmHardware {
            cpus: vm.cpus,
            memory_mib: vm.memory,
            networks: vm.networks.clone(),
        }),
    }
}
