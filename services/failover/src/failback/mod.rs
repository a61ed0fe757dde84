//! Failback (DESIGN §2.8): a planned failover from the site the VM runs on (after a
//! re-protect, its replication source) back to its recovery host — its original host — onto
//! the original disks, or into a folder there (`target_dir`). Two jobs, like ASR:
//!
//! * phase 1 (`failback`): the VM keeps running and replicating; the target brings its disks
//!   to the latest point — checksum mode reads them, names every block with the vault's keyed
//!   hash and fetches only the blocks that differ (a cut-off primary's divergent writes
//!   included: they differ, so they are overwritten); full mode writes every block. The
//!   record is then `synced`.
//! * phase 2 (`failback complete`): the source shuts the VM down and ships its last writes
//!   (the final point), the registry fences it, the target writes only the blocks that differ
//!   between phase 1's point and the final one (no disk pass), serves the disks and starts the
//!   VM. Failed over home, commit pending; the commit releases the recovered copy.
//!
//! Both phases run under the record's job lease and resume like a failover (every step is
//! idempotent: host work is named after the job, registry events repeat harmlessly).
mod reprotect;

use std::time::Duration;

use ferry_coord::KeptLease;
use ferry_proto::common::v1::Job;
use ferry_proto::failover::v1::{CompleteFailbackRequest, FailbackRequest};
use ferry_proto::registry::v1::{FailoverEvent, Vm};
use ferry_proto::scheduler::v1::{FailoverWork, WorkKind};
use tracing::{info, warn};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{
    Record, STATE_ACTIVE, STATE_COMPLETING, STATE_FAILED, STATE_RUNNING, STATE_SYNCED,
};
use crate::site_failover::StopAndFence;
use crate::test_failover::check_vm_name;

pub use reprotect::REPROTECT_STEPS;

/// The two jobs of a failback.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Phase 1: the target's disks brought to the latest point, the vm running meanwhile.
    Sync,
    /// Phase 2: stop, final sync, fence, the last writes applied, start on the target.
    Complete,
}

pub const FAILBACK_STEPS: [&str; 3] = [
    "check prerequisites",
    "start the failback (the vm keeps running)",
    "phase 1: bring the target's disks to the latest point",
];

pub const COMPLETE_STEPS: [&str; 4] = [
    "shut down the vm and synchronise its last writes",
    "fence the source",
    "apply the last writes on the target and start the vm",
    "record the failback",
];

/// How long the source may take to stop the VM and ship its last writes.
const FINAL_SYNC_WAIT: Duration = Duration::from_secs(600);

