//! SHUTDOWN_VM on a VM's own host: a failover stops the source VM through this host's
//! driver, then fences it here (its writes are refused: nothing the source does afterwards
//! can become a recovery point); a planned failover then has the last writes shipped (the
//! final synchronisation: zero data loss). RESUME_VM undoes the stop when the failover
//! failed before the VM ran elsewhere.
use ferry_proto::scheduler::v1::WorkItem;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::driver::{Network, Nic, RunDisk, VmRun, VmSpec};
use crate::{Agent, ReplError};

impl Agent {
    /// Stops and fences the VM; with `final_sync` also ships its last writes and returns the
    /// point that holds them.
    pub(crate) async fn shutdown_source(
        &self,
        item: &WorkItem,
        cancel: &CancellationToken,
    ) -> Result<Option<String>, ReplError> {
        let run = self.source_run(&item.vm)?;
        self.driver
            .stop(&run, cancel)
            .await
            .map_err(|e| ReplError::Permanent(format!("stopping vm {}: {e}", run.vm)))?;
        if let Some(t) = &self.tracker {
            t.fence_vm(&run.vm, "shut down for a failover")
                .map_err(|e| ReplError::Permanent(format!("fencing vm {}: {e}", run.vm)))?;
        }
        info!(vm = %run.vm, "source vm stopped and fenced for a failover");
        if !item.failover.as_ref().is_some_and(|f| f.final_sync) {
            return Ok(None);
        }
        // Fenced: the cut holds every write the tracker acknowledged, and nothing comes after.
        let synced = async {
            self.final_sync(&run.vm, &item.job_id, cancel).await?;
            self.get_point(&run.vm, "latest").await
        }
        .await;
        match synced {
            Ok(point) => {
                info!(vm = %run.vm, point = %point.id, "final synchronisation committed");
                Ok(Some(point.id))
            }
            // The failover cannot go on without its final point: the source takes over again.
            Err(e) => Err(
                match self.resume_source(item, &CancellationToken::new()).await {
                    Ok(()) => ReplError::Permanent(format!(
                        "the final synchronisation failed: {e}; vm {} was started again here",
                        run.vm
                    )),
                    Err(re) => ReplError::Permanent(format!(
                        "the final synchronisation failed: {e}; and the vm could not be started again: {re}"
                    )),
                },
            ),
        }
    }

    /// The stopped, fenced VM's last writes as a point: one delta cycle — or, when its
    /// logs cannot carry them (the agent was killed with a log open, or a resync was
    /// interrupted), a checksum resync of its disks: a disk pass, longer, but nothing lost.
    async fn final_sync(
        &self,
        vm: &str,
        job_id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        if !self.resync_in_progress(vm) {
            match self.delta_cycle(vm, false, "", cancel).await {
                Err(e) if e.resync_required() => {
                    warn!(vm, error = %e, "the change logs cannot carry the last writes; a checksum resync makes the final point");
                }
                r => return r,
            }
        }
        self.resync(vm, job_id, cancel).await
    }

    /// RESUME_VM: the failover that stopped the VM failed before it ran elsewhere, so the
    /// source takes over again: its writes are accepted and the driver starts it. A VM the
    /// registry still lists as failed over stays fenced (the next heartbeat says so).
    pub(crate) async fn resume_source(
        &self,
        item: &WorkItem,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        let run = self.source_run(&item.vm)?;
        if let Some(t) = &self.tracker
            && t.is_fenced(&run.vm)
        {
            t.unfence_vm(&run.vm)
                .map_err(|e| ReplError::Permanent(format!("unfencing vm {}: {e}", run.vm)))?;
        }
        self.driver
            .start(&run, cancel)
            .await
            .map_err(|e| ReplError::Permanent(format!("starting vm {} again: {e}", run.vm)))?;
        info!(vm = %run.vm, "vm started here (its source again after a failed failover, or a failback's target)");
        Ok(())
    }

    /// How the driver sees the configured VM `name` on this host (production network), or
    /// the VM recovered here (re-protected: this host is its source now).
    fn source_run(&self, name: &str) -> Result<VmRun, ReplError> {
        // A VM that runs here from a folder (recovered, or failed back into one) runs from
        // there, even when this host also has its configured disks.
        if let Some(run) = self.recovered_run(name) {
            return run;
        }
        let Some(vm) = self.cfg.vms.iter().find(|v| v.name == name) else {
            return Err(ReplError::Permanent(format!(
                "vm {name} is not configured on host {}",
                self.creds.host
            )));
        };
        let dir = self.cfg.data_dir.join("vms");
        std::fs::create_dir_all(&dir)
            .map_err(|e| ReplError::Permanent(format!("creating {}: {e}", dir.display())))?;
        let spec = VmSpec {
            name: vm.name.clone(),
            cpus: vm.cpus,
            memory_mib: vm.memory,
            nics: vm
                .networks
                .iter()
                .enumerate()
                .map(|(i, n)| Nic {
                    name: format!("nic{i}"),
                    network: n.clone(),
                    ip: String::new(),
                })
                .collect(),
        };
        let disks = vm
            .disks
            .iter()
            .map(|p| RunDisk {
                path: p.clone(),
                format: format_of(p).to_owned(),
                nbd_uri: self
                    .tracker
                    .as_ref()
                    .and_then(|t| t.nbd_uri(p))
                    .unwrap_or_default(),
            })
            .collect();
        let run = VmRun {
            vm: vm.name.clone(),
            network: Network::Production,
            spec_path: dir.join(format!("{}.vm.json", vm.name)),
            spec,
            disks,
            dir,
        };
        crate::driver::write_spec(&run.spec_path, &run.spec).map_err(|e| {
            ReplError::Permanent(format!("writing {}: {e}", run.spec_path.display()))
        })?;
        Ok(run)
    }
}

/// The format a disk's file name says (the driver only passes it on).
pub(super) fn format_of(path: &std::path::Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
    {
        Some(e) if e == "vhdx" => "vhdx",
        Some(e) if e == "vhd" => "vhd",
        _ => "raw",
    }
}
