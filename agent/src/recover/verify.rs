//! A drill's read-back of a point (`VERIFY_POINT` work, restic's `check --read-data`): every
//! chunk of every disk's block map is fetched from the gateway and opened — decrypted,
//! decompressed and checked against its id, the vault's keyed hash of the block — and
//! nothing is written. The answer is a report: the blocks checked, the chunks that did not
//! open and the first [`MAX_NAMED`] blocks naming them ("disk PATH block N: why"); the drill
//! decides what follows.
use ferry_proto::scheduler::v1::RecoveredVm;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::write::check_map;
use crate::{Agent, ReplError};

/// Chunks asked for in one FETCH, and FETCH streams in flight (as materialising does).
const BATCH: usize = 32;
const IN_FLIGHT: usize = 8;
/// Bad blocks a failure names (the rest are counted).
const MAX_NAMED: usize = 10;

impl Agent {
    /// Reads back every block of `point`.
    pub(crate) async fn verify_point(
        &self,
        vm: &str,
        point: &str,
        cancel: &CancellationToken,
    ) -> Result<RecoveredVm, ReplError> {
        let p = self.get_point(vm, point).await?;
        let mut checked = 0u64;
        let mut bad: Vec<String> = Vec::new();
        let mut bad_chunks: Vec<ferry_store::ChunkId> = Vec::new();
        let mut blocks_bad = 0u64;
        for disk in &p.disks {
            let map = self.block_map(vm, point, &disk.disk_id).await?;
            check_map(point, disk, &map)?;
            let batches: Vec<Vec<(u64, ferry_store::ChunkId)>> =
                map.chunks(BATCH).map(<[_]>::to_vec).collect();
            let mut results = futures::stream::iter(batches)
                .map(|batch| self.check_batch(vm, point, batch))
                .buffered(IN_FLIGHT);
            while let Some(r) = results.next().await {
                if cancel.is_cancelled() {
                    return Err(ReplError::Permanent(
                        "the verification was cancelled".into(),
                    ));
                }
                let (n, failed) = r?;
                checked += n;
                blocks_bad += failed.len() as u64;
                for (index, id, why) in failed {
                    if bad.len() < MAX_NAMED {
                        bad.push(format!("disk {} block {index}: {why}", disk.path));
                    }
                    if !bad_chunks.contains(&id) {
                        bad_chunks.push(id);
                    }
                }
            }
        }
        match bad.is_empty() {
            true => info!(
                vm,
                point,
                blocks = checked,
                "every block of the point read back and checked"
            ),
            false => warn!(
                vm,
                point,
                blocks = checked,
                bad = blocks_bad,
                "blocks of the point failed the read-back"
            ),
        }
        Ok(RecoveredVm {
            blocks_compared: checked,
            bad_chunks: bad_chunks.iter().map(|c| c.to_vec()).collect(),
            bad_blocks: bad,
            blocks_bad,
            ..Default::default()
        })
    }

    /// Fetches one batch and opens each chunk; the blocks checked and those that failed.
    async fn check_batch(
        &self,
        vm: &str,
        point: &str,
        batch: Vec<(u64, ferry_store::ChunkId)>,
    ) -> Result<(u64, Vec<(u64, ferry_store::ChunkId, String)>), ReplError> {
        let sealed = self.fetch_batch(vm, point, &batch).await?;
        let key = self.vault_key_for(&sealed).await;
        tokio::task::spawn_blocking(move || {
            let mut failed = Vec::new();
            for ((index, id), s) in batch.iter().zip(&sealed) {
                match ferry_store::open_chunk(&key, id, s) {
                    Ok(_) => {}
                    // A key this host could not fetch yet is no fault of the chunk: the drill
                    // is retried rather than reporting a good block bad.
                    Err(e @ ferry_store::StoreError::UnknownKey { .. }) => {
                        return Err(ReplError::Recoverable(format!("block {index}: {e}")));
                    }
                    Err(e) => failed.push((*index, *id, e.to_string())),
                }
            }
            Ok((batch.len() as u64, failed))
        })
        .await
        .map_err(|e| ReplError::Permanent(format!("checking chunks: {e}")))?
    }
}
