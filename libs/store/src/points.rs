//! Recovery point manifests: `points/<vm>/<seq:020>.json`, one immutable object per point,
//! written with put-if-absent at exactly `latest + 1`.

use bytes::Bytes;
use ferry_model::{Consistency, CycleKind};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::layout::{check_segment, parse_point_key, point_key, point_prefix};
use crate::{PageRef, Store, StoreError};

const PARALLEL: usize = 8;

/// One disk of a recovery point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskManifest {
    pub disk_id: String,
    pub path: String,
    pub format: String,
    pub subformat: String,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub block_size: u32,
    /// The block map's index pages (ascending by page).
    pub pages: Vec<PageRef>,
    pub stored_blocks: u64,
    /// Keys of shipped logs not merged into `pages` yet, oldest first.
    #[serde(default)]
    pub logs: Vec<String>,
    /// The lease token the writer held for this disk; never decreases from point to point.
    #[serde(default)]
    pub fencing_token: u64,
}

/// A recovery point of one VM.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PointManifest {
    /// Set to `<seq:020>` by [`Store::commit_point`] when empty.
    pub id: String,
    pub vm: String,
    pub seq: u64,
    pub time_ms: i64,
    /// Stored as "initial", "delta" or "resync", and "crash" or "app".
    pub kind: CycleKind,
    pub consistency: Consistency,
    pub cycle_id: String,
    pub disks: Vec<DiskManifest>,
    /// The host whose cycle committed the point (`ferry points verify` checks it against the
    /// VM's host at the time); empty in points committed before it was recorded.
    #[serde(default)]
    pub host: String,
    /// The group cut the point belongs to: its VM's replication group paused at one instant
    /// across hosts for it ("" = cut alone; absent in points from before group cuts).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cut_id: String,
}

impl Store {
    /// Commits a recovery point. `m.seq` must be the latest point's seq + 1 (1 for the first)
    /// or this fails with [`StoreError::Conflict`]; a disk whose fencing token is lower than
    /// the same disk's token in the latest point fails with [`StoreError::Fenced`]. Retrying a
    /// commit whose first attempt actually landed (an ambiguous failure) returns `Ok`, and so
    /// does committing again what the latest point already holds (same non-empty `cycle_id`,
    /// kind, consistency and disks; seq, id and time may differ): then the existing point is
    /// returned and nothing is written.
    pub async fn commit_point(&self, mut m: PointManifest) -> Result<PointManifest, StoreError> {
        check_segment("vm name", &m.vm)?;
        if m.seq == 0 {
            return Err(StoreError::invalid(
                "point seq",
                "sequence numbers start at 1",
            ));
        }
        if m.id.is_empty() {
            m.id = format!("{:020}", m.seq);
        }
        let key = point_key(&m.vm, m.seq);
        let bytes = serde_json::to_vec_pretty(&m).map_err(|source| StoreError::Encoding {
            what: format!("point {key}"),
            source,
        })?;
        let latest = self.latest_point(&m.vm).await?;
        let latest_seq = latest.as_ref().map_or(0, |p| p.seq);
        if latest_seq == m.seq && self.same_bytes(&key, &bytes).await? {
            debug!(vm = %m.vm, seq = m.seq, "point already committed");
            return Ok(m);
        }
        if let Some(latest) = latest.as_ref().filter(|l| is_recommit(&m, l)) {
            debug!(vm = %m.vm, seq = latest.seq, cycle = %m.cycle_id, "cycle already committed");
            return Ok(latest.clone());
        }
        if m.seq != latest_seq + 1 {
            return Err(StoreError::Conflict {
                what: format!(
                    "point seq {} for vm {} but the latest is {latest_seq}",
                    m.seq, m.vm
                ),
            });
        }
        if let Some(latest) = &latest {
            check_fencing(&m, latest)?;
        }
        if self.put_if_absent(&key, Bytes::from(bytes.clone())).await? {
            info!(vm = %m.vm, seq = m.seq, disks = m.disks.len(), kind = %m.kind, "recovery point committed");
            return Ok(m);
        }
        if self.same_bytes(&key, &bytes).await? {
            return Ok(m);
        }
        Err(StoreError::Conflict {
            what: format!("point {} of vm {} was committed concurrently", m.seq, m.vm),
        })
    }

