//! A drill's read-back of a point (`VERIFY_POINT` work, restic's `check --read-data`): every
//! chunk of every disk's block map is fetched from the gateway and opened — decrypted,
//! decompressed and checked against its id, the vault's keyed hash of the block — and
//! nothing is written. A chunk that does not open fails the work naming the disk and the
//! block (up to [`MAX_NAMED`] of them; all are counted).
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::write::check_map;
use crate::{Agent, ReplError};

/// Chunks asked for in one FETCH, and FETCH streams in flight (as materialising does).
const BATCH: usize = 32;
const IN_FLIGHT: usize = 8;
/// Bad blocks a failure names (the rest are counted).
const MAX_NAMED: usize = 10;

impl Agent {
    /// Reads back every block of `point`; how many blocks were checked.
    pub(crate) async fn verify_point(
        &self,
        vm: &str,
        point: &str,
        cancel: &CancellationToken,
    ) -> Result<u64, ReplError> {
        let p = self.get_point(vm, point).await?;
        let mut checked = 0u64;
        let mut bad: Vec<String> = Vec::new();
        let mut bad_count = 0usize;
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
                bad_count += failed.len();
                for (index, why) in failed {
                    if bad.len() < MAX_NAMED {
                        bad.push(format!("disk {} block {index}: {why}", disk.path));
                    }
                }
            }
        }
        if bad_count > 0 {
            return Err(ReplError::Permanent(format!(
                "vm {vm} point {point}: {bad_count} of {checked} blocks failed the read-back: {}",
                bad.join("; ")
            )));
        }
        info!(
            vm,
            point,
            blocks = checked,
            "every block of the point read back and checked"
        );
        Ok(checked)
    }

    /// Fetches one batch and opens each chunk; the blocks checked and those that failed.
    async fn check_batch(
        &self,
        vm: &str,
        point: &str,
        batch: Vec<(u64, ferry_store::ChunkId)>,
    ) -> Result<(u64, Vec<(u64, String)>), ReplError> {
        let sealed = self.fetch_batch(vm, point, &batch).await?;
        let key = self.creds.vault_key.clone();
        tokio::task::spawn_blocking(move || {
            let failed: Vec<(u64, String)> = batch
                .iter()
                .zip(&sealed)
                .filter_map(|((index, id), s)| {
                    ferry_store::open_chunk(&key, id, s)
                        .err()
                        .map(|e| (*index, e.to_string()))
                })
                .collect();
            (batch.len() as u64, failed)
        })
        .await
        .map_err(|e| ReplError::Permanent(format!("checking chunks: {e}")))
    }
}
