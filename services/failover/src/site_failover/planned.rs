//! Planned failover: zero data loss while the primary is healthy. Prerequisites (the primary
//! connected: it must shut the VM down) → the primary's driver stops the VM and its tracker
//! fences the disks, then the last writes are cut, shipped and committed (the final point
//! holds every write the tracker acknowledged) → the registry fences the primary (epoch) →
//! the recovery host materialises the final point and starts the VM with the production
//! network. A source that cannot be stopped fails the job before anything moved.
use std::time::Duration;

use ferry_coord::KeptLease;
use ferry_proto::common::v1::Job;
use ferry_proto::failover::v1::PlannedFailoverRequest;
use ferry_proto::registry::v1::{FailoverEvent, ListHostsRequest, Vm};
use ferry_proto::scheduler::v1::{FailoverWork, WorkKind};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::Record;
use crate::test_failover::check_vm_name;

pub const PLANNED_STEPS: [&str; 5] = [
    "check prerequisites",
    "shut down the source vm and synchronise its last writes",
    "fence the primary",
    "materialise disks and start the vm on the recovery host",
    "record the failover",
];

/// The step that stops the source: once it succeeded, a failure starts the source again.
pub(super) const SHUTDOWN_STEP: usize = 1;

/// How long the primary may take to stop the VM and ship its last writes.
const FINAL_SYNC_WAIT: Duration = Duration::from_secs(600);

/// Who stops, for what, and the event that fences it: see
/// [`Orchestrator::stop_sync_and_fence`].
pub(crate) struct StopAndFence {
    pub(crate) host: String,
    /// The failover kind the source's work carries ("planned", "failback").
    pub(crate) kind: &'static str,
    pub(crate) event: FailoverEvent,
    /// The job's step that stops; the next one fences.
    pub(crate) first_step: usize,
}

impl Orchestrator {
    /// Runs a planned failover of a VM to its recovery host and returns the finished job.
    pub async fn planned_failover(&self, req: PlannedFailoverRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        let prepare = async {
            self.no_current_failover(&req.vm).await?;
            let vm = self.failover_vm(&req.vm).await?;
            self.require_connected(&vm.host, &vm.name).await?;
            // The point is the final one, known after the source shipped it.
            let point = self.get_point(&req.vm, "latest").await?;
            // Cancellable only before the source is shut down.
            let job = JobTracker::start_cancellable(
                self.registry.clone(),
                "planned-failover",
                &req.vm,
                &PLANNED_STEPS,
                1,
            )
            .await?;
            Ok((vm, point, job))
        };
        self.begin_site_failover(&req.vm, "planned", false, req.instant, prepare)
            .await
    }

    /// A planned failover needs its source: refused at once when the primary is not connected.
    pub(crate) async fn require_connected(&self, host: &str, vm: &str) -> Result<()> {
        let mut registry = self.registry.clone();
        let hosts = registry
            .list_hosts(ListHostsRequest {})
            .await
            .map_err(|s| FailoverError::remote("registry", "list hosts", &s))?
            .into_inner()
            .hosts;
        match hosts.iter().find(|h| h.name == host) {
            Some(h) if h.status == "connected" => Ok(()),
            Some(h) => Err(FailoverError::FailedPrecondition(format!(
                "vm {vm}: its host {host} is {}: a planned failover needs the source to shut \
                 the vm down and ship its last writes; run an unplanned failover instead",
                h.status
            ))),
            None => Err(FailoverError::FailedPrecondition(format!(
                "vm {vm}: its host {host} is not registered"
            ))),
        }
    }

    /// Whether `host` tracks writes (a tracker serves its disks): it can recover a VM
    /// instantly. False when the registry cannot say.
    pub(crate) async fn host_tracks(&self, host: &str) -> bool {
        let mut registry = self.registry.clone();
        match registry.list_hosts(ListHostsRequest {}).await {
            Ok(r) => r
                .into_inner()
                .hosts
                .iter()
                .any(|h| h.name == host && h.change_tracking),
            Err(_) => false,
        }
    }

    /// Two steps of a planned failover and of a failback's phase 2: the source stops the VM
    /// and ships its last writes (the record's point becomes the final one), then the
    /// registry records `stop.event`, which fences the source.
    pub(crate) async fn stop_sync_and_fence(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &str,
        stop: StopAndFence,
    ) -> Result<()> {
        let (host, first) = (&stop.host, stop.first_step);
        job.enter_step(first).await?;
        let job_id = job.id().to_owned();
        record.point_id = self
            .stop_and_sync(host, vm, &job_id, stop.kind, &record.job_id)
            .await?;
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        job.step_done(
            first,
            format!("vm stopped on {host}; final point {}", record.point_id),
        )
        .await;
        job.enter_step(first + 1).await?;
        let fenced = self.record_failover(vm, stop.event, record, "").await?;
        job.step_done(
            first + 1,
            format!("replication from {host} fenced (epoch {})", fenced.epoch),
        )
        .await;
        Ok(())
    }

    /// Stops the VM on its source `host` and has the host ship its last writes (fenced
    /// first, so nothing comes after); the final point. A source that cannot is the job's
    /// failure (the host started the VM again itself).
    async fn stop_and_sync(
        &self,
        host: &str,
        vm: &str,
        job_id: &str,
        kind: &str,
        failover_id: &str,
    ) -> Result<String> {
        let work = FailoverWork {
            kind: kind.into(),
            failover_id: failover_id.to_owned(),
            final_sync: true,
            ..FailoverWork::default()
        };
        let done = self
            .dispatch_and_wait(
                host,
                WorkKind::ShutdownVm,
                vm,
                job_id,
                work,
                Some(FINAL_SYNC_WAIT),
            )
            .await
            .map_err(|e| {
                FailoverError::FailedPrecondition(format!(
                    "the vm could not be shut down on {host} and synchronised: {e}"
                ))
            })?;
        if done.final_point.is_empty() {
            return Err(FailoverError::Internal(format!(
                "host {host} stopped vm {vm} but named no final point"
            )));
        }
        Ok(done.final_point)
    }

    pub(super) async fn run_planned(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
    ) -> Result<()> {
        job.enter_step(0).await?;
        job.step_done(
            0,
            format!("{} connected, recovery host {}", vm.host, record.host),
        )
        .await;
        let stop = StopAndFence {
            host: vm.host.clone(),
            kind: "planned",
            event: FailoverEvent::PlannedStarted,
            first_step: 1,
        };
        self.stop_sync_and_fence(job, kept, record, &vm.name, stop)
            .await?;
        let point = self.get_point(&vm.name, &record.point_id).await?;
        self.bring_up(job, kept, record, vm, &point, 3).await
    }
}
