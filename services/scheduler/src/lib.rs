//! The scheduler: a Redis work queue per host and a server stream that hands work to each
//! host's agent. Work that was sent but never completed is re-sent when the host's agent
//! reconnects, so an agent killed mid-copy picks its copy up again after a restart. Failed
//! recoverable work goes to the retry set with backoff (DESIGN §2.6).
mod api;
mod cancel;
mod cuts;
mod cycles;
mod error;
pub mod leader;
mod results;
mod retention;
mod retry;
mod windows;
mod work;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use ferry_coord::Coord;
use ferry_mesh::{MeshConfig, Peers};
use ferry_model::{Health, VmState};
use ferry_proto::scheduler::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use api::Api;
pub use error::SchedulerError;
pub use retry::{BACKOFF_TAIL_UNITS, BACKOFF_UNITS, backoff};
pub use windows::in_window;

use cycles::CycleSchedule;

pub struct SchedulerService {
    cfg: MeshConfig,
    coord: Coord,
    /// Channels to the registry and storage-writer, made once.
    peers: Peers,
    shutdown: CancellationToken,
    /// Delta cycle timing per protected VM. Rebuilt from the registry (the catalog) every few
    /// seconds and at start, so losing this process or Redis loses no schedule.
    cycles: tokio::sync::Mutex<HashMap<String, CycleSchedule>>,
}

pub async fn run(
    cfg: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let coord = Coord::connect_config(&cfg)
        .await
        .context("connecting to redis")?;
    let svc = Arc::new(SchedulerService {
        cfg: cfg.clone(),
        coord,
        peers: Peers::service(&cfg).context("loading the service certificate")?,
        shutdown: shutdown.clone(),
        cycles: Default::default(),
    });
    // Only the leader replica runs the timing loops; every replica serves the API.
    tokio::spawn(leader::campaign(
        svc.coord.clone(),
        leader::replica_id(listener.local_addr().ok()),
        shutdown.clone(),
        {
            let svc = svc.clone();
            move |term| {
                tokio::spawn(svc.clone().retry_loop(term.clone()));
                tokio::spawn(svc.clone().cycle_loop(term));
            }
        },
    ));
    let auth = ferry_mesh::component_authenticator(&cfg, shutdown.clone())
        .await?
        .with_audit(ferry_store::AuditWriter::open(
            &cfg.store_url(),
            &cfg.data_key()?,
        )?);
    let server = pb::scheduler_server::SchedulerServer::new(Api(svc));
    ferry_mesh::serve_component(&cfg, listener, &auth, server, shutdown).await?;
    Ok(())
}

/// A VM's state and health from the registry's wire enums (the one conversion); a value this
/// build does not know (a newer registry) counts as neither.
pub(crate) fn lifecycle_of(v: &ferry_proto::registry::v1::Vm) -> Option<(VmState, Health)> {
    Some((v.state.try_into().ok()?, v.health.try_into().ok()?))
}
