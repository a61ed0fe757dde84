//! Re-protect after a commit (DESIGN §2.8): the host the VM runs on becomes its replication
//! source and the host it left its recovery host; the direction flips. The recovered VM's
//! disks were served by that host's tracker from the VM's first write, so its logs hold
//! exactly what changed since the point it failed over to: the first cycle ships them on top
//! of that point (the registry hands ingest the point as the cycle's base), never a full copy.
use std::time::Duration;

use ferry_proto::common::v1::{Disk, Job};
use ferry_proto::failover::v1::ReprotectRequest;
use ferry_proto::registry::v1::{FailoverEvent, RecordFailoverRequest, Vm};
use tracing::info;

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::Record;
use crate::test_failover::check_vm_name;

pub const REPROTECT_STEPS: [&str; 2] = [
    "make the host the vm runs on its replication source",
    "first point from the new source (the writes since the failover)",
];

/// How long the job waits for the new source's first point (the scheduler queues it at the
/// policy's frequency).
const FIRST_POINT_WAIT: Duration = Duration::from_secs(600);

impl Orchestrator {
    /// Re-protects a VM whose failover (or failback) was committed and returns the job.
    pub async fn reprotect(&self, req: ReprotectRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(&req.vm)?;
        let vm = self.get_vm(&req.vm).await?;
        let record = self.committed_failover(&vm).await?;
        // The base of the first cycle: still in the store, or re-protect cannot ship a delta.
        self.get_point(&vm.name, &record.point_id).await?;
        let disks = source_disks(&record, &vm)?;
        let mut job = JobTracker::start(
            self.registry.clone(),
            "reprotect",
            &vm.name,
            &REPROTECT_STEPS,
        )
        .await?;
        let res = self.run_reprotect(&mut job, &vm, &record, disks).await;
        Ok(match res {
            Ok(()) => job.succeed().await,
            Err(e) => job.fail(&e).await,
        })
    }

    async fn run_reprotect(
        &self,
        job: &mut JobTracker,
        vm: &Vm,
        record: &Record,
        disks: Vec<Disk>,
    ) -> Result<()> {
        job.step_running(0).await;
        let before = vm.last_point_id.clone();
        let mut registry = self.registry.clone();
        let now = registry
            .record_failover(RecordFailoverRequest {
                vm: vm.name.clone(),
                event: FailoverEvent::Reprotected as i32,
                failover_id: record.job_id.clone(),
                host: record.host.clone(),
                point: record.point_id.clone(),
                error: String::new(),
                disks,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                    FailoverError::FailedPrecondition(s.message().to_owned())
                }
                _ => FailoverError::remote("registry", "record re-protect", &s),
            })?
            .into_inner();
        info!(vm = %vm.name, source = %now.host, recovery_host = %now.recovery_host, direction = %now.direction, base = %record.point_id, "vm re-protected");
        job.step_done(
            0,
            format!(
                "{} replicates vm {} now ({}), {} is its recovery host; changes apply to point {}",
                now.host, vm.name, now.direction, now.recovery_host, record.point_id
            ),
        )
        .await;
        job.step_running(1).await;
        let first = self.first_point_after(&vm.name, &before).await?;
        job.step_done(
            1,
            format!(
                "point {} from {} ({} bytes shipped)",
                first.last_point_id, first.host, first.last_cycle_bytes
            ),
        )
        .await;
        Ok(())
    }

    /// The committed failover the VM runs from (planned, unplanned or failback), on the host
    /// it runs on now.
    async fn committed_failover(&self, vm: &Vm) -> Result<Record> {
        self.ledger
            .last_committed(&vm.name)
            .await?
            .filter(|r| r.host == vm.active_host && vm.failover_id == r.job_id)
            .ok_or_else(|| {
                FailoverError::FailedPrecondition(format!(
                    "vm {} has no committed failover to re-protect from (it runs on {})",
                    vm.name, vm.active_host
                ))
            })
    }

    /// Waits for the VM's first point after `before` from its new source.
    async fn first_point_after(&self, vm: &str, before: &str) -> Result<Vm> {
        let deadline = tokio::time::Instant::now() + FIRST_POINT_WAIT;
        loop {
            let v = self.get_vm(vm).await?;
            if v.last_point_id != before && v.base_point.is_empty() {
                return Ok(v);
            }
            if tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return Err(FailoverError::FailedPrecondition(format!(
                    "vm {vm} is re-protected but {} committed no point within {}s: see `ferry vm show {vm}`",
                    v.host,
                    FIRST_POINT_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The VM's disks on the host it runs on: the registry's disks (ids, sizes) at the paths
/// the failover recorded there.
fn source_disks(record: &Record, vm: &Vm) -> Result<Vec<Disk>> {
    vm.disks
        .iter()
        .map(|d| {
            let local = record
                .disks
                .iter()
                .find(|l| l.disk_id == d.id)
                .ok_or_else(|| {
                    FailoverError::Internal(format!(
                        "the failover of vm {} on {} recorded no disk {}",
                        record.vm, record.host, d.id
                    ))
                })?;
            Ok(Disk {
                path: local.path.clone(),
                format: local.format.clone(),
                nbd_uri: local.nbd_uri.clone(),
                error: String::new(),
                pending_log_bytes: 0,
                ..d.clone()
            })
        })
        .collect()
}
