//! Failover work on a recovery host (DESIGN §11): materialise a recovery point into the VM's
//! folder under `[recovery] dir`, serve its disks through the tracker (so the writes of the
//! recovered VM are tracked, as failback needs), start the VM through the driver; and the
//! reverse: stop it, stop serving its disks, delete the folder.
//!
//! The point's block maps come from storage-writer (`GetPoint`, `BlockHashes`, which the
//! registry lets a VM's recovery host read) and its chunks from the gateway over QUIC
//! (FETCH, entitled by the point); every chunk is opened with the vault key, which checks it
//! against its id. No other component writes into this host's filesystem.
//!
//! A folder is ours when it holds the marker file [`MARKER`], written before anything else
//! and naming the failover and the work item: the same work item delivered again (the agent
//! restarted, the scheduler re-sent it) finds a finished marker and answers with what it
//! recorded, or an unfinished one and starts over; new RECOVER_VM work of the same failover
//! is a change of point, done in place ([`repoint`]); a folder of another failover is
//! refused, never reused.
mod failback;
mod failback_dir;
mod instant;
mod marker;
mod repoint;
mod source;
pub(crate) mod standby;
mod standby_take;
mod verify;
mod write;

use std::path::{Path, PathBuf};

use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::scheduler::v1::{FailoverWork, RecoveredDisk, RecoveredVm, WorkItem};
use ferry_proto::storage::v1::GetPointRequest;
use ferry_proto::storage::v1::storage_writer_client::StorageWriterClient;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::driver::{Network, Nic, RunDisk, VmRun, VmSpec};
use crate::replicate::from_status;
use crate::{Agent, ReplError};
use marker::Marker;

/// The marker file in a recovered VM's folder.
pub const MARKER: &str = ".ferry-recovery.json";

/// CPUs and memory (MiB) a VM is started with when its host never reported them.
const DEFAULT_CPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u64 = 1024;

impl Agent {
    /// The folder of `vm` under this host's `[recovery] dir`.
    fn recovery_dir(&self, vm: &str) -> Result<PathBuf, ReplError> {
        let root = match (&self.cfg.recovery, self.recovery_ready) {
            (Some(r), true) => r.dir.clone(),
            _ => {
                return Err(ReplError::Permanent(format!(
                    "host {} has no usable [recovery] folder: it cannot receive vm {vm}",
                    self.creds.host
                )));
            }
        };
        if !ferry_model::disk::is_file_safe_vm_name(vm) {
            return Err(ReplError::Permanent(format!(
                "vm name {vm:?} cannot name a folder"
            )));
        }
        Ok(root.join(vm))
    }

    /// At start: the tracker serves the configured disks only, so the disks of every VM
    /// that runs here from a folder (recovered, or failed back into one) are served again,
    /// in place of the VM's configured disks where it has both.
    pub(crate) async fn serve_folders(&self) {
        if self.tracker.is_none() {
            return;
        }
        let mut dirs = Vec::new();
        if let (Some(r), true) = (&self.cfg.recovery, self.recovery_ready) {
            dirs.extend(subfolders(&r.dir));
        }
        dirs.extend(
            subfolders(&self.cfg.data_dir.join("failback"))
                .into_iter()
                .filter_map(|p| {
                    let vm = p.file_stem()?.to_str()?.to_owned();
                    self.failback_folder(&vm)
                }),
        );
        for dir in dirs {
            let Ok(Some(mut m)) = marker::read(&dir) else {
                continue;
            };
            if !m.finished {
                continue;
            }
            let vm = m.vm.clone();
            self.stop_serving(&vm).await;
            match self.serve(&vm, &mut m).await {
                Ok(()) => {
                    info!(vm = %vm, dir = %dir.display(), disks = m.disks.len(), "disks of a vm that runs from a folder served again")
                }
                Err(e) => {
                    warn!(vm = %vm, dir = %dir.display(), error = %e, "cannot serve the disks of a vm that runs from a folder")
                }
            }
        }
    }

    /// Whether `vm` runs here from a folder (recovered, or failed back into one).
    pub(crate) fn runs_from_folder(&self, vm: &str) -> bool {
        self.recovered(vm).is_some()
    }

