//! Instant recovery: a disk served before the point it recovers is local.
//!
//! The image starts empty; [`Fill`] knows the point's blocks (`fill_file.rs`) and which of
//! them are local. Before a read touches a block that is not local, the connection fetches it
//! (through a [`BlockSource`]: the gateway, each chunk checked against its id) and writes it
//! into the image; a background copy (`copy`) fetches the rest in block order, at most
//! `rate` bytes a second. Blocks the point does not hold read as zeros from the empty image.
//!
//! Why a VM write never loses to the copy: a write, write-zeroes or trim is queued only after
//! every block it touches is local *and* recorded so on disk (image flushed, then the state
//! file rewritten), and a block is written by a fill only while it is not local, under the
//! state lock. So a fill never overwrites a VM write, not even after a crash (a block the
//! state file does not list was never written by the VM). Fill data is the point's, not the
//! VM's: it goes into the image only, never into the change log, so the logs still hold
//! exactly the VM's writes since the point (what re-protect ships).
//!
//! When every block is local the state file and the map are removed: the disk is an ordinary
//! file and nothing more is fetched. After a crash the state file says where the copy was.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferry_disk::DiskRw;
use ferry_store::ChunkId;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::export::{Export, NBD_EIO, NBD_ESHUTDOWN};
use super::fill_file::{self, FillPlan};

/// Fetched blocks: index and data, in any order; or why they could not be fetched.
pub type Fetched = BoxFuture<'static, Result<Vec<(u64, Vec<u8>)>, String>>;

/// Where a disk's missing blocks come from.
pub trait BlockSource: Send + Sync {
    /// The opened (decrypted, checked) data of `blocks` (index, chunk).
    fn fetch(&self, blocks: Vec<(u64, ChunkId)>) -> Fetched;
}

/// Blocks the background copy asks for in one fetch.
const COPY_BATCH: usize = 32;
/// Fetches the background copy keeps in flight.
const COPY_IN_FLIGHT: usize = 4;
/// Longest the copy goes without recording its progress (what a crash makes it fetch again).
const PERSIST_EVERY: Duration = Duration::from_secs(1);

type Image = Arc<RwLock<Option<Box<dyn DiskRw>>>>;

/// A disk being filled from its point.
pub struct Fill {
    disk: PathBuf,
    plan: FillPlan,
    state: Mutex<State>,
    /// One rewrite of the state file at a time, in order.
    persist: Mutex<()>,
    /// Fired whenever a fetch in flight ends (its blocks local, or it failed).
    changed: Notify,
    source: Mutex<Option<Arc<dyn BlockSource>>>,
    complete: AtomicBool,
    /// Background copy rate, bytes a second (0: as fast as the gateway answers).
    rate: u64,
    /// Blocks fetched by this process (on demand and by the copy).
    fetched: AtomicU64,
}

struct State {
    /// Local blocks, by position in the plan.
    local: Vec<u64>,
    /// What the state file says (a subset of `local`).
    durable: Vec<u64>,
    /// Positions being fetched.
    inflight: HashSet<usize>,
    remaining: usize,
}

fn bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

fn set(bits: &mut [u64], i: usize) {
    bits[i / 64] |= 1 << (i % 64);
}

impl Fill {
    /// The fill of `disk` from its files, or None when the disk is not being filled.
    pub fn load(
        disk: &Path,
        source: impl FnOnce(&FillPlan) -> Arc<dyn BlockSource>,
        rate: u64,
    ) -> Result<Option<Arc<Fill>>, fill_file::FillFileError> {
        fill_file::remove_stale_map(disk);
        if !fill_file::pending(disk) {
            return Ok(None);
        }
        let plan = fill_file::read_map(disk)?;
        let local = fill_file::read_state(disk, plan.blocks.len())?;
        let done = (0..plan.blocks.len()).filter(|&i| bit(&local, i)).count();
        let source = source(&plan);
        Ok(Some(Arc::new(Fill {
            disk: disk.to_path_buf(),
            state: Mutex::new(State {
                durable: local.clone(),
                local,
                inflight: HashSet::new(),
                remaining: plan.blocks.len() - done,
            }),
            plan,
            persist: Mutex::new(()),
            changed: Notify::new(),
            source: Mutex::new(Some(source)),
            complete: AtomicBool::new(false),
            rate,
            fetched: AtomicU64::new(0),
        })))
    }

    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Blocks local and blocks in all (of the point's).
    pub fn progress(&self) -> (u64, u64) {
        let total = self.plan.blocks.len() as u64;
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (total - st.remaining as u64, total)
    }

    /// Blocks this process fetched.
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Positions in the plan of the blocks `[offset, offset + len)` touches.
    fn positions(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let bs = self.plan.block_size;
        let (first, end) = (offset / bs, (offset + len.max(1)).div_ceil(bs));
        let at = |b: u64| self.plan.blocks.partition_point(|(i, _)| *i < b);
        at(first)..at(end)
    }

    /// Makes the blocks of `[offset, offset + len)` local before a read (`durable` false)
    /// or a write (`durable` true: also recorded so on disk). An NBD error when a block
    /// cannot be fetched or written.
    pub(crate) async fn ensure(
        self: &Arc<Self>,
        image: &Image,
        offset: u64,
        len: u64,
        durable: bool,
    ) -> Result<(), u32> {
        if self.is_complete() {
            return Ok(());
        }
        let range = self.positions(offset, len);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (claimed, waiting) = self.claim(range.clone(), usize::MAX);
            if !claimed.is_empty() {
                self.fetch_and_fill(image, claimed).await?;
                continue;
            }
            if !waiting {
                break;
            }
            notified.await;
        }
        if durable && !self.durable_over(range) {
            let (me, image) = (self.clone(), image.clone());
            tokio::task::spawn_blocking(move || me.persist(&image))
                .await
                .map_err(|_| NBD_EIO)??;
        }
        Ok(())
    }

