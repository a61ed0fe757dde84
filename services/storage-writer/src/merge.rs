//! Merging shipped logs into the block map, in the background.
//!
//! A point's disk is its block map plus the logs shipped since (oldest first). Merging computes
//! the full map as of the point: every block a log's write records touch is read from the base
//! map (absent = zeros), the writes are applied in log order, and the result is named with the
//! keyed hash, sealed and stored (put-if-absent; an all-zero result leaves the map). The new
//! index pages are content-addressed like a commit's, and the outcome is recorded as the
//! point's merged map (`merged/<vm>/<seq:020>.json`, see [`ferry_store::MergedManifest`]) —
//! the point manifest itself never changes. That object is written last, so a merge that is
//! cancelled, fails or dies leaves nothing a reader would use (only unreferenced chunks and
//! pages, which garbage collection takes).
//!
//! Users: the next commit of a VM bases on its newest merged map (its point lists only the logs
//! shipped after it); `MaterializeDisk` writes a merged map without replaying when the point
//! has one and replays otherwise (it never waits for a merge); `BlockHashes` serves the merged
//! map, merging on demand when the background has not got to the point yet.
//!
//! The background merger ([`Writer::spawn_merger`]) takes VMs from a de-duplicating queue
//! (commits that leave logs pending enqueue their VM; at start every VM is enqueued, so a
//! restart picks up what was not merged) and merges each VM's newest point. Merges of one VM
//! are serialised by a per-VM lock; every merge holds the sweep lock shared (taken before the
//! VM lock, as commits do) so collection never deletes a chunk a merge found already stored.
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_store::{
    ChunkId, DiskManifest, MergedDisk, MergedManifest, PageRef, PointManifest, StoreError,
    chunk_hex, chunk_id, is_zero, layout, open_chunk, seal_chunk,
};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Writer;
use crate::error::{Result, WriterError};
use crate::logs::{get_descriptor, spool};
use crate::points::{read_map, write_map};

/// Blocks read, patched and sealed at once by one merge.
const MERGE_AHEAD: usize = 8;
/// VMs the background merger works on at once (each VM one merge at a time).
const MERGE_VMS: usize = 2;
/// A merge that failed transiently is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The merger's shared state: the queue of VMs to merge and the per-VM locks.
#[derive(Debug, Default)]
pub(crate) struct Merges {
    queued: std::sync::Mutex<BTreeSet<String>>,
    notify: Notify,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Merges {
    fn lock_of(&self, vm: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(vm.to_owned()).or_default())
    }

    fn enqueue(&self, vm: &str) {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.to_owned());
        self.notify.notify_one();
    }

    fn drain(&self) -> Vec<String> {
        std::mem::take(&mut *self.queued.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect()
    }
}

/// One write record's bytes that land in one block.
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Where the bytes are in the spooled log.
    file_off: u64,
    /// Index into [`Plan::files`].
    log: u32,
    /// Where they go in the block (both below the block size, a u32).
    block_off: u32,
    len: u32,
}

/// What a merge of one disk applies: per touched block (ascending) its segments in write
/// order, read from the spooled logs.
#[derive(Debug)]
struct Plan {
    files: Vec<std::fs::File>,
    keys: Vec<String>,
    blocks: Vec<(u64, Vec<Segment>)>,
    records: u64,
    write_bytes: u64,
}

/// Spooled log files of one merge, removed when dropped (also when the merge is cancelled or
/// its future dropped).
struct SpoolFiles(Vec<PathBuf>);

impl Drop for SpoolFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Err(e) = std::fs::remove_file(p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(path = %p.display(), error = %e, "cannot remove a spooled log");
            }
        }
    }
}

