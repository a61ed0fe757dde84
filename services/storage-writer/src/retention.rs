//! Retention and garbage collection.
//!
//! Pruning deletes the manifests of a VM's points older than its retention window; the newest
//! point always stays, and so does every point a failover or restore is reading. A reader
//! announces itself with a marker object `readers/<vm>/<point>/<uuid>` *before* it reads the
//! manifest and removes it when done (markers older than [`READER_STALE`] are from crashed
//! readers and are ignored).
//!
//! Collection then marks everything the remaining points of every VM reference (index pages,
//! their chunks, shipped-log descriptors and their chunks) and everything their merged maps
//! (`merged/<vm>/<seq>.json`) reference; a pruned point's merged map is deleted with it (and
//! by collection, if a merge recorded it after the prune). An unmarked object is deleted only
//! when it is older than a grace period (uploads of cycles in flight land before their point)
//! *and* it was already unmarked in the previous run (`gc/condemned.json`): a cycle that
//! deduplicated against an old unreferenced chunk (the gateway said "stored", so it was not
//! sent again) has until the next run to commit its point, which marks the chunk live again.
//! Commits hold the writer's sweep lock shared and collection holds it exclusively from mark to
//! sweep, so a chunk a commit verified is never swept before that commit's manifest lands
//! (one storage-writer; replicas will need the same lock in Redis). Readers are checked
//! again after the manifests are gone and before anything is swept: a reader that started in
//! between holds the point it read, so the sweep waits for a later run.
use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use ferry_store::object_store::ObjectStore;
use ferry_store::object_store::path::Path as ObjPath;
use ferry_store::{PointManifest, chunk_key};
use futures::TryStreamExt;
use tracing::{info, warn};

use crate::Writer;
use crate::error::{Result, WriterError};
use crate::logs::get_descriptor;
use crate::points::read_map;

/// Objects found unreferenced by the last collection: deleted by the next one if still so.
const CONDEMNED: &str = "gc/condemned.json";

/// A reader marker older than this belongs to a reader that died.
pub const READER_STALE: Duration = Duration::from_secs(6 * 3600);
/// Default age below which an unreferenced object is never collected.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

/// What a retention run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub points_pruned: u32,
    pub objects_collected: u64,
    /// The sweep was skipped because a reader appeared while pruning.
    pub sweep_deferred: bool,
}

/// Marks a point as being read until dropped (best effort; see the module doc).
pub struct ReaderGuard {
    store: ferry_store::Store,
    key: String,
}

impl ReaderGuard {
    pub fn release(self) {}
}

/// Dropping the guard (also when a request future is dropped because its client went away)
/// removes the marker.
impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            warn!(key = %self.key, "no runtime to remove a reader marker; it expires");
            return;
        };
        let store = self.store.clone();
        let key = std::mem::take(&mut self.key);
        rt.spawn(async move {
            if let Err(e) = store.delete(&key).await {
                warn!(key = %key, error = %e, "cannot remove a reader marker");
            }
        });
    }
}

impl Writer {
    /// Registers a reader of `vm`'s point `point` ("latest" is resolved by the caller first).
    pub async fn begin_read(&self, vm: &str, point: &str) -> Result<ReaderGuard> {
        let key = format!("readers/{vm}/{point}/{}", uuid::Uuid::new_v4());
        let body = chrono::Utc::now().timestamp_millis().to_string();
        self.store.put_if_absent(&key, Bytes::from(body)).await?;
        Ok(ReaderGuard {
            store: self.store.clone(),
            key,
        })
    }

