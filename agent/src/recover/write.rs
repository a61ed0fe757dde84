//! Writing one disk of a point on the recovery host: its block map from storage-writer
//! (`BlockHashes`: the merged map, so no log replay here), its chunks fetched from the gateway
//! in batches, several batches in flight, each chunk opened (decrypted, decompressed, checked
//! against its id) and written in block order into a new image of the source's format.
//!
//! The image is made under a hidden partial name and renamed when finished, so a crash never
//! leaves a file that looks whole; any error removes the partial file.
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use ferry_disk::{CreateOptions, DiskWriter, Format, Subformat};
use ferry_model::Backoff;
use ferry_proto::common::v1::PointDisk;
use ferry_proto::storage::v1::BlockHashesRequest;
use ferry_proto::storage::v1::storage_writer_client::StorageWriterClient;
use ferry_store::ChunkId;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::replicate::from_status;
use crate::{Agent, ReplError};

/// Chunks asked for in one FETCH.
const FETCH_BATCH: usize = 32;
/// FETCH streams in flight per disk. Measured on the failover benchmark (2 GiB, this 2-core
/// machine): 4 gave 538 MB/s, 8 gave 711 MB/s (16 of 16 chunks: 569 MB/s). Memory: up to
/// this many batches of opened blocks wait for the writer (8 × 32 MiB at 1 MiB blocks).
const FETCHES_IN_FLIGHT: usize = 8;
/// Tries of one batch when the gateway is briefly unavailable.
const FETCH_TRIES: u32 = 5;

type Blocks = Vec<(u64, Vec<u8>)>;

impl Agent {
    /// Writes `disk` of point `point` into `path` (never overwriting); the bytes written.
    pub(super) async fn write_disk(
        &self,
        vm: &str,
        point: &str,
        disk: &PointDisk,
        path: &Path,
        cancel: &CancellationToken,
    ) -> Result<u64, ReplError> {
        let map = self.block_map(vm, point, &disk.disk_id).await?;
        check_map(point, disk, &map)?;
        self.write_disk_from(vm, point, disk, path, map, cancel)
            .await
    }

    /// [`Self::write_disk`] with the disk's block map at hand (checked to fit).
    pub(super) async fn write_disk_from(
        &self,
        vm: &str,
        point: &str,
        disk: &PointDisk,
        path: &Path,
        map: Vec<(u64, ChunkId)>,
        cancel: &CancellationToken,
    ) -> Result<u64, ReplError> {
        let (format, opts) = output_format(disk)?;
        let partial = partial_path(path);
        let _ = std::fs::remove_file(&partial);
        let (p, o) = (partial.clone(), opts.clone());
        let writer = blocking(move || {
            ferry_disk::create(&p, format, &o)
                .map_err(|e| ReplError::Permanent(format!("creating {}: {e}", p.display())))
        })
        .await?;
        let res = self
            .feed(vm, point, disk, map, writer, cancel)
            .await
            .and_then(|bytes| {
                std::fs::rename(&partial, path)
                    .map(|()| bytes)
                    .map_err(|e| ReplError::Permanent(format!("renaming {}: {e}", path.display())))
            });
        if res.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        let bytes = res?;
        info!(vm = %vm, point = %point, disk = %disk.disk_id, path = %path.display(), %format, bytes, "disk materialised");
        Ok(bytes)
    }

