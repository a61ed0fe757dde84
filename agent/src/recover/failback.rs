//! FAILBACK on the target host (usually the VM's original host, whose tracker still has the
//! VM's old disks, fenced): bring those disks to a point of the VM's history as the recovery
//! site made it, then (phase 2) serve them and start the VM here.
//!
//! * Phase 1 (`start` false): checksum mode reads every block, names it with the vault's
//!   keyed hash and rewrites only the blocks whose name differs from the point's block map —
//!   writes a cut-off primary made after an unplanned failover differ, so they are
//!   overwritten, and counted; full mode writes every block.
//! * Phase 2 (`start`, `base_point` = phase 1's point): only the blocks whose entry differs
//!   between the two points' maps are written — the disks hold phase 1's point exactly (they
//!   are not served meanwhile), so no disk pass is needed — then the disks are served again
//!   and the VM started with this host's own description of it.
//!
//! The disks change behind the tracker's back, so they are not served from the first write
//! until phase 2 serves them again, and every change log next to them is deleted (their
//! writes are not in the VM's history any more; shipping them later would corrupt it), with
//! the chain tips (the next log starts a new chain). Progress is in `<data_dir>/failback/
//! <vm>.json`, written before the first block changes: a restarted agent, or the same work
//! delivered again, redoes the phase (idempotent: it compares and rewrites), and the file says
//! the disks are half written until a phase ends.
use std::path::{Path, PathBuf};

use ferry_proto::common::v1::{PointDisk, RecoveryPoint};
use ferry_proto::scheduler::v1::{FailoverWork, RecoveredDisk, RecoveredVm, WorkItem};
use ferry_store::ChunkId;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::failover_of;
use super::repoint::{Plan, Rewritten, discard_logs};
use super::write::{blocking, check_map};
use crate::driver::RunDisk;
use crate::{Agent, ReplError};

/// What the target recorded of a failback.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Progress {
    pub(super) failover_id: String,
    /// "syncing" (disks being written: not usable), "synced" (they hold `point`), "started".
    pub(super) phase: String,
    pub(super) point: String,
    pub(super) blocks_compared: u64,
    pub(super) blocks_rewritten: u64,
    pub(super) bytes_written: u64,
    /// The VM's folder when it fails back into one (`failback_dir.rs`); empty onto its disks.
    #[serde(default)]
    pub(super) dir: PathBuf,
}

impl Agent {
    /// FAILBACK: phase 1 or phase 2 of the work's failback, as [`RecoveredVm`].
    pub(crate) async fn failback_target(
        &self,
        item: &WorkItem,
        cancel: &CancellationToken,
    ) -> Result<RecoveredVm, ReplError> {
        let work = failover_of(item)?;
        if !work.target_dir.is_empty() {
            return self.failback_into_folder(item, &work, cancel).await;
        }
        let vm = item.vm.as_str();
        let locals = self.failback_disks(vm)?;
        let point = self.get_point(vm, &work.point).await?;
        let pairs = pair_disks(vm, &point, &locals)?;
        let path = progress_path(&self.cfg.data_dir, vm);
        let before = read_progress(&path)?;
        if let Some(p) = before.as_ref().filter(|p| {
            p.failover_id == work.failover_id
                && p.point == work.point
                && p.phase == if work.start { "started" } else { "synced" }
        }) {
            info!(vm, failover = %work.failover_id, phase = %p.phase, "failback work already done; answering with its record");
            return Ok(self.answer(vm, &locals, p));
        }
        let mut prog = Progress {
            failover_id: work.failover_id.clone(),
            phase: "syncing".into(),
            point: work.point.clone(),
            ..Progress::default()
        };
        write_progress(&path, &prog)?;
        self.unserve_for_failback(vm, &locals).await?;
        for (disk, local) in &pairs {
            let r = self
                .bring_disk(vm, &work, &point, disk, local, cancel)
                .await?;
            prog.blocks_compared += r.compared;
            prog.blocks_rewritten += r.rewritten;
            prog.bytes_written += r.bytes;
        }
        prog.phase = "synced".into();
        write_progress(&path, &prog)?;
        info!(vm, failover = %work.failover_id, point = %work.point, sync = %work.sync, phase2 = work.start, compared = prog.blocks_compared, rewritten = prog.blocks_rewritten, bytes = prog.bytes_written, "failback disks brought to the point");
        if !work.start {
            return Ok(self.answer(vm, &locals, &prog));
        }
        self.serve_configured(vm, &locals).await?;
        self.resume_source(item, cancel).await?;
        prog.phase = "started".into();
        write_progress(&path, &prog)?;
        Ok(self.answer(vm, &locals, &prog))
    }