    /// Point ids of `vm` with a live reader.
    async fn read_points(&self, vm: &str) -> Result<HashSet<String>> {
        let prefix = ObjPath::from(format!("readers/{vm}"));
        let metas: Vec<_> = match self
            .store
            .object_store()
            .list(Some(&prefix))
            .try_collect()
            .await
        {
            Ok(m) => m,
            Err(ferry_store::object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(WriterError::Store(e.into())),
        };
        let now = chrono::Utc::now();
        Ok(metas
            .into_iter()
            .filter(|m| {
                (now - m.last_modified)
                    .to_std()
                    .is_ok_and(|age| age < READER_STALE)
            })
            .filter_map(|m| m.location.parts().nth(2).map(|p| p.as_ref().to_string()))
            .collect())
    }

    /// Prunes `vm`'s points older than `retention`, then collects objects no point references.
    pub async fn run_retention(
        &self,
        vm: &str,
        retention: Duration,
        grace: Duration,
    ) -> Result<RetentionOutcome> {
        crate::points::check_vm(vm)?;
        let points = self.store.list_points(vm).await?;
        let cutoff = chrono::Utc::now().timestamp_millis() - retention.as_millis() as i64;
        let reading = self.read_points(vm).await?;
        let latest_seq = points.last().map(|p| p.seq);
        let doomed: Vec<&PointManifest> = points
            .iter()
            .filter(|p| Some(p.seq) != latest_seq && p.time_ms < cutoff && !reading.contains(&p.id))
            .collect();
        let mut out = RetentionOutcome::default();
        for p in &doomed {
            self.store
                .delete(&format!("points/{vm}/{:020}.json", p.seq))
                .await?;
            // The point's merged map goes with it (collection removes any left behind).
            self.store.delete_merged(vm, p.seq).await?;
            out.points_pruned += 1;
        }
        if out.points_pruned > 0 {
            info!(
                vm,
                pruned = out.points_pruned,
                kept = points.len() - doomed.len(),
                "points pruned"
            );
        }
        // A reader that started while manifests were deleted holds one of them: sweep later.
        let doomed_ids: HashSet<&str> = doomed.iter().map(|p| p.id.as_str()).collect();
        if self
            .read_points(vm)
            .await?
            .iter()
            .any(|id| doomed_ids.contains(id.as_str()))
        {
            out.sweep_deferred = true;
            return Ok(out);
        }
        out.objects_collected = self.collect(grace).await?;
        Ok(out)
    }

    /// Marks what the merged maps of `vm`'s remaining points reference. A merged map whose
    /// point is gone (pruned while a merge of it ran) or that cannot be read (no reader uses
    /// one) is removed, so what only it referenced is collected.
    async fn mark_merged(
        &self,
        vm: &str,
        points: &[PointManifest],
        live: &mut HashSet<String>,
    ) -> Result<()> {
        let kept: HashSet<u64> = points.iter().map(|p| p.seq).collect();
        for seq in self.store.merged_seqs(vm).await? {
            if !kept.contains(&seq) {
                info!(vm, seq, "removing the merged map of a pruned point");
                self.store.delete_merged(vm, seq).await?;
                continue;
            }
            let m = match self.store.get_merged(vm, seq).await {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e @ ferry_store::StoreError::Corrupt { .. }) => {
                    warn!(vm, seq, error = %e, "removing an unreadable merged map");
                    self.store.delete_merged(vm, seq).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            for d in &m.disks {
                live.extend(d.pages.iter().map(|r| r.key.clone()));
                let map = read_map(&self.store, &d.pages).await?;
                live.extend(map.entries.values().map(chunk_key));
            }
        }
        Ok(())
    }

    /// Mark and sweep over every VM's remaining points. Commits wait while it runs (they hold
    /// the sweep lock shared), so the mark sees every committed point.
    async fn collect(&self, grace: Duration) -> Result<u64> {
        let _sweep = self.sweep_lock.write().await;
        let mut live: HashSet<String> = HashSet::new();
        let vms: HashSet<String> = self
            .store
            .list("points/")
            .await?
            .iter()
            .filter_map(|k| k.split('/').nth(1).map(str::to_string))
            .collect();
        for vm in &vms {
            let points = self.store.list_points(vm).await?;
            self.mark_merged(vm, &points, &mut live).await?;
            for p in points {
                for d in &p.disks {
                    live.extend(d.pages.iter().map(|r| r.key.clone()));
                    let map = read_map(&self.store, &d.pages).await?;
                    live.extend(map.entries.values().map(chunk_key));
                    for key in &d.logs {
                        let desc = get_descriptor(&self.store, key).await?;
                        live.extend(desc.chunk_ids()?.iter().map(chunk_key));
                        live.insert(key.clone());
                    }
                }
            }
        }
        let now = chrono::Utc::now();
        let mut unreferenced: Vec<String> = Vec::new();
        for prefix in ["chunks", "index", "logs"] {
            let p = ObjPath::from(prefix);
            let metas: Vec<_> = match self.store.object_store().list(Some(&p)).try_collect().await {
                Ok(m) => m,
                Err(ferry_store::object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(WriterError::Store(e.into())),
            };
            for m in metas {
                let key = m.location.to_string();
                let old = (now - m.last_modified)
                    .to_std()
                    .is_ok_and(|age| age >= grace);
                if old && !live.contains(&key) {
                    unreferenced.push(key);
                }
            }
        }
        let condemned: HashSet<String> = match self.store.get(CONDEMNED).await? {
            Some(b) => serde_json::from_slice(&b).unwrap_or_default(),
            None => HashSet::new(),
        };
        let mut collected = 0u64;
        for key in unreferenced.iter().filter(|k| condemned.contains(*k)) {
            self.store.delete(key).await?;
            collected += 1;
        }
        let next: Vec<&String> = unreferenced
            .iter()
            .filter(|k| !condemned.contains(*k))
            .collect();
        let body = serde_json::to_vec(&next).map_err(|e| WriterError::Internal(e.to_string()))?;
        self.store.delete(CONDEMNED).await?;
        self.store
            .put_if_absent(CONDEMNED, Bytes::from(body))
            .await?;
        if collected > 0 {
            info!(
                collected,
                live = live.len(),
                "unreferenced objects collected"
            );
        }
        Ok(collected)
    }
}
