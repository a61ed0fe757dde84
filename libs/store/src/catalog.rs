//! The catalog: an append-only transaction log per namespace, `catalog/<ns>/<seq:020>.json`.
//!
//! Appending is put-if-absent at `tail + 1` (as Delta Lake does on object stores): two writers
//! racing for the same sequence number cannot both win, the loser re-lists and tries the next
//! one, so the log stays gapless and no entry is lost. Each entry is wrapped in an envelope with
//! a per-append writer id, which lets an append whose put failed ambiguously (it landed but the
//! response was lost) recognise its own entry instead of appending it twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferry_model::Backoff;
use futures::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::layout::{catalog_key, catalog_prefix, check_segment, parse_catalog_key};
use crate::{Store, StoreError};

const PARALLEL: usize = 8;
/// Conflicts are progress by someone else, so many are tolerated before giving up.
const MAX_CONFLICTS: usize = 1000;
const MAX_TRANSIENT: u32 = 4;

/// An append-only log of JSON entries in one namespace. Cheap to clone; clones share the
/// cached tail.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub(crate) store: Store,
    pub(crate) namespace: String,
    prefix: String,
    /// Last sequence number known to exist (0 = unknown / empty).
    tail: Arc<AtomicU64>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a, T: Serialize> {
    v: u32,
    writer: &'a str,
    time_ms: i64,
    entry: &'a T,
}

#[derive(Deserialize)]
struct EnvelopeIn<T> {
    entry: T,
}

#[derive(Deserialize)]
struct WriterOnly {
    writer: String,
}