    /// The VM recovered here for production (a finished planned or unplanned failover in
    /// its folder under `[recovery] dir`, or the folder a failback into a folder made
    /// here): after a re-protect this host replicates it.
    fn recovered(&self, vm: &str) -> Option<(PathBuf, Marker)> {
        let running = |dir: PathBuf| {
            let m = marker::read(&dir).ok()??;
            (m.finished && m.network == "production").then_some((dir, m))
        };
        (self.recovery_dir(vm).ok().and_then(running))
            .or_else(|| self.failback_folder(vm).and_then(running))
    }

    /// The folder of failover `failover_id` of `vm` here: the failback folder that holds
    /// it, else the VM's folder under `[recovery] dir`.
    fn folder_of(&self, vm: &str, failover_id: &str) -> Result<PathBuf, ReplError> {
        let back = self.failback_folder(vm).filter(|dir| {
            marker::read(dir)
                .ok()
                .flatten()
                .is_some_and(|m| m.failover_id == failover_id)
        });
        match back {
            Some(dir) => Ok(dir),
            None => self.recovery_dir(vm),
        }
    }

    /// The disks of the VM recovered here, with the ids of its points' disks.
    pub(crate) fn recovered_disks(&self, vm: &str) -> Option<Vec<ferry_proto::common::v1::Disk>> {
        let (_, m) = self.recovered(vm)?;
        Some(
            m.disks
                .iter()
                .zip(&m.disk_ids)
                .map(|(d, id)| ferry_proto::common::v1::Disk {
                    id: id.clone(),
                    ..crate::inventory::describe_disk(vm, &d.path, self.tracker.as_ref())
                })
                .collect(),
        )
    }

    /// How the driver sees the VM recovered here (its disks as the tracker serves them now).
    pub(crate) fn recovered_run(&self, vm: &str) -> Option<Result<VmRun, ReplError>> {
        let (dir, mut m) = self.recovered(vm)?;
        for d in &mut m.disks {
            d.nbd_uri = self
                .tracker
                .as_ref()
                .and_then(|t| t.nbd_uri(&d.path))
                .unwrap_or_default();
        }
        Some(self.vm_run(vm, &dir, &m))
    }

    /// RECOVER_VM: the point's disks in the VM's folder, served and started.
    pub(crate) async fn recover_vm(
        &self,
        item: &WorkItem,
        cancel: &CancellationToken,
    ) -> Result<RecoveredVm, ReplError> {
        let work = failover_of(item)?;
        let dir = self.recovery_dir(&item.vm)?;
        match marker::read(&dir)? {
            Some(m) if m.failover_id != work.failover_id => {
                return Err(ReplError::Permanent(format!(
                    "{} holds failover {} of vm {}: clean it up first",
                    dir.display(),
                    m.failover_id,
                    item.vm
                )));
            }
            Some(m) if m.finished && m.answers(item, &work) => {
                info!(vm = %item.vm, failover = %work.failover_id, "failover work already done; answering with its record");
                return Ok(m.to_proto());
            }
            Some(m) if m.finished && instant::filling(self, &m).is_some() => {
                return Err(ReplError::Permanent(format!(
                    "vm {} cannot change its point yet: {}; change it once the copy is done",
                    item.vm,
                    instant::filling(self, &m).unwrap_or_default()
                )));
            }
            Some(m) if m.finished => match self.repoint(item, &work, &dir, m, cancel).await? {
                repoint::Repointed::Done(r) => return Ok(*r),
                // The folder is gone: the whole point is materialised below.
                repoint::Repointed::Rematerialise => {}
            },
            Some(_) => {
                info!(vm = %item.vm, failover = %work.failover_id, dir = %dir.display(), "an earlier run of this failover did not finish; starting over");
                self.stop_serving(&item.vm).await;
                remove_folder(&dir)?;
            }
            None if dir.exists() => {
                return Err(ReplError::Permanent(format!(
                    "{} exists and is not a folder of ferry's: move it away first",
                    dir.display()
                )));
            }
            None => {}
        }
        let mut m = Marker::new(item, &work, &dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ReplError::Permanent(format!("creating {}: {e}", dir.display())))?;
        marker::write(&dir, &m)?;
        let res = self
            .materialise_and_start(item, &work, &dir, &mut m, cancel)
            .await;
        if let Err(e) = &res {
            warn!(vm = %item.vm, failover = %work.failover_id, error = %e, "recovering the vm failed; removing what it made");
            self.stop_serving(&item.vm).await;
            if let Err(rm) = remove_folder(&dir) {
                warn!(vm = %item.vm, error = %rm, "cannot remove the folder of a failed recovery");
            }
        }
        res
    }

