//! Checksum resynchronization of a VM (DESIGN §2.5): when the change logs cannot carry the
//! replica forward (a log lost, broken or too large, writes made behind the tracker's back),
//! the agent reads each disk in the vault's fixed blocks, names them with the same keyed hash
//! storage uses, compares them with the block-hash list of the VM's latest recovery point and
//! ships only the blocks that differ. The result is a full block map, like an initial copy.
//!
//! Consistency: the logs are cut before the pass and every sealed log is deleted (the pass
//! reads the whole disk, so they are superseded, broken ones included); writes made during the
//! pass land in new logs, which are cut again at the end and ship with the point, applied on
//! top of it at materialisation.
//!
//! Durable progress: `<data_dir>/resync/<vm>.json` (job id, per disk the block index below
//! which everything is read and stored, and how many map entries the journal
//! `<data_dir>/resync/<vm>.<disk n>.map` holds: 8-byte index + 32-byte chunk id each). A
//! retry of the same job resumes from the recorded index, keeping the logs sealed since the
//! start (they hold the writes to blocks already read) — but only when that chain of logs is
//! provably intact: every log since the start cut is present, chained by PreviousUniqueId, and
//! closed cleanly (the tracker's open log excepted). After a `kill -9` the open log was not
//! sealed, so its writes cannot be trusted and the pass starts again from block 0 with a fresh
//! cut; chunks already stored are offered and skipped, so that costs reads and hashes, not
//! network. The files are removed once the point commits.
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_model::CycleKind;
use ferry_proto::common::v1::Disk;
use ferry_proto::ingest::v1::{BlockRef, DiskBlockMap};
use ferry_proto::storage::v1::{
    BlockHashesRequest, GetPointRequest, storage_writer_client::StorageWriterClient,
};
use ferry_store::ChunkId;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::Agent;
use crate::replicate::{CopyStats, ReadBlock, ReplError, from_status, read_blocks};

/// How often the progress of a pass is made durable.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// One journal entry: block index (u64, little endian) and chunk id.
const ENTRY_LEN: usize = 8 + 32;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Progress {
    job_id: String,
    block_size: u32,
    /// The start cut was made and the logs before it removed.
    start_cut_done: bool,
    disks: Vec<DiskProgress>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskProgress {
    disk_id: String,
    path: String,
    /// Sequence number and UniqueId of the log the start cut sealed (0 and nil without a
    /// tracker): the logs after it hold every write made since the pass started.
    start_seq: u64,
    start_log_id: Uuid,
    /// Every block below this index is read and in the journal (stored, or equal to the
    /// stored one).
    next_index: u64,
    /// The whole disk was read.
    done: bool,
    /// Valid entries in the journal.
    entries: u64,
}

/// The progress file of a VM and its map journals.
struct ProgressFiles {
    dir: PathBuf,
    stem: String,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> ReplError {
    // A full or broken agent data dir: the scheduler's retry may find it fixed.
    ReplError::Recoverable(format!("resync progress: {what} {}: {e}", path.display()))
}

impl ProgressFiles {
    fn new(data_dir: &Path, vm: &str) -> Self {
        let stem = vm
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Self {
            dir: data_dir.join("resync"),
            stem,
        }
    }

    fn json(&self) -> PathBuf {
        self.dir.join(format!("{}.json", self.stem))
    }

    fn journal(&self, disk: usize) -> PathBuf {
        self.dir.join(format!("{}.{disk}.map", self.stem))
    }

    /// The saved progress; None when there is none or it cannot be read (a new pass starts).
    fn load(&self) -> Option<Progress> {
        let p = self.json();
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "resync progress unreadable; starting over");
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(prog) => Some(prog),
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "resync progress invalid; starting over");
                None
            }
        }
    }

    /// Temp file, fsync, rename, fsync of the folder.
    fn save(&self, prog: &Progress) -> Result<(), ReplError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("creating", &self.dir, e))?;
        let path = self.json();
        let tmp = self.dir.join(format!("{}.json.tmp", self.stem));
        let bytes = serde_json::to_vec(prog)
            .map_err(|e| ReplError::Permanent(format!("resync progress: encoding: {e}")))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err("writing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_err("renaming", &path, e))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes the progress file and every journal of the VM.
    fn remove_all(&self) {
        let _ = std::fs::remove_file(self.json());
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let prefix = format!("{}.", self.stem);
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(mid) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".map"))
                && mid.bytes().all(|c| c.is_ascii_digit())
                && let Err(err) = std::fs::remove_file(e.path())
            {
                tracing::warn!(file = %e.path().display(), error = %err, "cannot remove a resync journal");
            }
        }
    }

    /// Opens a disk's journal at its first `entries` entries (anything after them was
    /// appended after the last saved progress and is dropped) and reads those.
    fn open_journal(&self, disk: usize, entries: u64) -> Result<Journal, ReplError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("creating", &self.dir, e))?;
        let path = self.journal(disk);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        let want = entries * ENTRY_LEN as u64;
        let len = f.metadata().map_err(|e| io_err("reading", &path, e))?.len();
        if len < want {
            return Err(ReplError::Recoverable(format!(
                "resync progress: {} holds {len} bytes, the progress file says {want}",
                path.display()
            )));
        }
        let mut bytes = vec![0u8; want as usize];
        f.read_exact(&mut bytes)
            .map_err(|e| io_err("reading", &path, e))?;
        f.set_len(want)
            .and_then(|()| f.seek(SeekFrom::End(0)).map(|_| ()))
            .map_err(|e| io_err("truncating", &path, e))?;
        let blocks = bytes
            .chunks_exact(ENTRY_LEN)
            .map(|e| {
                let mut idx = [0u8; 8];
                idx.copy_from_slice(&e[..8]);
                BlockRef {
                    index: u64::from_le_bytes(idx),
                    chunk: e[8..].to_vec(),
                }
            })
            .collect();
        Ok(Journal {
            f,
            path,
            loaded: blocks,
        })
    }
}

