//! Unplanned failover (DESIGN §11; planned failover is in [`planned`]): the VM's production copy comes up on its recovery host
//! from a chosen point while its primary may be gone. As a job with steps:
//!
//! 1. fence the primary — the registry raises the VM's epoch and moves it to failing-over
//!    (the state machine decides whether it may): ingest and storage-writer refuse the
//!    primary's cycles from then on, and its heartbeats tell its agent to refuse the VM's
//!    writes (a primary that was down learns it when it reconnects);
//! 2. with `--shutdown`, ask the primary's driver to stop the VM, carrying on when it cannot;
//! 3. the recovery host materialises the point and starts the VM with the production network;
//! 4. record it: failed over, commit pending.
//!
//! The job runs under its lease like a test failover and is resumed by another replica the
//! same way; every step is idempotent (a repeated start of the same failover is accepted,
//! the host work is named after the job).
mod change;
mod planned;
mod registry;
pub(crate) use planned::StopAndFence;

use std::time::Duration;

use ferry_coord::KeptLease;
use ferry_proto::common::v1::{Job, RecoveryPoint};
use ferry_proto::failover::v1::UnplannedFailoverRequest;
use ferry_proto::registry::v1::{FailoverEvent, Vm};
use ferry_proto::scheduler::v1::{FailoverWork, WorkKind};
use tracing::{info, warn};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{Record, RecordDisk, STATE_ACTIVE, STATE_FAILED, STATE_RUNNING};
use crate::test_failover::check_vm_name;

pub const UNPLANNED_STEPS: [&str; 4] = [
    "fence the primary",
    "shut down the source vm",
    "materialise disks and start the vm on the recovery host",
    "record the failover",
];

/// How long a `--shutdown` waits for the primary before carrying on without it.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);

impl Orchestrator {
    /// Runs an unplanned failover of a VM to its recovery host and returns the finished job.
    pub async fn unplanned_failover(&self, req: UnplannedFailoverRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        let point_ref = if req.point.is_empty() {
            "latest"
        } else {
            req.point.as_str()
        };
        let prepare = self.prepare_failover(&req.vm, point_ref);
        self.begin_site_failover(&req.vm, "unplanned", req.shutdown, req.instant, prepare)
            .await
    }

    /// Starts a planned or unplanned failover of `name` (`kind`): claims the VM, runs
    /// `prepare` under the VM's start lock, records the failover under its job's lease and
    /// drives it.
    pub(crate) async fn begin_site_failover(
        &self,
        name: &str,
        kind: &str,
        shutdown: bool,
        instant: bool,
        prepare: impl std::future::Future<Output = Result<(Vm, RecoveryPoint, JobTracker)>>,
    ) -> Result<Job> {
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(name)?;
        let starting = self.lock_vm_start(name).await?;
        let (vm, point, job) = match prepare.await {
            Ok(b) => b,
            Err(e) => {
                self.unlock_vm_start(starting).await;
                return Err(e);
            }
        };
        let mut record = new_failover_record(&vm, &point, job.id(), self.holder(), shutdown);
        record.kind = kind.to_owned();
        record.instant = instant;
        let begun = self.lease_and_record(&mut record).await;
        self.unlock_vm_start(starting).await;
        match begun {
            Ok(kept) => self.drive_failover(job, kept, record, vm, point).await,
            Err(e) => Ok(job.fail(&e).await),
        }
    }

    async fn prepare_failover(
        &self,
        name: &str,
        point_ref: &str,
    ) -> Result<(Vm, RecoveryPoint, JobTracker)> {
        self.no_current_failover(name).await?;
        let vm = self.failover_vm(name).await?;
        let point = self.get_point(name, point_ref).await?;
        // Cancellable until the vm runs on the recovery host (its last step records it).
        let job = JobTracker::start_cancellable(
            self.registry.clone(),
            "unplanned-failover",
            name,
            &UNPLANNED_STEPS,
            3,
        )
        .await?;
        Ok((vm, point, job))
    }

    /// Refuses while the VM has a failover of any kind active or running.
    pub(crate) async fn no_current_failover(&self, name: &str) -> Result<()> {
        let Some(current) = self.ledger.current(name).await? else {
            return Ok(());
        };
        Err(FailoverError::FailedPrecondition(format!(
            "vm {name} has a {} failover {} (job {}){}",
            current.kind,
            current.state,
            current.job_id,
            if current.kind == "test" {
                "; run cleanup first"
            } else {
                ""
            }
        )))
    }