/// Reads the spooled logs (every checksum is validated) and cuts their write records into
/// per-block segments. A log that is corrupt, not closed cleanly, or writes past the disk's end
/// is an error naming it.
fn plan(paths: &[PathBuf], keys: &[String], vsize: u64, bs: u64) -> Result<Plan> {
    let mut blocks: std::collections::BTreeMap<u64, Vec<Segment>> = Default::default();
    let mut files = Vec::with_capacity(paths.len());
    let (mut records, mut write_bytes) = (0u64, 0u64);
    for (li, (path, key)) in (0u32..).zip(paths.iter().zip(keys)) {
        let log = ferry_disk::hrl::HrlLog::open(path)
            .map_err(|e| WriterError::Corrupt(format!("shipped log {key}: {e}")))?;
        if !log.clean {
            return Err(WriterError::Corrupt(format!(
                "shipped log {key} was not closed cleanly"
            )));
        }
        for r in &log.records {
            let end = r.offset.checked_add(u64::from(r.length));
            if end.is_none_or(|end| end > vsize) {
                return Err(WriterError::Corrupt(format!(
                    "shipped log {key}: a write of {} bytes at {} ends past the disk's {vsize} bytes",
                    r.length, r.offset
                )));
            }
            let end = r.offset + u64::from(r.length);
            let mut pos = r.offset;
            while pos < end {
                let index = pos / bs;
                let block_end = ((index + 1) * bs).min(end);
                // Both fit in u32: they are below the block size, a u32.
                blocks.entry(index).or_default().push(Segment {
                    file_off: r.data_at + (pos - r.offset),
                    log: li,
                    block_off: (pos - index * bs) as u32,
                    len: (block_end - pos) as u32,
                });
                pos = block_end;
            }
            records += 1;
            write_bytes += u64::from(r.length);
        }
        let f = std::fs::File::open(path)
            .map_err(|e| WriterError::Internal(format!("{}: {e}", path.display())))?;
        files.push(f);
    }
    Ok(Plan {
        files,
        keys: keys.to_vec(),
        blocks: blocks.into_iter().collect(),
        records,
        write_bytes,
    })
}

/// The block after the plan's writes: `base` (already opened, or empty for a zero block)
/// resized to `len`, then every segment applied in order. `None` when the result is all zero.
fn patch_block(plan: &Plan, at: usize, mut data: Vec<u8>, len: usize) -> Result<Option<Vec<u8>>> {
    data.resize(len, 0);
    for s in &plan.blocks[at].1 {
        let (off, end) = (s.block_off as usize, s.block_off as usize + s.len as usize);
        let dst = data
            .get_mut(off..end)
            .ok_or_else(|| WriterError::Internal("segment outside its block".into()))?;
        let log = s.log as usize;
        plan.files[log]
            .read_exact_at(dst, s.file_off)
            .map_err(|e| {
                WriterError::Internal(format!("reading spooled log {}: {e}", plan.keys[log]))
            })?;
    }
    Ok((!is_zero(&data)).then_some(data))
}

impl Writer {
    /// Queues a merge of `vm`'s newest point for the background merger (a no-op until
    /// [`Writer::spawn_merger`] runs; queued VMs are de-duplicated).
    pub fn schedule_merge(&self, vm: &str) {
        self.merges.enqueue(vm);
    }