struct Journal {
    f: std::fs::File,
    path: PathBuf,
    /// The entries it held when opened.
    loaded: Vec<BlockRef>,
}

impl Journal {
    fn append(&mut self, blocks: &[BlockRef]) -> Result<(), ReplError> {
        if blocks.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(blocks.len() * ENTRY_LEN);
        for b in blocks {
            buf.extend_from_slice(&b.index.to_le_bytes());
            buf.extend_from_slice(&b.chunk);
        }
        self.f
            .write_all(&buf)
            .and_then(|()| self.f.sync_data())
            .map_err(|e| io_err("appending to", &self.path, e))
    }
}

/// What a pass of one cycle works with.
struct Pass<'a> {
    vm: &'a str,
    cycle: &'a str,
    block_size: u32,
    files: &'a ProgressFiles,
    cancel: &'a CancellationToken,
    lost: &'a CancellationToken,
}

/// Checks that the logs written since the start cut are all there, chained, and sealed
/// cleanly (the tracker's open log excepted): then they hold every write made since the pass
/// started, and a resumed pass may keep them instead of re-reading from block 0.
fn chain_intact(p: &DiskProgress, current: Option<&Path>) -> Result<(), String> {
    let disk = Path::new(&p.path);
    let logs = crate::tracker::list_logs(disk).map_err(|e| format!("listing logs: {e}"))?;
    let since: Vec<(u64, PathBuf)> = logs.into_iter().filter(|(s, _)| *s > p.start_seq).collect();
    if since.is_empty() {
        return Err("no log since the start of the resync".into());
    }
    let mut expect_prev = p.start_log_id;
    for (expect_seq, (seq, path)) in (p.start_seq + 1..).zip(since) {
        if seq != expect_seq {
            return Err(format!("log {expect_seq} is missing (found {seq})"));
        }
        let log =
            ferry_disk::hrl::HrlLog::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if log.header.previous_unique_id != expect_prev {
            return Err(format!(
                "{} does not chain to its predecessor",
                path.display()
            ));
        }
        if !log.clean && Some(path.as_path()) != current {
            return Err(format!("{} was not closed cleanly", path.display()));
        }
        expect_prev = log.header.unique_id;
    }
    Ok(())
}

impl Agent {
    async fn storage_writer(&self) -> Result<StorageWriterClient<Channel>, ReplError> {
        let ch = self
            .peers
            .channel(ferry_mesh::Component::StorageWriter)
            .map_err(|e| ReplError::Permanent(format!("storage-writer endpoint: {e}")))?;
        Ok(StorageWriterClient::new(ch))
    }

    /// Whether a resync of `vm` has begun and not committed: delta cycles must not ship (and
    /// delete) the logs it keeps.
    pub(crate) fn resync_in_progress(&self, vm: &str) -> bool {
        ProgressFiles::new(&self.cfg.data_dir, vm).json().exists()
    }

