//! DR drills (`ferry drill run VM [--boot-check CMD]`): proof that a point is restorable, not
//! hope. One `drill` job on the VM's recovery host: every block of the point read back —
//! fetched, decrypted and checked against its id, the vault's keyed hash (`VERIFY_POINT`) —,
//! a test failover of that point (the VM started on the test network), the boot check (a
//! command on the recovery host that probes the started VM), the cleanup, and the result
//! recorded on the VM (`Registry.RecordVerification`; `vm show`'s `last_verified`). A failed
//! step does not skip the cleanup or the record. Blocks that do not read back have their
//! chunks quarantined and the VM marked for a resync, which ships them again.
use std::time::Duration;

use ferry_model::Operation;
use ferry_model::plan::SCRIPT_TIMEOUT_SECS;
use ferry_proto::common::v1::{ErrorClass, Job, StepStatus};
use ferry_proto::failover::v1::{CleanupTestFailoverRequest, RunDrillRequest, TestFailoverRequest};
use ferry_proto::registry::v1::{RecordVerificationRequest, ReportReplicationErrorRequest, Vm};
use ferry_proto::scheduler::v1::{FailoverWork, PlanScript, RecoveredVm, WorkKind};
use ferry_proto::storage::v1::QuarantineChunksRequest;

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::test_failover::check_vm_name;

pub const DRILL_STEPS: &[&str] = &[
    "read back every block",
    "test failover",
    "boot check",
    "clean up",
    "record the result",
];
const READ_BACK: usize = 0;
const TEST: usize = 1;
const BOOT: usize = 2;
const CLEAN: usize = 3;
const RECORD: usize = 4;

impl Orchestrator {
    /// Runs a drill of `req.vm` — a recovery plan of that name: each of its VMs in turn —
    /// and returns the ended job.
    pub async fn run_drill(&self, req: RunDrillRequest) -> Result<Job> {
        if let Some(plan) = self.plans.get(&req.vm).await? {
            if !matches!(req.point.as_str(), "" | "latest") {
                return Err(FailoverError::InvalidArgument(format!(
                    "a drill of plan {} drills each vm's latest point, not point {}",
                    plan.name, req.point
                )));
            }
            return self.run_plan_drill(&plan, &req.boot_check).await;
        }
        self.run_vm_drill(req).await
    }

    /// Runs a drill of VM `req.vm` (its latest point, or `req.point`); returns the ended job.
    pub(crate) async fn run_vm_drill(&self, req: RunDrillRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        self.require_allowed(&req.vm, Operation::TestFailover)
            .await?;
        let vm = self.drill_vm(&req.vm).await?;
        let point = match req.point.as_str() {
            "" | "latest" => vm.last_point_id.clone(),
            id => id.to_owned(),
        };
        let mut job =
            JobTracker::start(self.registry.clone(), "drill", &vm.name, DRILL_STEPS).await?;
        let failure = self
            .drill_steps(&mut job, &vm, &point, &req.boot_check)
            .await;
        job.step_running(RECORD).await;
        let (ok, message) = match &failure {
            None => (
                true,
                format!("point {point} read back, started and checked"),
            ),
            Some(e) => (false, e.clone()),
        };
        if let Err(e) = self
            .record_verification(&vm.name, &point, ok, &message, job.id())
            .await
        {
            return Ok(job.fail(&e).await);
        }
        match failure {
            None => {
                job.step_done(RECORD, "recorded: succeeded".into()).await;
                Ok(job.succeed().await)
            }
            Some(why) => {
                job.step_done(RECORD, "recorded: failed".into()).await;
                Ok(job.fail(&FailoverError::FailedPrecondition(why)).await)
            }
        }
    }

    /// The VM, refused unless it has a recovery host and a point.
    async fn drill_vm(&self, name: &str) -> Result<Vm> {
        let vm = self.failover_vm(name).await?;
        if vm.last_point_id.is_empty() {
            return Err(FailoverError::FailedPrecondition(format!(
                "vm {name} has no recovery point to drill"
            )));
        }
        Ok(vm)
    }

