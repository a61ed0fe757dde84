//! Materializing the disks of a test copy through the storage-writer.
use std::path::PathBuf;

use ferry_coord::KeptLease;
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::registry::v1::Vm;
use ferry_proto::storage::v1::MaterializeDiskRequest;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tracing::info;

use super::files::partial_path;
use super::plan::PlannedDisk;
use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;

impl Orchestrator {
    /// Materializes every disk through the storage-writer, in parallel, each into a partial
    /// file named for this run and linked to its final name when written (so a partial file
    /// a storage-writer removes late never is a file of another run). On the first error the
    /// other calls are dropped (the storage-writer removes their partial files), and so on
    /// an operator's cancel.
    pub(super) async fn materialize(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        vm: &Vm,
        point: &RecoveryPoint,
        disks: &[PlannedDisk],
        made: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let total: u64 = disks.iter().map(|d| d.virtual_size).sum();
        let mut done = 0u64;
        job.set_bytes(total, 0);
        let run = kept.token();
        let mut calls: FuturesUnordered<_> = disks
            .iter()
            .map(|d| {
                let mut storage = self.storage.clone();
                let partial = partial_path(d, run);
                let req = MaterializeDiskRequest {
                    vm: vm.name.clone(),
                    point: point.id.clone(),
                    disk_id: d.disk_id.clone(),
                    target_path: partial.display().to_string(),
                    // The source's own format, as the storage-writer defaults it.
                    format: String::new(),
                    subformat: String::new(),
                };
                async move { (d, partial, storage.materialize_disk(req).await) }
            })
            .collect();
        let mut finished = 0usize;
        // A cancelled job drops the calls, as an error does.
        let cancel = job.cancel_token().clone();
        loop {
            let next = tokio::select! {
                next = calls.next() => next,
                () = cancel.cancelled() => return Err(FailoverError::JobCancelled),
            };
            let Some((disk, partial, result)) = next else {
                break;
            };
            let resp = result
                .map_err(|s| FailoverError::remote("storage-writer", "materialize disk", &s))?
                .into_inner();
            made.push(partial.clone());
            // Never replaces a file: the target was checked empty, a newcomer is not ours.
            std::fs::hard_link(&partial, &disk.path).map_err(|e| {
                FailoverError::io(
                    format!("linking {} to {}", partial.display(), disk.path.display()),
                    e,
                )
            })?;
            made.push(disk.path.clone());
            std::fs::remove_file(&partial)
                .map_err(|e| FailoverError::io(format!("removing {}", partial.display()), e))?;
            made.retain(|p| p != &partial);
            finished += 1;
            done += disk.virtual_size;
            job.set_bytes(total, done);
            info!(vm = %vm.name, disk = %disk.disk_id, file = %disk.file, bytes = resp.bytes_written, "disk materialised");
            let percent = u32::try_from(finished * 100 / disks.len().max(1)).unwrap_or(100);
            job.step_progress(
                1,
                percent,
                format!("{finished}/{} disks: {}", disks.len(), disk.file),
            )
            .await;
        }
        Ok(())
    }
}