    /// The block map of the disk in the VM's latest point; empty when there is no point yet,
    /// the point does not hold the disk, or its blocks have another size.
    async fn stored_blocks(
        &self,
        vm: &str,
        disk: &Disk,
        block_size: u32,
    ) -> Result<(String, HashMap<u64, ChunkId>), ReplError> {
        let mut sw = self.storage_writer().await?;
        let point = match sw
            .get_point(GetPointRequest {
                vm: vm.to_string(),
                point: "latest".into(),
            })
            .await
        {
            Ok(p) => p.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                tracing::info!(vm, disk = %disk.path, "no recovery point yet; every block is shipped");
                return Ok((String::new(), HashMap::new()));
            }
            Err(s) => return Err(from_status("latest recovery point", s)),
        };
        match point.disks.iter().find(|d| d.disk_id == disk.id) {
            None => {
                tracing::info!(vm, disk = %disk.path, point = %point.id, "the latest point does not hold the disk; every block is shipped");
                return Ok((point.id, HashMap::new()));
            }
            Some(pd) if pd.block_size != block_size => {
                tracing::info!(vm, disk = %disk.path, point = %point.id, point_block_size = pd.block_size, block_size, "the latest point has another block size; every block is shipped");
                return Ok((point.id, HashMap::new()));
            }
            Some(_) => {}
        }
        let mut stream = match sw
            .block_hashes(BlockHashesRequest {
                vm: vm.to_string(),
                point: point.id.clone(),
                disk_id: disk.id.clone(),
                // A block whose chunk was quarantined ships again.
                omit_lost: true,
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok((point.id, HashMap::new()));
            }
            Err(s) => return Err(from_status("block hashes", s)),
        };
        let mut map = HashMap::new();
        while let Some(page) = stream
            .message()
            .await
            .map_err(|s| from_status("block hashes", s))?
        {
            for b in page.blocks {
                // A malformed id compares unequal to every block: that block is shipped.
                if let Ok(id) = ChunkId::try_from(b.chunk.as_slice()) {
                    map.insert(b.index, id);
                }
            }
        }
        Ok((point.id, map))
    }

    /// Saved progress of this job when its chain of logs is intact; otherwise a new pass:
    /// cut, remove every sealed log, save the start.
    async fn resync_start(
        &self,
        vm: &str,
        job_id: &str,
        block_size: u32,
        disks: &[Disk],
        files: &ProgressFiles,
    ) -> Result<Progress, ReplError> {
        if let Some(p) = files.load() {
            let same = p.job_id == job_id
                && p.block_size == block_size
                && p.start_cut_done
                && p.disks.len() == disks.len()
                && p.disks
                    .iter()
                    .zip(disks)
                    .all(|(a, b)| a.disk_id == b.id && a.path == b.path);
            if same {
                let currents: Vec<Option<PathBuf>> = p
                    .disks
                    .iter()
                    .map(|d| {
                        self.tracker
                            .as_ref()
                            .and_then(|t| t.current_log(Path::new(&d.path)))
                    })
                    .collect();
                let check = {
                    let p = p.clone();
                    let tracked = self.tracker.is_some();
                    tokio::task::spawn_blocking(move || {
                        if !tracked {
                            return Ok(());
                        }
                        p.disks
                            .iter()
                            .zip(&currents)
                            .try_for_each(|(d, c)| chain_intact(d, c.as_deref()))
                    })
                    .await
                    .map_err(|e| ReplError::Recoverable(format!("log check: {e}")))?
                };
                match check {
                    Ok(()) => {
                        for d in &p.disks {
                            tracing::info!(vm, job = job_id, disk = %d.path, next_index = d.next_index, done = d.done, "resuming resync");
                        }
                        return Ok(p);
                    }
                    Err(why) => {
                        tracing::info!(vm, job = job_id, reason = %why, "the logs since the resync started are not intact; reading again from block 0");
                    }
                }
            } else {
                tracing::info!(vm, job = job_id, previous_job = %p.job_id, "resync progress of another pass; starting over");
            }
        }
        files.remove_all();
        let mut prog = Progress {
            job_id: job_id.to_string(),
            block_size,
            start_cut_done: false,
            disks: disks
                .iter()
                .map(|d| DiskProgress {
                    disk_id: d.id.clone(),
                    path: d.path.clone(),
                    start_seq: 0,
                    start_log_id: Uuid::nil(),
                    next_index: 0,
                    done: false,
                    entries: 0,
                })
                .collect(),
        };
        if let Some(t) = &self.tracker {
            let sealed = t
                .cut(vm)
                .await
                .map_err(|e| ReplError::Recoverable(format!("vm {vm}: sealing logs: {e}")))?;
            for (dp, d) in prog.disks.iter_mut().zip(disks) {
                if let Some(s) = sealed.iter().find(|s| s.disk == Path::new(&d.path)) {
                    dp.start_seq = s.seq;
                    dp.start_log_id = s.unique_id;
                }
                // The pass reads the whole disk: every sealed log is superseded, broken and
                // unclean ones included.
                let old = crate::delta::sealed_logs(Path::new(&d.path), Some(t))?;
                tracing::info!(vm, disk = %d.path, logs = old.len(), "resync supersedes the sealed logs");
                crate::delta::remove_logs(&self.cfg.data_dir, &old);
            }
        }
        prog.start_cut_done = true;
        files.save(&prog)?;
        Ok(prog)
    }

    /// Checksum resync of a VM as one cycle of kind resync.
    pub(crate) async fn resync(
        &self,
        vm: &str,
        job_id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        self.refuse_while_filling(vm, "a resync")?;
        let disks = self.vm_disks(vm)?;
        let files = ProgressFiles::new(&self.cfg.data_dir, vm);
        let mut shipped_files = Vec::new();
        let point = self
            .run_cycle(
                vm,
                CycleKind::Resync,
                job_id,
                &disks,
                async |cycle, block_size, lost| {
                    let mut prog = self
                        .resync_start(vm, job_id, block_size, &disks, &files)
                        .await?;
                    let pass = Pass {
                        vm,
                        cycle,
                        block_size,
                        files: &files,
                        cancel,
                        lost,
                    };
                    let mut maps = Vec::new();
                    for (i, d) in disks.iter().enumerate() {
                        let blocks = self.resync_disk(&pass, d, i, &mut prog).await?;
                        maps.push(DiskBlockMap {
                            disk_id: d.id.clone(),
                            blocks,
                            ..Default::default()
                        });
                    }
                    // The writes made during the pass ship with the point, applied on top of it.
                    if self.tracker.is_some() {
                        self.cut(vm).await?;
                        for (d, m) in disks.iter().zip(maps.iter_mut()) {
                            let (logs, files) =
                                self.ship_disk_logs(cycle, d, block_size, lost).await?;
                            m.shipped_logs = logs;
                            shipped_files.extend(files);
                        }
                    }
                    Ok(maps)
                },
            )
            .await?;
        files.remove_all();
        crate::delta::remove_logs(&self.cfg.data_dir, &shipped_files);
        tracing::info!(vm, job = job_id, point = %point.id, logs = shipped_files.len(), "resync committed");
        Ok(())
    }

    /// One disk's pass from its saved index: read and name the blocks, keep those equal to
    /// the stored ones, upload the others (offer/need: what storage already has is skipped),
    /// checkpoint the progress. Returns the disk's full block map.
    async fn resync_disk(
        &self,
        pass: &Pass<'_>,
        disk: &Disk,
        di: usize,
        prog: &mut Progress,
    ) -> Result<Vec<BlockRef>, ReplError> {
        let Pass {
            vm,
            cycle,
            block_size,
            files,
            cancel,
            lost,
        } = *pass;
        let mut journal = files.open_journal(di, prog.disks[di].entries)?;
        let map = std::mem::take(&mut journal.loaded);
        let from = prog.disks[di].next_index;
        if prog.disks[di].done {
            tracing::info!(disk = %disk.path, blocks = map.len(), "disk already compared");
            return Ok(map);
        }
        let (point, known) = self.stored_blocks(vm, disk, block_size).await?;
        tracing::info!(vm, disk = %disk.path, point = %point, stored_blocks = known.len(), from_index = from, "comparing disk with the latest point");
        let stats = Arc::new(CopyStats::default());
        let mut blocks_equal = 0u64;
        let (tx, mut rx) = mpsc::channel::<ReadBlock>(self.cfg.batch_blocks * 2);
        let reader = {
            let path = PathBuf::from(&disk.path);
            let key = self.vault_key();
            let stats = stats.clone();
            let stop = cancel.clone();
            tokio::task::spawn_blocking(move || {
                read_blocks(&path, block_size, &key, &tx, &stats, &stop, from)
            })
        };
        let mut st = PassState {
            journaled: map.len(),
            map,
            journal,
            open: BTreeSet::new(),
            batch: Vec::with_capacity(self.cfg.batch_blocks),
            next: from,
        };
        let mut inflight: JoinSet<Result<u64, ReplError>> = JoinSet::new();
        let mut last_checkpoint = Instant::now();
        let outcome: Result<(), ReplError> = async {
            loop {
                let got = tokio::select! {
                    _ = cancel.cancelled() => return Err(ReplError::Recoverable("resync cancelled".into())),
                    _ = lost.cancelled() => return Err(ReplError::Recoverable("the cycle's lease was lost".into())),
                    b = rx.recv() => b,
                };
                let done = got.is_none();
                if let Some(b) = got {
                    st.next = b.index + 1;
                    st.map.push(BlockRef {
                        index: b.index,
                        chunk: b.id.to_vec(),
                    });
                    if known.get(&b.index) == Some(&b.id) {
                        blocks_equal += 1;
                    } else {
                        st.batch.push(b);
                    }
                }
                if st.batch.len() >= self.cfg.batch_blocks || (done && !st.batch.is_empty()) {
                    while inflight.len() >= self.cfg.batches_in_flight {
                        let first = next_upload(&mut inflight, cancel, lost).await?;
                        st.open.remove(&first);
                    }
                    let blocks = std::mem::take(&mut st.batch);
                    let first = blocks[0].index;
                    st.open.insert(first);
                    let upload = self.clone().upload_with_retry(
                        cycle.to_string(),
                        blocks,
                        stats.clone(),
                        lost.clone(),
                    );
                    inflight.spawn(async move { upload.await.map(|()| first) });
                }
                while let Some(r) = inflight.try_join_next() {
                    st.open.remove(&joined(r)?);
                }
                if done {
                    break;
                }
                if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                    st.checkpoint(files, prog, di)?;
                    last_checkpoint = Instant::now();
                }
            }
            while !inflight.is_empty() {
                let first = next_upload(&mut inflight, cancel, lost).await?;
                st.open.remove(&first);
            }
            reader
                .await
                .map_err(|e| ReplError::Recoverable(format!("disk reader: {e}")))?
        }
        .await;
        if let Err(e) = outcome {
            // What is stored so far stays recorded: the retry resumes from there.
            while let Some(r) = inflight.try_join_next() {
                if let Ok(Ok(first)) = r {
                    st.open.remove(&first);
                }
            }
            if let Err(ce) = st.checkpoint(files, prog, di) {
                tracing::warn!(vm, disk = %disk.path, error = %ce, "cannot record resync progress");
            }
            return Err(e);
        }
        st.checkpoint(files, prog, di)?;
        prog.disks[di].done = true;
        files.save(prog)?;
        tracing::info!(
            vm,
            disk = %disk.path,
            from_index = from,
            blocks_read = stats.blocks_read.load(Ordering::Relaxed),
            blocks_zero = stats.blocks_zero.load(Ordering::Relaxed),
            blocks_equal,
            blocks_shipped = stats.blocks_sent.load(Ordering::Relaxed),
            blocks_already_stored = stats.blocks_skipped.load(Ordering::Relaxed),
            bytes_shipped = stats.bytes_sent.load(Ordering::Relaxed),
            "disk resynchronized"
        );
        Ok(st.map)
    }
}

