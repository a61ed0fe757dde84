//! Committing a replication cycle as a recovery point: fencing, block maps, chunk checks,
//! index pages and the put-if-absent manifest at `latest + 1`.
use std::collections::{HashMap, HashSet};

use ferry_coord::CoordError;
use ferry_model::{Consistency, CycleKind};
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::storage::v1::{CommitDisk, CommitPointRequest};
use ferry_store::{
    BlockMap, ChunkId, DiskManifest, MergedManifest, PageRef, PointManifest, StoreError,
};
use tracing::{debug, info, warn};

use crate::Writer;
use crate::error::{Result, WriterError};
use crate::logs::{LogDescriptor, put_descriptor};
use crate::points::{check_vm, chunk_from_bytes, point_to_proto, read_map, write_map};

/// Lost races for the next sequence number before giving up (each loss is someone else's
/// progress, so this is generous).
const MAX_COMMIT_ATTEMPTS: usize = 32;

/// One disk of a validated commit request.
#[derive(Debug)]
struct DiskInput {
    disk: ferry_proto::common::v1::Disk,
    block_size: u32,
    blocks: Vec<(u64, ChunkId)>,
    zeroed: Vec<u64>,
    logs: Vec<String>,
    /// Change logs shipped with this cycle, oldest first.
    shipped: Vec<LogDescriptor>,
    full: bool,
    token: u64,
}

/// A validated commit request.
#[derive(Debug)]
struct CommitInput {
    vm: String,
    cycle_id: String,
    kind: CycleKind,
    consistency: Consistency,
    disks: Vec<DiskInput>,
    /// The host whose cycle this is (ingest checked it is the VM's).
    host: String,
    /// The point the changes apply to when it is not the latest ("": the latest).
    base_point: String,
    /// The group cut of the point ("": none; ingest checked it went ahead with this VM).
    cut_id: String,
}

impl TryFrom<CommitPointRequest> for CommitInput {
    type Error = WriterError;

    fn try_from(req: CommitPointRequest) -> Result<Self> {
        check_vm(&req.vm)?;
        let kind = CycleKind::try_from(req.kind)
            .map_err(|e| invalid(format!("{e} (expected initial, delta or resync)")))?;
        // A peer that does not say is crash-consistent, as before the enum.
        let consistency = match req.consistency {
            0 => Consistency::Crash,
            v => Consistency::try_from(v)
                .map_err(|e| invalid(format!("{e} (expected crash or app)")))?,
        };
        if req.disks.is_empty() {
            return Err(invalid("a recovery point needs at least one disk".into()));
        }
        let mut ids = HashSet::new();
        let mut disks = Vec::with_capacity(req.disks.len());
        for d in req.disks {
            let input = disk_input(d, &req.fencing_tokens)?;
            if !ids.insert(input.disk.id.clone()) {
                return Err(invalid(format!("disk {} appears twice", input.disk.id)));
            }
            disks.push(input);
        }
        Ok(CommitInput {
            vm: req.vm,
            cycle_id: req.cycle_id,
            kind,
            consistency,
            disks,
            host: req.host,
            base_point: req.base_point,
            cut_id: req.cut_id,
        })
    }
}

fn invalid(msg: String) -> WriterError {
    WriterError::InvalidArgument(msg)
}

fn disk_input(d: CommitDisk, tokens: &HashMap<String, u64>) -> Result<DiskInput> {
    let Some(disk) = d.disk else {
        return Err(invalid("a commit disk without its disk description".into()));
    };
    if disk.id.is_empty() {
        return Err(invalid("disk id is required".into()));
    }
    let id = disk.id.clone();
    if d.block_size == 0 || !d.block_size.is_multiple_of(512) {
        return Err(invalid(format!(
            "disk {id}: block size {} is not a positive multiple of 512",
            d.block_size
        )));
    }
    let Some(&token) = tokens.get(&id) else {
        return Err(invalid(format!("disk {id}: no fencing token")));
    };
    let block_count = disk.virtual_size.div_ceil(u64::from(d.block_size));
    let mut seen = HashSet::with_capacity(d.blocks.len());
    let mut blocks = Vec::with_capacity(d.blocks.len());
    for b in d.blocks {
        check_index(&id, b.index, block_count)?;
        if !seen.insert(b.index) {
            return Err(invalid(format!("disk {id}: block {} given twice", b.index)));
        }
        let chunk = chunk_from_bytes(&format!("disk {id} block {}", b.index), &b.chunk)?;
        blocks.push((b.index, chunk));
    }
    for &z in &d.zeroed {
        check_index(&id, z, block_count)?;
        if seen.contains(&z) {
            return Err(invalid(format!(
                "disk {id}: block {z} is both written and zeroed"
            )));
        }
    }
    let shipped = d
        .shipped_logs
        .iter()
        .map(|l| LogDescriptor::from_proto(&id, l))
        .collect::<Result<Vec<_>>>()?;
    Ok(DiskInput {
        disk,
        block_size: d.block_size,
        blocks,
        zeroed: d.zeroed,
        logs: d.logs,
        shipped,
        full: d.full,
        token,
    })
}

