//! Harness for whole-mesh tests: the real mesh in-process (`ferry up`'s code) with a real
//! `redis-server` child on a free port and a local-filesystem store in a temp dir, real
//! agents (in-process or as `ferry-agent` processes), disks made by `qemu-img`/`qemu-io`.
mod agent;
pub mod bench;
mod failover;
mod gateway;
mod lossy;
mod mesh;
mod replicas;
mod rng;
mod stores;
mod throttle;
mod tools;

pub use agent::{
    InProcessAgent, host_identity, host_tls, nbd_io, nbd_write, spawn_agent_process, unclean_logs,
    wait_logs_closed,
};
pub use failover::{command_driver, ok_job, step, text};
pub use gateway::InProcessGateway;
pub use lossy::LossyRelay;
pub use mesh::{
    TestMesh, init_logs, policy_resync_window_closed, start_mesh_with_block_size,
    start_mesh_with_setting,
};
pub use replicas::Replica;
pub use rng::Rng;
pub use stores::ObjectServer;
pub use throttle::ThrottlingProxy;
pub use tools::{
    bin, fill_random, qemu_compare, qemu_convert, qemu_create, qemu_io, qemu_virtual_size, run,
};
