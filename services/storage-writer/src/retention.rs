//! Retention and garbage collection.
//!
//! Pruning thins a VM's points ([`select_pruned`]): every point younger than `keep_all` stays;
//! older ones inside the retention window are thinned to one per `thin_to` (greedy from the
//! oldest: a point stays when it is at least `thin_to` after the previous point kept), plus
//! every app-consistent point; points older than the window go. The newest point always
//! stays, and so does every point a failover or restore is reading. A kept point never depends
//! on a pruned one: each manifest lists its own index pages (the full map of its base) and the
//! logs shipped since, and a merged map belongs to its own point only, so pruning points in the
//! middle leaves every other point materialising as before. A reader
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
use ferry_model::Consistency;
use ferry_store::layout;
use ferry_store::object_store::ObjectStore;
use ferry_store::object_store::path::Path as ObjPath;
use ferry_store::{PointManifest, chunk_key};
use futures::TryStreamExt;
use tracing::{info, warn};

use crate::Writer;

/// Tries after the first of a reader's marker that a transient store failure may cost.
const READER_MARK_RETRIES: u32 = 4;
use crate::error::{Result, WriterError};
use crate::logs::get_descriptor;
use crate::points::read_map;

/// A reader marker older than this belongs to a reader that died.
pub const READER_STALE: Duration = Duration::from_secs(6 * 3600);
/// Default age below which an unreferenced object is never collected.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);
/// Default window in which every point is kept (at most the retention window).
pub const DEFAULT_KEEP_ALL: Duration =
    Duration::from_secs(ferry_model::policy::DEFAULT_KEEP_ALL_SECONDS);
/// Default interval older points are thinned to.
pub const DEFAULT_THIN_TO: Duration =
    Duration::from_secs(ferry_model::policy::DEFAULT_THIN_TO_SECONDS);

/// Which of a VM's points retention keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Points older than this are pruned.
    pub retention: Duration,
    /// Every point younger than this is kept (a value above `retention` acts as `retention`).
    pub keep_all: Duration,
    /// Points between `keep_all` and `retention` old are thinned to one per this interval,
    /// plus every app-consistent point.
    pub thin_to: Duration,
}

/// Only the retention window: every point inside it is kept (no thinning).
impl From<Duration> for RetentionPolicy {
    fn from(retention: Duration) -> Self {
        Self {
            retention,
            keep_all: retention,
            thin_to: DEFAULT_THIN_TO,
        }
    }
}

impl RetentionPolicy {
    /// The policy of a `RunRetention` request: 0 means the default (`keep_all` 1 h but at most
    /// the retention window, `thin_to` 5 min); a retention of 0, or a `keep_all` or `thin_to`
    /// given above the retention window, is refused.
    pub fn from_seconds(retention: u64, keep_all: u64, thin_to: u64) -> Result<Self> {
        if retention == 0 {
            return Err(WriterError::InvalidArgument(
                "retention_seconds must be positive".into(),
            ));
        }
        for (field, v) in [("keep_all_seconds", keep_all), ("thin_to_seconds", thin_to)] {
            if v > retention {
                return Err(WriterError::InvalidArgument(format!(
                    "{field} is {v}; it must be at most retention_seconds ({retention}), or 0 for the default"
                )));
            }
        }
        let retention = Duration::from_secs(retention);
        Ok(Self {
            retention,
            keep_all: match keep_all {
                0 => DEFAULT_KEEP_ALL.min(retention),
                s => Duration::from_secs(s),
            },
            thin_to: match thin_to {
                0 => DEFAULT_THIN_TO,
                s => Duration::from_secs(s),
            },
        })
    }
}

/// One point as [`select_pruned`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub seq: u64,
    pub time_ms: i64,
    /// An app-consistent point (kept for the whole retention window).
    pub app: bool,
    /// Being read by a failover or restore (kept while read).
    pub held: bool,
}