    /// The VM, which must name its recovery host.
    pub(crate) async fn failover_vm(&self, name: &str) -> Result<Vm> {
        let vm = self.get_vm(name).await?;
        if vm.recovery_host.is_empty() {
            return Err(FailoverError::FailedPrecondition(format!(
                "vm {name} has no recovery host: set one with `ferry vm set {name} \
                 --recovery-host HOST`"
            )));
        }
        Ok(vm)
    }

    /// Runs (or re-runs) the failover of `record` under `kept` until it ends here.
    pub(crate) async fn drive_failover(
        &self,
        mut job: JobTracker,
        kept: KeptLease,
        mut record: Record,
        vm: Vm,
        point: RecoveryPoint,
    ) -> Result<Job> {
        let _running = self.mark_running(job.id());
        let lost = kept.lost();
        let outcome = tokio::select! {
            res = self.run_failover(&mut job, &kept, &mut record, &vm, &point) => res,
            () = self.shutdown.cancelled() => {
                info!(job = %job.id(), vm = %vm.name, "shutting down mid-failover; another replica resumes it");
                let _ = kept.release().await;
                return Ok(job.snapshot());
            }
            () = lost.cancelled() => {
                warn!(job = %job.id(), vm = %vm.name, "job lease lost; leaving the failover to its new holder");
                return Ok(job.snapshot());
            }
        };
        match outcome {
            Ok(()) => {
                let _ = kept.release().await;
                Ok(job.succeed().await)
            }
            Err(e) if lost.is_cancelled() || matches!(e, FailoverError::Lease(_)) => {
                Ok(job.snapshot())
            }
            Err(e) => Ok(self.fail_failover(job, kept, record, &vm, &e).await),
        }
    }

    async fn run_failover(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
        point: &RecoveryPoint,
    ) -> Result<()> {
        if record.kind == "planned" {
            return self.run_planned(job, kept, record, vm).await;
        }
        job.enter_step(0).await?;
        let fenced = self
            .record_failover(&vm.name, FailoverEvent::UnplannedStarted, record, "")
            .await?;
        job.step_done(
            0,
            format!(
                "replication from {} fenced (epoch {})",
                vm.host, fenced.epoch
            ),
        )
        .await;
        job.enter_step(1).await?;
        let said = match record.shutdown {
            true => self.shut_source_down(job.id(), vm).await,
            false => "not asked for (--shutdown)".to_owned(),
        };
        job.step_done(1, said).await;

        self.bring_up(job, kept, record, vm, point, 2).await
    }

    /// Steps `step` and `step + 1` of a failover: the recovery host materialises `point` and
    /// starts the VM with the production network; then it is recorded as failed over.
    pub(crate) async fn bring_up(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
        point: &RecoveryPoint,
        step: usize,
    ) -> Result<()> {
        job.enter_step(step).await?;
        let total: u64 = point.disks.iter().map(|d| d.virtual_size).sum();
        job.set_bytes(total, 0);
        let work = FailoverWork {
            point: point.id.clone(),
            network: "production".into(),
            kind: record.kind.clone(),
            failover_id: record.job_id.clone(),
            hardware: Some(production_hardware(vm)),
            final_sync: false,
            nic_addresses: vm
                .policy
                .as_ref()
                .map(|p| p.nic_addresses.clone())
                .unwrap_or_default(),
            instant: record.instant,
            ..FailoverWork::default()
        };
        let recovered = self
            .dispatch_for_job(&record.host, WorkKind::RecoverVm, &vm.name, job, work)
            .await?;
        job.set_bytes(total, total);
        job.step_done(
            step,
            format!(
                "{} disks in {} on {}, started ({} driver){}",
                recovered.disks.len(),
                recovered.dir,
                record.host,
                recovered.driver,
                crate::host_work::made_from(&recovered)
            ),
        )
        .await;

        job.enter_step(step + 1).await?;
        record.set_recovered(&recovered);
        record.state = STATE_ACTIVE.into();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        self.record_failover(&vm.name, FailoverEvent::FailedOver, record, "")
            .await?;
        job.step_done(
            step + 1,
            format!("vm running on {}; commit pending", record.host),
        )
        .await;
        info!(vm = %vm.name, kind = %record.kind, point = %point.id, host = %record.host, "failover done; commit pending");
        Ok(())
    }

    /// Asks the primary's driver to stop the VM; says how it went (never fails the job).
    async fn shut_source_down(&self, job_id: &str, vm: &Vm) -> String {
        let work = FailoverWork {
            kind: "unplanned".into(),
            failover_id: job_id.to_owned(),
            ..FailoverWork::default()
        };
        let kind = WorkKind::ShutdownVm;
        match self
            .dispatch_and_wait(&vm.host, kind, &vm.name, job_id, work, Some(SHUTDOWN_WAIT))
            .await
        {
            Ok(_) => format!("vm stopped on {}", vm.host),
            Err(e) => {
                warn!(vm = %vm.name, host = %vm.host, error = %e, "the source vm could not be shut down; carrying on");
                format!("could not shut the source down ({e}); carried on")
            }
        }
    }