    async fn materialise_and_start(
        &self,
        item: &WorkItem,
        work: &FailoverWork,
        dir: &Path,
        m: &mut Marker,
        cancel: &CancellationToken,
    ) -> Result<RecoveredVm, ReplError> {
        let point = self.get_point(&item.vm, &work.point).await?;
        let files = plan_files(&item.vm, &point)?;
        m.instant = work.instant;
        // An instant recovery serves at once; otherwise a standby copy saves the fetch.
        let copy = m.network == "test";
        let standby = match work.instant {
            true => None,
            false => {
                self.disks_from_standby(&item.vm, &point, &files, dir, copy, cancel)
                    .await?
            }
        };
        if let Some(s) = &standby {
            m.standby_point = s.point.clone();
            m.bytes_written = s.bytes;
            m.blocks_compared = s.compared;
            m.blocks_rewritten = s.rewritten;
        }
        for (disk, file) in point.disks.iter().zip(&files) {
            let path = dir.join(file);
            // Disks made from the standby copy are in place already.
            if standby.is_none() && work.instant {
                self.prepare_instant_disk(&item.vm, &point.id, disk, &path)
                    .await?;
            } else if standby.is_none() {
                let bytes = self
                    .write_disk(&item.vm, &point.id, disk, &path, cancel)
                    .await?;
                m.bytes_written += bytes;
            }
            m.disks.push(RunDisk {
                path,
                format: disk.format.clone(),
                nbd_uri: String::new(),
            });
            m.disk_ids.push(disk.disk_id.clone());
        }
        let recovered = self.start_recovered(&item.vm, dir, m, cancel).await?;
        info!(vm = %item.vm, point = %point.id, network = %m.network, disks = m.disks.len(), bytes = m.bytes_written, instant = m.instant, standby_point = %m.standby_point, driver = %m.driver, "vm recovered and started");
        Ok(recovered)
    }

    /// Serves the written disks, writes the VM's spec and starts it; then the marker is
    /// finished.
    pub(super) async fn start_recovered(
        &self,
        vm: &str,
        dir: &Path,
        m: &mut Marker,
        cancel: &CancellationToken,
    ) -> Result<RecoveredVm, ReplError> {
        self.serve(vm, m).await?;
        let run = self.vm_run(vm, dir, m)?;
        crate::driver::write_spec(&run.spec_path, &run.spec).map_err(|e| {
            ReplError::Permanent(format!("writing {}: {e}", run.spec_path.display()))
        })?;
        m.started_at_ms = ferry_proto::now_ms();
        self.driver
            .start(&run, cancel)
            .await
            .map_err(|e| ReplError::Permanent(format!("starting vm {vm}: {e}")))?;
        m.driver = self.driver.kind().to_owned();
        m.finished = true;
        marker::write(dir, m)?;
        Ok(m.to_proto())
    }

    /// REMOVE_RECOVERED: stops the VM (refusing to go on when the driver cannot), stops
    /// serving its disks and deletes its folder. Nothing there: done already.
    pub(crate) async fn remove_recovered(
        &self,
        item: &WorkItem,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        let work = failover_of(item)?;
        let dir = self.folder_of(&item.vm, &work.failover_id)?;
        let m = match marker::read(&dir)? {
            None if !dir.exists() => {
                info!(vm = %item.vm, "nothing recovered here; nothing to remove");
                return Ok(());
            }
            None => {
                return Err(ReplError::Permanent(format!(
                    "{} is not a folder of ferry's: not removing it",
                    dir.display()
                )));
            }
            Some(m) if m.failover_id != work.failover_id => {
                return Err(ReplError::Permanent(format!(
                    "{} holds failover {} of vm {}, not {}",
                    dir.display(),
                    m.failover_id,
                    item.vm,
                    work.failover_id
                )));
            }
            Some(m) => m,
        };
        self.stop_recovered(&item.vm, &dir, &m, cancel).await?;
        self.remove_stopped(&item.vm, &dir, &m, cancel).await?;
        info!(vm = %item.vm, failover = %work.failover_id, dir = %dir.display(), "recovered vm stopped and removed");
        Ok(())
    }

