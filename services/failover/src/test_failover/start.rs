//! Starting and resuming test failover jobs: the per-VM start lock, the job's lease and its
//! record.
use std::path::Path;

use ferry_coord::{KeptLease, Lease};
use ferry_proto::common::v1::{Job, RecoveryPoint};
use ferry_proto::failover::v1::TestFailoverRequest;
use ferry_proto::registry::v1::Vm;
use tracing::{info, warn};

use super::TEST_FAILOVER_STEPS;
use super::plan::check_vm_name;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{Record, STATE_CLEANING, STATE_FAILED, STATE_RUNNING};
use crate::{JOB_LEASE_TTL, Orchestrator, job_resource};

/// How long a replica may take from checking a VM to recording the job it starts.
const VM_START_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl Orchestrator {
    /// The folder a test failover names (none: the VM's recovery host), refused unless it
    /// lies under this machine's export roots.
    pub fn check_target_dir(&self, dir: &str) -> Result<Option<std::path::PathBuf>> {
        if dir.is_empty() {
            return Ok(None);
        }
        if let Some(why) = ferry_model::disk::outside_roots(dir, self.export_roots()) {
            return Err(FailoverError::InvalidArgument(format!(
                "target_dir {dir:?} {why}"
            )));
        }
        Ok(Some(std::path::PathBuf::from(dir)))
    }

    /// Runs a test failover of a VM and returns the finished job. Bad input, an unknown VM or
    /// point, and an active test failover are errors; a failure after the job started is a
    /// FAILED job (with nothing left behind). If this replica stops mid-job, the job is
    /// returned still running: another replica resumes it.
    pub async fn test_failover(&self, req: TestFailoverRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        // No folder named: on the VM's recovery host (checked once the VM is read).
        let dir = self.check_target_dir(&req.target_dir)?;
        if req.instant && dir.is_some() {
            return Err(FailoverError::InvalidArgument(
                "an instant recovery runs on the vm's recovery host: it cannot export into a folder (--target)".into(),
            ));
        }
        let point_ref = if req.point.is_empty() {
            "latest"
        } else {
            req.point.as_str()
        };
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(&req.vm)?;
        let starting = self.lock_vm_start(&req.vm).await?;
        if let Some(current) = self.ledger.current(&req.vm).await? {
            self.unlock_vm_start(starting).await;
            return Err(FailoverError::FailedPrecondition(if current.is_active() {
                format!(
                    "vm {} has an active test failover in {} (job {}); run cleanup first",
                    req.vm, current.target_dir, current.job_id
                )
            } else {
                format!(
                    "a failover operation for vm {} is already running (job {})",
                    req.vm,
                    current.working_job()
                )
            }));
        }
        let (vm, point, job) = match self.prepare_test(&req.vm, point_ref, dir.is_none()).await {
            Ok(p) => p,
            Err(e) => {
                self.unlock_vm_start(starting).await;
                return Err(e);
            }
        };
        let mut record = new_test_record(&vm, &point, dir.as_deref(), job.id(), self.holder());
        record.instant = req.instant;
        let begun = self.lease_and_record(&mut record).await;
        self.unlock_vm_start(starting).await;
        match begun {
            Ok(kept) => self.drive_test(job, kept, record, vm, point).await,
            Err(e) => Ok(job.fail(&e).await),
        }
    }

    /// The VM and point of a test failover about to start, and its job (started).
    async fn prepare_test(
        &self,
        name: &str,
        point_ref: &str,
        on_host: bool,
    ) -> Result<(Vm, RecoveryPoint, JobTracker)> {
        let vm = self.get_vm(name).await?;
        if on_host && vm.recovery_host.is_empty() {
            return Err(FailoverError::FailedPrecondition(format!(
                "vm {name} has no recovery host: set one with `ferry vm set {name} \
                 --recovery-host HOST`, or export into a folder with --target DIR"
            )));
        }
        let point = self.get_point(name, point_ref).await?;
        let steps: &[&str] = match on_host {
            true => &super::ON_HOST_TEST_STEPS,
            false => &TEST_FAILOVER_STEPS,
        };
        // Cancellable until the test vm runs (on a host) or the disks are written (a folder).
        let job =
            JobTracker::start_cancellable(self.registry.clone(), "test-failover", name, steps, 2)
                .await?;
        Ok((vm, point, job))
    }

    /// Takes the lease of the job working on `record` (as `record.holder`), then writes the
    /// record under it. The lease first, then the record: a replica that sees the record
    /// finds it leased.
    pub(crate) async fn lease_and_record(&self, record: &mut Record) -> Result<KeptLease> {
        let kept = self
            .coord
            .acquire_kept(&job_resource(&record.job_id), &record.holder, JOB_LEASE_TTL)
            .await
            .map_err(FailoverError::Lease)?;
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        Ok(kept)
    }

    /// Resumes the job working on `rec`, whose lease this replica just took. None when there
    /// was nothing left to do (the job ended meanwhile).
    pub(crate) async fn resume(&self, rec: Record, kept: KeptLease) -> Result<Option<Job>> {
        // Read again under the lease: the previous holder may have finished just before
        // releasing it.
        let Some(mut record) = self.ledger.get(&rec.job_id).await? else {
            return Ok(None);
        };
        if !record.is_in_progress() || record.fence >= kept.token() {
            let _ = kept.release().await;
            return Ok(None);
        }
        let _busy = match self.claim(&record.vm) {
            Ok(b) => b,
            Err(_) => {
                let _ = kept.release().await;
                return Ok(None);
            }
        };
        let job = match JobTracker::resume(self.registry.clone(), record.working_job()).await {
            Ok(j) => j,
            Err(e) => {
                let _ = kept.release().await;
                return Err(e);
            }
        };
        info!(job = %job.id(), vm = %record.vm, state = %record.state, previous = %record.holder, "resuming a failover job");
        record.holder = kept.lease().holder.clone();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        if let Err(e) = self
            .ledger
            .put_fenced(&mut record, &self.coord, kept.lease())
            .await
        {
            return Ok(Some(job.fail(&e).await));
        }
        if record.state == STATE_CLEANING {
            return self.drive_cleanup(job, kept, record).await.map(Some);
        }
        let prepared = async {
            let vm = self.get_vm(&record.vm).await?;
            let point = self.get_point(&record.vm, &record.point_id).await?;
            Ok::<_, FailoverError>((vm, point))
        }
        .await;
        match prepared {
            Ok((vm, _)) if record.kind == "failback" => {
                self.resume_failback(job, kept, record, vm).await.map(Some)
            }
            Ok((vm, point)) if record.kind != "test" => self
                .drive_failover(job, kept, record, vm, point)
                .await
                .map(Some),
            Ok((vm, point)) => self
                .drive_test(job, kept, record, vm, point)
                .await
                .map(Some),
            Err(e) => {
                record.state = STATE_FAILED.into();
                let _ = self
                    .ledger
                    .put_fenced(&mut record, &self.coord, kept.lease())
                    .await;
                let _ = kept.release().await;
                Ok(Some(job.fail(&e).await))
            }
        }
    }

    /// Other replicas: one failover operation per VM starts at a time.
    pub(crate) async fn lock_vm_start(&self, vm: &str) -> Result<Lease> {
        self.coord
            .acquire_lease(&format!("failover-vm-{vm}"), &self.holder(), VM_START_TTL)
            .await
            .map_err(|e| match e {
                ferry_coord::CoordError::LeaseHeld { .. } => FailoverError::FailedPrecondition(
                    format!("a failover operation for vm {vm} is starting on another replica"),
                ),
                e => FailoverError::Lease(e),
            })
    }

    pub(crate) async fn unlock_vm_start(&self, lease: Lease) {
        if let Err(e) = self.coord.release_lease(&lease).await {
            warn!(resource = %lease.resource, error = %e, "releasing a start lock failed; it expires");
        }
    }
}

/// The record of a test failover of `vm` to `point` in `dir` (None: on the VM's recovery
/// host) that job `job_id` starts, held by `holder`.
fn new_test_record(
    vm: &Vm,
    point: &RecoveryPoint,
    dir: Option<&Path>,
    job_id: &str,
    holder: String,
) -> Record {
    let now = chrono::Utc::now().timestamp_millis();
    Record {
        vm: vm.name.clone(),
        kind: "test".into(),
        point_id: point.id.clone(),
        target_dir: dir.map(|d| d.display().to_string()).unwrap_or_default(),
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
        host: match dir {
            Some(_) => String::new(),
            None => vm.recovery_host.clone(),
        },
        disks: Vec::new(),
        driver: String::new(),
        started_at_ms: 0,
        shutdown: false,
        ..Record::default()
    }
}
