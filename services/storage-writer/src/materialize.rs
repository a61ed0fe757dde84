//! Writing a point's disk into an image file.
//!
//! Chunks are fetched and opened (decrypt, decompress, verify) several at a time ahead of the
//! writer, and handed in block order to one blocking thread that owns the image writer. The
//! thread removes the file unless it was told to finish: an error, a cancellation or a dropped
//! request future (the client went away) all leave no partial file behind.
use std::path::{Path, PathBuf};

use ferry_disk::{CreateOptions, Format, Subformat};
use ferry_proto::storage::v1::{MaterializeDiskRequest, MaterializeDiskResponse};
use ferry_store::{ChunkId, DiskManifest, StoreError, chunk_hex, open_chunk};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Writer;
use crate::error::{Result, WriterError};
use crate::points::read_map;

/// Chunks fetched and opened ahead of the writer.
pub const FETCH_AHEAD: usize = 8;
/// Opened blocks queued for the writer thread.
const WRITE_QUEUE: usize = 4;

enum Msg {
    Block { offset: u64, data: Vec<u8> },
    Finish,
}

/// The output's format and subformat: the request's, else the source disk's own. A source
/// without a usable subformat (raw, or a differencing chain, which is written flattened)
/// becomes dynamic.
fn output_format(req: &MaterializeDiskRequest, disk: &DiskManifest) -> Result<(Format, Subformat)> {
    let bad = |e: ferry_disk::DiskError| WriterError::InvalidArgument(e.to_string());
    let format: Format = if req.format.is_empty() {
        disk.format.parse().map_err(bad)?
    } else {
        req.format.parse().map_err(bad)?
    };
    let subformat = if !req.subformat.is_empty() {
        req.subformat.parse().map_err(bad)?
    } else if req.format.is_empty() || req.format.eq_ignore_ascii_case(&disk.format) {
        match disk.subformat.parse() {
            Ok(Subformat::Fixed) => Subformat::Fixed,
            _ => Subformat::Dynamic,
        }
    } else {
        Subformat::Dynamic
    };
    if subformat == Subformat::Differencing {
        return Err(WriterError::InvalidArgument(
            "a materialised disk cannot be differencing".into(),
        ));
    }
    Ok((format, subformat))
}

impl Writer {
    /// Writes the disk of a point into `req.target_path` (never overwriting a file) and
    /// returns how much data it wrote. Stops, removing the partial file, when `cancel` fires.
    /// The point is marked as being read meanwhile, so retention neither prunes it nor
    /// collects its chunks.
    pub async fn materialize_disk(
        &self,
        mut req: MaterializeDiskRequest,
        cancel: CancellationToken,
    ) -> Result<MaterializeDiskResponse> {
        self.check_target(&req.target_path)?;
        if req.point.is_empty() || req.point == "latest" {
            req.point = self.resolve_point(&req.vm, &req.point).await?.id;
        }
        let reader = self.begin_read(&req.vm, &req.point).await?;
        let res = self.materialize_held(req, cancel).await;
        reader.release();
        res
    }

    /// Bad input before anything is read: an absolute file whose folder lies under this
    /// machine's export roots (links resolved).
    fn check_target(&self, target_path: &str) -> Result<()> {
        let target = std::path::Path::new(target_path);
        if target_path.is_empty() || !target.is_absolute() {
            return Err(WriterError::InvalidArgument(format!(
                "target path {target_path:?} must be absolute"
            )));
        }
        let folder = target.parent().and_then(|p| p.to_str()).unwrap_or("");
        if let Some(why) = ferry_model::disk::outside_roots(folder, &self.export_roots) {
            return Err(WriterError::InvalidArgument(format!(
                "target path {target_path:?}: its folder {why}"
            )));
        }
        Ok(())
    }

