//! Replication-ingest: the replication cycle. BeginCycle takes every disk's lease (with a
//! fencing token), the gateway asks whether a host may upload into a cycle and reports what
//! landed, CommitCycle hands the block maps to storage-writer, which re-checks the fencing
//! tokens and commits the recovery point, and the registry hears of it.
//!
//! Cycles live in Redis (`ferry:cycle:<id>`) so any ingest replica can serve any call; a
//! lost cycle costs a restart of the copy, never data (chunks are durable and deduplicated).
mod api;
mod cycle;
mod error;
mod report;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_coord::Coord;
use ferry_mesh::{MeshConfig, Peers, VmOwners};
use ferry_proto::ingest::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::Api;
pub use error::IngestError;

/// Lease period of a disk's replication; the agent renews at a third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

pub struct IngestService {
    cfg: MeshConfig,
    coord: Coord,
    /// Channels to the storage-writer and registry, made once.
    peers: Peers,
    /// Which host each VM belongs to (the registry's answer): a host begins cycles only for
    /// its own VMs.
    owners: VmOwners,
    /// Serialises read-modify-write of a cycle record within this replica.
    lock: tokio::sync::Mutex<()>,
}

pub async fn run(
    cfg: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let coord = Coord::connect_config(&cfg)
        .await
        .context("connecting to redis")?;
    let svc = Arc::new(IngestService {
        cfg: cfg.clone(),
        coord,
        peers: Peers::service(&cfg).context("loading the service certificate")?,
        owners: VmOwners::registry(&cfg)?,
        lock: Default::default(),
    });
    let auth = ferry_mesh::component_authenticator(&cfg, shutdown.clone())
        .await?
        .with_audit(ferry_store::AuditWriter::open(
            &cfg.store_url(),
            &cfg.data_key()?,
        )?);
    let server = pb::ingest_server::IngestServer::new(Api(svc)).max_decoding_message_size(64 << 20);
    ferry_mesh::serve_component(&cfg, listener, &auth, server, shutdown).await?;
    Ok(())
}
