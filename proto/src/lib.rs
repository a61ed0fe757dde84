//! Ferry's gRPC API. One module per `.proto` package; [`FILE_DESCRIPTOR_SET`] feeds server
//! reflection so grpcurl can list and call every service without local `.proto` files.

/// Encoded `FileDescriptorSet` of every Ferry proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));

#[allow(clippy::all, clippy::pedantic)]
pub mod common {
    pub mod v1 {
        tonic::include_proto!("ferry.common.v1");
    }
}

#[allow(clippy::all, clippy::pedantic)]
pub mod registry {
    pub mod v1 {
        tonic::include_proto!("ferry.registry.v1");
    }
}

#[allow(clippy::all, clippy::pedantic)]
pub mod scheduler {
    pub mod v1 {
        tonic::include_proto!("ferry.scheduler.v1");
    }
}

#[allow(clippy::all, clippy::pedantic)]
pub mod ingest {
    pub mod v1 {
        tonic::include_proto!("ferry.ingest.v1");
    }
}

#[allow(clippy::all, clippy::pedantic)]
pub mod storage {
    pub mod v1 {
        tonic::include_proto!("ferry.storage.v1");
    }
}

#[allow(clippy::all, clippy::pedantic)]
pub mod failover {
    pub mod v1 {
        tonic::include_proto!("ferry.failover.v1");
    }
}

/// Fully qualified gRPC service names, as reflection lists them.
pub const SERVICE_NAMES: &[&str] = &[
    "ferry.registry.v1.Registry",
    "ferry.scheduler.v1.Scheduler",
    "ferry.ingest.v1.Ingest",
    "ferry.storage.v1.StorageWriter",
    "ferry.failover.v1.Failover",
];

/// The stable id of a VM's disk: the storage and lease key of its replication. It depends on
/// the VM's name and the disk's path as configured on the host, not on the host, so a second
/// host claiming the same disk meets the same lease.
pub fn disk_id(vm: &str, path: &str) -> String {
    let mut h = blake3::Hasher::new_derive_key("ferry 2026 disk id");
    h.update(vm.as_bytes());
    h.update(&[0]);
    h.update(path.as_bytes());
    let hex = h.finalize().to_hex();
    hex[..32].to_string()
}

/// Current time in Unix milliseconds, the unit of every `*_ms` field in the API.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
