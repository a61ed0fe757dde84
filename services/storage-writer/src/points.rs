//! Reading recovery points: list, get, chunk presence and block-hash lists, plus the
//! conversions between store manifests and the API's types.
use std::collections::HashSet;

use ferry_proto::common::v1::{PointDisk, RecoveryPoint};
use ferry_proto::storage::v1::{BlockEntry, BlockHashesChunk, BlockHashesRequest};
use ferry_store::{
    BlockMap, ChunkId, DiskManifest, PageRef, PointManifest, Store, StoreError, chunk_hex,
};
use futures::{StreamExt, TryStreamExt};

use crate::Writer;
use crate::error::{Result, WriterError};

/// How many chunk `HEAD`s run at once.
pub(crate) const HEAD_PARALLEL: usize = 16;
/// Entries per `BlockHashesChunk` message (40 bytes each on the wire: ~160 KiB a message).
pub const HASH_PAGE_ENTRIES: usize = 4096;
/// The most chunk ids one `HasChunks` call may ask about.
pub const MAX_HAS_CHUNKS: usize = 100_000;

/// The API view of a stored point.
pub fn point_to_proto(m: &PointManifest) -> RecoveryPoint {
    RecoveryPoint {
        id: m.id.clone(),
        vm: m.vm.clone(),
        time_ms: m.time_ms,
        consistency: m.consistency.into(),
        kind: m.kind.into(),
        seq: m.seq,
        disks: m.disks.iter().map(disk_to_proto).collect(),
        host: m.host.clone(),
        cut_id: m.cut_id.clone(),
    }
}

fn disk_to_proto(d: &DiskManifest) -> PointDisk {
    PointDisk {
        disk_id: d.disk_id.clone(),
        path: d.path.clone(),
        format: d.format.clone(),
        subformat: d.subformat.clone(),
        virtual_size: d.virtual_size,
        block_size: d.block_size,
        stored_blocks: d.stored_blocks,
        pending_logs: u32::try_from(d.logs.len()).unwrap_or(u32::MAX),
    }
}

/// `Store::read_block_map`, driven on a blocking-pool thread. The store's block-map futures
/// hold stream closures over borrowed pages that rustc cannot prove `Send` (rust-lang/rust#102211),
/// so they cannot be awaited inside a tonic handler; created and driven on their own thread
/// they need not be `Send`.
pub(crate) async fn read_map(store: &Store, pages: &[PageRef]) -> Result<BlockMap> {
    let (store, pages) = (store.clone(), pages.to_vec());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(store.read_block_map(&pages)))
        .await
        .map_err(|e| WriterError::Internal(format!("block map read task failed: {e}")))?
        .map_err(WriterError::from)
}

/// `Store::write_block_map`, driven like [`read_map`].
pub(crate) async fn write_map(
    store: &Store,
    map: BlockMap,
    previous: &[PageRef],
) -> Result<(BlockMap, Vec<PageRef>)> {
    let (store, previous) = (store.clone(), previous.to_vec());
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let pages = handle.block_on(store.write_block_map(&map, &previous));
        pages.map(|p| (map, p))
    })
    .await
    .map_err(|e| WriterError::Internal(format!("block map write task failed: {e}")))?
    .map_err(WriterError::from)
}

/// A 32-byte chunk id from the wire.
pub(crate) fn chunk_from_bytes(what: &str, bytes: &[u8]) -> Result<ChunkId> {
    ChunkId::try_from(bytes).map_err(|_| {
        WriterError::InvalidArgument(format!(
            "{what}: a chunk id is 32 bytes, got {}",
            bytes.len()
        ))
    })
}

/// Checks a VM name before it reaches the store (which also refuses bad path segments).
pub(crate) fn check_vm(vm: &str) -> Result<()> {
    if vm.is_empty() {
        return Err(WriterError::InvalidArgument("vm is required".into()));
    }
    Ok(())
}

/// The block-hash list of a map, in messages of at most `page_len` entries (ascending index).
pub fn hash_pages(map: &BlockMap, page_len: usize) -> Vec<BlockHashesChunk> {
    let entries: Vec<BlockEntry> = map
        .entries
        .iter()
        .map(|(&index, id)| BlockEntry {
            index,
            chunk: id.to_vec(),
        })
        .collect();
    let mut out = Vec::with_capacity(entries.len().div_ceil(page_len.max(1)));
    let mut rest = entries.into_iter().peekable();
    while rest.peek().is_some() {
        out.push(BlockHashesChunk {
            blocks: rest.by_ref().take(page_len.max(1)).collect(),
        });
    }
    out
}

impl Writer {
    /// Deletes every recovery point of `vm` (disable protection with `--delete-points`): the
    /// manifests and merged maps through the store; the chunks only they referenced go with
    /// the next garbage collection.
    pub async fn delete_points(&self, vm: &str) -> Result<u32> {
        check_vm(vm)?;
        Ok(self.store.delete_points(vm).await?)
    }
}

impl Writer {
    /// All points of a VM, oldest first (none is not an error).
    pub async fn list_points(&self, vm: &str) -> Result<Vec<RecoveryPoint>> {
        check_vm(vm)?;
        let points = self.store.list_points(vm).await?;
        Ok(points.iter().map(point_to_proto).collect())
    }