    /// Fetches the blocks of `map` batch by batch (several ahead), writes them in order and
    /// finishes the image; the bytes written. A new image gets every block of the point, an
    /// image rewritten in place (`repoint.rs`) only those that differ.
    pub(super) async fn feed(
        &self,
        vm: &str,
        point: &str,
        disk: &PointDisk,
        map: Vec<(u64, ChunkId)>,
        mut writer: Box<dyn DiskWriter>,
        cancel: &CancellationToken,
    ) -> Result<u64, ReplError> {
        let bs = u64::from(disk.block_size);
        let vsize = disk.virtual_size;
        // Owned futures: a stream of futures borrowing `self` is not provably Send.
        let batches: Vec<_> = map
            .chunks(FETCH_BATCH)
            .map(|batch| {
                let (me, vm, point, batch) = (
                    self.clone(),
                    vm.to_owned(),
                    point.to_owned(),
                    batch.to_vec(),
                );
                async move { me.fetch_blocks(&vm, &point, batch).await }
            })
            .collect();
        let mut batches = futures::stream::iter(batches).buffered(FETCHES_IN_FLIGHT);
        let mut bytes = 0u64;
        loop {
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    return Err(ReplError::Recoverable(format!("materialising vm {vm} was cancelled")));
                }
                next = batches.next() => next,
            };
            let Some(blocks) = next else { break };
            let blocks = blocks?;
            bytes += blocks
                .iter()
                .map(|(i, d)| block_len(*i, d, bs, vsize))
                .sum::<u64>();
            writer = blocking(move || {
                for (index, data) in &blocks {
                    let len = block_len(*index, data, bs, vsize) as usize;
                    writer
                        .write_at(index * bs, &data[..len])
                        .map_err(|e| ReplError::Permanent(format!("writing block {index}: {e}")))?;
                }
                Ok(writer)
            })
            .await?;
        }
        blocking(move || {
            writer
                .finish()
                .map_err(|e| ReplError::Permanent(format!("finishing the image: {e}")))
        })
        .await?;
        Ok(bytes)
    }

    /// One batch: fetched from the gateway (retrying while it is unavailable), then opened.
    pub(super) async fn fetch_blocks(
        &self,
        vm: &str,
        point: &str,
        batch: Vec<(u64, ChunkId)>,
    ) -> Result<Blocks, ReplError> {
        let sealed = self.fetch_batch(vm, point, &batch).await?;
        let key = self.vault_key_for(&sealed).await;
        blocking(move || {
            batch
                .into_iter()
                .zip(sealed)
                .map(|((index, id), sealed)| {
                    ferry_store::open_chunk(&key, &id, &sealed)
                        .map(|data| (index, data))
                        .map_err(|e| match e {
                            // Not this chunk's fault: the registry could not be asked yet.
                            ferry_store::StoreError::UnknownKey { .. } => {
                                ReplError::Recoverable(format!("block {index}: {e}"))
                            }
                            e => ReplError::Permanent(format!("block {index}: {e}")),
                        })
                })
                .collect()
        })
        .await
    }

    /// The sealed chunks of `batch`, one per block (a short answer is refused).
    pub(super) async fn fetch_batch(
        &self,
        vm: &str,
        point: &str,
        batch: &[(u64, ChunkId)],
    ) -> Result<Vec<Bytes>, ReplError> {
        let ids: Vec<ChunkId> = batch.iter().map(|(_, id)| *id).collect();
        let sealed = self.fetch_sealed(vm, point, &ids).await?;
        if sealed.len() != ids.len() {
            return Err(ReplError::Recoverable(format!(
                "the gateway answered {} of {} chunks",
                sealed.len(),
                ids.len()
            )));
        }
        Ok(sealed)
    }

    async fn fetch_sealed(
        &self,
        vm: &str,
        point: &str,
        ids: &[ChunkId],
    ) -> Result<Vec<Bytes>, ReplError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
        let mut tries = 0;
        loop {
            tries += 1;
            let err = match self.uploader().await {
                Ok(u) => match u.fetch(vm, point, ids).await {
                    Ok(sealed) => return Ok(sealed),
                    Err(e) if e.is_transient() => ReplError::Recoverable(format!("gateway: {e}")),
                    Err(e) => return Err(ReplError::Permanent(format!("gateway: {e}"))),
                },
                Err(e) => e,
            };
            if tries >= FETCH_TRIES || !err.recoverable() {
                return Err(err);
            }
            debug!(vm = %vm, point = %point, error = %err, "fetch failed; retrying");
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// The point's block map of one disk, ordered by block.
    pub(super) async fn block_map(
        &self,
        vm: &str,
        point: &str,
        disk_id: &str,
    ) -> Result<Vec<(u64, ChunkId)>, ReplError> {
        let ch = self
            .peers
            .channel(ferry_mesh::Component::StorageWriter)
            .map_err(|e| ReplError::Permanent(format!("storage-writer endpoint: {e}")))?;
        let what = format!("block map of disk {disk_id} of vm {vm} at point {point}");
        let mut stream = StorageWriterClient::new(ch)
            .block_hashes(BlockHashesRequest {
                vm: vm.to_owned(),
                point: point.to_owned(),
                disk_id: disk_id.to_owned(),
                omit_lost: false,
            })
            .await
            .map_err(|s| from_status(&what, s))?
            .into_inner();
        let mut map = Vec::new();
        while let Some(page) = stream.message().await.map_err(|s| from_status(&what, s))? {
            for b in page.blocks {
                let id: ChunkId = b.chunk.as_slice().try_into().map_err(|_| {
                    ReplError::Permanent(format!(
                        "{what}: block {} has a malformed chunk id",
                        b.index
                    ))
                })?;
                map.push((b.index, id));
            }
        }
        map.sort_unstable_by_key(|(i, _)| *i);
        map.dedup_by_key(|(i, _)| *i);
        Ok(map)
    }
}

/// A disk's block map at a point, as the fill files (instant recovery) and a standby copy's
/// map file keep it.
pub(super) fn fill_plan(
    vm: &str,
    point: &str,
    disk: &PointDisk,
    blocks: Vec<(u64, ChunkId)>,
) -> crate::tracker::fill_file::FillPlan {
    crate::tracker::fill_file::FillPlan {
        vm: vm.to_owned(),
        point: point.to_owned(),
        block_size: u64::from(disk.block_size),
        virtual_size: disk.virtual_size,
        blocks,
    }
}

/// Refuses a block map that does not fit its disk (or a disk without a block size).
pub(super) fn check_map(
    point: &str,
    disk: &PointDisk,
    map: &[(u64, ChunkId)],
) -> Result<(), ReplError> {
    let bs = u64::from(disk.block_size);
    if bs == 0
        || map
            .last()
            .is_some_and(|(i, _)| *i >= disk.virtual_size.div_ceil(bs))
    {
        return Err(ReplError::Permanent(format!(
            "disk {} of point {point}: its block map does not fit its size {} (block size {bs})",
            disk.disk_id, disk.virtual_size
        )));
    }
    Ok(())
}

/// The output's format: the source's own; a fixed source stays fixed, anything else (a
/// differencing chain is written flattened) becomes dynamic.
pub(super) fn output_format(disk: &PointDisk) -> Result<(Format, CreateOptions), ReplError> {
    let format: Format = disk.format.parse().map_err(|e| {
        ReplError::Permanent(format!(
            "disk {}: format {:?}: {e}",
            disk.disk_id, disk.format
        ))
    })?;
    let subformat = match disk.subformat.parse() {
        Ok(Subformat::Fixed) => Subformat::Fixed,
        _ => Subformat::Dynamic,
    };
    Ok((
        format,
        CreateOptions {
            virtual_size: disk.virtual_size,
            subformat,
            block_size: None,
        },
    ))
}

/// How much of a block lies inside the disk (the last block may be short).
fn block_len(index: u64, data: &[u8], bs: u64, vsize: u64) -> u64 {
    (data.len() as u64)
        .min(bs)
        .min(vsize.saturating_sub(index * bs))
}

fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplError> + Send + 'static,
) -> Result<T, ReplError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ReplError::Permanent(format!("disk task failed: {e}")))?
}