    /// One disk to `disk` of `point`: by comparison (checksum), every block (full), or only
    /// the blocks that differ from the base point (phase 2).
    pub(super) async fn bring_disk(
        &self,
        vm: &str,
        work: &FailoverWork,
        point: &RecoveryPoint,
        disk: &PointDisk,
        local: &Path,
        cancel: &CancellationToken,
    ) -> Result<Rewritten, ReplError> {
        let map = self.block_map(vm, &point.id, &disk.disk_id).await?;
        check_map(&point.id, disk, &map)?;
        let blocks = disk
            .virtual_size
            .div_ceil(u64::from(disk.block_size.max(1)));
        let plan = match (work.base_point.as_str(), work.sync.as_str()) {
            ("", "full") => full_plan(&map, blocks),
            ("", _) => {
                return self
                    .rewrite_disk(vm, &point.id, disk, local, map, cancel)
                    .await;
            }
            (base, _) => {
                let before = self.block_map(vm, base, &disk.disk_id).await?;
                plan_between(&before, &map, blocks)
            }
        };
        let (p, what) = (local.to_path_buf(), format!("{}", local.display()));
        let image = blocking(move || {
            ferry_disk::open_rw(&p)
                .map_err(|e| ReplError::Permanent(format!("{what}: opening: {e}")))
        })
        .await?;
        self.apply_plan(vm, &point.id, disk, local, image, plan, cancel)
            .await
    }

    /// The VM's configured disks here (the failback's target).
    fn failback_disks(&self, vm: &str) -> Result<Vec<PathBuf>, ReplError> {
        self.cfg
            .vms
            .iter()
            .find(|v| v.name == vm)
            .map(|v| v.disks.clone())
            .ok_or_else(|| {
                ReplError::Permanent(format!(
                    "vm {vm} is not configured on host {}: fail back to the host it came from",
                    self.creds.host
                ))
            })
    }

    /// The tracker lets go of the disks, and their change logs and chain tips go.
    async fn unserve_for_failback(&self, vm: &str, locals: &[PathBuf]) -> Result<(), ReplError> {
        if let Some(tracker) = &self.tracker {
            match tracker.remove_vm(vm).await {
                Ok(_) | Err(crate::tracker::TrackerError::UnknownVm(_)) => {}
                Err(e) => {
                    return Err(ReplError::Permanent(format!(
                        "vm {vm}: the tracker did not stop serving its disks cleanly: {e}"
                    )));
                }
            }
        }
        let disks: Vec<RunDisk> = locals
            .iter()
            .map(|p| RunDisk {
                path: p.clone(),
                format: String::new(),
                nbd_uri: String::new(),
            })
            .collect();
        let logs = discard_logs(vm, &disks)?;
        for p in locals {
            crate::delta::forget_chain_tip(&self.cfg.data_dir, p);
        }
        if logs > 0 {
            info!(
                vm,
                logs, "change logs of the old disks discarded for the failback"
            );
        }
        Ok(())
    }

    /// Serves the configured disks of `vm` again (after phase 2 wrote them).
    async fn serve_configured(&self, vm: &str, locals: &[PathBuf]) -> Result<(), ReplError> {
        let Some(tracker) = &self.tracker else {
            return Ok(());
        };
        let disks = locals
            .iter()
            .map(|p| crate::tracker::TrackedDisk {
                vm: vm.to_owned(),
                path: p.clone(),
                export: crate::export_name(vm, p),
            })
            .collect();
        match tracker.add_vm(vm, disks).await {
            Ok(_) => Ok(()),
            Err(e) => Err(ReplError::Permanent(format!(
                "serving the disks of vm {vm} again: {e}"
            ))),
        }
    }