impl Catalog {
    /// A catalog over `store` for `namespace` (one path segment, e.g. `registry`, `jobs`).
    /// A bad namespace makes every call fail with [`StoreError::Invalid`].
    pub fn new(store: Store, namespace: &str) -> Self {
        Catalog {
            store,
            namespace: namespace.to_string(),
            prefix: catalog_prefix(namespace),
            tail: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn key(&self, seq: u64) -> String {
        catalog_key(&self.namespace, seq)
    }

    /// Appends an entry at the end of the log and returns its sequence number (from 1).
    pub async fn append<T: Serialize>(&self, entry: &T) -> Result<u64, StoreError> {
        self.append_inner(false, |_, _| Ok(entry)).await
    }

    /// Appends the entry `make(seq, previous)` builds for sequence number `seq` from the entry
    /// before it (`None` for the first): for logs whose entries chain to their predecessor.
    /// `make` runs again whenever another writer took `seq` first.
    pub async fn append_chained<T, F>(&self, mut make: F) -> Result<u64, StoreError>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(u64, Option<T>) -> T,
    {
        let what = format!("catalog entry of {}", self.namespace);
        self.append_inner(true, |seq, prev| {
            let prev = match prev {
                None => None,
                Some(bytes) => Some(
                    serde_json::from_slice::<EnvelopeIn<T>>(&bytes)
                        .map_err(|e| {
                            StoreError::corrupt(format!("{what} {}", seq - 1), e.to_string())
                        })?
                        .entry,
                ),
            };
            Ok(make(seq, prev))
        })
        .await
    }

    /// The append loop: `make(seq, previous entry's bytes)` gives the entry for `seq` (the
    /// previous one is read only when `chained`).
    async fn append_inner<T, F>(&self, chained: bool, mut make: F) -> Result<u64, StoreError>
    where
        T: Serialize,
        F: FnMut(u64, Option<Bytes>) -> Result<T, StoreError>,
    {
        check_segment("catalog namespace", &self.namespace)?;
        let writer = uuid::Uuid::new_v4().to_string();
        let mut seq = self.tail.load(Ordering::Acquire);
        if seq == 0 || chained {
            seq = self.find_tail(seq).await?;
        }
        let mut conflicts = 0usize;
        // 40, 80, 160, 320 ms between attempts after a transient failure.
        let mut transient = Backoff::new(Duration::from_millis(40), Duration::from_millis(320));
        // Sequence numbers we tried whose outcome is unknown (transient failure).
        let mut uncertain: Vec<u64> = Vec::new();
        loop {
            let next = seq + 1;
            let prev = match (chained, seq) {
                (true, 1..) => Some(self.store.get(&self.key(seq)).await?.ok_or_else(|| {
                    StoreError::NotFound {
                        what: format!(
                            "catalog entry {} (the one before a new entry)",
                            self.key(seq)
                        ),
                    }
                })?),
                _ => None,
            };
            let bytes = self.envelope(&writer, make(next, prev)?)?;
            match self.store.put_if_absent(&self.key(next), bytes).await {
                Ok(true) => {
                    self.tail.fetch_max(next, Ordering::AcqRel);
                    debug!(namespace = %self.namespace, seq = next, "catalog entry appended");
                    return Ok(next);
                }
                Ok(false) => {
                    if uncertain.contains(&next) && self.written_by(next, &writer).await? {
                        self.tail.fetch_max(next, Ordering::AcqRel);
                        return Ok(next);
                    }
                    conflicts += 1;
                    if conflicts > MAX_CONFLICTS {
                        return Err(StoreError::Conflict {
                            what: format!(
                                "catalog {}: gave up after {conflicts} lost races",
                                self.namespace
                            ),
                        });
                    }
                    seq = self.find_tail(next).await?;
                    if let Some(s) = self.find_own(&uncertain, &writer).await? {
                        return Ok(s);
                    }
                }
                Err(e) if e.is_transient() && transient.failures() < MAX_TRANSIENT => {
                    let delay = transient.next_delay();
                    warn!(namespace = %self.namespace, seq = next, error = %e, attempt = transient.failures(), "catalog append failed, retrying");
                    uncertain.push(next);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn envelope<T: Serialize>(&self, writer: &str, entry: T) -> Result<Bytes, StoreError> {
        let env = EnvelopeOut {
            v: 1,
            writer,
            time_ms: chrono::Utc::now().timestamp_millis(),
            entry: &entry,
        };
        let bytes = serde_json::to_vec(&env).map_err(|source| StoreError::Encoding {
            what: format!("catalog entry for {}", self.namespace),
            source,
        })?;
        Ok(Bytes::from(bytes))
    }

    /// If one of the uncertain attempts did land, its sequence number.
    async fn find_own(&self, uncertain: &[u64], writer: &str) -> Result<Option<u64>, StoreError> {
        for &s in uncertain {
            if self.written_by(s, writer).await? {
                self.tail.fetch_max(s, Ordering::AcqRel);
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    async fn written_by(&self, seq: u64, writer: &str) -> Result<bool, StoreError> {
        let Some(bytes) = self.store.get(&self.key(seq)).await? else {
            return Ok(false);
        };
        Ok(serde_json::from_slice::<WriterOnly>(&bytes).is_ok_and(|w| w.writer == writer))
    }

    /// The highest existing sequence number, knowing that `at_least` exists (0: nothing known).
    async fn find_tail(&self, at_least: u64) -> Result<u64, StoreError> {
        let offset = (at_least > 0).then(|| self.key(at_least));
        let keys = self
            .store
            .list_after(&self.prefix, offset.as_deref())
            .await?;
        let tail = keys
            .iter()
            .filter_map(|k| parse_catalog_key(k).map(|(_, seq)| seq))
            .max()
            .unwrap_or(0)
            .max(at_least);
        self.tail.fetch_max(tail, Ordering::AcqRel);
        Ok(tail)
    }

    /// Entries with sequence number greater than `after_seq`, in order.
    pub async fn read_from<T: DeserializeOwned>(
        &self,
        after_seq: u64,
    ) -> Result<Vec<(u64, T)>, StoreError> {
        self.read_each_from(after_seq)
            .await?
            .into_iter()
            .map(|(seq, entry)| entry.map(|e| (seq, e)))
            .collect()
    }

    /// Like [`Catalog::read_from`], but an entry that is missing or does not parse is an
    /// error of its own instead of failing the whole read (for checking a log).
    pub async fn read_each_from<T: DeserializeOwned>(
        &self,
        after_seq: u64,
    ) -> Result<Vec<(u64, Result<T, StoreError>)>, StoreError> {
        check_segment("catalog namespace", &self.namespace)?;
        let offset = (after_seq > 0).then(|| self.key(after_seq));
        let keys = self
            .store
            .list_after(&self.prefix, offset.as_deref())
            .await?;
        let mut seqs: Vec<u64> = keys
            .iter()
            .filter_map(|k| parse_catalog_key(k).map(|(_, seq)| seq))
            .filter(|&s| s > after_seq)
            .collect();
        seqs.sort_unstable();
        if let Some(&last) = seqs.last() {
            self.tail.fetch_max(last, Ordering::AcqRel);
        }
        for w in seqs.windows(2) {
            if w[1] != w[0] + 1 {
                warn!(namespace = %self.namespace, after = w[0], next = w[1], "gap in catalog log");
            }
        }
        let entries = futures::stream::iter(seqs.into_iter().map(|s| async move {
            let key = self.key(s);
            let entry = match self.store.get(&key).await {
                Ok(Some(bytes)) => serde_json::from_slice::<EnvelopeIn<T>>(&bytes)
                    .map(|env| env.entry)
                    .map_err(|e| {
                        StoreError::corrupt(format!("catalog entry {key}"), e.to_string())
                    }),
                Ok(None) => Err(StoreError::NotFound {
                    what: format!("catalog entry {key}"),
                }),
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => Err(e),
            };
            Ok((s, entry))
        }))
        .buffered(PARALLEL)
        .try_collect()
        .await?;
        Ok(entries)
    }
}
