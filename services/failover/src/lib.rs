//! Ferry failover orchestrator: test failover and its cleanup, planned and unplanned
//! failover, change point, commit, re-protect, failback and recovery plans, each as a
//! registry job; failover records and plans in the catalog.
//!
//! The logic lives on [`Orchestrator`] as plain async methods; [`service`] adds authorization
//! and maps errors to statuses.
//!
//! Replicas: any number of orchestrators may serve one vault. A job runs under a lease on its
//! record (`failover-job-<job id>`, renewed in the background); its state lives in the catalog
//! (see [`records`]), every entry written with the lease's fencing token. Each replica scans
//! the catalog for records with a job in progress whose lease is free (the replica running it
//! stopped or died, or Redis lost its data) and resumes that job.

mod allowed;
mod drill;
mod drill_schedule;
pub mod error;
mod failback;
mod host_work;
mod job;
pub mod plans;
pub mod records;
pub mod service;
mod site_failover;
mod test_failover;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use ferry_coord::Coord;
use ferry_mesh::{ClientTls, Component, MeshConfig};
use ferry_proto::failover::v1::failover_server::FailoverServer;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_proto::scheduler::v1::scheduler_client::SchedulerClient;
use ferry_proto::storage::v1::storage_writer_client::StorageWriterClient;
use ferry_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use drill::DRILL_STEPS;
pub use error::FailoverError;
pub use failback::{COMPLETE_STEPS, FAILBACK_STEPS, REPROTECT_STEPS};
pub use records::{Ledger, Record};
pub use service::FailoverService;
pub use site_failover::UNPLANNED_STEPS;
pub use test_failover::{CLEANUP_STEPS, ON_HOST_TEST_STEPS, TEST_FAILOVER_STEPS, disk_file_name};

/// The orchestrator's state: clients of the registry and the storage-writer (service
/// certificate), and the failover records. Cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    registry: RegistryClient<Channel>,
    storage: StorageWriterClient<Channel>,
    /// Failover work for hosts (recovery hosts) goes through the scheduler.
    scheduler: Option<SchedulerClient<Channel>>,
    ledger: Arc<Ledger>,
    /// Recovery plans.
    plans: Arc<plans::PlanBook>,
    /// VMs with a failover operation running in this process.
    busy: Arc<Mutex<HashSet<String>>>,
    /// Server shutdown: running jobs stop and release their leases, so another replica
    /// resumes them at once.
    shutdown: CancellationToken,
    /// Job leases.
    coord: Coord,
    /// This process, in lease holders.
    replica: String,
    /// Jobs running in this process (the resume scan skips them).
    running: Arc<Mutex<HashSet<String>>>,
    /// The folders a test failover's `target_dir` must lie under (none: every one refused).
    export_roots: Arc<Vec<std::path::PathBuf>>,
}

/// The lease ttl of a job: a job whose replica died is resumed within about this.
pub const JOB_LEASE_TTL: Duration = Duration::from_secs(5);
/// How often each replica looks for jobs to resume.
pub const RESUME_SCAN: Duration = Duration::from_secs(1);

/// Every this many resume scans, plan jobs whose runner is gone are ended (they list every
/// job of the registry).
const PLAN_SCAN_EVERY: u64 = 10;

/// The lease guarding the jobs on the record made by job `job_id`.
pub(crate) fn job_resource(job_id: &str) -> String {
    format!("failover-job-{job_id}")
}

/// Forgets a job marked by [`Orchestrator::mark_running`].
struct Running {
    running: Arc<Mutex<HashSet<String>>>,
    job: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&self.job);
        }
    }
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").finish_non_exhaustive()
    }
}

/// Releases a VM claimed by [`Orchestrator::claim`].
struct Claim {
    busy: Arc<Mutex<HashSet<String>>>,
    vm: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(&self.vm);
        }
    }
}

impl Orchestrator {
    /// An orchestrator over channels to the registry and the storage-writer (authenticated
    /// with the service certificate), the object store holding the catalog, and Redis for
    /// job leases.
    pub fn new(registry: Channel, storage: Channel, store: Store, coord: Coord) -> Self {
        Self {
            registry: RegistryClient::new(registry),
            storage: StorageWriterClient::new(storage),
            scheduler: None,
            plans: Arc::new(plans::PlanBook::new(store.clone())),
            ledger: Arc::new(Ledger::new(store)),
            busy: Arc::default(),
            shutdown: CancellationToken::new(),
            coord,
            replica: format!("failover-{}", uuid::Uuid::new_v4()),
            running: Arc::default(),
            export_roots: Arc::default(),
        }
    }

    /// Lets test failovers write into folders under `roots` on this machine.
    pub fn with_export_roots(mut self, roots: Vec<std::path::PathBuf>) -> Self {
        self.export_roots = Arc::new(roots);
        self
    }

    pub(crate) fn export_roots(&self) -> &[std::path::PathBuf] {
        &self.export_roots
    }

    /// Sends work to hosts through the scheduler on `channel` (failover on a recovery host).
    pub fn with_scheduler(mut self, channel: Channel) -> Self {
        self.scheduler = Some(SchedulerClient::new(channel));
        self
    }

