//! Merged block maps: `merged/<vm>/<seq:020>.json`, one immutable object per recovery point,
//! written with put-if-absent after everything it references is stored.
//!
//! A point's manifest holds, per disk, the index pages of the last full block map plus the
//! shipped change logs not merged into it. A merger applies those logs to the map and records
//! the result here, beside the point (the point manifest itself never changes): per disk the
//! pages it started from, the logs it applied and the pages of the resulting full map. A
//! reader uses a merged disk only when it [applies](MergedDisk::merges) to the point's disk, so
//! a stale or foreign object is ignored rather than trusted.
//!
//! The object is written last: an interrupted merge leaves at most unreferenced chunks and
//! pages (collected by garbage collection), never a merged map a reader would use.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::layout::{check_segment, merged_key, merged_prefix, parse_merged_key};
use crate::{DiskManifest, PageRef, Store, StoreError};

/// One disk of a merged map.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MergedDisk {
    pub disk_id: String,
    pub block_size: u32,
    pub virtual_size: u64,
    /// The point disk's own pages, which the logs were applied to.
    pub base_pages: Vec<PageRef>,
    /// The point disk's logs, all applied, oldest first.
    pub logs: Vec<String>,
    /// The full block map as of the point (ascending by page).
    pub pages: Vec<PageRef>,
    pub stored_blocks: u64,
}

impl MergedDisk {
    /// True if this is the merged map of exactly `disk` (same block size and pages, the same
    /// logs all applied).
    pub fn merges(&self, disk: &DiskManifest) -> bool {
        self.is_prefix_of(disk) && self.logs.len() == disk.logs.len()
    }

    /// True if this map is `disk`'s pages with the first `self.logs.len()` of `disk`'s logs
    /// applied: a later point of the same base that only added logs. Its remaining logs are
    /// `disk.logs[self.logs.len()..]`.
    pub fn is_prefix_of(&self, disk: &DiskManifest) -> bool {
        self.disk_id == disk.disk_id
            && self.block_size == disk.block_size
            && self.base_pages == disk.pages
            && disk.logs.starts_with(&self.logs)
    }
}

/// The merged map of one recovery point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MergedManifest {
    pub vm: String,
    /// The point's seq and id.
    pub seq: u64,
    pub point_id: String,
    pub disks: Vec<MergedDisk>,
}

impl MergedManifest {
    pub fn disk(&self, disk_id: &str) -> Option<&MergedDisk> {
        self.disks.iter().find(|d| d.disk_id == disk_id)
    }
}

impl Store {
    /// Records a point's merged map (put-if-absent). When one is already stored (another
    /// merger got there first) the stored one is returned: merging is deterministic, so both
    /// describe the same maps.
    pub async fn put_merged(&self, m: &MergedManifest) -> Result<MergedManifest, StoreError> {
        check_segment("vm name", &m.vm)?;
        let key = merged_key(&m.vm, m.seq);
        let bytes = serde_json::to_vec_pretty(m).map_err(|source| StoreError::Encoding {
            what: format!("merged map {key}"),
            source,
        })?;
        if self.put_if_absent(&key, Bytes::from(bytes)).await? {
            info!(vm = %m.vm, seq = m.seq, disks = m.disks.len(), "merged map recorded");
            return Ok(m.clone());
        }
        debug!(vm = %m.vm, seq = m.seq, "merged map already recorded");
        self.get_merged(&m.vm, m.seq)
            .await?
            .ok_or_else(|| StoreError::Conflict {
                what: format!("merged map {key} was removed while being written"),
            })
    }

