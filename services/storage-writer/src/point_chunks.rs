//! The chunks of a recovery point: every chunk id the block maps of its disks reference, so
//! the QUIC gateway can serve a recovery host exactly those chunks and no others (the read
//! path of the data plane; see `gateway/PROTOCOL.md`, FETCH).
use std::collections::BTreeSet;

use ferry_proto::storage::v1::{BlockHashesRequest, PointChunksPage};
use ferry_store::ChunkId;

use crate::Writer;
use crate::error::Result;

/// Chunk ids per `PointChunksPage` (32 bytes each: ~128 KiB a message).
pub const POINT_CHUNKS_PAGE: usize = 4096;

impl Writer {
    /// Every distinct chunk id referenced by the block map of every disk of a point (by id or
    /// `"latest"`), ascending. The maps are the ones `BlockHashes` serves: a disk with shipped
    /// logs contributes its merged map (merged now if the merger has not got to it), so the
    /// set is what materialising the point reads, and no log chunk is in it.
    pub async fn point_chunks(&self, vm: &str, point: &str) -> Result<Vec<ChunkId>> {
        // Resolved once: "latest" must not move to a newer point between two disks.
        let p = self.resolve_point(vm, point).await?;
        let mut ids = BTreeSet::new();
        for disk in &p.disks {
            let req = BlockHashesRequest {
                vm: p.vm.clone(),
                point: p.id.clone(),
                disk_id: disk.disk_id.clone(),
                omit_lost: false,
            };
            ids.extend(self.block_map(&req).await?.entries.into_values());
        }
        Ok(ids.into_iter().collect())
    }
}

/// `ids` in messages of at most `page_len` ids, in order; none for no ids.
pub fn chunk_pages(ids: &[ChunkId], page_len: usize) -> Vec<PointChunksPage> {
    ids.chunks(page_len.max(1))
        .map(|page| PointChunksPage {
            chunk_ids: page.iter().map(|id| id.to_vec()).collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_split_in_order() {
        let ids: Vec<ChunkId> = (0..10u8).map(|i| [i; 32]).collect();
        let pages = chunk_pages(&ids, 4);
        assert_eq!(
            pages.iter().map(|p| p.chunk_ids.len()).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let flat: Vec<Vec<u8>> = pages.into_iter().flat_map(|p| p.chunk_ids).collect();
        assert_eq!(flat, ids.iter().map(|i| i.to_vec()).collect::<Vec<_>>());
        assert!(chunk_pages(&[], 4).is_empty());
    }
}