    fn answer(&self, vm: &str, locals: &[PathBuf], p: &Progress) -> RecoveredVm {
        RecoveredVm {
            dir: String::new(),
            disks: locals
                .iter()
                .map(|path| {
                    let s = path.display().to_string();
                    RecoveredDisk {
                        disk_id: ferry_proto::disk_id(vm, &s),
                        path: s,
                        format: super::source::format_of(path).to_owned(),
                        nbd_uri: self
                            .tracker
                            .as_ref()
                            .and_then(|t| t.nbd_uri(path))
                            .unwrap_or_default(),
                    }
                })
                .collect(),
            bytes_written: p.bytes_written,
            driver: self.driver.kind().to_owned(),
            started_at_ms: ferry_proto::now_ms(),
            blocks_compared: p.blocks_compared,
            blocks_rewritten: p.blocks_rewritten,
            ..RecoveredVm::default()
        }
    }
}

/// Each disk of the point with the local disk of the same id.
fn pair_disks<'a>(
    vm: &str,
    point: &'a RecoveryPoint,
    locals: &'a [PathBuf],
) -> Result<Vec<(&'a PointDisk, &'a PathBuf)>, ReplError> {
    point
        .disks
        .iter()
        .map(|d| {
            locals
                .iter()
                .find(|p| ferry_proto::disk_id(vm, &p.display().to_string()) == d.disk_id)
                .map(|p| (d, p))
                .ok_or_else(|| {
                    ReplError::Permanent(format!(
                        "disk {} of point {} of vm {vm} is not one of its disks here",
                        d.disk_id, point.id
                    ))
                })
        })
        .collect()
}

/// Every block of `map` written, every other block zeroed.
fn full_plan(map: &[(u64, ChunkId)], blocks: u64) -> Plan {
    let mut zero = Vec::new();
    let mut it = map.iter().peekable();
    for i in 0..blocks {
        match it.peek() {
            Some((j, _)) if *j == i => {
                it.next();
            }
            _ => zero.push(i),
        }
    }
    Plan {
        compared: 0,
        fetch: map.to_vec(),
        zero,
    }
}

/// What turns a disk holding `before` into `after` (both sorted by block): the blocks whose
/// entry changed, and the blocks `after` no longer holds (zeros there).
fn plan_between(before: &[(u64, ChunkId)], after: &[(u64, ChunkId)], blocks: u64) -> Plan {
    let old: std::collections::HashMap<u64, &ChunkId> =
        before.iter().map(|(i, id)| (*i, id)).collect();
    let fetch: Vec<(u64, ChunkId)> = after
        .iter()
        .filter(|(i, id)| old.get(i) != Some(&id))
        .copied()
        .collect();
    let kept: std::collections::HashSet<u64> = after.iter().map(|(i, _)| *i).collect();
    let zero = before
        .iter()
        .map(|(i, _)| *i)
        .filter(|i| !kept.contains(i) && *i < blocks)
        .collect();
    Plan {
        compared: after.len() as u64,
        fetch,
        zero,
    }
}

pub(super) fn progress_path(data_dir: &Path, vm: &str) -> PathBuf {
    data_dir.join("failback").join(format!("{vm}.json"))
}

pub(super) fn read_progress(path: &Path) -> Result<Option<Progress>, ReplError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ReplError::Permanent(format!("{} is unreadable: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReplError::Permanent(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

pub(super) fn write_progress(path: &Path, p: &Progress) -> Result<(), ReplError> {
    let json = serde_json::to_vec_pretty(p)
        .map_err(|e| ReplError::Permanent(format!("encoding {}: {e}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .and_then(|()| ferry_mesh::write_secret(path, &json))
        .map_err(|e| ReplError::Permanent(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> ChunkId {
        [b; 32]
    }

    #[test]
    fn phase_two_writes_only_what_changed_between_the_points() {
        let before = [(0, id(1)), (1, id(2)), (3, id(4))];
        let after = [(0, id(1)), (1, id(9)), (2, id(5))];
        let p = plan_between(&before, &after, 4);
        assert_eq!(p.fetch, vec![(1, id(9)), (2, id(5))]);
        assert_eq!(p.zero, vec![3]);
        assert!(plan_between(&after, &after, 4).fetch.is_empty());
    }

    #[test]
    fn full_sync_writes_every_block() {
        let map = [(1, id(1)), (3, id(3))];
        let p = full_plan(&map, 5);
        assert_eq!(p.fetch.len(), 2);
        assert_eq!(p.zero, vec![0, 2, 4]);
    }
}