    async fn same_bytes(&self, key: &str, bytes: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(key).await?.is_some_and(|b| b == bytes))
    }

    /// All points of a VM, oldest first. A point pruned between the listing and its read
    /// (retention thins points in the middle at any time) is left out.
    pub async fn list_points(&self, vm: &str) -> Result<Vec<PointManifest>, StoreError> {
        let seqs = self.point_seqs(vm).await?;
        futures::stream::iter(seqs.into_iter().map(|s| async move {
            match self.read_point(vm, s).await {
                Ok(p) => Ok(Some(p)),
                Err(StoreError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        }))
        .buffered(PARALLEL)
        .try_filter_map(|p| std::future::ready(Ok(p)))
        .try_collect()
        .await
    }

    /// The newest point of a VM, if any.
    pub async fn latest_point(&self, vm: &str) -> Result<Option<PointManifest>, StoreError> {
        match self.point_seqs(vm).await?.last() {
            Some(&s) => Ok(Some(self.read_point(vm, s).await?)),
            None => Ok(None),
        }
    }

    /// A point by id, by seq (decimal), or `"latest"`.
    pub async fn get_point(
        &self,
        vm: &str,
        id_or_latest: &str,
    ) -> Result<PointManifest, StoreError> {
        let not_found = || StoreError::NotFound {
            what: format!("recovery point {id_or_latest:?} of vm {vm}"),
        };
        if id_or_latest == "latest" {
            return self.latest_point(vm).await?.ok_or_else(not_found);
        }
        let seqs = self.point_seqs(vm).await?;
        if let Ok(seq) = id_or_latest.parse::<u64>()
            && seqs.binary_search(&seq).is_ok()
        {
            let p = self.read_point(vm, seq).await?;
            if p.id == id_or_latest || p.seq == seq {
                return Ok(p);
            }
        }
        // Caller-chosen ids (uuids): scan newest first.
        for &seq in seqs.iter().rev() {
            let p = self.read_point(vm, seq).await?;
            if p.id == id_or_latest {
                return Ok(p);
            }
        }
        Err(not_found())
    }

    async fn point_seqs(&self, vm: &str) -> Result<Vec<u64>, StoreError> {
        check_segment("vm name", vm)?;
        let mut seqs: Vec<u64> = self
            .list(&point_prefix(vm))
            .await?
            .iter()
            .filter_map(|k| parse_point_key(k).map(|(_, seq)| seq))
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    async fn read_point(&self, vm: &str, seq: u64) -> Result<PointManifest, StoreError> {
        let key = point_key(vm, seq);
        let bytes = self.get(&key).await?.ok_or_else(|| StoreError::NotFound {
            what: format!("recovery point {seq} of vm {vm}"),
        })?;
        let p: PointManifest = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::corrupt(format!("point {key}"), e.to_string()))?;
        if p.vm != vm || p.seq != seq {
            return Err(StoreError::corrupt(
                format!("point {key}"),
                format!("manifest says vm {} seq {}", p.vm, p.seq),
            ));
        }
        Ok(p)
    }
}

impl Store {
    /// Deletes every recovery point manifest of `vm` and the merged maps (those of points
    /// pruned earlier too); returns how many points it deleted. Chunks and index pages stay
    /// for the garbage collection, which finds them unreferenced.
    pub async fn delete_points(&self, vm: &str) -> Result<u32, StoreError> {
        check_segment("vm name", vm)?;
        let mut deleted = 0u32;
        for seq in self.point_seqs(vm).await? {
            self.delete(&point_key(vm, seq)).await?;
            self.delete_merged(vm, seq).await?;
            deleted += 1;
        }
        for seq in self.merged_seqs(vm).await? {
            self.delete_merged(vm, seq).await?;
        }
        info!(vm, deleted, "recovery points deleted");
        Ok(deleted)
    }
}

/// True if `m` is `latest` again: the same cycle with the same content, whatever its seq,
/// id and time (a retry built after the first attempt landed).
fn is_recommit(m: &PointManifest, latest: &PointManifest) -> bool {
    !m.cycle_id.is_empty()
        && m.cycle_id == latest.cycle_id
        && m.kind == latest.kind
        && m.consistency == latest.consistency
        && m.disks == latest.disks
}

fn check_fencing(m: &PointManifest, latest: &PointManifest) -> Result<(), StoreError> {
    for d in &m.disks {
        if let Some(prev) = latest.disks.iter().find(|p| p.disk_id == d.disk_id)
            && d.fencing_token < prev.fencing_token
        {
            return Err(StoreError::Fenced {
                disk_id: d.disk_id.clone(),
                presented: d.fencing_token,
                latest: prev.fencing_token,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq_of(key: &str) -> Option<u64> {
        parse_point_key(key).map(|(_, seq)| seq)
    }

    #[test]
    fn seq_parsing() {
        assert_eq!(seq_of("points/vm/00000000000000000042.json"), Some(42));
        assert_eq!(seq_of("points/vm/42.json"), None);
        assert_eq!(seq_of("points/vm/0000000000000000004x.json"), None);
        assert_eq!(seq_of("points/vm/99999999999999999999.json"), None);
    }
}