    /// Starts the background merger. At start every VM is queued (a restart merges whatever
    /// was left unmerged); later, commits queue their VM. Stops when `shutdown` fires,
    /// cancelling merges in flight (they leave nothing a reader would use).
    pub fn spawn_merger(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            match this.store.list(layout::POINTS_PREFIX).await {
                Ok(keys) => {
                    let vms: BTreeSet<&str> = keys
                        .iter()
                        .filter_map(|k| layout::vm_of_point_key(k))
                        .collect();
                    debug!(vms = vms.len(), "merger started");
                    for vm in vms {
                        this.merges.enqueue(vm);
                    }
                }
                Err(e) => warn!(error = %e, "merger cannot list vms; merging on new commits only"),
            }
            loop {
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    () = this.merges.notify.notified() => {}
                }
                let vms = this.merges.drain();
                futures::stream::iter(vms)
                    .for_each_concurrent(MERGE_VMS, |vm| {
                        let this = this.clone();
                        let shutdown = shutdown.clone();
                        async move { this.background_merge(&vm, &shutdown).await }
                    })
                    .await;
            }
            debug!("merger stopped");
        })
    }

    async fn background_merge(&self, vm: &str, shutdown: &CancellationToken) {
        match self.merge_latest(vm, shutdown).await {
            Ok(Some(m)) => debug!(vm, seq = m.seq, "background merge done"),
            Ok(None) => {}
            Err(WriterError::Cancelled) => debug!(vm, "merge cancelled by shutdown"),
            Err(e) if is_transient(&e) => {
                warn!(vm, error = %e, retry_in_s = RETRY_AFTER.as_secs(), "merge failed; retrying later");
                let (this, vm, shutdown) = (self.clone(), vm.to_owned(), shutdown.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        () = tokio::time::sleep(RETRY_AFTER) => this.merges.enqueue(&vm),
                    }
                });
            }
            // A corrupt log or chunk: the point stays usable by replay; the error names it.
            Err(e) => {
                warn!(vm, error = %e, "merge failed; the point is served by replaying its logs")
            }
        }
    }

    /// Merges `vm`'s newest point if its disks carry logs and it has no merged map yet.
    /// Returns the merged map (None when there is nothing to merge).
    pub async fn merge_latest(
        &self,
        vm: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<MergedManifest>> {
        let _no_sweep = self.sweep_lock.read().await;
        let lock = self.merges.lock_of(vm);
        let _one_per_vm = lock.lock().await;
        let Some(point) = self.store.latest_point(vm).await? else {
            return Ok(None);
        };
        if point.disks.iter().all(|d| d.logs.is_empty()) {
            return Ok(None);
        }
        self.merge_held(&point, cancel).await.map(Some)
    }

    /// Merges a point (by id, seq or "latest") now, or returns its merged map when it has one.
    /// None when its disks carry no logs (their pages are the full map already).
    pub async fn merge_point(
        &self,
        vm: &str,
        point: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<MergedManifest>> {
        let _no_sweep = self.sweep_lock.read().await;
        let p = self.resolve_point(vm, point).await?;
        if p.disks.iter().all(|d| d.logs.is_empty()) {
            return Ok(None);
        }
        self.merge_locked(&p, cancel).await.map(Some)
    }

    /// [`Writer::merge_held`] under the VM's merge lock; the caller holds the sweep lock.
    pub(crate) async fn merge_locked(
        &self,
        point: &PointManifest,
        cancel: &CancellationToken,
    ) -> Result<MergedManifest> {
        let lock = self.merges.lock_of(&point.vm);
        let _one_per_vm = lock.lock().await;
        self.merge_held(point, cancel).await
    }

    /// The point's merged map if it has a usable one (logged and ignored when it is corrupt:
    /// the caller replays instead).
    pub(crate) async fn merged_of(&self, point: &PointManifest) -> Option<MergedManifest> {
        match self.store.get_merged(&point.vm, point.seq).await {
            Ok(Some(m)) if m.point_id == point.id => Some(m),
            Ok(Some(_)) => {
                warn!(vm = %point.vm, seq = point.seq, "merged map names another point; ignored");
                None
            }
            Ok(None) => None,
            Err(e) => {
                warn!(vm = %point.vm, seq = point.seq, error = %e, "merged map unreadable; ignored");
                None
            }
        }
    }

    /// Merges every disk of `point` that carries logs, starting from the newest merged map of
    /// an earlier point with the same base when there is one (then only the logs after it are
    /// applied), and records the result. The caller holds the sweep lock and the VM's lock.
    async fn merge_held(
        &self,
        point: &PointManifest,
        cancel: &CancellationToken,
    ) -> Result<MergedManifest> {
        if let Some(m) = self.store.get_merged(&point.vm, point.seq).await? {
            return check_merged(point, m);
        }
        let earlier = match point.seq.checked_sub(1) {
            Some(s) if s > 0 => match self.store.newest_merged(&point.vm, s).await {
                Ok(m) => m,
                Err(e @ StoreError::Corrupt { .. }) => {
                    warn!(vm = %point.vm, error = %e, "earlier merged map unreadable; merging from the point's base");
                    None
                }
                Err(e) => return Err(e.into()),
            },
            _ => None,
        };
        let started = std::time::Instant::now();
        let mut disks = Vec::with_capacity(point.disks.len());
        for d in &point.disks {
            let base = earlier
                .as_ref()
                .and_then(|m| m.disk(&d.disk_id))
                .filter(|m| m.is_prefix_of(d));
            disks.push(self.merge_disk(&point.vm, d, base, cancel).await?);
        }
        if cancel.is_cancelled() {
            return Err(WriterError::Cancelled);
        }
        let m = MergedManifest {
            vm: point.vm.clone(),
            seq: point.seq,
            point_id: point.id.clone(),
            disks,
        };
        let stored = self.store.put_merged(&m).await?;
        info!(
            vm = %point.vm,
            seq = point.seq,
            logs = point.disks.iter().map(|d| d.logs.len()).sum::<usize>(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "point merged"
        );
        check_merged(point, stored)
    }

    /// One disk: `base` (an earlier merged map of the same base) or the disk's own pages, plus
    /// the logs not in it yet.
    async fn merge_disk(
        &self,
        vm: &str,
        disk: &DiskManifest,
        base: Option<&MergedDisk>,
        cancel: &CancellationToken,
    ) -> Result<MergedDisk> {
        let (base_pages, done): (&[PageRef], usize) = match base {
            Some(b) => (&b.pages, b.logs.len()),
            None => (&disk.pages, 0),
        };
        let todo = &disk.logs[done..];
        let merged = |pages: Vec<PageRef>, stored_blocks: u64| MergedDisk {
            disk_id: disk.disk_id.clone(),
            block_size: disk.block_size,
            virtual_size: disk.virtual_size,
            base_pages: disk.pages.clone(),
            logs: disk.logs.clone(),
            pages,
            stored_blocks,
        };
        if todo.is_empty() {
            let stored = match base {
                Some(b) => b.stored_blocks,
                None => disk.stored_blocks,
            };
            return Ok(merged(base_pages.to_vec(), stored));
        }
        let bs = u64::from(disk.block_size);
        if bs == 0 || bs > ferry_store::MAX_CHUNK_LEN as u64 {
            return Err(WriterError::Corrupt(format!(
                "disk {} of vm {vm}: block size {bs}",
                disk.disk_id
            )));
        }
        let mut map = read_map(&self.store, base_pages).await?;

        // Spool the logs to local files (HrlLog reads files), removed when this returns.
        tokio::fs::create_dir_all(&*self.spool_dir)
            .await
            .map_err(|e| WriterError::Internal(format!("{}: {e}", self.spool_dir.display())))?;
        let run = uuid::Uuid::new_v4();
        let mut files = SpoolFiles(Vec::with_capacity(todo.len()));
        for (i, key) in todo.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(WriterError::Cancelled);
            }
            let desc = get_descriptor(&self.store, key).await?;
            let path = self.spool_dir.join(format!("ferry-merge-{run}-{i:06}.hrl"));
            files.0.push(path.clone());
            spool(&self.store, &self.key(), &desc, &path).await?;
        }
        let (paths, keys, vsize) = (files.0.clone(), todo.to_vec(), disk.virtual_size);
        let plan = tokio::task::spawn_blocking(move || plan(&paths, &keys, vsize, bs))
            .await
            .map_err(|e| WriterError::Internal(format!("log read task failed: {e}")))??;
        let plan = Arc::new(plan);
        debug!(
            vm, disk = %disk.disk_id, logs = todo.len(), records = plan.records,
            write_bytes = plan.write_bytes, blocks = plan.blocks.len(), "merging logs"
        );

        let jobs = (0..plan.blocks.len()).map(|at| {
            let (this, plan) = (self.clone(), Arc::clone(&plan));
            let index = plan.blocks[at].0;
            let base = map.entries.get(&index).copied();
            let disk_id = disk.disk_id.clone();
            let len = bs.min(vsize - index * bs) as usize;
            async move {
                this.merge_block(&disk_id, index, base, plan, at, (len, bs))
                    .await
                    .map(|id| (index, id))
            }
        });
        let mut blocks =
            futures::stream::iter(jobs.collect::<Vec<_>>()).buffer_unordered(MERGE_AHEAD);
        let (mut written, mut zeroed) = (0u64, 0u64);
        loop {
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(WriterError::Cancelled),
                next = blocks.next() => next,
            };
            let Some(block) = next else { break };
            match block? {
                (index, Some(id)) => {
                    written += 1;
                    map.entries.insert(index, id);
                }
                (index, None) => {
                    zeroed += 1;
                    map.entries.remove(&index);
                }
            }
        }
        drop(blocks);
        drop(files);
        if cancel.is_cancelled() {
            return Err(WriterError::Cancelled);
        }
        let (map, pages) = write_map(&self.store, map, base_pages).await?;
        debug!(vm, disk = %disk.disk_id, written, zeroed, stored_blocks = map.entries.len(), "disk merged");
        Ok(merged(pages, map.entries.len() as u64))
    }

    /// Reads one block (absent = zeros), applies its segments, and stores the result when it
    /// changed. Returns the block's new chunk, None for an all-zero block.
    async fn merge_block(
        &self,
        disk: &str,
        index: u64,
        base: Option<ChunkId>,
        plan: Arc<Plan>,
        at: usize,
        (len, block_size): (usize, u64),
    ) -> Result<Option<ChunkId>> {
        let sealed = match base {
            Some(id) => match self.store.get_chunk(&id).await {
                Ok(s) => Some(s),
                Err(StoreError::NotFound { .. }) => {
                    return Err(WriterError::Corrupt(format!(
                        "disk {disk}: block {index} references chunk {} which is not stored",
                        chunk_hex(&id)
                    )));
                }
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        let key = self.key();
        let what = format!("disk {disk}: block {index}");
        let block_size = block_size as usize;
        let out = tokio::task::spawn_blocking(move || -> Result<Option<(ChunkId, Option<Vec<u8>>)>> {
            let data = match (base, sealed) {
                (Some(id), Some(s)) => {
                    let data = open_chunk(&key, &id, &s)
                        .map_err(|e| WriterError::Corrupt(format!("{what}: {e}")))?;
                    if data.len() > block_size {
                        return Err(WriterError::Corrupt(format!(
                            "{what}: the chunk holds {} bytes, more than the block size {block_size}",
                            data.len()
                        )));
                    }
                    data
                }
                _ => Vec::new(),
            };
            let Some(block) = patch_block(&plan, at, data, len)? else {
                return Ok(None);
            };
            let id = chunk_id(&key, &block);
            if Some(id) == base {
                return Ok(Some((id, None)));
            }
            Ok(Some((id, Some(seal_chunk(&key, &id, &block)))))
        })
        .await
        .map_err(|e| WriterError::Internal(format!("block merge task failed: {e}")))??;
        match out {
            None => Ok(None),
            Some((id, None)) => Ok(Some(id)),
            Some((id, Some(sealed))) => {
                self.store.put_chunk(&id, sealed.into()).await?;
                Ok(Some(id))
            }
        }
    }
}

/// A recorded merged map is used only if it is exactly this point's.
fn check_merged(point: &PointManifest, m: MergedManifest) -> Result<MergedManifest> {
    let ok = m.point_id == point.id
        && point
            .disks
            .iter()
            .all(|d| m.disk(&d.disk_id).is_some_and(|md| md.merges(d)));
    if ok {
        Ok(m)
    } else {
        Err(WriterError::Corrupt(format!(
            "merged map {} does not match point {} of vm {}",
            layout::merged_key(&point.vm, point.seq),
            point.id,
            point.vm
        )))
    }
}

fn is_transient(e: &WriterError) -> bool {
    match e {
        WriterError::Store(s) => s.is_transient(),
        WriterError::Io(_) => true,
        _ => false,
    }
}

/// Removes spooled logs a previous run left behind (it died mid-merge).
pub(crate) fn clean_spool_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("ferry-merge-") && name.ends_with(".hrl") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
