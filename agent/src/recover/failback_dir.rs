//! FAILBACK into a folder (`ferry failback VM --dir DIR`, usually with `--sync full`): the VM
//! is created on the target host in `DIR/<vm>/` — its disks in the source's formats, named
//! as on the source — instead of on the disks it had there, which stay untouched (a lost or
//! replaced primary disk, or another host). The folder is a recovered VM's folder like one
//! under `[recovery] dir` (marker, spec) and is found again through the failback progress
//! file: once phase 2 started the VM, this host serves, runs and replicates it from there.
//!
//! Phase 1 writes each disk whole into a new file (full sync), or — checksum sync, when an
//! earlier run of this failback left the file — rewrites only the blocks that differ; phase 2
//! writes the blocks that differ between phase 1's point and the final one, stops serving the
//! VM's configured disks here (if any: they are not changed), serves the folder's and starts
//! the VM.
use std::path::{Path, PathBuf};

use ferry_proto::common::v1::{PointDisk, RecoveryPoint};
use ferry_proto::scheduler::v1::{FailoverWork, RecoveredVm, WorkItem};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::failback::{Progress, progress_path, read_progress, write_progress};
use super::marker::{self, Marker};
use super::repoint::Rewritten;
use super::{MARKER, plan_files};
use crate::driver::RunDisk;
use crate::{Agent, ReplError};

impl Agent {
    /// FAILBACK with a target folder: phase 1 or 2 in `<target_dir>/<vm>/`.
    pub(super) async fn failback_into_folder(
        &self,
        item: &WorkItem,
        work: &FailoverWork,
        cancel: &CancellationToken,
    ) -> Result<RecoveredVm, ReplError> {
        let vm = item.vm.as_str();
        let roots = self.cfg.export_roots.as_deref().unwrap_or_default();
        let dir = folder_for(vm, &work.target_dir, roots)?;
        let path = progress_path(&self.cfg.data_dir, vm);
        // Phase 1 delivered again after it ended: the progress file says so.
        let synced = !work.start
            && read_progress(&path)?.is_some_and(|p| {
                p.failover_id == work.failover_id && p.point == work.point && p.phase == "synced"
            });
        let Some(mut m) = self.folder_marker(item, work, &dir, synced)? else {
            let m = marker::read(&dir)?.unwrap_or_else(|| Marker::new(item, work, &dir));
            info!(vm, failover = %work.failover_id, dir = %dir.display(), "failback work already done; answering with its record");
            return Ok(m.to_proto());
        };
        let mut prog = Progress {
            failover_id: work.failover_id.clone(),
            phase: "syncing".into(),
            point: work.point.clone(),
            dir: dir.clone(),
            ..Progress::default()
        };
        write_progress(&path, &prog)?;
        let point = self.get_point(vm, &work.point).await?;
        let files = plan_files(vm, &point)?;
        marker::write(&dir, &m)?;
        for (disk, file) in point.disks.iter().zip(&files) {
            let local = dir.join(file);
            let r = self
                .bring_folder_disk(vm, work, &point, disk, &local, cancel)
                .await?;
            m.bytes_written += r.bytes;
            m.blocks_compared += r.compared;
            m.blocks_rewritten += r.rewritten;
            m.disks.push(RunDisk {
                path: local,
                format: disk.format.clone(),
                nbd_uri: String::new(),
            });
            m.disk_ids.push(disk.disk_id.clone());
        }
        marker::write(&dir, &m)?;
        (prog.phase, prog.bytes_written) = ("synced".into(), m.bytes_written);
        (prog.blocks_compared, prog.blocks_rewritten) = (m.blocks_compared, m.blocks_rewritten);
        write_progress(&path, &prog)?;
        info!(vm, failover = %work.failover_id, point = %work.point, dir = %dir.display(), sync = %work.sync, phase2 = work.start, rewritten = m.blocks_rewritten, bytes = m.bytes_written, "failback folder brought to the point");
        if !work.start {
            return Ok(m.to_proto());
        }
        // The VM's configured disks here (fenced, stale) are let go, not changed.
        self.stop_serving(vm).await;
        let started = self.start_recovered(vm, &dir, &mut m, cancel).await?;
        prog.phase = "started".into();
        write_progress(&path, &prog)?;
        Ok(started)
    }