    /// Nothing of a failed failover runs: the recovery host removed what it made; the VM is
    /// recorded as protected again (critical, with the reason), a planned failover's source
    /// that was stopped is started again (a failure inside the stop step is undone by the
    /// primary itself), and the job fails.
    async fn fail_failover(
        &self,
        mut job: JobTracker,
        kept: KeptLease,
        mut record: Record,
        vm: &Vm,
        e: &FailoverError,
    ) -> Job {
        if let Err(re) = self
            .record_failover(&vm.name, FailoverEvent::Failed, &record, &e.to_string())
            .await
        {
            warn!(vm = %vm.name, error = %re, "cannot record the failed failover in the registry");
        }
        record.state = STATE_FAILED.into();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        if let Err(put) = self
            .ledger
            .put_fenced(&mut record, &self.coord, kept.lease())
            .await
        {
            warn!(job = %job.id(), error = %put, "cannot record the failed failover");
        }
        if record.kind == "planned" && job.step_succeeded(planned::SHUTDOWN_STEP) {
            let job_id = job.id().to_owned();
            let said = self.resume_source(&job_id, vm).await;
            job.note(planned::SHUTDOWN_STEP, &said);
        }
        let _ = kept.release().await;
        job.fail(e).await
    }

    /// After a failed planned failover: the primary lifts its fence and starts the VM again
    /// (never fails the job further; says how it went).
    async fn resume_source(&self, job_id: &str, vm: &Vm) -> String {
        let work = FailoverWork {
            kind: "planned".into(),
            failover_id: job_id.to_owned(),
            ..FailoverWork::default()
        };
        let kind = WorkKind::ResumeVm;
        match self
            .dispatch_and_wait(&vm.host, kind, &vm.name, job_id, work, Some(SHUTDOWN_WAIT))
            .await
        {
            Ok(_) => {
                info!(vm = %vm.name, host = %vm.host, "the source vm runs again after the failed failover");
                format!("the failover failed: vm started again on {}", vm.host)
            }
            Err(re) => {
                warn!(vm = %vm.name, host = %vm.host, error = %re, "the source vm could not be started again");
                format!(
                    "the failover failed and vm could not be started again on {}: {re}",
                    vm.host
                )
            }
        }
    }
}

/// The VM's hardware with its networks mapped to the recovery site's (the policy's
/// network map; a network it does not name keeps its name).
pub(crate) fn production_hardware(vm: &Vm) -> ferry_proto::common::v1::VmHardware {
    let mut hw = vm.hardware.clone().unwrap_or_default();
    if let Some(map) = vm.policy.as_ref().map(|p| &p.network_map) {
        for n in &mut hw.networks {
            if let Some(to) = map.get(n.as_str()) {
                n.clone_from(to);
            }
        }
    }
    hw
}

impl Record {
    /// What the recovery host reported it made.
    pub(crate) fn set_recovered(&mut self, r: &ferry_proto::scheduler::v1::RecoveredVm) {
        self.target_dir = r.dir.clone();
        self.files = r.disks.iter().map(|d| d.path.clone()).collect();
        self.disks = r
            .disks
            .iter()
            .map(|d| RecordDisk {
                disk_id: d.disk_id.clone(),
                path: d.path.clone(),
                format: d.format.clone(),
                nbd_uri: d.nbd_uri.clone(),
            })
            .collect();
        self.driver = r.driver.clone();
        self.started_at_ms = r.started_at_ms;
    }
}

pub(crate) fn new_failover_record(
    vm: &Vm,
    point: &RecoveryPoint,
    job_id: &str,
    holder: String,
    shutdown: bool,
) -> Record {
    let now = chrono::Utc::now().timestamp_millis();
    Record {
        vm: vm.name.clone(),
        kind: "unplanned".into(),
        point_id: point.id.clone(),
        target_dir: String::new(),
        files: Vec::new(),
        state: STATE_RUNNING.into(),
        created_at_ms: now,
        job_id: job_id.to_owned(),
        updated_at_ms: now,
        last_job_id: job_id.to_owned(),
        fence: 0,
        holder,
        planned: Vec::new(),
        created_dir: false,
        host: vm.recovery_host.clone(),
        disks: Vec::new(),
        driver: String::new(),
        started_at_ms: 0,
        shutdown,
        ..Record::default()
    }
}