    async fn materialize_held(
        &self,
        req: MaterializeDiskRequest,
        cancel: CancellationToken,
    ) -> Result<MaterializeDiskResponse> {
        let target = PathBuf::from(&req.target_path);
        let (point, disk) = self.resolve_disk(&req.vm, &req.point, &req.disk_id).await?;
        let (format, subformat) = output_format(&req, &disk)?;
        if tokio::fs::symlink_metadata(&target).await.is_ok() {
            return Err(WriterError::AlreadyExists(target.display().to_string()));
        }
        // A merged map is the whole point: nothing to replay. Without one (the merger has not
        // got to the point, or failed) the logs are replayed; this never waits for a merge.
        let merged = match disk.logs.is_empty() {
            true => None,
            false => self
                .merged_of(&point)
                .await
                .and_then(|m| m.disk(&disk.disk_id).filter(|m| m.merges(&disk)).cloned()),
        };
        let (pages, replay) = match &merged {
            Some(m) => (&m.pages, false),
            None => (&disk.pages, !disk.logs.is_empty()),
        };
        let map = read_map(&self.store, pages).await?;
        let bs = u64::from(disk.block_size);
        let vsize = disk.virtual_size;
        if bs == 0 {
            return Err(WriterError::Corrupt(format!(
                "disk {}: block size 0",
                disk.disk_id
            )));
        }
        if let Some((&last, _)) = map.entries.last_key_value()
            && last >= vsize.div_ceil(bs)
        {
            return Err(WriterError::Corrupt(format!(
                "disk {}: block {last} lies beyond the virtual size {vsize}",
                disk.disk_id
            )));
        }
        info!(
            vm = %point.vm, point = %point.id, disk = %disk.disk_id, target = %target.display(),
            %format, %subformat, blocks = map.entries.len(), merged = merged.is_some(),
            "materialising disk"
        );
        let opts = CreateOptions {
            virtual_size: vsize,
            subformat,
            block_size: None,
        };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let (created_tx, created_rx) = tokio::sync::oneshot::channel();
        let path = target.clone();
        let thread =
            tokio::task::spawn_blocking(move || write_thread(&path, format, &opts, rx, created_tx));
        // A create failure (the file exists, a bad directory) ends the thread before any block.
        if created_rx.await.is_err() {
            return Err(join(thread.await).err().unwrap_or(WriterError::Internal(
                "disk writer stopped before creating the file".into(),
            )));
        }
        let fed = self
            .feed(&disk, map.entries.into_iter().collect(), &tx, &cancel)
            .await;
        let outcome = match fed {
            Ok(bytes) => match tx.send(Msg::Finish).await {
                Ok(()) => Ok(bytes),
                Err(_) => Err(None),
            },
            Err(e) => Err(Some(e)),
        };
        drop(tx);
        let written = join(thread.await);
        match (outcome, written) {
            (Ok(bytes_written), Ok(())) => {
                if replay && let Err(e) = self.apply_logs(&disk, &target, &cancel).await {
                    warn!(disk = %disk.disk_id, target = %target.display(), error = %e, "applying shipped logs failed; partial file removed");
                    let _ = std::fs::remove_file(&target);
                    return Err(e);
                }
                let replayed = if replay { disk.logs.len() } else { 0 };
                info!(disk = %disk.disk_id, target = %target.display(), bytes_written, logs = replayed, "disk materialised");
                Ok(MaterializeDiskResponse {
                    bytes_written,
                    virtual_size: vsize,
                    target_path: req.target_path,
                })
            }
            // The writer failed first: its error explains why the queue closed.
            (Err(None) | Ok(_), Err(e)) => Err(e),
            (Err(Some(e)), _) => {
                warn!(disk = %disk.disk_id, target = %target.display(), error = %e, "materialise failed; partial file removed");
                Err(e)
            }
            (Err(None), Ok(())) => Err(WriterError::Internal("disk writer stopped early".into())),
        }
    }