/// The next finished upload's first block index; stops waiting when the work is cancelled
/// or the cycle's lease lost (the uploads left are dropped with the set).
async fn next_upload(
    inflight: &mut JoinSet<Result<u64, ReplError>>,
    cancel: &CancellationToken,
    lost: &CancellationToken,
) -> Result<u64, ReplError> {
    tokio::select! {
        _ = cancel.cancelled() => Err(ReplError::Recoverable("resync cancelled".into())),
        _ = lost.cancelled() => Err(ReplError::Recoverable("the cycle's lease was lost".into())),
        r = inflight.join_next() => match r {
            Some(r) => joined(r),
            None => Err(ReplError::Recoverable("no upload in flight".into())),
        },
    }
}

fn joined(r: Result<Result<u64, ReplError>, tokio::task::JoinError>) -> Result<u64, ReplError> {
    r.map_err(|e| ReplError::Recoverable(format!("upload task: {e}")))?
}

/// The state of one disk's pass that its checkpoints record.
struct PassState {
    /// The block map so far, ascending.
    map: Vec<BlockRef>,
    journal: Journal,
    /// Entries of `map` already in the journal.
    journaled: usize,
    /// First block index of each batch being uploaded.
    open: BTreeSet<u64>,
    /// Blocks waiting to form a batch.
    batch: Vec<ReadBlock>,
    /// The index after the last block the reader handed over (it read everything before).
    next: u64,
}

impl PassState {
    /// Records in the journal and the progress file every block below the first one not yet
    /// stored.
    fn checkpoint(
        &mut self,
        files: &ProgressFiles,
        prog: &mut Progress,
        di: usize,
    ) -> Result<(), ReplError> {
        let mark = self
            .open
            .first()
            .copied()
            .or(self.batch.first().map(|b| b.index))
            .unwrap_or(self.next);
        let upto = self.map.partition_point(|b| b.index < mark);
        self.journal.append(&self.map[self.journaled..upto])?;
        self.journaled = upto;
        let dp = &mut prog.disks[di];
        dp.next_index = mark;
        dp.entries = upto as u64;
        files.save(prog)
    }
}