    /// Stops the VM through the driver when it was started; an error when the driver cannot
    /// (nothing may touch the disks of a VM that may still run).
    async fn stop_recovered(
        &self,
        vm: &str,
        dir: &Path,
        m: &Marker,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        if m.started_at_ms == 0 {
            return Ok(());
        }
        let run = self.vm_run(vm, dir, m)?;
        self.driver
            .stop(&run, cancel)
            .await
            .map_err(|e| ReplError::Permanent(format!("stopping vm {vm}: {e}; its files stay")))
    }

    /// The stopped VM's definition removed from the driver, its disks no longer served and
    /// its folder deleted.
    async fn remove_stopped(
        &self,
        vm: &str,
        dir: &Path,
        m: &Marker,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        let run = self.vm_run(vm, dir, m)?;
        self.driver
            .remove(&run, cancel)
            .await
            .map_err(|e| ReplError::Permanent(format!("removing vm {vm}: {e}")))?;
        self.stop_serving(vm).await;
        for d in &m.disks {
            crate::delta::forget_chain_tip(&self.cfg.data_dir, &d.path);
        }
        remove_folder(dir)
    }

    /// Serves the written disks through the tracker (when this host has one); a disk still
    /// being filled (instant recovery) with its fill, whose copy goes on.
    async fn serve(&self, vm: &str, m: &mut Marker) -> Result<(), ReplError> {
        let fills = self.fills_of(m)?;
        let Some(tracker) = &self.tracker else {
            if fills.iter().any(Option::is_some) {
                return Err(ReplError::Permanent(format!(
                    "vm {vm}: an instant recovery needs a [tracker] on host {} to serve its disks",
                    self.creds.host
                )));
            }
            return Ok(());
        };
        let disks = m
            .disks
            .iter()
            .map(|d| crate::tracker::TrackedDisk {
                vm: vm.to_owned(),
                path: d.path.clone(),
                export: crate::export_name(vm, &d.path),
            })
            .collect();
        let uris = tracker
            .add_vm_filled(vm, disks, fills)
            .await
            .map_err(|e| ReplError::Permanent(format!("serving the disks of vm {vm}: {e}")))?;
        for (d, uri) in m.disks.iter_mut().zip(uris) {
            d.nbd_uri = uri;
        }
        Ok(())
    }

    pub(super) async fn stop_serving(&self, vm: &str) {
        let Some(tracker) = &self.tracker else {
            return;
        };
        match tracker.remove_vm(vm).await {
            Ok(_) | Err(crate::tracker::TrackerError::UnknownVm(_)) => {}
            Err(e) => {
                warn!(vm = %vm, error = %e, "cannot stop serving the disks of a recovered vm")
            }
        }
    }

    fn vm_run(&self, vm: &str, dir: &Path, m: &Marker) -> Result<VmRun, ReplError> {
        let network = match m.network.as_str() {
            "test" => Network::Test,
            "production" => Network::Production,
            other => {
                return Err(ReplError::Permanent(format!(
                    "failover network {other:?} is neither production nor test"
                )));
            }
        };
        let spec = VmSpec {
            name: vm.to_owned(),
            cpus: if m.cpus == 0 { DEFAULT_CPUS } else { m.cpus },
            memory_mib: if m.memory_mib == 0 {
                DEFAULT_MEMORY_MIB
            } else {
                m.memory_mib
            },
            nics: m
                .networks
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let name = format!("nic{i}");
                    Nic {
                        ip: m.nic_addresses.get(&name).cloned().unwrap_or_default(),
                        name,
                        network: n.clone(),
                    }
                })
                .collect(),
        };
        Ok(VmRun {
            vm: vm.to_owned(),
            network,
            spec_path: dir.join(format!("{vm}.vm.json")),
            spec,
            disks: m.disks.clone(),
            dir: dir.to_path_buf(),
        })
    }

    async fn get_point(&self, vm: &str, point: &str) -> Result<RecoveryPoint, ReplError> {
        let ch = self
            .peers
            .channel(ferry_mesh::Component::StorageWriter)
            .map_err(|e| ReplError::Permanent(format!("storage-writer endpoint: {e}")))?;
        StorageWriterClient::new(ch)
            .get_point(GetPointRequest {
                vm: vm.to_owned(),
                point: point.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| from_status(&format!("point {point} of vm {vm}"), s))
    }
}