    /// A point by id or `"latest"` (an empty point means latest).
    pub async fn get_point(&self, vm: &str, point: &str) -> Result<RecoveryPoint> {
        Ok(point_to_proto(&self.resolve_point(vm, point).await?))
    }

    pub(crate) async fn resolve_point(&self, vm: &str, point: &str) -> Result<PointManifest> {
        check_vm(vm)?;
        let point = if point.is_empty() { "latest" } else { point };
        match self.store.get_point(vm, point).await {
            Ok(p) => Ok(p),
            Err(StoreError::NotFound { .. }) => Err(WriterError::NotFound(format!(
                "recovery point {point:?} of vm {vm}"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// A point and one of its disks.
    pub(crate) async fn resolve_disk(
        &self,
        vm: &str,
        point: &str,
        disk_id: &str,
    ) -> Result<(PointManifest, DiskManifest)> {
        if disk_id.is_empty() {
            return Err(WriterError::InvalidArgument("disk_id is required".into()));
        }
        let p = self.resolve_point(vm, point).await?;
        let Some(d) = p.disks.iter().find(|d| d.disk_id == disk_id).cloned() else {
            return Err(WriterError::NotFound(format!(
                "disk {disk_id} in recovery point {} of vm {vm}",
                p.id
            )));
        };
        Ok((p, d))
    }

    /// Which of `chunks` are stored, in request order (concurrent, bounded `HEAD`s).
    pub async fn has_chunks(&self, chunks: &[Vec<u8>]) -> Result<Vec<bool>> {
        if chunks.len() > MAX_HAS_CHUNKS {
            return Err(WriterError::InvalidArgument(format!(
                "{} chunk ids in one call (at most {MAX_HAS_CHUNKS})",
                chunks.len()
            )));
        }
        let ids = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| chunk_from_bytes(&format!("chunk {i}"), c))
            .collect::<Result<Vec<_>>>()?;
        let present = futures::stream::iter(ids.into_iter().map(|id| {
            let store = self.store.clone();
            async move { store.chunk_exists(&id).await }
        }))
        .buffered(HEAD_PARALLEL)
        .try_collect()
        .await?;
        Ok(present)
    }

    /// The full block map of a point's disk as of that point (its block-hash list: chunk ids
    /// are keyed BLAKE3 hashes of the plaintext blocks, the same the agent computes for
    /// resync). A disk with shipped logs is served from the point's merged map, merged now
    /// when the background merger has not got to it yet.
    pub async fn block_map(&self, req: &BlockHashesRequest) -> Result<BlockMap> {
        let (point, disk) = self.resolve_disk(&req.vm, &req.point, &req.disk_id).await?;
        if disk.logs.is_empty() {
            return read_map(&self.store, &disk.pages).await;
        }
        let merged = match self.merged_of(&point).await {
            Some(m) => m,
            None => {
                let _no_sweep = self.sweep_lock.read().await;
                self.merge_locked(&point, &tokio_util::sync::CancellationToken::new())
                    .await?
            }
        };
        match merged.disk(&disk.disk_id).filter(|m| m.merges(&disk)) {
            Some(m) => read_map(&self.store, &m.pages).await,
            None => Err(WriterError::Corrupt(format!(
                "merged map of point {} of vm {} does not match disk {}",
                point.id, point.vm, disk.disk_id
            ))),
        }
    }

    /// The first of `chunks` (with the disk and block naming them) that the store lacks.
    /// Each distinct chunk is checked once, with bounded concurrency.
    pub(crate) async fn first_missing(
        &self,
        chunks: &[(String, u64, ChunkId)],
    ) -> Result<Option<(String, u64, String)>> {
        let mut seen = HashSet::with_capacity(chunks.len());
        let unique: Vec<(usize, ChunkId)> = chunks
            .iter()
            .enumerate()
            .filter(|(_, (_, _, id))| seen.insert(*id))
            .map(|(i, (_, _, id))| (i, *id))
            .collect();
        let mut checks = futures::stream::iter(unique.into_iter().map(|(i, id)| {
            let store = self.store.clone();
            async move { store.chunk_exists(&id).await.map(|ok| (ok, i)) }
        }))
        .buffer_unordered(HEAD_PARALLEL);
        while let Some(res) = checks.next().await {
            let (present, i) = res?;
            if !present {
                let (disk, index, id) = &chunks[i];
                return Ok(Some((disk.clone(), *index, chunk_hex(id))));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_pages_split_in_order() {
        let mut map = BlockMap::default();
        for i in 0..10u64 {
            map.entries.insert(i * 3, [i as u8; 32]);
        }
        let pages = hash_pages(&map, 4);
        assert_eq!(
            pages.iter().map(|p| p.blocks.len()).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let indices: Vec<u64> = pages
            .iter()
            .flat_map(|p| p.blocks.iter().map(|b| b.index))
            .collect();
        assert_eq!(indices, (0..10).map(|i| i * 3).collect::<Vec<_>>());
        assert!(hash_pages(&BlockMap::default(), 4).is_empty());
    }
}