fn check_index(disk: &str, index: u64, block_count: u64) -> Result<()> {
    if index >= block_count {
        return Err(invalid(format!(
            "disk {disk}: block {index} is beyond the disk ({block_count} blocks)"
        )));
    }
    Ok(())
}

/// The disk's new map: a full map replaces the previous one; a patch sets the given blocks and
/// removes the zeroed ones (and any block past a shrunk disk's end).
fn build_map(d: &DiskInput, prev: Option<(&DiskManifest, &BlockMap)>) -> Result<BlockMap> {
    let given = d.blocks.iter().copied();
    if d.full {
        return Ok(BlockMap {
            entries: given.collect(),
        });
    }
    let Some((prev_disk, prev_map)) = prev else {
        return Err(WriterError::FailedPrecondition(format!(
            "disk {}: a delta needs a previous recovery point of the disk; send a full map",
            d.disk.id
        )));
    };
    if prev_disk.block_size != d.block_size {
        return Err(WriterError::FailedPrecondition(format!(
            "disk {}: block size changed from {} to {}; send a full map",
            d.disk.id, prev_disk.block_size, d.block_size
        )));
    }
    let mut map = prev_map.clone();
    let block_count = d.disk.virtual_size.div_ceil(u64::from(d.block_size));
    map.entries.retain(|&i, _| i < block_count);
    for z in &d.zeroed {
        map.entries.remove(z);
    }
    map.entries.extend(given);
    Ok(map)
}

/// Entries of `new` that the previous map does not already hold (their chunks must be checked).
fn changed(disk: &str, new: &BlockMap, prev: Option<&BlockMap>) -> Vec<(String, u64, ChunkId)> {
    new.entries
        .iter()
        .filter(|(i, id)| prev.and_then(|p| p.entries.get(i)) != Some(id))
        .map(|(&i, id)| (disk.to_owned(), i, *id))
        .collect()
}

/// What a disk's new map builds on: the previous point's pages and pending logs, or — when the
/// VM has a merged map of that base — the merged pages and only the logs not merged into them.
#[derive(Debug)]
struct Base {
    pages: Vec<PageRef>,
    /// Logs still to apply on top of `pages`, oldest first.
    logs: Vec<String>,
    /// Logs already in `pages` (a log shipped again is not listed again).
    merged: Vec<String>,
}

impl Base {
    fn of(prev: &DiskManifest, merged: Option<&MergedManifest>) -> Self {
        match merged
            .and_then(|m| m.disk(&prev.disk_id))
            .filter(|m| m.is_prefix_of(prev))
        {
            Some(m) => Base {
                pages: m.pages.clone(),
                logs: prev.logs[m.logs.len()..].to_vec(),
                merged: m.logs.clone(),
            },
            None => Base {
                pages: prev.pages.clone(),
                logs: prev.logs.clone(),
                merged: Vec::new(),
            },
        }
    }
}

/// Shipped logs not merged yet: a patch keeps its base's, a full map starts over. A log
/// shipped again (an agent that could not tell its commit landed) is listed once, and not at
/// all when it is merged into the base already.
fn pending_logs(d: &DiskInput, base: Option<&Base>) -> Vec<String> {
    let mut logs = match base {
        Some(b) if !d.full => b.logs.clone(),
        _ => Vec::new(),
    };
    for key in d
        .logs
        .iter()
        .cloned()
        .chain(d.shipped.iter().map(LogDescriptor::key))
    {
        let merged = !d.full && base.is_some_and(|b| b.merged.contains(&key));
        if !merged && !logs.contains(&key) {
            logs.push(key);
        }
    }
    logs
}