fn failover_of(item: &WorkItem) -> Result<FailoverWork, ReplError> {
    item.failover.clone().ok_or_else(|| {
        ReplError::Permanent(format!(
            "work {} for vm {} carries no failover part",
            item.id, item.vm
        ))
    })
}

/// The file of each disk of the point: the base name of its path on the source host,
/// refused when it cannot name a file in the folder or two disks would share it.
fn plan_files(vm: &str, point: &RecoveryPoint) -> Result<Vec<String>, ReplError> {
    let mut names = std::collections::HashSet::from([format!("{vm}.vm.json"), MARKER.to_owned()]);
    let mut files = Vec::with_capacity(point.disks.len());
    for d in &point.disks {
        let Some(file) = ferry_model::disk::file_name(&d.path) else {
            return Err(ReplError::Permanent(format!(
                "disk {} of vm {vm}: its path {:?} gives no usable file name",
                d.disk_id, d.path
            )));
        };
        if !names.insert(file.to_owned()) {
            return Err(ReplError::Permanent(format!(
                "two files of vm {vm} would both be named {file}"
            )));
        }
        files.push(file.to_owned());
    }
    Ok(files)
}

/// The entries of `dir` (none when it cannot be read).
fn subfolders(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|it| it.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

fn remove_folder(dir: &Path) -> Result<(), ReplError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ReplError::Permanent(format!(
            "removing {}: {e}",
            dir.display()
        ))),
    }
}

impl Marker {
    fn to_proto(&self) -> RecoveredVm {
        RecoveredVm {
            dir: self.dir.display().to_string(),
            disks: self
                .disks
                .iter()
                .zip(&self.disk_ids)
                .map(|(d, id)| RecoveredDisk {
                    disk_id: id.clone(),
                    path: d.path.display().to_string(),
                    format: d.format.clone(),
                    nbd_uri: d.nbd_uri.clone(),
                })
                .collect(),
            bytes_written: self.bytes_written,
            blocks_compared: self.blocks_compared,
            blocks_rewritten: self.blocks_rewritten,
            logs_removed: 0,
            driver: self.driver.clone(),
            started_at_ms: self.started_at_ms,
            final_point: String::new(),
            instant: self.instant,
            standby_point: self.standby_point.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::common::v1::PointDisk;

    fn point(paths: &[&str]) -> RecoveryPoint {
        RecoveryPoint {
            disks: paths
                .iter()
                .enumerate()
                .map(|(i, p)| PointDisk {
                    disk_id: format!("d{i}"),
                    path: (*p).into(),
                    ..PointDisk::default()
                })
                .collect(),
            ..RecoveryPoint::default()
        }
    }

    #[test]
    fn files_from_the_source_paths() {
        let files = plan_files("web", &point(&["/a/x.vhdx", r"C:\b\y.vhd"])).unwrap();
        assert_eq!(files, ["x.vhdx", "y.vhd"]);
    }

    #[test]
    fn hostile_or_clashing_names_are_refused() {
        for bad in [
            &["/a/.."][..],
            &["/a/"],
            &["/a/x.raw", "/b/x.raw"],
            &["/a/web.vm.json"],
            &["/a/.ferry-recovery.json"],
        ] {
            let e = plan_files("web", &point(bad)).unwrap_err().to_string();
            assert!(e.contains("web"), "{bad:?}: {e}");
        }
    }
}
