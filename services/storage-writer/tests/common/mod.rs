//! What the merge and thinning tests share: a writer over a local-filesystem store and a real
//! `redis-server`, the disk's lease, a source disk in memory, and real `.hrl` logs shipped as
//! chunks the way the agent ships them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_coord::{Coord, RedisServer};
use ferry_proto::common::v1::ShippedLog;
use ferry_storage_writer::Writer;
use ferry_store::{ChunkId, Store, VaultKey, chunk_id, seal_chunk};

pub const BS: u32 = 64 * 1024;
pub const BSU: usize = BS as usize;
pub const VM: &str = "web";
pub const DISK: &str = "d1";

pub struct Env {
    pub dir: tempfile::TempDir,
    pub writer: Writer,
    pub store: Store,
    pub key: VaultKey,
    pub coord: Coord,
    pub token: u64,
    /// The latest log's unique id (the next log's previous id).
    pub chain: uuid::Uuid,
    /// The disk as the source holds it now.
    pub disk: Vec<u8>,
    pub logs: usize,
    _redis: RedisServer,
}

pub fn local_store(dir: &Path) -> Store {
    Store::from_url(&format!(
        "file://{}?fsync=false",
        dir.join("store").display()
    ))
    .unwrap()
}

/// A writer over `store(dir)` for a zeroed source disk of `vsize` bytes, holding its lease.
pub async fn env_with(vsize: u64, store: impl FnOnce(&Path) -> Store) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let redis = RedisServer::start(&dir.path().join("redis")).unwrap();
    let coord = Coord::connect(&redis.url()).await.unwrap();
    let key = VaultKey::generate();
    std::fs::create_dir(dir.path().join("spool")).unwrap();
    let writer = Writer::new(store.clone(), coord.clone(), key.clone())
        .with_spool_dir(dir.path().join("spool"))
        .with_export_roots(vec![dir.path().to_path_buf()]);
    let token = coord
        .acquire_lease(DISK, "agent-a", Duration::from_secs(600))
        .await
        .unwrap()
        .token;
    Env {
        dir,
        writer,
        store,
        key,
        coord,
        token,
        chain: uuid::Uuid::nil(),
        disk: vec![0; vsize as usize],
        logs: 0,
        _redis: redis,
    }
}

impl Env {
    pub async fn put(&self, data: &[u8]) -> ChunkId {
        let id = chunk_id(&self.key, data);
        let sealed = seal_chunk(&self.key, &id, data);
        self.store.put_chunk(&id, sealed.into()).await.unwrap();
        id
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes an `.hrl` log of `writes` (also applied to the source disk), ships its bytes
    /// as chunks the way the agent does, and returns what the commit carries.
    pub async fn log(&mut self, writes: &[(u64, Vec<u8>)]) -> ShippedLog {
        self.logs += 1;
        let path = self.path(&format!("disk.{:08}.hrl", self.logs));
        let mut w = ferry_disk::hrl::HrlWriter::create(
            &path,
            &ferry_disk::hrl::HrlOptions {
                previous_unique_id: self.chain,
                ..Default::default()
            },
        )
        .unwrap();
        for (off, data) in writes {
            w.record(*off, data).unwrap();
            self.disk[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        let header = w.close().unwrap();
        let previous = std::mem::replace(&mut self.chain, header.unique_id);
        let bytes = std::fs::read(&path).unwrap();
        let mut chunks = Vec::new();
        for piece in bytes.chunks(BSU) {
            chunks.push(self.put(piece).await.to_vec());
        }
        ShippedLog {
            unique_id: header.unique_id.as_bytes().to_vec(),
            previous_id: previous.as_bytes().to_vec(),
            length: bytes.len() as u64,
            chunks,
            records: writes.len() as u64,
            write_bytes: writes.iter().map(|(_, d)| d.len() as u64).sum(),
        }
    }
}
