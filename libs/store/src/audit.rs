//! The audit trail: [`AuditRecord`]s in the catalog namespace `audit`, in batches, each batch
//! an entry chained to the one before it.
//!
//! Entry `n` holds its records, `prev` (the MAC of entry `n - 1`) and its own `mac`: a BLAKE3
//! keyed hash, under a key derived from the vault data key, of `(n, prev, records)`. So
//! without the key nobody can write an entry that verifies: an altered entry fails its own
//! MAC, a removed one leaves a gap in the sequence numbers or a `prev` that does not match,
//! and entries cannot be renumbered. What a chain cannot show is the newest entries removed
//! together: the log then ends earlier, intact (docs/SECURITY.md says so).
use std::sync::Arc;
use std::time::Duration;

use ferry_model::{AuditRecord, AuditSink};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::{Catalog, Store, StoreError};

/// The catalog namespace of the audit trail.
pub const AUDIT_NAMESPACE: &str = "audit";
/// Records in flight to one writer; past this, audited calls wait for room.
const QUEUE: usize = 4096;
/// Records written as one entry at most.
const BATCH: usize = 256;
/// How long an audited call waits for its record to be written.
const RECORD_TIMEOUT: Duration = Duration::from_secs(10);

/// One catalog entry of the trail.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct AuditEntry {
    seq: u64,
    prev: String,
    records: Vec<AuditRecord>,
    mac: String,
}

/// What a check of the whole trail found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditVerification {
    pub entries: u64,
    pub records: u64,
    /// Each break of the chain, naming the entry; empty when the trail is intact.
    pub problems: Vec<String>,
}

/// The audit trail of a vault.
#[derive(Clone)]
pub struct AuditLog {
    catalog: Catalog,
    key: [u8; 32],
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// The trail in `store`, chained under a key derived from the vault data key.
    pub fn new(store: Store, data_key: &[u8; 32]) -> Self {
        Self {
            catalog: Catalog::new(store, AUDIT_NAMESPACE),
            key: blake3::derive_key("ferry audit chain v1", data_key),
        }
    }

    fn mac(&self, seq: u64, prev: &str, records: &[AuditRecord]) -> String {
        let body = serde_json::to_vec(&(seq, prev, records)).unwrap_or_default();
        blake3::keyed_hash(&self.key, &body).to_hex().to_string()
    }

    /// Appends `records` as one entry; returns its sequence number.
    pub async fn append(&self, records: Vec<AuditRecord>) -> Result<u64, StoreError> {
        self.catalog
            .append_chained(|seq, prev: Option<AuditEntry>| {
                let prev = prev.map(|p| p.mac).unwrap_or_default();
                let mac = self.mac(seq, &prev, &records);
                AuditEntry {
                    seq,
                    prev,
                    records: records.clone(),
                    mac,
                }
            })
            .await
    }

    /// Every record, oldest first (entries that do not parse are left out: see [`Self::verify`]).
    pub async fn records(&self) -> Result<Vec<AuditRecord>, StoreError> {
        let entries = self.catalog.read_each_from::<AuditEntry>(0).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(_, e)| e.ok())
            .flat_map(|e| e.records)
            .collect())
    }

    /// Checks the whole chain.
    pub async fn verify(&self) -> Result<AuditVerification, StoreError> {
        let entries = self.catalog.read_each_from::<AuditEntry>(0).await?;
        let mut v = AuditVerification::default();
        let mut expect_seq = 1u64;
        let mut prev_mac = String::new();
        for (seq, entry) in entries {
            v.entries += 1;
            if seq != expect_seq {
                // What follows a gap cannot be checked against what is gone.
                prev_mac.clear();
                v.problems.push(match seq - expect_seq {
                    1 => format!("entry {expect_seq} is missing"),
                    n => format!("entries {expect_seq} to {} are missing", expect_seq + n - 1),
                });
            }
            expect_seq = seq + 1;
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    v.problems.push(format!("entry {seq} is unreadable: {e}"));
                    prev_mac.clear();
                    continue;
                }
            };
            v.records += entry.records.len() as u64;
            if entry.seq != seq || entry.mac != self.mac(seq, &entry.prev, &entry.records) {
                v.problems
                    .push(format!("entry {seq} was altered: its mac does not match"));
            } else if seq > 1 && !prev_mac.is_empty() && entry.prev != prev_mac {
                v.problems.push(format!(
                    "entry {seq} does not follow entry {}: the chain was broken there",
                    seq - 1
                ));
            }
            prev_mac = entry.mac;
        }
        Ok(v)
    }
}

type Pending = (AuditRecord, oneshot::Sender<()>);

/// The audit sink of one component: a task that writes records in batches (group commit),
/// each audited call waiting until its record is in the store.
#[derive(Debug)]
pub struct AuditWriter {
    tx: mpsc::Sender<Pending>,
}