    /// The merged map of point `seq` of `vm`, if one is recorded.
    pub async fn get_merged(
        &self,
        vm: &str,
        seq: u64,
    ) -> Result<Option<MergedManifest>, StoreError> {
        check_segment("vm name", vm)?;
        let key = merged_key(vm, seq);
        let Some(bytes) = self.get(&key).await? else {
            return Ok(None);
        };
        let m: MergedManifest = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::corrupt(format!("merged map {key}"), e.to_string()))?;
        if m.vm != vm || m.seq != seq {
            return Err(StoreError::corrupt(
                format!("merged map {key}"),
                format!("it says vm {} seq {}", m.vm, m.seq),
            ));
        }
        Ok(Some(m))
    }

    /// Seqs of the points of `vm` that have a merged map recorded, ascending.
    pub async fn merged_seqs(&self, vm: &str) -> Result<Vec<u64>, StoreError> {
        check_segment("vm name", vm)?;
        let mut seqs: Vec<u64> = self
            .list(&merged_prefix(vm))
            .await?
            .iter()
            .filter_map(|k| parse_merged_key(k).map(|(_, seq)| seq))
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// The newest merged map of `vm` for a point at or before `seq`, if any.
    pub async fn newest_merged(
        &self,
        vm: &str,
        seq: u64,
    ) -> Result<Option<MergedManifest>, StoreError> {
        let seqs = self.merged_seqs(vm).await?;
        match seqs.iter().rev().find(|&&s| s <= seq) {
            Some(&s) => self.get_merged(vm, s).await,
            None => Ok(None),
        }
    }

    /// Removes the merged map of point `seq` (missing is not an error).
    pub async fn delete_merged(&self, vm: &str, seq: u64) -> Result<(), StoreError> {
        check_segment("vm name", vm)?;
        self.delete(&merged_key(vm, seq)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(pages: &[&str], logs: &[&str]) -> DiskManifest {
        DiskManifest {
            disk_id: "d1".into(),
            path: String::new(),
            format: "raw".into(),
            subformat: String::new(),
            virtual_size: 1 << 20,
            logical_sector_size: 512,
            block_size: 65536,
            pages: pages
                .iter()
                .enumerate()
                .map(|(i, k)| PageRef {
                    page: i as u64,
                    key: (*k).into(),
                })
                .collect(),
            stored_blocks: 0,
            logs: logs.iter().map(|l| (*l).into()).collect(),
            fencing_token: 1,
        }
    }

    fn merged(base: &DiskManifest, logs: usize) -> MergedDisk {
        MergedDisk {
            disk_id: base.disk_id.clone(),
            block_size: base.block_size,
            virtual_size: base.virtual_size,
            base_pages: base.pages.clone(),
            logs: base.logs[..logs].to_vec(),
            pages: vec![],
            stored_blocks: 0,
        }
    }

    fn seq_of(key: &str) -> Option<u64> {
        parse_merged_key(key).map(|(_, seq)| seq)
    }

    #[test]
    fn applicability() {
        let d = disk(&["index/aa/1"], &["logs/d1/a.json", "logs/d1/b.json"]);
        assert!(merged(&d, 2).merges(&d));
        assert!(merged(&d, 1).is_prefix_of(&d));
        assert!(!merged(&d, 1).merges(&d));
        let other_base = disk(&["index/bb/2"], &["logs/d1/a.json", "logs/d1/b.json"]);
        assert!(!merged(&d, 2).is_prefix_of(&other_base));
        let other_logs = disk(&["index/aa/1"], &["logs/d1/x.json"]);
        assert!(!merged(&d, 1).is_prefix_of(&other_logs));
        let mut bs = merged(&d, 2);
        bs.block_size *= 2;
        assert!(!bs.merges(&d));
    }

    #[test]
    fn seq_parsing() {
        assert_eq!(seq_of("merged/vm/00000000000000000042.json"), Some(42));
        assert_eq!(seq_of("merged/vm/42.json"), None);
    }

    #[tokio::test]
    async fn put_get_list_delete() {
        let store = Store::from_url("memory://").unwrap();
        let d = disk(&["index/aa/1"], &["logs/d1/a.json"]);
        let m = MergedManifest {
            vm: "web".into(),
            seq: 3,
            point_id: "00000000000000000003".into(),
            disks: vec![merged(&d, 1)],
        };
        assert_eq!(store.get_merged("web", 3).await.unwrap(), None);
        assert_eq!(store.put_merged(&m).await.unwrap(), m);
        // A second writer gets the stored one back.
        assert_eq!(store.put_merged(&m).await.unwrap(), m);
        assert_eq!(store.get_merged("web", 3).await.unwrap().as_ref(), Some(&m));
        assert_eq!(store.merged_seqs("web").await.unwrap(), [3]);
        assert_eq!(
            store.newest_merged("web", 5).await.unwrap().as_ref(),
            Some(&m)
        );
        assert_eq!(store.newest_merged("web", 2).await.unwrap(), None);
        // An object under the wrong key is corrupt, not trusted.
        store
            .put_if_absent(
                &merged_key("web", 4),
                serde_json::to_vec(&m).unwrap().into(),
            )
            .await
            .unwrap();
        assert!(matches!(
            store.get_merged("web", 4).await,
            Err(StoreError::Corrupt { .. })
        ));
        store.delete_merged("web", 3).await.unwrap();
        store.delete_merged("web", 3).await.unwrap();
        assert_eq!(store.get_merged("web", 3).await.unwrap(), None);
        assert!(store.get_merged("../x", 1).await.is_err());
    }

    #[tokio::test]
    async fn delete_points_removes_manifests_and_merged_maps_of_one_vm() {
        let store = Store::from_url("memory://").unwrap();
        for (vm, seq) in [("web", 1), ("web", 2), ("db", 1)] {
            let key = crate::layout::point_key(vm, seq);
            store.put_if_absent(&key, "{}".into()).await.unwrap();
        }
        let d = disk(&["index/aa/1"], &[]);
        for seq in [2, 7] {
            let m = MergedManifest {
                vm: "web".into(),
                seq,
                point_id: format!("{seq:020}"),
                disks: vec![merged(&d, 0)],
            };
            store.put_merged(&m).await.unwrap();
        }
        assert_eq!(store.delete_points("web").await.unwrap(), 2);
        assert!(
            store
                .list(&crate::layout::point_prefix("web"))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(store.merged_seqs("web").await.unwrap().is_empty());
        assert_eq!(
            store
                .list(&crate::layout::point_prefix("db"))
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(store.delete_points("web").await.unwrap(), 0);
        assert!(store.delete_points("..").await.is_err());
    }
}