    /// Steps 1–4; the first failure, in words (`None`: every check passed).
    async fn drill_steps(
        &self,
        job: &mut JobTracker,
        vm: &Vm,
        point: &str,
        boot_check: &str,
    ) -> Option<String> {
        let host = vm.recovery_host.as_str();
        let mut failure = None;
        job.step_running(READ_BACK).await;
        let work = FailoverWork {
            point: point.to_owned(),
            ..Default::default()
        };
        let read = self
            .dispatch_and_wait(host, WorkKind::VerifyPoint, &vm.name, job.id(), work, None)
            .await;
        match read {
            Ok(r) if r.blocks_bad == 0 => {
                let msg = format!(
                    "{} blocks of point {point} read back and checked",
                    r.blocks_compared
                );
                job.step_done(READ_BACK, msg).await;
            }
            Ok(r) => {
                let why = self.corruption_found(vm, point, &r).await;
                failure = Some(self.failed(job, READ_BACK, why).await);
            }
            Err(e) => failure = Some(self.failed(job, READ_BACK, e.to_string()).await),
        }
        if failure.is_some() {
            return failure;
        }
        job.step_running(TEST).await;
        // Every block was just read back: the test VM need not wait for a copy of them.
        let instant = self.host_tracks(&vm.recovery_host).await;
        let test = self
            .test_failover(TestFailoverRequest {
                vm: vm.name.clone(),
                point: point.to_owned(),
                target_dir: String::new(),
                instant,
            })
            .await;
        match test {
            Ok(j) if j.status == StepStatus::Succeeded as i32 => {
                job.step_done(
                    TEST,
                    format!("job {} started the vm on the test network", j.id),
                )
                .await;
            }
            Ok(j) => {
                let why = format!("job {} failed: {}", j.id, j.error);
                return Some(self.failed(job, TEST, why).await);
            }
            Err(e) => return Some(self.failed(job, TEST, e.to_string()).await),
        }
        if let Err(e) = self.boot_check(job, vm, boot_check).await {
            failure = Some(self.failed(job, BOOT, e.to_string()).await);
        }
        job.step_running(CLEAN).await;
        let clean = self
            .cleanup_test_failover(CleanupTestFailoverRequest {
                vm: vm.name.clone(),
            })
            .await;
        match clean {
            Ok(j) if j.status == StepStatus::Succeeded as i32 => {
                job.step_done(CLEAN, format!("job {} removed the test copy", j.id))
                    .await;
            }
            Ok(j) => {
                let why = format!("job {} failed: {}", j.id, j.error);
                failure.get_or_insert(self.failed(job, CLEAN, why).await);
            }
            Err(e) => {
                failure.get_or_insert(self.failed(job, CLEAN, e.to_string()).await);
            }
        }
        failure
    }

    /// The read-back found blocks that do not open: their chunks are quarantined (checked
    /// again by the storage-writer) and the VM marked for a resync, which ships those blocks
    /// again. What the step says.
    async fn corruption_found(&self, vm: &Vm, point: &str, r: &RecoveredVm) -> String {
        let mut why = format!(
            "vm {} point {point}: {} of {} blocks failed the read-back: {}",
            vm.name,
            r.blocks_bad,
            r.blocks_compared,
            r.bad_blocks.join("; ")
        );
        let quarantined = self
            .storage
            .clone()
            .quarantine_chunks(QuarantineChunksRequest {
                vm: vm.name.clone(),
                chunks: r.bad_chunks.clone(),
            })
            .await
            .map(|q| q.into_inner().quarantined.len());
        match quarantined {
            Ok(n) => why.push_str(&format!("; {n} chunk(s) quarantined")),
            Err(s) => why.push_str(&format!("; quarantine failed: {}", s.message())),
        }
        let report = self
            .registry
            .clone()
            .report_replication_error(ReportReplicationErrorRequest {
                vm: vm.name.clone(),
                error: format!(
                    "a drill found corrupt data in storage: {}",
                    r.bad_blocks.join("; ")
                ),
                error_class: ErrorClass::ResyncRequired as i32,
                ..Default::default()
            })
            .await;
        match report {
            Ok(_) => why.push_str("; the vm waits for a resync, which ships those blocks again"),
            Err(s) => why.push_str(&format!(
                "; marking the vm for resync failed: {}",
                s.message()
            )),
        }
        tracing::warn!(vm = %vm.name, point, bad = r.blocks_bad, "a drill found corrupt data in storage");
        why
    }

    /// Runs the boot check on the recovery host (skipped, and said so, without one).
    async fn boot_check(&self, job: &mut JobTracker, vm: &Vm, command: &str) -> Result<()> {
        if command.trim().is_empty() {
            let msg = "no --boot-check given: the driver's start is the only check".to_owned();
            job.step_ended(BOOT, StepStatus::Skipped, msg).await;
            return Ok(());
        }
        job.step_running(BOOT).await;
        let work = FailoverWork {
            script: Some(PlanScript {
                command: command.to_owned(),
                vms: vec![vm.name.clone()],
                mode: "drill".into(),
                phase: "boot-check".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let timeout = Duration::from_secs(SCRIPT_TIMEOUT_SECS + 120);
        let id = format!("{}-boot", job.id());
        let out = self
            .dispatch_and_wait(
                &vm.recovery_host,
                WorkKind::RunScript,
                &vm.name,
                &id,
                work,
                Some(timeout),
            )
            .await?;
        let msg = match out.script_output.is_empty() {
            true => "passed".to_owned(),
            false => format!("passed: {}", out.script_output),
        };
        job.step_done(BOOT, msg).await;
        Ok(())
    }

    async fn failed(&self, job: &mut JobTracker, step: usize, why: String) -> String {
        job.step_ended(step, StepStatus::Failed, why.clone()).await;
        format!("{}: {why}", DRILL_STEPS[step])
    }

    async fn record_verification(
        &self,
        vm: &str,
        point: &str,
        ok: bool,
        message: &str,
        job_id: &str,
    ) -> Result<()> {
        self.registry
            .clone()
            .record_verification(RecordVerificationRequest {
                vm: vm.to_owned(),
                point_id: point.to_owned(),
                ok,
                message: message.to_owned(),
                job_id: job_id.to_owned(),
            })
            .await
            .map_err(|s| FailoverError::remote("registry", "record verification", &s))?;
        Ok(())
    }
}
