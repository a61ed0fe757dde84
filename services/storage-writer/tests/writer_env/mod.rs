//! What the writer and materialise tests share: a writer over a local-filesystem store and a
//! real `redis-server` for fencing, sealed blocks, and commit requests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ferry_coord::{Coord, Lease, RedisServer};
use ferry_model::{Consistency, CycleKind};
use ferry_proto::common::v1::Disk;
use ferry_proto::storage::v1::{
    BlockEntry, BlockHashesRequest, CommitDisk, CommitPointRequest, MaterializeDiskRequest,
};
use ferry_storage_writer::Writer;
use ferry_store::{ChunkId, Store, VaultKey, chunk_id, seal_chunk};

pub const BS: u32 = 64 * 1024;
/// Ten full blocks and a partial eleventh (a multiple of 512, as VHDX needs).
pub const VSIZE: u64 = 10 * BS as u64 + 12 * 1024;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub writer: Writer,
    pub store: Store,
    pub key: VaultKey,
    pub coord: Coord,
    _redis: RedisServer,
}

pub async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::from_url(&format!(
        "file://{}?fsync=false",
        dir.path().join("store").display()
    ))
    .unwrap();
    let redis = RedisServer::start(&dir.path().join("redis")).unwrap();
    let coord = Coord::connect(&redis.url()).await.unwrap();
    let key = VaultKey::generate();
    let writer = Writer::new(store.clone(), coord.clone(), key.clone())
        .with_export_roots(vec![dir.path().to_path_buf()]);
    Env {
        dir,
        writer,
        store,
        key,
        coord,
        _redis: redis,
    }
}

impl Env {
    /// Seals and stores a block; returns its chunk id.
    pub async fn put(&self, data: &[u8]) -> ChunkId {
        let id = chunk_id(&self.key, data);
        let sealed = seal_chunk(&self.key, &id, data);
        self.store.put_chunk(&id, sealed.into()).await.unwrap();
        id
    }

    /// Takes the disk's lease.
    pub async fn lease(&self, disk: &str, holder: &str) -> Lease {
        self.coord
            .acquire_lease(disk, holder, std::time::Duration::from_secs(60))
            .await
            .unwrap()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A recognisable, non-zero block.
pub fn block(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub fn disk(id: &str, format: &str, subformat: &str) -> Disk {
    Disk {
        id: id.into(),
        path: format!("/vms/{id}.{format}"),
        format: format.into(),
        subformat: subformat.into(),
        virtual_size: VSIZE,
        logical_sector_size: 512,
        ..Disk::default()
    }
}

pub fn commit(
    vm: &str,
    disk: Disk,
    blocks: &[(u64, ChunkId)],
    zeroed: &[u64],
    full: bool,
    token: u64,
) -> CommitPointRequest {
    let id = disk.id.clone();
    CommitPointRequest {
        vm: vm.into(),
        cycle_id: uuid::Uuid::new_v4().to_string(),
        kind: if full {
            CycleKind::Initial
        } else {
            CycleKind::Delta
        }
        .into(),
        consistency: Consistency::Crash.into(),
        disks: vec![CommitDisk {
            disk: Some(disk),
            block_size: BS,
            blocks: blocks
                .iter()
                .map(|(i, c)| BlockEntry {
                    index: *i,
                    chunk: c.to_vec(),
                })
                .collect(),
            zeroed: zeroed.to_vec(),
            logs: vec![],
            full,
            shipped_logs: vec![],
        }],
        fencing_tokens: [(id, token)].into_iter().collect(),
        host: "h1".into(),
        epoch: 0,
        base_point: String::new(),
        cut_id: String::new(),
    }
}

pub async fn map_of(w: &Writer, vm: &str, point: &str, disk: &str) -> Vec<(u64, ChunkId)> {
    let req = BlockHashesRequest {
        vm: vm.into(),
        point: point.into(),
        disk_id: disk.into(),
        omit_lost: false,
    };
    let map = w.block_map(&req).await.unwrap();
    map.entries.into_iter().collect()
}

pub fn materialize_req(target: &Path, format: &str) -> MaterializeDiskRequest {
    MaterializeDiskRequest {
        vm: "web".into(),
        point: "latest".into(),
        disk_id: "d1".into(),
        target_path: target.display().to_string(),
        format: format.into(),
        subformat: String::new(),
    }
}
