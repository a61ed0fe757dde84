//! Chunks found corrupt: moved from `chunks/` to `quarantine/` (kept as found until a good
//! copy is stored again), so the next upload of the block stores a good copy under the same
//! id and every point naming it reads again.
use std::collections::HashSet;

use crate::chunk::ChunkId;
use crate::error::StoreError;
use crate::layout::{QUARANTINE_PREFIX, chunk_key, parse_quarantine_key, quarantine_key};
use crate::store::Store;

impl Store {
    /// Moves the chunk to quarantine; false when it was not in `chunks/` (already moved).
    pub async fn quarantine_chunk(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let Some(bytes) = self.get(&chunk_key(id)).await? else {
            return Ok(false);
        };
        // A copy from an earlier quarantine of the same id stays as it was.
        self.put_if_absent(&quarantine_key(id), bytes).await?;
        self.delete(&chunk_key(id)).await?;
        Ok(true)
    }

    /// The quarantined chunks not stored again since (a block naming one has no readable
    /// data). A chunk stored again has its quarantine entry removed here.
    pub async fn lost_chunks(&self) -> Result<HashSet<ChunkId>, StoreError> {
        let mut lost = HashSet::new();
        for key in self.list(QUARANTINE_PREFIX).await? {
            let Some(id) = parse_quarantine_key(&key) else {
                continue;
            };
            if self.chunk_exists(&id).await? {
                self.delete(&key).await?;
            } else {
                lost.insert(id);
            }
        }
        Ok(lost)
    }
}
