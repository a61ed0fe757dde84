//! After a failover, before its commit: change the recovery point (the VM on the recovery
//! host is stopped, its disks rewritten from the other point, and started again), or commit
//! (the point is fixed; the VM's points stay under the retention policy).
//!
//! Changing the point is RECOVER_VM work of the same failover (`failover_id` is the
//! failover's job) with the new point: the recovery host sees its folder holds another point
//! of that failover, stops the VM, compares its disks block by block with the new point's
//! block maps and rewrites only the blocks that differ (what the VM wrote since it started is
//! discarded, with its change logs), then starts it again (`agent/src/recover/repoint.rs`).
//! A point whose disks are not the local ones is materialised whole.
use ferry_coord::KeptLease;
use ferry_proto::common::v1::Job;
use ferry_proto::failover::v1::{ChangeRecoveryPointRequest, CommitFailoverRequest};
use ferry_proto::registry::v1::FailoverEvent;
use ferry_proto::scheduler::v1::{FailoverWork, WorkKind};
use tracing::info;

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{Record, STATE_COMMITTED};
use crate::test_failover::check_vm_name;

pub const COMMIT_STEPS: [&str; 1] = ["commit the failover"];
pub const CHANGE_POINT_STEPS: [&str; 2] = [
    "resolve recovery point",
    "stop the vm, rewrite the blocks that differ and start it on the recovery host",
];

impl Orchestrator {
    /// The VM's planned or unplanned failover waiting for its commit.
    async fn pending_failover(&self, vm: &str) -> Result<Record> {
        match self.ledger.current(vm).await? {
            Some(r) if r.kind != "test" && r.is_active() => Ok(r),
            Some(r) if r.kind != "test" => Err(FailoverError::FailedPrecondition(format!(
                "the failover of vm {vm} is still running (job {})",
                r.working_job()
            ))),
            _ => Err(FailoverError::FailedPrecondition(format!(
                "vm {vm} has no failover waiting for its commit"
            ))),
        }
    }

    /// Runs `f` as job `kind` on the VM's pending failover, under the record's lease.
    async fn on_pending<'a, F, Fut>(
        &'a self,
        vm: &str,
        kind: &str,
        steps: &[&str],
        f: F,
    ) -> Result<Job>
    where
        F: FnOnce(&'a Self, JobTracker, KeptLease, Record) -> Fut,
        Fut: std::future::Future<Output = (JobTracker, KeptLease, Result<()>)>,
    {
        check_vm_name(vm)?;
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(vm)?;
        let starting = self.lock_vm_start(vm).await?;
        let begun = async {
            let record = self.pending_failover(vm).await?;
            let job = JobTracker::start(self.registry.clone(), kind, vm, steps).await?;
            Ok::<_, FailoverError>((record, job))
        }
        .await;
        let (record, job) = match begun {
            Ok(b) => b,
            Err(e) => {
                self.unlock_vm_start(starting).await;
                return Err(e);
            }
        };
        let mut record = Record {
            last_job_id: job.id().to_owned(),
            holder: self.holder(),
            ..record
        };
        let kept = self.lease_and_record(&mut record).await;
        self.unlock_vm_start(starting).await;
        let kept = match kept {
            Ok(k) => k,
            Err(e) => return Ok(job.fail(&e).await),
        };
        let _running = self.mark_running(job.id());
        let (job, kept, res) = f(self, job, kept, record).await;
        let _ = kept.release().await;
        Ok(match res {
            Ok(()) => job.succeed().await,
            Err(e) => job.fail(&e).await,
        })
    }

    /// Commits the VM's failover: the registry fixes it (failover-committed) and the record
    /// says committed.
    pub async fn commit_failover(&self, req: CommitFailoverRequest) -> Result<Job> {
        self.on_pending(&req.vm, "commit-failover", &COMMIT_STEPS, |me, mut job, kept, mut record| async move {
            let res = async {
                job.step_running(0).await;
                me.record_failover(&record.vm, FailoverEvent::Committed, &record, "")
                    .await?;
                record.state = STATE_COMMITTED.into();
                record.updated_at_ms = chrono::Utc::now().timestamp_millis();
                me.ledger.put_fenced(&mut record, &me.coord, kept.lease()).await?;
                let released = me.release_recovered(job.id(), &record).await;
                job.step_done(0, format!("point {} on {} committed{released}", record.point_id, record.host))
                    .await;
                info!(vm = %record.vm, point = %record.point_id, host = %record.host, "failover committed");
                Ok(())
            }
            .await;
            (job, kept, res)
        })
        .await
    }

    /// Moves the failed-over VM to another point.
    pub async fn change_recovery_point(&self, req: ChangeRecoveryPointRequest) -> Result<Job> {
        let point_ref = if req.point.is_empty() {
            "latest".to_owned()
        } else {
            req.point.clone()
        };
        self.on_pending(
            &req.vm,
            "change-recovery-point",
            &CHANGE_POINT_STEPS,
            |me, mut job, kept, record| async move {
                let res = me.change_point(&mut job, &kept, record, &point_ref).await;
                (job, kept, res)
            },
        )
        .await
    }

    async fn change_point(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        mut record: Record,
        point_ref: &str,
    ) -> Result<()> {
        job.step_running(0).await;
        let vm = self.get_vm(&record.vm).await?;
        let point = self.get_point(&record.vm, point_ref).await?;
        job.step_done(0, format!("point {} ({} ms)", point.id, point.time_ms))
            .await;

        job.step_running(1).await;
        let total: u64 = point.disks.iter().map(|d| d.virtual_size).sum();
        job.set_bytes(total, 0);
        let recover = FailoverWork {
            point: point.id.clone(),
            network: "production".into(),
            kind: record.kind.clone(),
            failover_id: record.job_id.clone(),
            hardware: Some(super::production_hardware(&vm)),
            final_sync: false,
            nic_addresses: vm
                .policy
                .as_ref()
                .map(|p| p.nic_addresses.clone())
                .unwrap_or_default(),

            ..FailoverWork::default()
        };
        let (host, job_id) = (record.host.clone(), job.id().to_owned());
        let recovered = self
            .dispatch_and_wait(&host, WorkKind::RecoverVm, &vm.name, &job_id, recover, None)
            .await?;
        // A host that answers with the start it recorded before did not change anything (an
        // agent from before changes of point were done in place answers so).
        if record.started_at_ms != 0 && recovered.started_at_ms == record.started_at_ms {
            return Err(FailoverError::FailedPrecondition(format!(
                "host {host} did not restart vm {} on point {}: its agent may be too old to change the point",
                vm.name, point.id
            )));
        }
        job.set_bytes(total, total);
        record.set_recovered(&recovered);
        record.point_id = point.id.clone();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        self.ledger
            .put_fenced(&mut record, &self.coord, kept.lease())
            .await?;
        self.record_failover(&vm.name, FailoverEvent::PointChanged, &record, "")
            .await?;
        job.step_done(
            1,
            format!(
                "vm running on point {} on {host}; {} of {total} bytes rewritten",
                point.id, recovered.bytes_written
            ),
        )
        .await;
        info!(vm = %vm.name, point = %point.id, host = %host, bytes_rewritten = recovered.bytes_written, size = total, "recovery point changed");
        Ok(())
    }
}