    /// Fetches and opens the blocks ahead of the writer and queues them in block order.
    /// Returns the bytes queued.
    async fn feed(
        &self,
        disk: &DiskManifest,
        entries: Vec<(u64, ChunkId)>,
        tx: &mpsc::Sender<Msg>,
        cancel: &CancellationToken,
    ) -> Result<u64> {
        let bs = u64::from(disk.block_size);
        let vsize = disk.virtual_size;
        let mut blocks = futures::stream::iter(entries.into_iter().map(|(index, id)| {
            let this = self.clone();
            let disk_id = disk.disk_id.clone();
            async move {
                this.fetch_block(&disk_id, index, id)
                    .await
                    .map(|data| (index, data))
            }
        }))
        .buffered(FETCH_AHEAD);
        let mut bytes = 0u64;
        loop {
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(WriterError::Cancelled),
                next = blocks.next() => next,
            };
            let Some(block) = next else {
                return Ok(bytes);
            };
            let (index, mut data) = block?;
            let offset = index * bs;
            if data.len() as u64 > bs {
                return Err(WriterError::Corrupt(format!(
                    "disk {}: block {index} holds {} bytes, more than the block size {bs}",
                    disk.disk_id,
                    data.len()
                )));
            }
            // The last block of a disk whose size is not a multiple of the block size.
            let len = (data.len() as u64).min(vsize - offset);
            data.truncate(usize::try_from(len).unwrap_or(data.len()));
            bytes += len;
            if tx.send(Msg::Block { offset, data }).await.is_err() {
                // The writer thread ended (its error is reported by the caller).
                return Ok(bytes);
            }
        }
    }

    /// Applies the point's shipped logs, oldest first, onto the written image (the point is
    /// the block map plus its logs not merged yet).
    async fn apply_logs(
        &self,
        disk: &DiskManifest,
        target: &Path,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let dir = target.parent().unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let mut spools = Vec::new();
        let res = async {
            for (i, key) in disk.logs.iter().enumerate() {
                if cancel.is_cancelled() {
                    return Err(WriterError::Cancelled);
                }
                let d = crate::logs::get_descriptor(&self.store, key).await?;
                let spool = dir.join(format!(".{name}.{i:06}.hrl.spool"));
                spools.push(spool.clone());
                crate::logs::spool(&self.store, &self.key(), &d, &spool).await?;
            }
            let (t, s) = (target.to_path_buf(), spools.clone());
            let bytes = tokio::task::spawn_blocking(move || crate::logs::replay(&t, &s))
                .await
                .map_err(|e| WriterError::Internal(format!("log replay task failed: {e}")))??;
            debug!(disk = %disk.disk_id, logs = disk.logs.len(), bytes, "shipped logs applied");
            Ok(())
        }
        .await;
        for s in &spools {
            let _ = std::fs::remove_file(s);
        }
        res
    }

    async fn fetch_block(&self, disk: &str, index: u64, id: ChunkId) -> Result<Vec<u8>> {
        let sealed = match self.store.get_chunk(&id).await {
            Ok(s) => s,
            Err(StoreError::NotFound { .. }) => {
                return Err(WriterError::Corrupt(format!(
                    "disk {disk}: block {index} references chunk {} which is not stored",
                    chunk_hex(&id)
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let key = self.key();
        let opened = tokio::task::spawn_blocking(move || open_chunk(&key, &id, &sealed))
            .await
            .map_err(|e| WriterError::Internal(format!("chunk open task failed: {e}")))?;
        opened.map_err(|e| WriterError::Corrupt(format!("disk {disk}: block {index}: {e}")))
    }
}

fn join(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(|e| WriterError::Internal(format!("disk writer thread failed: {e}")))?
}

/// Owns the image writer: creates the file, writes the queued blocks, and finishes it only
/// when told to. Any other end (error, queue closed without `Finish`) removes the file.
fn write_thread(
    path: &Path,
    format: Format,
    opts: &CreateOptions,
    mut rx: mpsc::Receiver<Msg>,
    created: tokio::sync::oneshot::Sender<()>,
) -> Result<()> {
    let mut writer = ferry_disk::create(path, format, opts).map_err(|e| match e {
        ferry_disk::DiskError::AlreadyExists { path } => {
            WriterError::AlreadyExists(path.display().to_string())
        }
        ferry_disk::DiskError::Io { path, source, .. }
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            WriterError::FailedPrecondition(format!(
                "the directory of {} does not exist",
                path.display()
            ))
        }
        e => WriterError::Disk(e),
    })?;
    let _ = created.send(());
    let result = loop {
        match rx.blocking_recv() {
            Some(Msg::Block { offset, data }) => {
                if let Err(e) = writer.write_at(offset, &data) {
                    break Err(WriterError::Disk(e));
                }
            }
            Some(Msg::Finish) => break writer.finish().map_err(WriterError::Disk),
            None => {
                debug!(path = %path.display(), "materialise abandoned");
                break Err(WriterError::Cancelled);
            }
        }
    };
    if result.is_err()
        && let Err(e) = std::fs::remove_file(path)
    {
        warn!(path = %path.display(), error = %e, "cannot remove a partial disk file");
    }
    result
}