/// True if `latest` is this very cycle, committed by an earlier attempt: the same non-empty
/// cycle id (ingest names each cycle uniquely), kind, consistency and disks.
fn is_retry_of(input: &CommitInput, latest: &PointManifest) -> bool {
    !input.cycle_id.is_empty()
        && latest.cycle_id == input.cycle_id
        && latest.kind == input.kind
        && latest.consistency == input.consistency
        && latest.disks.len() == input.disks.len()
        && input.disks.iter().all(|d| {
            latest
                .disks
                .iter()
                .any(|l| l.disk_id == d.disk.id && l.fencing_token == d.token)
        })
}

/// True if the disk's blocks change in this commit on top of its previous map (not a full map,
/// not logs only): such a patch is newer than the base's pending logs.
fn is_patch(d: &DiskInput) -> bool {
    !d.full && (!d.blocks.is_empty() || !d.zeroed.is_empty())
}

impl Writer {
    /// The newest merged map of `vm` at or before point `seq`; a commit that cannot read one
    /// builds on the latest point as it is (logged, not an error).
    async fn newest_merged(&self, vm: &str, seq: u64) -> Option<MergedManifest> {
        match self.store.newest_merged(vm, seq).await {
            Ok(m) => m,
            Err(e) => {
                warn!(vm, error = %e, "cannot read the newest merged map; building on the latest point");
                None
            }
        }
    }

    /// Commits a cycle as the VM's next recovery point and returns it. The point holds exactly
    /// the request's disks (all disks of a VM are cut at the same instant, so a disk left out
    /// is not carried over from an older point). Retrying a cycle whose first attempt landed
    /// returns that point.
    pub async fn commit_point(&self, req: CommitPointRequest) -> Result<RecoveryPoint> {
        let input = CommitInput::try_from(req)?;
        self.check_fencing(&input).await?;
        let _no_sweep = self.sweep_lock.read().await;
        // Chunks already verified in an earlier attempt are not checked again.
        let mut verified: HashSet<ChunkId> = HashSet::new();
        for attempt in 1..=MAX_COMMIT_ATTEMPTS {
            match self.try_commit(&input, &mut verified).await {
                Ok(m) => {
                    if m.disks.iter().any(|d| !d.logs.is_empty()) {
                        self.schedule_merge(&m.vm);
                    }
                    return Ok(point_to_proto(&m));
                }
                Err(WriterError::Store(StoreError::Conflict { what })) => {
                    debug!(vm = %input.vm, attempt, %what, "lost the race for the next point; reloading");
                }
                Err(e) => return Err(e),
            }
        }
        warn!(vm = %input.vm, attempts = MAX_COMMIT_ATTEMPTS, "giving up on a contended commit");
        Err(WriterError::Contended(input.vm))
    }

    /// Each disk's token must be the current lease token of that disk (a stale cycle is
    /// refused before anything is written).
    async fn check_fencing(&self, input: &CommitInput) -> Result<()> {
        for d in &input.disks {
            let reason = match self.coord.check_fence(&d.disk.id, d.token).await {
                Ok(()) => continue,
                Err(CoordError::Fenced { current, .. }) => {
                    format!("the current token is {current}")
                }
                Err(CoordError::LeaseLost { .. }) => "the disk has no current lease".to_owned(),
                Err(e) => return Err(e.into()),
            };
            warn!(vm = %input.vm, disk = %d.disk.id, token = d.token, %reason, "stale fencing token");
            return Err(WriterError::Fenced {
                disk: d.disk.id.clone(),
                token: d.token,
                reason,
            });
        }
        Ok(())
    }

