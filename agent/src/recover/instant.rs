//! Instant recovery on a recovery host (`--instant`): each disk of the point is created
//! empty with its fill files (the point's block map), served at once through the tracker,
//! which fetches the blocks a read or write needs from the gateway before it runs and copies
//! the rest in the background (`tracker/fill.rs`); the VM's driver starts as soon as every
//! disk is served. After a restart the copy goes on from its state file (`serve`).
//!
//! While a disk is being filled, nothing here reads the file behind the tracker's back: a
//! change of point, a resync and an initial copy wait for the copy to end (refused with how
//! far it is).
use std::path::Path;
use std::sync::Arc;

use ferry_proto::common::v1::PointDisk;
use ferry_store::ChunkId;
use tracing::info;

use super::marker::Marker;
use super::write::{blocking, check_map, output_format};
use crate::tracker::fill::{BlockSource, Fetched, Fill};
use crate::tracker::fill_file::{self, FillPlan};
use crate::{Agent, ReplError};

/// Blocks of a point, fetched through the gateway like a materialise's.
struct PointSource {
    agent: Agent,
    vm: String,
    point: String,
}

impl BlockSource for PointSource {
    fn fetch(&self, blocks: Vec<(u64, ChunkId)>) -> Fetched {
        let (agent, vm, point) = (self.agent.clone(), self.vm.clone(), self.point.clone());
        Box::pin(async move {
            agent
                .fetch_blocks(&vm, &point, blocks)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl Agent {
    /// An empty image of `disk`'s format and size at `path`, with the fill files that name
    /// the point's blocks; the bytes the copy has to fetch.
    pub(super) async fn prepare_instant_disk(
        &self,
        vm: &str,
        point: &str,
        disk: &PointDisk,
        path: &Path,
    ) -> Result<u64, ReplError> {
        let (format, opts) = output_format(disk)?;
        let blocks = self.block_map(vm, point, &disk.disk_id).await?;
        check_map(point, disk, &blocks)?;
        let plan = super::write::fill_plan(vm, point, disk, blocks);
        let bytes = plan.blocks.len() as u64 * plan.block_size;
        let p = path.to_path_buf();
        blocking(move || {
            let w = ferry_disk::create(&p, format, &opts)
                .map_err(|e| ReplError::Permanent(format!("creating {}: {e}", p.display())))?;
            w.finish()
                .map_err(|e| ReplError::Permanent(format!("creating {}: {e}", p.display())))?;
            fill_file::create(&p, &plan).map_err(|e| ReplError::Permanent(e.to_string()))
        })
        .await?;
        info!(vm, point, disk = %disk.disk_id, path = %path.display(), %format, bytes, "disk created empty for an instant recovery");
        Ok(bytes)
    }

    /// The fill of each of the marker's disks (None for a disk that is local already).
    pub(super) fn fills_of(&self, m: &Marker) -> Result<Vec<Option<Arc<Fill>>>, ReplError> {
        let rate = self
            .cfg
            .recovery
            .as_ref()
            .and_then(|r| r.instant_copy_mib_per_s)
            .map_or(0, |mib| mib << 20);
        m.disks
            .iter()
            .map(|d| {
                let source = |plan: &FillPlan| -> Arc<dyn BlockSource> {
                    Arc::new(PointSource {
                        agent: self.clone(),
                        vm: plan.vm.clone(),
                        point: plan.point.clone(),
                    })
                };
                Fill::load(&d.path, source, rate).map_err(|e| {
                    ReplError::Permanent(format!(
                        "disk {} of vm {} is being filled from its point, but {e}",
                        d.path.display(),
                        m.vm
                    ))
                })
            })
            .collect()
    }

    /// Refuses (recoverably: it is retried) while a disk of the VM that runs here from a
    /// folder is still being filled, saying how far the copy is.
    pub(crate) fn refuse_while_filling(&self, vm: &str, what: &str) -> Result<(), ReplError> {
        let Some((_, m)) = self.recovered(vm) else {
            return Ok(());
        };
        match filling(self, &m) {
            None => Ok(()),
            Some(why) => Err(ReplError::Recoverable(format!(
                "{what} of vm {vm} waits: {why}"
            ))),
        }
    }
}

/// Why the marker's disks are not all local: the first disk still being filled, with its
/// progress.
pub(super) fn filling(agent: &Agent, m: &Marker) -> Option<String> {
    m.disks
        .iter()
        .find(|d| fill_file::pending(&d.path))
        .map(|d| {
            let progress = agent
                .tracker
                .as_ref()
                .and_then(|t| t.fill_progress(&d.path))
                .map(|(done, all)| format!(" ({done} of {all} blocks local)"))
                .unwrap_or_default();
            format!(
                "disk {} is still being copied from point {} by an instant recovery{progress}",
                d.path.display(),
                m.point
            )
        })
}
