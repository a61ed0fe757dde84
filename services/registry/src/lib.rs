//! The registry: the vault's hosts, VMs and disks, one-time registration keys and host
//! certificates, the protection state machine and every job. Its durable state is the
//! `registry` catalog namespace in object storage (see [`state`]).
mod cancel;
mod error;
mod job_record;
mod jobs;
mod lifecycle;
mod recovery_site;
mod service;
pub mod snapshot;
pub mod state;
mod unprotect;

use std::sync::Arc;

use anyhow::Context;
use ferry_mesh::MeshConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::RegistryError;
pub use service::{RegistryApi, RegistryService};

/// Serves the registry on `listener` until `shutdown` fires.
pub async fn run(
    cfg: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let svc = RegistryService::open(cfg.clone(), shutdown.clone())
        .await
        .context("opening the registry catalog")?;
    let svc = Arc::new(svc);
    svc.resume_jobs();
    let auth = svc.authenticator()?;
    let server = ferry_proto::registry::v1::registry_server::RegistryServer::new(
        service::RegistryApi(svc.clone()),
    );
    ferry_mesh::serve_component(&cfg, listener, &auth, server, shutdown).await?;
    Ok(())
}
