//! Scrub: walks every recovery point and merged map and checks that each object they
//! reference is there and sound (index pages by hash, shipped logs by existence, chunks by
//! existence or, given the vault key, by opening them). What a store fault must never break.
use std::collections::{BTreeSet, HashSet};

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::layout::{POINTS_PREFIX, vm_of_point_key};
use crate::{ChunkId, PageRef, Store, StoreError, VaultKey, chunk_hex, open_chunk};

const PARALLEL: usize = 16;

/// What a scrub found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScrubReport {
    pub vms: usize,
    pub points: usize,
    pub merged_maps: usize,
    pub pages: usize,
    pub logs: usize,
    /// Distinct chunks checked.
    pub chunks: usize,
    /// One line per problem, naming the point and the object.
    pub problems: Vec<String>,
}

impl ScrubReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Store {
    /// Checks every point and merged map of every VM. Problems with the data go into the
    /// report; only failures to read the store at all are errors.
    pub async fn scrub(&self, key: Option<&VaultKey>) -> Result<ScrubReport, StoreError> {
        let mut report = ScrubReport::default();
        let vms: BTreeSet<String> = self
            .list(POINTS_PREFIX)
            .await?
            .iter()
            .filter_map(|k| vm_of_point_key(k).map(str::to_owned))
            .collect();
        report.vms = vms.len();
        let mut chunks = HashSet::new();
        let mut seen_pages = HashSet::new();
        for vm in &vms {
            self.scrub_vm(vm, &mut report, &mut chunks, &mut seen_pages)
                .await?;
        }
        report.chunks = chunks.len();
        let missing = self.check_chunks(chunks, key).await?;
        report.problems.extend(missing);
        Ok(report)
    }

    async fn scrub_vm(
        &self,
        vm: &str,
        report: &mut ScrubReport,
        chunks: &mut HashSet<ChunkId>,
        seen_pages: &mut HashSet<String>,
    ) -> Result<(), StoreError> {
        for point in self.list_points(vm).await? {
            report.points += 1;
            for disk in &point.disks {
                let at = format!("vm {vm} point {} disk {}", point.seq, disk.disk_id);
                self.scrub_pages(&at, &disk.pages, report, chunks, seen_pages)
                    .await?;
                for log in &disk.logs {
                    report.logs += 1;
                    if self.get(log).await?.is_none() {
                        report.problems.push(format!("{at}: log {log} is missing"));
                    }
                }
            }
        }
        for seq in self.merged_seqs(vm).await? {
            let Some(m) = self.get_merged(vm, seq).await? else {
                continue; // pruned since the listing
            };
            report.merged_maps += 1;
            for disk in &m.disks {
                let at = format!("vm {vm} merged map {seq} disk {}", disk.disk_id);
                self.scrub_pages(&at, &disk.pages, report, chunks, seen_pages)
                    .await?;
            }
        }
        Ok(())
    }

    /// Reads the pages (each distinct page once) and collects the chunks they name.
    async fn scrub_pages(
        &self,
        at: &str,
        pages: &[PageRef],
        report: &mut ScrubReport,
        chunks: &mut HashSet<ChunkId>,
        seen_pages: &mut HashSet<String>,
    ) -> Result<(), StoreError> {
        let fresh: Vec<PageRef> = pages
            .iter()
            .filter(|p| seen_pages.insert(p.key.clone()))
            .cloned()
            .collect();
        report.pages += fresh.len();
        match self.read_block_map(&fresh).await {
            Ok(map) => chunks.extend(map.entries.into_values()),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => report.problems.push(format!("{at}: {e}")),
        }
        Ok(())
    }

    /// Each chunk is there (a `HEAD`), or with the key, opens and authenticates.
    async fn check_chunks(
        &self,
        chunks: HashSet<ChunkId>,
        key: Option<&VaultKey>,
    ) -> Result<Vec<String>, StoreError> {
        futures::stream::iter(chunks.into_iter().map(|id| async move {
            let problem = match key {
                None => (!self.chunk_exists(&id).await?).then(|| "is missing".to_string()),
                Some(key) => match self.get_chunk(&id).await {
                    Ok(sealed) => open_chunk(key, &id, &sealed).err().map(|e| e.to_string()),
                    Err(StoreError::NotFound { .. }) => Some("is missing".to_string()),
                    Err(e) => return Err(e),
                },
            };
            Ok(problem.map(|p| format!("chunk {} {p}", chunk_hex(&id))))
        }))
        .buffer_unordered(PARALLEL)
        .try_filter_map(|p| std::future::ready(Ok(p)))
        .try_collect()
        .await
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{DiskManifest, PointManifest, chunk_id, seal_chunk};
    use ferry_model::{Consistency, CycleKind};

    fn point(vm: &str, seq: u64, pages: Vec<PageRef>, logs: Vec<String>) -> PointManifest {
        PointManifest {
            id: String::new(),
            vm: vm.into(),
            seq,
            time_ms: 1,
            kind: CycleKind::Initial,
            consistency: Consistency::Crash,
            cycle_id: format!("c{seq}"),
            disks: vec![DiskManifest {
                disk_id: "d1".into(),
                path: "/d1.raw".into(),
                format: "raw".into(),
                subformat: String::new(),
                virtual_size: 1 << 20,
                logical_sector_size: 512,
                block_size: 65536,
                pages,
                stored_blocks: 2,
                logs,
                fencing_token: 1,
            }],
            host: "hv01".into(),
            cut_id: String::new(),
        }
    }

    #[tokio::test]
    async fn finds_missing_chunks_pages_and_logs() {
        let store = Store::from_url_without_faults("memory://").unwrap();
        let key = VaultKey::generate();
        let mut map = crate::BlockMap::default();
        for (block, byte) in [(0u64, 1u8), (3, 2)] {
            let data = vec![byte; 65536];
            let id = chunk_id(&key, &data);
            store
                .put_chunk(&id, Bytes::from(seal_chunk(&key, &id, &data)))
                .await
                .unwrap();
            map.entries.insert(block, id);
        }
        let pages = store.write_block_map(&map, &[]).await.unwrap();
        store
            .commit_point(point("vm1", 1, pages.clone(), vec![]))
            .await
            .unwrap();
        let clean = store.scrub(Some(&key)).await.unwrap();
        assert!(clean.is_clean(), "{clean:?}");
        assert_eq!((clean.points, clean.pages, clean.chunks), (1, 1, 2));

        // A point naming a log that is gone, and a chunk deleted under the first point.
        let mut p2 = point("vm1", 2, pages, vec!["logs/d1/00aa.json".into()]);
        p2.cycle_id = "c2".into();
        store.commit_point(p2).await.unwrap();
        let gone = *map.entries.values().next().unwrap();
        store.delete(&crate::chunk_key(&gone)).await.unwrap();
        let r = store.scrub(None).await.unwrap();
        assert_eq!(r.problems.len(), 2, "{r:?}");
        assert!(r.problems.iter().any(|p| p.contains("logs/d1/00aa.json")));
        assert!(r.problems.iter().any(|p| p.contains(&chunk_hex(&gone))));
    }
}
