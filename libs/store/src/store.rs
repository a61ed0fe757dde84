//! `Store`: the object-storage handle and its raw, chunk-level operations.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tracing::{debug, warn};

use crate::layout::chunk_key;
use crate::{ChunkId, FaultPlan, StoreError, UnreliableStore, chunk_hex};

/// A handle on one object store (cheap to clone). All layout-aware operations (chunks, index
/// pages, points, catalog) hang off it.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    url: Arc<str>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

impl Store {
    /// Opens a store by URL: `file:///abs/dir[?fsync=false]`, `az://container/prefix`,
    /// `s3://bucket/prefix`, `gs://bucket/prefix` or `memory://` (see [`crate::backend`] for
    /// the options and where credentials come from). Other schemes are rejected with
    /// [`StoreError::Invalid`]. With [`FaultPlan::ENV`] set (fault tests) the store fails
    /// and delays calls as that plan says.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let store = Self::from_url_without_faults(url)?;
        match FaultPlan::from_env()? {
            None => Ok(store),
            Some(plan) => {
                warn!(store = %url, ?plan, "store fault injection is on ({})", FaultPlan::ENV);
                let faulty = UnreliableStore::with_plan(store.inner, plan);
                Ok(Self::from_object_store(Arc::new(faulty), url))
            }
        }
    }

    /// [`Store::from_url`] ignoring [`FaultPlan::ENV`] (what a fault test checks the store
    /// with).
    pub fn from_url_without_faults(url: &str) -> Result<Self, StoreError> {
        match crate::backend::open(url)? {
            Some(inner) => Ok(Self::from_object_store(inner, url)),
            None => {
                let scheme = url.split("://").next().unwrap_or(url);
                Err(StoreError::invalid(
                    "store url",
                    format!(
                        "unsupported scheme {scheme:?} (supported: file:///abs/dir, az://container/prefix, s3://bucket/prefix, gs://bucket/prefix, memory://)"
                    ),
                ))
            }
        }
    }

    /// Wraps any object store (Azure, S3, an [`crate::UnreliableStore`] for fault tests).
    /// `url_label` is what [`Store::url`] reports; it must not contain credentials.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, url_label: &str) -> Self {
        Store {
            inner,
            url: Arc::from(url_label),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// True if the chunk is stored (a `HEAD`).
    pub async fn chunk_exists(&self, id: &ChunkId) -> Result<bool, StoreError> {
        let path = path(&chunk_key(id))?;
        match self.inner.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a sealed chunk with put-if-absent. Returns false when it was already there (a
    /// retried upload costs nothing more).
    pub async fn put_chunk(&self, id: &ChunkId, sealed: Bytes) -> Result<bool, StoreError> {
        self.put_if_absent(&chunk_key(id), sealed).await
    }

    pub async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, StoreError> {
        let key = chunk_key(id);
        self.get(&key).await?.ok_or_else(|| StoreError::NotFound {
            what: format!("chunk {}", chunk_hex(id)),
        })
    }

    /// Writes `key` only if it does not exist. Returns false if it already existed (the
    /// existing object is left untouched).
    pub async fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let path = path(key)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let opts = PutOptions::from(PutMode::Create);
            let payload = PutPayload::from_bytes(bytes.clone());
            match self.inner.put_opts(&path, payload, opts).await {
                Ok(_) => return Ok(true),
                // After a try cut short, an object with our bytes is ours.
                Err(object_store::Error::AlreadyExists { .. })
                    if tries > 1 && self.get(key).await?.as_ref() == Some(&bytes) =>
                {
                    return Ok(true);
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    debug!(key, "object already exists");
                    return Ok(false);
                }
                Err(e) if tries < VANISHED_FOLDER_TRIES && folder_vanished(&e) => {
                    debug!(key, error = %e, "a folder of the key vanished under the put; trying again");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The object's bytes, or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let path = path(key)?;
        let res = match self.inner.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match res.bytes().await {
            Ok(b) => Ok(Some(b)),
            // Deleted between open and read.
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// All keys under `prefix`, sorted. The prefix matches whole path segments: `catalog/jobs`
    /// lists `catalog/jobs/...` but not `catalog/jobs2/...`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.list_after(prefix, None).await
    }

    /// Keys under `prefix` strictly greater than `offset` (when given), sorted.
    pub(crate) async fn list_after(
        &self,
        prefix: &str,
        offset: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let prefix_path = if prefix.trim_matches('/').is_empty() {
            None
        } else {
            Some(path(prefix.trim_end_matches('/'))?)
        };
        let stream = match offset {
            Some(o) => self.inner.list_with_offset(prefix_path.as_ref(), &path(o)?),
            None => self.inner.list(prefix_path.as_ref()),
        };
        let metas: Vec<_> = match stream.try_collect().await {
            Ok(m) => m,
            // A prefix whose directory does not exist yet on the local filesystem.
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut keys: Vec<String> = metas.into_iter().map(|m| m.location.to_string()).collect();
        keys.sort();
        Ok(keys)
    }

    /// Deletes `key`; deleting a missing key is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = path(key)?;
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Tries of a put whose folder vanished under it. The local backend removes a folder once a
/// delete leaves it empty (automatic cleanup), racing a put into the same folder; the put
/// then fails with "not found" though nothing is wrong. Seen with two readers of one point.
const VANISHED_FOLDER_TRIES: u32 = 5;

/// Whether `e` is an I/O "not found" or "exists" (anywhere in its sources; the backend's own
/// `AlreadyExists`, a conditional put's conflict, is matched before): for a put, which makes
/// its own folders, that is the race above — the folder went before the file was linked or
/// synced, or came back while it was being made again.
fn folder_vanished(e: &object_store::Error) -> bool {
    use std::io::ErrorKind;
    if matches!(e, object_store::Error::NotFound { .. }) {
        return true;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| matches!(io.kind(), ErrorKind::NotFound | ErrorKind::AlreadyExists))
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Parses a key, refusing anything that is not a clean relative path.
pub(crate) fn path(key: &str) -> Result<Path, StoreError> {
    if key.is_empty() || key.starts_with('/') || key.split('/').any(|s| s == "." || s == "..") {
        return Err(StoreError::invalid("object key", format!("{key:?}")));
    }
    Path::parse(key).map_err(|e| StoreError::invalid("object key", e.to_string()))
}
