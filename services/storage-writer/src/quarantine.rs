//! `QuarantineChunks`: chunks a drill's read-back could not open are checked again here with
//! the vault key and, only when they are indeed corrupt, moved to `quarantine/` — a caller
//! cannot make a good chunk disappear. The VM's next resync ships their blocks again.
use ferry_store::{ChunkId, StoreError};
use tracing::warn;

use crate::Writer;
use crate::error::{Result, WriterError};

/// Most chunks one call may name.
pub const MAX_QUARANTINE: usize = 4096;

impl Writer {
    /// Quarantines each corrupt chunk of `ids`; the ids quarantined (now or before) and
    /// those that read fine.
    pub async fn quarantine(
        &self,
        vm: &str,
        ids: &[ChunkId],
    ) -> Result<(Vec<ChunkId>, Vec<ChunkId>)> {
        if ids.len() > MAX_QUARANTINE {
            return Err(WriterError::InvalidArgument(format!(
                "{} chunks named; at most {MAX_QUARANTINE} per call",
                ids.len()
            )));
        }
        let (mut quarantined, mut healthy) = (Vec::new(), Vec::new());
        for id in ids {
            let sealed = match self.store.get_chunk(id).await {
                Ok(s) => s,
                Err(StoreError::NotFound { .. }) => {
                    quarantined.push(*id);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match ferry_store::open_chunk(&self.key(), id, &sealed) {
                Ok(_) => healthy.push(*id),
                // A key rotated after the last poll is no fault of the chunk: never quarantine
                // for it; the caller retries once the keys are read.
                Err(e @ StoreError::UnknownKey { .. }) => return Err(e.into()),
                Err(e) => {
                    self.store.quarantine_chunk(id).await?;
                    warn!(vm, chunk = %ferry_store::chunk_hex(id), error = %e, "corrupt chunk quarantined");
                    quarantined.push(*id);
                }
            }
        }
        Ok((quarantined, healthy))
    }
}