    async fn try_commit(
        &self,
        input: &CommitInput,
        verified: &mut HashSet<ChunkId>,
    ) -> Result<PointManifest> {
        let latest = self.store.latest_point(&input.vm).await?;
        // A retry of the cycle that made the latest point (its first attempt landed, the
        // caller could not tell): that point is the answer. Rebuilding it would not reproduce
        // it when a merge was recorded in between.
        if let Some(l) = latest.as_ref().filter(|l| is_retry_of(input, l)) {
            debug!(vm = %input.vm, seq = l.seq, cycle = %input.cycle_id, "cycle already committed");
            return Ok(l.clone());
        }
        // After a re-protect the new source's changes are on top of the point the VM failed
        // over to, which may be older than the latest.
        let base_point = match input.base_point.as_str() {
            "" => latest.clone(),
            id => Some(self.resolve_point(&input.vm, id).await?),
        };
        let mut merged = match &base_point {
            Some(l) => self.newest_merged(&input.vm, l.seq).await,
            None => None,
        };
        let mut maps = Vec::with_capacity(input.disks.len());
        let mut to_check = Vec::new();
        for d in &input.disks {
            let prev_disk = base_point
                .as_ref()
                .and_then(|p| p.disks.iter().find(|x| x.disk_id == d.disk.id));
            let mut base = prev_disk.map(|pd| Base::of(pd, merged.as_ref()));
            if let (Some(l), Some(pd), Some(b)) = (&base_point, prev_disk, &base)
                && is_patch(d)
                && !b.logs.is_empty()
            {
                // The patch is newer than the logs pending on its base: merge them first, so
                // the point does not replay them over it.
                info!(vm = %input.vm, disk = %d.disk.id, logs = b.logs.len(), "merging pending logs before a patch");
                let m = self
                    .merge_locked(l, &tokio_util::sync::CancellationToken::new())
                    .await?;
                base = Some(Base::of(pd, Some(&m)));
                merged = Some(m);
            }
            let prev_map = match &base {
                Some(b) => Some(read_map(&self.store, &b.pages).await?),
                None => None,
            };
            let map = build_map(d, prev_disk.zip(prev_map.as_ref()))?;
            to_check.extend(
                changed(&d.disk.id, &map, prev_map.as_ref())
                    .into_iter()
                    .filter(|(_, _, id)| !verified.contains(id)),
            );
            for log in &d.shipped {
                for (i, id) in log.chunk_ids()?.into_iter().enumerate() {
                    if !verified.contains(&id) {
                        to_check.push((
                            format!("{} (log {})", d.disk.id, log.unique_id),
                            i as u64,
                            id,
                        ));
                    }
                }
            }
            maps.push((d, base, map));
        }
        if let Some((disk, index, chunk)) = self.first_missing(&to_check).await? {
            warn!(vm = %input.vm, disk = %disk, index, chunk = %chunk, "commit references a missing chunk");
            return Err(WriterError::MissingChunk { disk, index, chunk });
        }
        verified.extend(to_check.iter().map(|(_, _, id)| *id));
        for d in &input.disks {
            for log in &d.shipped {
                put_descriptor(&self.store, log).await?;
            }
        }
        let mut disks = Vec::with_capacity(maps.len());
        for (d, base, map) in maps {
            let previous = base.as_ref().map_or(&[][..], |b| b.pages.as_slice());
            let (map, pages) = write_map(&self.store, map, previous).await?;
            disks.push(DiskManifest {
                disk_id: d.disk.id.clone(),
                path: d.disk.path.clone(),
                format: d.disk.format.clone(),
                subformat: d.disk.subformat.clone(),
                virtual_size: d.disk.virtual_size,
                logical_sector_size: d.disk.logical_sector_size,
                block_size: d.block_size,
                pages,
                stored_blocks: map.entries.len() as u64,
                logs: pending_logs(d, base.as_ref()),
                fencing_token: d.token,
            });
        }
        let manifest = PointManifest {
            id: String::new(),
            vm: input.vm.clone(),
            seq: latest.as_ref().map_or(1, |p| p.seq + 1),
            time_ms: chrono::Utc::now().timestamp_millis(),
            kind: input.kind,
            consistency: input.consistency,
            cycle_id: input.cycle_id.clone(),
            disks,
            host: input.host.clone(),
            cut_id: input.cut_id.clone(),
        };
        // Again right before the manifest lands: the lease may have moved while pages were
        // written (the store itself only refuses tokens lower than the latest point's).
        self.check_fencing(input).await?;
        let committed = self.store.commit_point(manifest).await?;
        info!(
            vm = %committed.vm,
            seq = committed.seq,
            kind = %committed.kind,
            cycle = %committed.cycle_id,
            "point committed"
        );
        Ok(committed)
    }
}
