//! SHUTDOWN_VM on a VM's own host: a failover stops the source VM through this host's
//! driver, then fences it here (its writes are refused: nothing the source does afterwards
//! can become a recovery point); a planned failover then has the last writes shipped (the
//! final synchronisation: zero data loss).
use ferry_proto::scheduler::v1::WorkItem;
use tokio_util::sync::CancellationToken;
use tracing::info;

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
        let Some(vm) = self.cfg.vms.iter().find(|v| v.name == item.vm) else {
            return Err(ReplError::Permanent(format!(
                "vm {} is not configured on host {}",
                item.vm, self.creds.host
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
        self.driver
            .stop(&run, cancel)
            .await
            .map_err(|e| ReplError::Permanent(format!("stopping vm {}: {e}", vm.name)))?;
        if let Some(t) = &self.tracker {
            t.fence_vm(&vm.name, "shut down for a failover")
                .map_err(|e| ReplError::Permanent(format!("fencing vm {}: {e}", vm.name)))?;
        }
        info!(vm = %vm.name, "source vm stopped and fenced for a failover");
        if !item.failover.as_ref().is_some_and(|f| f.final_sync) {
            return Ok(None);
        }
        // Fenced: the cut holds every write the tracker acknowledged, and nothing comes after.
        self.delta_cycle(&vm.name, false, cancel).await?;
        let point = self.get_point(&vm.name, "latest").await?;
        info!(vm = %vm.name, point = %point.id, "final synchronisation committed");
        Ok(Some(point.id))
    }
}

/// The format a disk's file name says (the driver only passes it on).
fn format_of(path: &std::path::Path) -> &'static str {
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