    /// Takes up to `max` positions of `range` that are neither local nor being fetched;
    /// and whether some of the range is being fetched by someone else.
    fn claim(&self, range: std::ops::Range<usize>, max: usize) -> (Vec<usize>, bool) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (mut claimed, mut waiting) = (Vec::new(), false);
        for p in range {
            if bit(&st.local, p) {
                continue;
            }
            if st.inflight.contains(&p) {
                waiting = true;
            } else if claimed.len() < max {
                st.inflight.insert(p);
                claimed.push(p);
            }
        }
        (claimed, waiting)
    }

    fn durable_over(&self, range: std::ops::Range<usize>) -> bool {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        range.into_iter().all(|p| bit(&st.durable, p))
    }

    /// Fetches the claimed positions and writes them; the claims end either way.
    async fn fetch_and_fill(
        self: &Arc<Self>,
        image: &Image,
        claimed: Vec<usize>,
    ) -> Result<(), u32> {
        let res = self.fetch_and_fill_inner(image, &claimed).await;
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for p in &claimed {
                st.inflight.remove(p);
            }
        }
        self.changed.notify_waiters();
        res
    }

    async fn fetch_and_fill_inner(
        self: &Arc<Self>,
        image: &Image,
        claimed: &[usize],
    ) -> Result<(), u32> {
        let Some(source) = self
            .source
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return Err(NBD_ESHUTDOWN);
        };
        let blocks: Vec<(u64, ChunkId)> = claimed.iter().map(|&p| self.plan.blocks[p]).collect();
        let data = source.fetch(blocks).await.map_err(|e| {
            warn!(disk = %self.disk.display(), blocks = claimed.len(), error = %e, "cannot fetch blocks of a disk being filled");
            NBD_EIO
        })?;
        self.fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
        let (me, image) = (self.clone(), image.clone());
        tokio::task::spawn_blocking(move || me.fill(&image, data))
            .await
            .map_err(|_| NBD_EIO)?
    }

    /// Writes fetched blocks that are still not local (a block of zeros needs no write: the
    /// image was created empty and nothing wrote there since).
    fn fill(&self, image: &Image, data: Vec<(u64, Vec<u8>)>) -> Result<(), u32> {
        let bs = self.plan.block_size;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut guard = image.write().unwrap_or_else(|e| e.into_inner());
        let Some(img) = guard.as_mut() else {
            return Err(NBD_ESHUTDOWN);
        };
        for (index, block) in data {
            let p = self.plan.blocks.partition_point(|(i, _)| *i < index);
            if self.plan.blocks.get(p).is_none_or(|(i, _)| *i != index) || bit(&st.local, p) {
                continue;
            }
            let len = (block.len() as u64)
                .min(bs)
                .min(self.plan.virtual_size.saturating_sub(index * bs))
                as usize;
            if block[..len].iter().any(|&b| b != 0) {
                img.write_at(index * bs, &block[..len]).map_err(|e| {
                    warn!(disk = %self.disk.display(), block = index, error = %e, "cannot write a fetched block");
                    NBD_EIO
                })?;
            }
            set(&mut st.local, p);
            st.remaining -= 1;
        }
        Ok(())
    }

    /// Records on disk what is local now: the image flushed first, then the state file.
    fn persist(&self, image: &Image) -> Result<(), u32> {
        let _one = self.persist.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .local
            .clone();
        // The bulk of the writeback without the image lock, so reads go on meanwhile (fsync
        // flushes the file, whichever descriptor asks); the image's own flush below (its
        // metadata too) then finds little left to write.
        if let Ok(f) = std::fs::File::open(&self.disk) {
            let _ = f.sync_data();
        }
        {
            let mut guard = image.write().unwrap_or_else(|e| e.into_inner());
            let Some(img) = guard.as_mut() else {
                return Err(NBD_ESHUTDOWN);
            };
            img.flush().map_err(|e| {
                warn!(disk = %self.disk.display(), error = %e, "cannot flush a disk being filled");
                NBD_EIO
            })?;
        }
        fill_file::write_state(&self.disk, &snapshot).map_err(|e| {
            warn!(error = %e, "cannot record the progress of a disk being filled");
            NBD_EIO
        })?;
        self.state.lock().unwrap_or_else(|e| e.into_inner()).durable = snapshot;
        Ok(())
    }

    /// Every block local and recorded: the fill files go and the disk is ordinary.
    fn finish(&self, image: &Image) -> Result<(), u32> {
        self.persist(image)?;
        fill_file::remove(&self.disk).map_err(|e| {
            warn!(error = %e, "cannot remove the fill files of a copied disk");
            NBD_EIO
        })?;
        self.complete.store(true, Ordering::Release);
        Ok(())
    }

    /// Drops the block source (the copy ended: nothing more is fetched by this fill).
    fn release(&self) {
        self.source.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// The background copy of `export`'s fill, until every block is local or `stop` fires (the
/// disk is no longer served, or the tracker stops). Fetch errors are retried with a backoff:
/// the VM runs on this disk, giving up would leave it depending on the store for ever.
pub(crate) async fn copy(export: Arc<Export>, fill: Arc<Fill>, shutdown: CancellationToken) {
    let name = export.name.clone();
    let (done, total) = fill.progress();
    info!(export = %name, point = %fill.plan.point, blocks_local = done, blocks = total, "instant copy running");
    let started = Instant::now();
    let outcome = tokio::select! {
        biased;
        () = export.detached.cancelled() => Err("the disk is no longer served".to_owned()),
        () = shutdown.cancelled() => Err("the tracker stops".to_owned()),
        r = copy_all(&export, &fill) => r,
    };
    fill.release();
    match outcome {
        Ok(()) => {
            info!(export = %name, blocks = total, fetched = fill.fetched(), secs = started.elapsed().as_secs_f64(), "instant copy done: the disk is an ordinary local file")
        }
        Err(why) => {
            let (done, total) = fill.progress();
            info!(export = %name, blocks_local = done, blocks = total, why = %why, "instant copy stopped; it resumes where it was when the disk is served again")
        }
    }
}

async fn copy_all(export: &Arc<Export>, fill: &Arc<Fill>) -> Result<(), String> {
    let image = &export.image;
    let mut backoff = ferry_model::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut last_persist = Instant::now();
    let started = Instant::now();
    let mut copied = 0u64;
    let mut cursor = 0usize;
    let n = fill.plan.blocks.len();
    // With a rate, a round fetches about a second of it, so the copy never runs far ahead.
    let per_round = match fill.rate {
        0 => COPY_BATCH * COPY_IN_FLIGHT,
        r => ((r / fill.plan.block_size) as usize).clamp(1, COPY_BATCH * COPY_IN_FLIGHT),
    };
    loop {
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut claimed_round = 0;
        while claimed_round < per_round && cursor < n {
            let want = (per_round - claimed_round).min(COPY_BATCH);
            let end = (cursor + want * 4).min(n);
            let (claimed, _) = fill.claim(cursor..end, want);
            cursor = claimed.last().map_or(end, |p| p + 1);
            claimed_round += claimed.len();
            if !claimed.is_empty() {
                batches.push(claimed);
            }
        }
        if batches.is_empty() {
            if fill.progress().0 == n as u64 {
                return fill.finish(image).map_err(|e| format!("nbd error {e}"));
            }
            // What is left is being fetched on demand, or failed: look again.
            cursor = 0;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let bytes: u64 = batches.iter().map(|b| b.len() as u64).sum::<u64>() * fill.plan.block_size;
        let results =
            futures::future::join_all(batches.into_iter().map(|b| fill.fetch_and_fill(image, b)))
                .await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            if e == NBD_ESHUTDOWN {
                return Err("the disk was closed".into());
            }
            cursor = 0;
            let wait = backoff.next_delay();
            debug!(export = %export.name, error = e, ?wait, "instant copy: a fetch failed; retrying");
            tokio::time::sleep(wait).await;
            continue;
        }
        backoff = ferry_model::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        copied += bytes;
        if last_persist.elapsed() >= PERSIST_EVERY {
            let (f, img) = (fill.clone(), image.clone());
            tokio::task::spawn_blocking(move || f.persist(&img))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("nbd error {e}"))?;
            last_persist = Instant::now();
        }
        if fill.rate > 0 {
            let due = Duration::from_secs_f64(copied as f64 / fill.rate as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(ahead).await;
            }
        }
    }
}
