//! Ferry's gRPC API. One module per `.proto` package; [`FILE_DESCRIPTOR_SET`] feeds server
//! reflection so grpcurl can list and call every service without local `.proto` files.

/// Encoded `FileDescriptorSet` of every Ferry proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));

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