impl AuditWriter {
    /// The writer of a component: the trail of the store at `store_url`, chained under the
    /// vault `data_key`.
    pub fn open(store_url: &str, data_key: &[u8; 32]) -> Result<Arc<Self>, StoreError> {
        Ok(Self::spawn(AuditLog::new(
            Store::from_url(store_url)?,
            data_key,
        )))
    }

    /// Starts the writer task; it ends when the writer is dropped.
    pub fn spawn(log: AuditLog) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_batches(log, rx));
        Arc::new(Self { tx })
    }
}

impl AuditSink for AuditWriter {
    fn record(
        &self,
        record: AuditRecord,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let (done, written) = oneshot::channel();
            let operation = record.operation.clone();
            let sent = async {
                self.tx.send((record, done)).await.ok()?;
                written.await.ok()
            };
            if tokio::time::timeout(RECORD_TIMEOUT, sent)
                .await
                .ok()
                .flatten()
                .is_none()
            {
                tracing::error!(%operation, "an audit record could not be written in time");
            }
        })
    }
}

async fn write_batches(log: AuditLog, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let (records, acks): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        let count = records.len();
        let mut backoff =
            ferry_model::Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            match log.append(records.clone()).await {
                Ok(seq) => {
                    tracing::debug!(seq, records = count, "audit records written");
                    break;
                }
                Err(e) if backoff.failures() < 5 => {
                    tracing::warn!(error = %e, records = count, "writing audit records failed, retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, records = count, "audit records were lost: the store refused them");
                    break;
                }
            }
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::AuditResult;

    fn rec(i: i64) -> AuditRecord {
        AuditRecord {
            time_ms: i,
            component: "registry".into(),
            caller: "token:alice".into(),
            role: "operator".into(),
            operation: "ferry.registry.v1.Registry/ResyncVm".into(),
            target: format!("vm:web{i}"),
            for_host: String::new(),
            result: AuditResult::Ok,
            code: "OK".into(),
            message: String::new(),
        }
    }

    async fn trail() -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::from_url(&format!("file://{}", dir.path().display())).unwrap();
        (dir, AuditLog::new(store, &[7; 32]))
    }

    #[tokio::test]
    async fn an_intact_trail_verifies_and_lists_in_order() {
        let (_dir, log) = trail().await;
        for i in 0..5 {
            log.append(vec![rec(i), rec(i + 100)]).await.unwrap();
        }
        let v = log.verify().await.unwrap();
        assert_eq!((v.entries, v.records), (5, 10));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let times: Vec<i64> = log
            .records()
            .await
            .unwrap()
            .iter()
            .map(|r| r.time_ms)
            .collect();
        assert_eq!(times, [0, 100, 1, 101, 2, 102, 3, 103, 4, 104]);
    }

    #[tokio::test]
    async fn removed_altered_or_forged_entries_are_found() {
        let (dir, log) = trail().await;
        for i in 0..6 {
            log.append(vec![rec(i)]).await.unwrap();
        }
        let path = |seq: u64| dir.path().join(format!("catalog/audit/{seq:020}.json"));
        std::fs::remove_file(path(2)).unwrap();
        let text = std::fs::read_to_string(path(4)).unwrap();
        std::fs::write(path(4), text.replace("web3", "web9")).unwrap();
        let v = log.verify().await.unwrap();
        assert_eq!(v.problems.len(), 2, "{:?}", v.problems);
        assert!(
            v.problems[0].contains("entry 2 is missing"),
            "{:?}",
            v.problems
        );
        assert!(
            v.problems[1].contains("entry 4 was altered"),
            "{:?}",
            v.problems
        );
        // The same trail under another key: nothing verifies.
        let store = Store::from_url(&format!("file://{}", dir.path().display())).unwrap();
        let other = AuditLog::new(store, &[8; 32]).verify().await.unwrap();
        assert_eq!(other.problems.len(), 6, "{:?}", other.problems);
    }

    #[tokio::test]
    async fn racing_writers_keep_one_chain() {
        let (_dir, log) = trail().await;
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..10 {
                        log.append(vec![rec(w * 100 + i)]).await.unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let v = log.verify().await.unwrap();
        assert_eq!((v.entries, v.records), (40, 40));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
    }

    #[tokio::test]
    async fn the_writer_batches_and_acknowledges() {
        let (_dir, log) = trail().await;
        let writer = AuditWriter::spawn(log.clone());
        let calls: Vec<_> = (0..50)
            .map(|i| {
                let w = writer.clone();
                tokio::spawn(async move { w.record(rec(i)).await })
            })
            .collect();
        for c in calls {
            c.await.unwrap();
        }
        let v = log.verify().await.unwrap();
        assert_eq!(v.records, 50);
        assert!(v.entries <= 50 && v.problems.is_empty(), "{v:?}");
    }
}