impl Candidate {
    /// A committed point; `held` when a reader marker names it.
    pub fn of(p: &PointManifest, held: bool) -> Self {
        Self {
            seq: p.seq,
            time_ms: p.time_ms,
            app: p.consistency == Consistency::App,
            held,
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The seqs of the points to prune at `now_ms`, ascending; `points` oldest first.
///
/// A point older than the retention window goes; one younger than `keep_all` stays; in
/// between an app-consistent point stays, and a crash-consistent one stays when it is at least
/// `thin_to` after the previous point that stayed by this rule (oldest to newest). The newest
/// point and points being read stay too but do not count as "the previous point": once read,
/// such a point goes, and the choice of every other point is the same as if it never stayed.
/// So the choice is stable across runs: a point kept once is only ever pruned for leaving the
/// retention window, and the kept points of the thinned range are `thin_to` apart.
pub fn select_pruned(points: &[Candidate], now_ms: i64, policy: &RetentionPolicy) -> Vec<u64> {
    let cutoff = now_ms.saturating_sub(millis(policy.retention));
    let recent = now_ms.saturating_sub(millis(policy.keep_all)).max(cutoff);
    let thin_to = millis(policy.thin_to);
    let newest = points.iter().map(|p| p.seq).max();
    let mut previous: Option<i64> = None;
    let mut doomed = Vec::new();
    for p in points {
        let keep = if p.time_ms < cutoff {
            false
        } else if p.time_ms >= recent || p.app {
            true
        } else {
            previous.is_none_or(|t| p.time_ms.saturating_sub(t) >= thin_to)
        };
        if keep {
            previous = Some(p.time_ms);
        } else if !p.held && Some(p.seq) != newest {
            doomed.push(p.seq);
        }
    }
    doomed
}

/// What a retention run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionOutcome {
    pub points_pruned: u32,
    /// Points of the VM left after pruning.
    pub points_kept: u32,
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
        let key = layout::reader_key(vm, point, &uuid::Uuid::new_v4().to_string());
        let body = Bytes::from(chrono::Utc::now().timestamp_millis().to_string());
        // A failover must not fail on one lost answer of the store: the key is this reader's
        // alone, so a try that landed before its answer was lost is this marker too.
        let mut backoff =
            ferry_model::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            match self.store.put_if_absent(&key, body.clone()).await {
                Ok(_) => break,
                Err(e) if e.is_transient() && backoff.failures() < READER_MARK_RETRIES => {
                    warn!(vm, point, error = %e, "registering a reader failed; trying again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(ReaderGuard {
            store: self.store.clone(),
            key,
        })
    }

    /// Point ids of `vm` with a live reader.
    async fn read_points(&self, vm: &str) -> Result<HashSet<String>> {
        let prefix = ObjPath::from(layout::reader_prefix(vm));
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
            .filter_map(|m| {
                layout::parse_reader_key(m.location.as_ref()).map(|(_, p)| p.to_string())
            })
            .collect())
    }

    /// Thins and prunes `vm`'s points as `policy` says ([`select_pruned`]; a bare retention
    /// window keeps every point inside it), then collects objects no point references.
    pub async fn run_retention(
        &self,
        vm: &str,
        policy: impl Into<RetentionPolicy>,
        grace: Duration,
    ) -> Result<RetentionOutcome> {
        crate::points::check_vm(vm)?;
        let policy = policy.into();
        let points = self.store.list_points(vm).await?;
        let reading = self.read_points(vm).await?;
        let candidates: Vec<Candidate> = points
            .iter()
            .map(|p| Candidate::of(p, reading.contains(&p.id)))
            .collect();
        let doomed_seqs: HashSet<u64> =
            select_pruned(&candidates, chrono::Utc::now().timestamp_millis(), &policy)
                .into_iter()
                .collect();
        let doomed: Vec<&PointManifest> = points
            .iter()
            .filter(|p| doomed_seqs.contains(&p.seq))
            .collect();
        let mut out = RetentionOutcome {
            points_kept: u32::try_from(points.len() - doomed.len()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        for p in &doomed {
            self.store.delete(&layout::point_key(vm, p.seq)).await?;
            // The point's merged map goes with it (collection removes any left behind). No
            // other point needs it: a later point lists the pages it was based on itself.
            self.store.delete_merged(vm, p.seq).await?;
            out.points_pruned += 1;
        }
        if out.points_pruned > 0 {
            info!(
                vm,
                pruned = out.points_pruned,
                kept = out.points_kept,
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
            .list(layout::POINTS_PREFIX)
            .await?
            .iter()
            .filter_map(|k| layout::vm_of_point_key(k).map(str::to_string))
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
        for prefix in [
            layout::CHUNKS_PREFIX,
            layout::INDEX_PREFIX,
            layout::LOGS_PREFIX,
        ] {
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
        let condemned: HashSet<String> = match self.store.get(layout::CONDEMNED_KEY).await? {
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
        self.store.delete(layout::CONDEMNED_KEY).await?;
        self.store
            .put_if_absent(layout::CONDEMNED_KEY, Bytes::from(body))
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
