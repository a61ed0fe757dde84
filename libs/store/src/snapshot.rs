//! Catalog snapshots: `snapshots/<ns>/<seq:020>.json`, a namespace's state as of entry `seq`,
//! so a reader starts from the newest snapshot and replays only the entries after it instead
//! of the whole history. A snapshot is derived data: one that is missing, unreadable or of
//! another format is skipped (the log is the truth), never trusted half-way.
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::layout::{check_segment, parse_snapshot_key, snapshot_key, snapshot_prefix};
use crate::{Catalog, StoreError};

#[derive(Serialize)]
struct SnapshotOut<'a, T: Serialize> {
    namespace: &'a str,
    seq: u64,
    format: u32,
    time_ms: i64,
    state: &'a T,
}

#[derive(Deserialize)]
struct SnapshotIn<T> {
    namespace: String,
    seq: u64,
    format: u32,
    state: T,
}

impl Catalog {
    /// Records `state` as the namespace's state after entry `seq`, in the caller's `format`
    /// (bumped whenever the state's shape changes, so an old snapshot is not misread).
    /// Writing the same seq twice keeps the first.
    pub async fn write_snapshot<T: Serialize>(
        &self,
        seq: u64,
        format: u32,
        state: &T,
    ) -> Result<(), StoreError> {
        check_segment("catalog namespace", &self.namespace)?;
        let key = snapshot_key(&self.namespace, seq);
        let out = SnapshotOut {
            namespace: &self.namespace,
            seq,
            format,
            time_ms: chrono::Utc::now().timestamp_millis(),
            state,
        };
        let bytes = serde_json::to_vec(&out).map_err(|source| StoreError::Encoding {
            what: format!("snapshot {key}"),
            source,
        })?;
        let len = bytes.len();
        if self.store.put_if_absent(&key, Bytes::from(bytes)).await? {
            debug!(namespace = %self.namespace, seq, bytes = len, "catalog snapshot written");
        }
        Ok(())
    }

    /// The newest snapshot of `format` that reads back whole: its seq and state. Others
    /// (unparsable, another format, naming another place) are skipped with a warning.
    pub async fn latest_snapshot<T: DeserializeOwned>(
        &self,
        format: u32,
    ) -> Result<Option<(u64, T)>, StoreError> {
        for seq in self.snapshot_seqs().await?.into_iter().rev() {
            let key = snapshot_key(&self.namespace, seq);
            let Some(bytes) = self.store.get(&key).await? else {
                continue; // pruned since the listing
            };
            match serde_json::from_slice::<SnapshotIn<T>>(&bytes) {
                Ok(s) if s.format == format && s.seq == seq && s.namespace == self.namespace => {
                    return Ok(Some((seq, s.state)));
                }
                Ok(s) => {
                    warn!(%key, format = s.format, want = format, "skipping a snapshot of another format or place")
                }
                Err(e) => warn!(%key, error = %e, "skipping an unreadable snapshot"),
            }
        }
        Ok(None)
    }

    /// Deletes all but the newest `keep` snapshots; returns how many it deleted.
    pub async fn prune_snapshots(&self, keep: usize) -> Result<usize, StoreError> {
        let seqs = self.snapshot_seqs().await?;
        let old = seqs.len().saturating_sub(keep);
        for &seq in &seqs[..old] {
            self.store
                .delete(&snapshot_key(&self.namespace, seq))
                .await?;
        }
        Ok(old)
    }

    async fn snapshot_seqs(&self) -> Result<Vec<u64>, StoreError> {
        check_segment("catalog namespace", &self.namespace)?;
        let mut seqs: Vec<u64> = self
            .store
            .list(&snapshot_prefix(&self.namespace))
            .await?
            .iter()
            .filter_map(|k| parse_snapshot_key(k).map(|(_, seq)| seq))
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    #[tokio::test]
    async fn newest_whole_snapshot_of_the_format_wins() {
        let store = Store::from_url_without_faults("memory://").unwrap();
        let cat = Catalog::new(store.clone(), "registry");
        assert_eq!(cat.latest_snapshot::<Vec<u32>>(1).await.unwrap(), None);
        cat.write_snapshot(10, 1, &vec![1u32, 2]).await.unwrap();
        cat.write_snapshot(20, 1, &vec![1u32, 2, 3]).await.unwrap();
        // The same seq again keeps the first.
        cat.write_snapshot(20, 1, &vec![9u32]).await.unwrap();
        assert_eq!(
            cat.latest_snapshot::<Vec<u32>>(1).await.unwrap(),
            Some((20, vec![1, 2, 3]))
        );
        // A newer one of another format, and a torn one, are skipped.
        cat.write_snapshot(30, 2, &vec![7u32]).await.unwrap();
        store
            .put_if_absent(&snapshot_key("registry", 40), Bytes::from_static(b"{\"nam"))
            .await
            .unwrap();
        assert_eq!(
            cat.latest_snapshot::<Vec<u32>>(1).await.unwrap(),
            Some((20, vec![1, 2, 3]))
        );
        // Another namespace's are not this one's.
        let other = Catalog::new(store.clone(), "failover");
        assert_eq!(other.latest_snapshot::<Vec<u32>>(1).await.unwrap(), None);
        assert_eq!(cat.prune_snapshots(2).await.unwrap(), 2);
        assert_eq!(cat.snapshot_seqs().await.unwrap(), vec![30, 40]);
        assert_eq!(cat.latest_snapshot::<Vec<u32>>(1).await.unwrap(), None);
    }
}