    pub(crate) fn scheduler(&self) -> error::Result<SchedulerClient<Channel>> {
        self.scheduler.clone().ok_or_else(|| {
            FailoverError::Internal(
                "this orchestrator has no scheduler to send host work to".into(),
            )
        })
    }

    /// Stops running jobs when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Connects to Redis, and (lazily: peers may start later) to the peers named in the
    /// config.
    pub async fn from_config(cfg: &MeshConfig) -> anyhow::Result<Self> {
        let tls = ClientTls::service(cfg).context("loading the service certificate")?;
        let registry = ferry_mesh::connect_lazy(&cfg.endpoint(Component::Registry), &tls)?;
        let storage = ferry_mesh::connect_lazy(&cfg.endpoint(Component::StorageWriter), &tls)?;
        let scheduler = ferry_mesh::connect_lazy(&cfg.endpoint(Component::Scheduler), &tls)?;
        let store = Store::from_url(&cfg.store_url()).context("opening the object store")?;
        let coord = Coord::connect_config(cfg)
            .await
            .context("connecting to redis")?;
        Ok(Self::new(registry, storage, store, coord)
            .with_scheduler(scheduler)
            .with_export_roots(cfg.export_roots.clone()))
    }

    /// A lease holder name for one run of a job here.
    pub(crate) fn holder(&self) -> String {
        format!("{}/{}", self.replica, uuid::Uuid::new_v4())
    }

    /// Notes that `job` runs here until the result is dropped; None if it already does.
    fn mark_running(&self, job: &str) -> Option<Running> {
        let mut running = self.running.lock().ok()?;
        running.insert(job.to_owned()).then(|| Running {
            running: self.running.clone(),
            job: job.to_owned(),
        })
    }

    /// Every [`RESUME_SCAN`] until shutdown: resumes the jobs whose lease is free.
    pub async fn resume_loop(self) {
        let mut scans: u64 = 0;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(RESUME_SCAN) => {}
            }
            if let Err(e) = self.resume_orphans().await {
                tracing::warn!(error = %e, "scanning for failover jobs to resume failed");
            }
            scans += 1;
            if scans % PLAN_SCAN_EVERY == 1
                && let Err(e) = self.resume_orphan_plan_jobs().await
            {
                tracing::warn!(error = %e, "scanning for plan jobs without a runner failed");
            }
        }
    }

    /// One scan: every record with a job in progress that no replica holds is resumed here
    /// (in the background). Returns how many were taken.
    pub async fn resume_orphans(&self) -> error::Result<usize> {
        let mut taken = 0;
        for rec in self.ledger.records().await? {
            if !rec.is_in_progress() || self.shutdown.is_cancelled() {
                continue;
            }
            let Some(running) = self.mark_running(rec.working_job()) else {
                continue;
            };
            let kept = match self
                .coord
                .acquire_kept(&job_resource(&rec.job_id), &self.holder(), JOB_LEASE_TTL)
                .await
            {
                Ok(k) => k,
                Err(ferry_coord::CoordError::LeaseHeld { .. }) => continue,
                Err(e) => return Err(FailoverError::Lease(e)),
            };
            taken += 1;
            let me = self.clone();
            tokio::spawn(async move {
                let job = rec.working_job().to_owned();
                match me.resume(rec, kept).await {
                    Ok(Some(j)) => {
                        tracing::info!(job = %job, status = j.status, "resumed failover job ended")
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(job = %job, error = %e, "resuming a failover job failed")
                    }
                }
                drop(running);
            });
        }
        Ok(taken)
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Every failover record in its latest state, oldest first; failed ones (which left
    /// nothing behind) are not listed.
    pub async fn list_failovers(&self) -> error::Result<Vec<Record>> {
        let mut records = self.ledger.records().await?;
        records.retain(|r| r.state != records::STATE_FAILED);
        Ok(records)
    }

    /// One failover operation per VM at a time in this process; the catalog state catches
    /// the rest (an active test failover refuses another).
    fn claim(&self, vm: &str) -> error::Result<Claim> {
        let mut busy = self
            .busy
            .lock()
            .map_err(|_| FailoverError::Internal("failover lock poisoned".into()))?;
        if !busy.insert(vm.to_owned()) {
            return Err(FailoverError::FailedPrecondition(format!(
                "a failover operation for vm {vm} is already running"
            )));
        }
        Ok(Claim {
            busy: self.busy.clone(),
            vm: vm.to_owned(),
        })
    }
}

/// Serves `ferry.failover.v1.Failover` (TLS, health, reflection, caller authentication) on
/// `listener` until `shutdown` is cancelled.
pub async fn run(
    cfg: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let orchestrator = Orchestrator::from_config(&cfg)
        .await?
        .with_shutdown(shutdown.clone());
    tokio::spawn(orchestrator.clone().resume_loop());
    tokio::spawn(orchestrator.clone().drill_schedule_loop());
    let auth = ferry_mesh::component_authenticator(&cfg, shutdown.clone())
        .await
        .context("setting up authentication")?
        .with_audit(ferry_store::AuditWriter::open(
            &cfg.store_url(),
            &cfg.data_key()?,
        )?);
    let server = FailoverServer::new(FailoverService::new(orchestrator));
    ferry_mesh::serve_component(&cfg, listener, &auth, server, shutdown).await?;
    Ok(())
}