    /// The folder's marker, made ready for this work (counts reset); None when the folder
    /// already holds this very work's outcome (the VM started, or phase 1 `synced`).
    fn folder_marker(
        &self,
        item: &WorkItem,
        work: &FailoverWork,
        dir: &Path,
        synced: bool,
    ) -> Result<Option<Marker>, ReplError> {
        let m = match marker::read(dir)? {
            Some(m) if m.failover_id != work.failover_id => {
                return Err(ReplError::Permanent(format!(
                    "{} holds failover {} of vm {}: choose another folder",
                    dir.display(),
                    m.failover_id,
                    m.vm
                )));
            }
            Some(m) if (m.finished || synced) && m.work_id == item.id => return Ok(None),
            Some(m) => Marker {
                work_id: item.id.clone(),
                point: work.point.clone(),
                ..Marker::new(item, work, dir)
            }
            .with_started(m.started_at_ms),
            None if has_entries(dir)? => {
                return Err(ReplError::Permanent(format!(
                    "{} exists and is not a folder of ferry's: choose another folder",
                    dir.display()
                )));
            }
            None => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    ReplError::Permanent(format!("creating {}: {e}", dir.display()))
                })?;
                Marker::new(item, work, dir)
            }
        };
        Ok(Some(m))
    }

    /// One disk of the folder to `disk` of `point`: a new file with every block (phase 1
    /// without a usable earlier file, or full sync), else in place (checksum, or phase 2's
    /// difference between the points).
    async fn bring_folder_disk(
        &self,
        vm: &str,
        work: &FailoverWork,
        point: &RecoveryPoint,
        disk: &PointDisk,
        local: &Path,
        cancel: &CancellationToken,
    ) -> Result<Rewritten, ReplError> {
        let phase1 = work.base_point.is_empty();
        let reusable = local.exists() && ferry_disk::open_rw(local).is_ok();
        if !phase1 || (work.sync != "full" && reusable) {
            return self.bring_disk(vm, work, point, disk, local, cancel).await;
        }
        remove_file(local)?;
        let bytes = self.write_disk(vm, &point.id, disk, local, cancel).await?;
        Ok(Rewritten {
            compared: 0,
            rewritten: disk
                .virtual_size
                .div_ceil(u64::from(disk.block_size.max(1))),
            bytes,
        })
    }

    /// The folder a failback into a folder left the VM in here, when there is one.
    pub(super) fn failback_folder(&self, vm: &str) -> Option<PathBuf> {
        let p = read_progress(&progress_path(&self.cfg.data_dir, vm)).ok()??;
        (!p.dir.as_os_str().is_empty()).then_some(p.dir)
    }
}

impl Marker {
    /// Keeps when the VM was started from the folder (so a later stop stops it).
    fn with_started(mut self, at_ms: i64) -> Self {
        self.started_at_ms = at_ms;
        self
    }
}

/// `<target_dir>/<vm>`, refused when the folder could climb out of what the operator named
/// or lies outside this host's export roots.
fn folder_for(vm: &str, target_dir: &str, roots: &[PathBuf]) -> Result<PathBuf, ReplError> {
    if let Some(why) = ferry_model::disk::outside_roots(target_dir, roots) {
        return Err(ReplError::Permanent(format!(
            "failback folder {target_dir:?} {why}"
        )));
    }
    if !ferry_model::disk::is_file_safe_vm_name(vm) {
        return Err(ReplError::Permanent(format!(
            "vm name {vm:?} cannot name a folder"
        )));
    }
    Ok(Path::new(target_dir).join(vm))
}

/// Whether `dir` exists with anything in it but a marker being written.
fn has_entries(dir: &Path) -> Result<bool, ReplError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.any(|e| {
            e.map_or(true, |e| {
                e.file_name() != std::ffi::OsStr::new(&format!("{MARKER}.tmp"))
            })
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ReplError::Permanent(format!(
            "reading {}: {e}",
            dir.display()
        ))),
    }
}

fn remove_file(path: &Path) -> Result<(), ReplError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ReplError::Permanent(format!(
            "removing {}: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_that_climb_out_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let roots = [root.path().to_path_buf()];
        let back = root.path().join("back");
        let back = back.to_str().unwrap();
        assert_eq!(
            folder_for("web01", back, &roots).unwrap(),
            Path::new(back).join("web01")
        );
        let climbs = format!("{}/../etc", root.path().display());
        for (vm, dir) in [
            ("web01", climbs.as_str()),
            ("web01", "relative"),
            ("web01", "/etc"),
            ("..", back),
        ] {
            let e = folder_for(vm, dir, &roots).unwrap_err().to_string();
            assert!(e.contains(dir) || e.contains(vm), "{e}");
        }
        let e = folder_for("web01", "/etc", &roots).unwrap_err().to_string();
        assert!(e.contains("not under a folder"), "{e}");
    }
}
