//! Shipped change logs (MS-HRL `.hrl` files) kept beside a point's block map until merged.
//!
//! A log travels as content-addressed chunks (the file's bytes in block-size pieces, sealed
//! like any block). Committing a cycle writes one descriptor per log at
//! `logs/<disk>/<unique id>.json` (put-if-absent: a retried commit writes nothing new) and lists
//! its key in the disk's manifest. Materialising a point applies the listed logs, oldest first,
//! on top of the blocks — failover never waits for a merge.
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use ferry_proto::common::v1::ShippedLog;
use ferry_store::{
    ChunkId, Store, StoreError, VaultKey, chunk_hex, layout, open_chunk, parse_chunk_hex,
};
use serde::{Deserialize, Serialize};

use crate::error::{Result, WriterError};
use crate::points::chunk_from_bytes;

/// What a point keeps of a shipped log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogDescriptor {
    pub disk_id: String,
    /// MS-HRL UniqueId / PreviousUniqueId, hex.
    pub unique_id: String,
    pub previous_id: String,
    /// Size of the `.hrl` file.
    pub length: u64,
    /// Chunk ids of its pieces, in file order (hex).
    pub chunks: Vec<String>,
    pub records: u64,
    pub write_bytes: u64,
}

impl LogDescriptor {
    /// Where the descriptor is stored: [`layout::log_key`].
    pub fn key(&self) -> String {
        layout::log_key(&self.disk_id, &self.unique_id)
    }

    pub fn from_proto(disk_id: &str, l: &ShippedLog) -> Result<Self> {
        let bad =
            |m: String| WriterError::InvalidArgument(format!("disk {disk_id}: shipped log: {m}"));
        if l.unique_id.len() != 16 || l.previous_id.len() != 16 {
            return Err(bad("unique and previous ids must be 16 bytes".into()));
        }
        if l.chunks.is_empty() || l.length == 0 {
            return Err(bad(format!("log {} is empty", hex::encode(&l.unique_id))));
        }
        let mut chunks = Vec::with_capacity(l.chunks.len());
        for (i, c) in l.chunks.iter().enumerate() {
            chunks.push(chunk_hex(&chunk_from_bytes(
                &format!("disk {disk_id} log piece {i}"),
                c,
            )?));
        }
        Ok(Self {
            disk_id: disk_id.to_owned(),
            unique_id: hex::encode(&l.unique_id),
            previous_id: hex::encode(&l.previous_id),
            length: l.length,
            chunks,
            records: l.records,
            write_bytes: l.write_bytes,
        })
    }

    pub fn chunk_ids(&self) -> Result<Vec<ChunkId>> {
        self.chunks
            .iter()
            .map(|c| {
                parse_chunk_hex(c)
                    .map_err(|e| WriterError::Corrupt(format!("log {}: {e}", self.unique_id)))
            })
            .collect()
    }
}

/// Writes the descriptor (idempotent) and returns its key.
pub async fn put_descriptor(store: &Store, d: &LogDescriptor) -> Result<String> {
    let key = d.key();
    let body =
        serde_json::to_vec(d).map_err(|e| WriterError::Internal(format!("log descriptor: {e}")))?;
    store.put_if_absent(&key, Bytes::from(body)).await?;
    Ok(key)
}

pub async fn get_descriptor(store: &Store, key: &str) -> Result<LogDescriptor> {
    let body = store.get(key).await?.ok_or_else(|| {
        WriterError::Corrupt(format!(
            "shipped log {key} is listed by the point but not stored"
        ))
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| WriterError::Corrupt(format!("shipped log {key}: {e}")))
}

/// Reassembles a shipped log into `out` (a local file), verifying every piece.
pub async fn spool(
    store: &Store,
    key: &Arc<VaultKey>,
    d: &LogDescriptor,
    out: &Path,
) -> Result<()> {
    let mut f = std::fs::File::create(out)
        .map_err(|e| WriterError::Internal(format!("{}: {e}", out.display())))?;
    let mut written = 0u64;
    for (i, id) in d.chunk_ids()?.into_iter().enumerate() {
        let sealed = match store.get_chunk(&id).await {
            Ok(s) => s,
            Err(StoreError::NotFound { .. }) => {
                return Err(WriterError::Corrupt(format!(
                    "log {} piece {i} references chunk {} which is not stored",
                    d.unique_id,
                    chunk_hex(&id)
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let k = Arc::clone(key);
        let plain = tokio::task::spawn_blocking(move || open_chunk(&k, &id, &sealed))
            .await
            .map_err(|e| WriterError::Internal(format!("chunk open task failed: {e}")))?
            .map_err(|e| WriterError::Corrupt(format!("log {} piece {i}: {e}", d.unique_id)))?;
        f.write_all(&plain)
            .map_err(|e| WriterError::Internal(format!("{}: {e}", out.display())))?;
        written += plain.len() as u64;
    }
    if written != d.length {
        return Err(WriterError::Corrupt(format!(
            "log {} reassembles to {written} bytes, its descriptor says {}",
            d.unique_id, d.length
        )));
    }
    f.sync_all()
        .map_err(|e| WriterError::Internal(format!("{}: {e}", out.display())))?;
    Ok(())
}

/// Applies spooled logs, in order, onto the image at `target` (in place, in its own format).
pub fn replay(target: &Path, logs: &[std::path::PathBuf]) -> Result<u64> {
    let mut rw = ferry_disk::open_rw(target).map_err(WriterError::Disk)?;
    let mut bytes = 0u64;
    for p in logs {
        let log = ferry_disk::hrl::HrlLog::open(p).map_err(WriterError::Disk)?;
        if !log.clean {
            return Err(WriterError::Corrupt(format!(
                "shipped log {} was not closed cleanly",
                p.display()
            )));
        }
        bytes += log.replay_onto(&mut *rw).map_err(WriterError::Disk)?;
    }
    rw.flush().map_err(WriterError::Disk)?;
    rw.finish().map_err(WriterError::Disk)?;
    Ok(bytes)
}
