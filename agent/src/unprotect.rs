//! Disable protection on the VM's host: the sealed `.hrl` logs of the VM's disks that no cycle
//! shipped are deleted (the registry keeps no replication of the VM any more, so nothing would
//! ship them). The tracker keeps serving the disks and writing their current logs; a later
//! protection starts with a full copy, which supersedes them.
use ferry_proto::scheduler::v1::RecoveredVm;

use crate::Agent;
use crate::replicate::ReplError;

impl Agent {
    /// Deletes the sealed, unshipped logs of `vm`'s configured disks (never the tracker's
    /// current log) and says how many in `logs_removed`.
    pub(crate) fn disable_protection(&self, vm: &str) -> Result<RecoveredVm, ReplError> {
        let vm_cfg = self.cfg.vms.iter().find(|v| v.name == vm).ok_or_else(|| {
            ReplError::Permanent(format!(
                "vm {vm} is not configured on host {}",
                self.creds.host
            ))
        })?;
        let mut removed = 0u32;
        for disk in &vm_cfg.disks {
            let sealed = crate::delta::sealed_logs(disk, self.tracker.as_ref())?;
            removed += sealed.len() as u32;
            // Records the chain tip as if the logs had shipped: the current log chains to it.
            crate::delta::remove_logs(&self.cfg.data_dir, &sealed);
            tracing::info!(vm, disk = %disk.display(), logs = sealed.len(), "sealed change logs removed");
        }
        Ok(RecoveredVm {
            logs_removed: removed,
            ..Default::default()
        })
    }
}