impl Orchestrator {
    /// Runs phase 1 of a failback and returns its job (the record is then `synced`).
    pub async fn failback(&self, req: FailbackRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        let sync = match req.mode.as_str() {
            "" | "checksum" => "checksum",
            "full" => "full",
            other => {
                return Err(FailoverError::InvalidArgument(format!(
                    "failback sync {other:?}: expected checksum or full"
                )));
            }
        };
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(&req.vm)?;
        let starting = self.lock_vm_start(&req.vm).await?;
        let prepared = self.prepare_failback(&req, sync).await;
        let (vm, job, mut record) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.unlock_vm_start(starting).await;
                return Err(e);
            }
        };
        let kept = self.lease_and_record(&mut record).await;
        self.unlock_vm_start(starting).await;
        match kept {
            Ok(kept) => self.drive_phase(Phase::Sync, job, kept, record, vm).await,
            Err(e) => Ok(job.fail(&e).await),
        }
    }

    async fn prepare_failback(
        &self,
        req: &FailbackRequest,
        sync: &str,
    ) -> Result<(Vm, JobTracker, Record)> {
        if let Some(why) = (!req.target_dir.is_empty())
            .then(|| ferry_model::disk::folder_problem(&req.target_dir))
            .flatten()
        {
            return Err(FailoverError::InvalidArgument(format!(
                "failback folder {:?} {why}",
                req.target_dir
            )));
        }
        self.no_current_failover(&req.vm).await?;
        let vm = self.get_vm(&req.vm).await?;
        let target = match req.to_host.as_str() {
            "" => vm.recovery_host.clone(),
            h => h.to_owned(),
        };
        if target.is_empty() || target == vm.host {
            return Err(FailoverError::FailedPrecondition(format!(
                "vm {} runs on {}: a failback needs another host to go to (--to-host)",
                vm.name, vm.host
            )));
        }
        self.require_connected(&target, &vm.name).await?;
        self.require_connected(&vm.host, &vm.name).await?;
        let point = self.get_point(&vm.name, "latest").await?;
        let previous = self.last_committed(&vm).await?;
        let job =
            JobTracker::start(self.registry.clone(), "failback", &vm.name, &FAILBACK_STEPS).await?;
        let mut record =
            crate::site_failover::new_failover_record(&vm, &point, job.id(), self.holder(), false);
        record.kind = "failback".into();
        record.host = target;
        record.target_dir = req.target_dir.clone();
        record.source_host = vm.host.clone();
        record.previous_failover_id = previous;
        record.sync = sync.to_owned();
        Ok((vm, job, record))
    }

    /// The job of the committed failover whose copy the VM runs on now ("" when none).
    async fn last_committed(&self, vm: &Vm) -> Result<String> {
        Ok(self
            .ledger
            .last_committed(&vm.name)
            .await?
            .filter(|r| r.host == vm.host)
            .map(|r| r.job_id)
            .unwrap_or_default())
    }

    /// Runs `phase`; on a failure records it (see [`Phase`]) and marks the record failed.
    async fn drive_phase(
        &self,
        phase: Phase,
        mut job: JobTracker,
        kept: KeptLease,
        mut record: Record,
        vm: Vm,
    ) -> Result<Job> {
        let _running = self.mark_running(job.id());
        let res = match phase {
            Phase::Sync => self.run_phase1(&mut job, &kept, &mut record, &vm).await,
            Phase::Complete => self.run_phase2(&mut job, &kept, &mut record, &vm).await,
        };
        if matches!(res, Err(FailoverError::Lease(_))) || kept.lost().is_cancelled() {
            return Ok(job.snapshot());
        }
        let Err(e) = res else {
            let _ = kept.release().await;
            return Ok(job.succeed().await);
        };
        // Phase 2 after the fence leaves the vm critical on its source until repaired;
        // before it, or in phase 1, it is protected again (a warning).
        let event = match phase == Phase::Complete && job.step_succeeded(1) {
            true => FailoverEvent::Failed,
            false => FailoverEvent::FailbackFailed,
        };
        if let Err(re) = self
            .record_failover(&vm.name, event, &record, &e.to_string())
            .await
        {
            warn!(vm = %vm.name, error = %re, "cannot record the failed failback");
        }
        // Phase 2 stopped the vm: its source runs it again.
        if phase == Phase::Complete && job.step_succeeded(0) {
            let said = self.restart_source(job.id(), &record).await;
            job.note(0, &said);
        }
        record.state = STATE_FAILED.into();
        let _ = self
            .ledger
            .put_fenced(&mut record, &self.coord, kept.lease())
            .await;
        let _ = kept.release().await;
        Ok(job.fail(&e).await)
    }

    async fn run_phase1(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
    ) -> Result<()> {
        job.enter_step(0).await?;
        job.step_done(
            0,
            format!(
                "{} and {} connected; {} sync to point {}",
                record.source_host, record.host, record.sync, record.point_id
            ),
        )
        .await;
        job.enter_step(1).await?;
        self.record_failover(&vm.name, FailoverEvent::FailbackStarted, record, "")
            .await?;
        job.step_done(1, format!("vm keeps running on {}", record.source_host))
            .await;
        job.enter_step(2).await?;
        let work = self.failback_work(vm, record, &record.point_id, "", false);
        let done = self
            .dispatch_for_job(&record.host, WorkKind::Failback, &vm.name, job, work)
            .await?;
        job.set_bytes(done.bytes_written, done.bytes_written);
        record.synced_point = record.point_id.clone();
        record.state = STATE_SYNCED.into();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        job.step_done(
            2,
            format!(
                "{} of {} blocks differed and were rewritten ({} bytes) on {}; run `ferry failback complete {}`",
                done.blocks_rewritten, done.blocks_compared, done.bytes_written, record.host, vm.name
            ),
        )
        .await;
        info!(vm = %vm.name, target = %record.host, point = %record.point_id, rewritten = done.blocks_rewritten, compared = done.blocks_compared, bytes = done.bytes_written, "failback phase 1 done");
        Ok(())
    }

    fn failback_work(
        &self,
        vm: &Vm,
        record: &Record,
        point: &str,
        base: &str,
        start: bool,
    ) -> FailoverWork {
        FailoverWork {
            point: point.to_owned(),
            network: "production".into(),
            kind: "failback".into(),
            failover_id: record.job_id.clone(),
            hardware: Some(vm.hardware.clone().unwrap_or_default()),
            sync: record.sync.clone(),
            base_point: base.to_owned(),
            start,
            target_dir: record.target_dir.clone(),
            previous_failover_id: record.previous_failover_id.clone(),
            ..FailoverWork::default()
        }
    }

    /// Runs phase 2 of the VM's synced failback and returns its job (commit pending after).
    pub async fn complete_failback(&self, req: CompleteFailbackRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(&req.vm)?;
        let starting = self.lock_vm_start(&req.vm).await?;
        let begun = async {
            let record = match self.ledger.current(&req.vm).await? {
                Some(r) if r.kind == "failback" && r.state == STATE_SYNCED => r,
                Some(r) => {
                    return Err(FailoverError::FailedPrecondition(format!(
                        "vm {} has a {} failover {} (job {}), not a synced failback",
                        req.vm, r.kind, r.state, r.working_job()
                    )));
                }
                None => {
                    return Err(FailoverError::FailedPrecondition(format!(
                        "vm {} has no failback waiting for its completion: run `ferry failback {}` first",
                        req.vm, req.vm
                    )));
                }
            };
            let vm = self.get_vm(&req.vm).await?;
            let job = JobTracker::start(self.registry.clone(), "complete-failback", &req.vm, &COMPLETE_STEPS)
                .await?;
            Ok((record, vm, job))
        }
        .await;
        let (record, vm, job) = match begun {
            Ok(b) => b,
            Err(e) => {
                self.unlock_vm_start(starting).await;
                return Err(e);
            }
        };
        let mut record = Record {
            last_job_id: job.id().to_owned(),
            holder: self.holder(),
            state: STATE_COMPLETING.into(),
            ..record
        };
        let kept = self.lease_and_record(&mut record).await;
        self.unlock_vm_start(starting).await;
        match kept {
            Ok(kept) => {
                self.drive_phase(Phase::Complete, job, kept, record, vm)
                    .await
            }
            Err(e) => Ok(job.fail(&e).await),
        }
    }

    async fn run_phase2(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
    ) -> Result<()> {
        let stop = StopAndFence {
            host: record.source_host.clone(),
            kind: "failback",
            event: FailoverEvent::FailbackCutover,
            first_step: 0,
        };
        self.stop_sync_and_fence(job, kept, record, &vm.name, stop)
            .await?;

        job.enter_step(2).await?;
        let work = self.failback_work(vm, record, &record.point_id, &record.synced_point, true);
        let started = self
            .dispatch_for_job(&record.host, WorkKind::Failback, &vm.name, job, work)
            .await?;
        job.set_bytes(started.bytes_written, started.bytes_written);
        job.step_done(
            2,
            format!(
                "{} blocks differed from point {} and were written ({} bytes); vm started on {} ({} driver)",
                started.blocks_rewritten, record.synced_point, started.bytes_written, record.host, started.driver
            ),
        )
        .await;

        job.enter_step(3).await?;
        record.set_recovered(&started);
        record.state = STATE_ACTIVE.into();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        self.record_failover(&vm.name, FailoverEvent::FailedOver, record, "")
            .await?;
        job.step_done(3, format!("vm running on {}; commit pending", record.host))
            .await;
        info!(vm = %vm.name, target = %record.host, point = %record.point_id, "failback done; commit pending");
        Ok(())
    }

    /// After a failed phase 2: the source lifts its fence and starts the VM again (says how
    /// it went; never fails the job further).
    async fn restart_source(&self, job_id: &str, record: &Record) -> String {
        let host = &record.source_host;
        match self
            .on_source(record, WorkKind::ResumeVm, &record.job_id, job_id)
            .await
        {
            Ok(_) => format!("the failback failed: vm started again on {host}"),
            Err(e) => {
                format!("the failback failed and vm could not be started again on {host}: {e}")
            }
        }
    }

    /// After a failback's commit: the host it left removes the recovered copy (stops the VM if
    /// it runs, stops serving its disks, deletes its folder and logs). Says how it went.
    pub(crate) async fn release_recovered(&self, job_id: &str, record: &Record) -> String {
        if record.kind != "failback" || record.previous_failover_id.is_empty() {
            return String::new();
        }
        let host = &record.source_host;
        let failover = &record.previous_failover_id;
        match self
            .on_source(record, WorkKind::RemoveRecovered, failover, job_id)
            .await
        {
            Ok(_) => format!("; the copy on {host} was removed"),
            Err(e) => {
                warn!(vm = %record.vm, host = %host, error = %e, "cannot remove the recovered copy after the failback");
                format!("; the copy on {host} could not be removed: {e}")
            }
        }
    }

    /// Host work of failover `failover_id` on the failback's source host, for job `job_id`.
    async fn on_source(
        &self,
        record: &Record,
        kind: WorkKind,
        failover_id: &str,
        job_id: &str,
    ) -> Result<ferry_proto::scheduler::v1::RecoveredVm> {
        let work = FailoverWork {
            kind: "failback".into(),
            failover_id: failover_id.to_owned(),
            ..FailoverWork::default()
        };
        let wait = Some(FINAL_SYNC_WAIT);
        self.dispatch_and_wait(&record.source_host, kind, &record.vm, job_id, work, wait)
            .await
    }

    /// A failback job found in progress after a restart: phase 1 or phase 2 again.
    pub(crate) async fn resume_failback(
        &self,
        job: JobTracker,
        kept: KeptLease,
        record: Record,
        vm: Vm,
    ) -> Result<Job> {
        match record.state.as_str() {
            STATE_RUNNING => self.drive_phase(Phase::Sync, job, kept, record, vm).await,
            _ => {
                self.drive_phase(Phase::Complete, job, kept, record, vm)
                    .await
            }
        }
    }
}
