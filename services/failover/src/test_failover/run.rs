//! Running a test failover under its job lease: resolve the point and plan the files,
//! materialize the disks, write the VM description; or, on a failure, leave nothing behind.
use std::path::PathBuf;

use ferry_coord::KeptLease;
use ferry_model::{Consistency, TestFailover};
use ferry_proto::common::v1::{Job, RecoveryPoint};
use ferry_proto::registry::v1::Vm;
use tracing::{info, warn};

use super::files::{exists, remove_files, remove_partials, write_description};
use super::plan::{PlannedDisk, plan_disks};
use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{Record, STATE_ACTIVE, STATE_FAILED};

/// What ended a job's run here without finishing it.
enum Interrupted {
    /// This replica is shutting down: the job is left to another one.
    Shutdown,
    /// The job lease was lost: another replica may hold the job now.
    LeaseLost,
}

impl Orchestrator {
    /// Runs (or re-runs) the test failover of `record` under `kept` until it ends here.
    pub(super) async fn drive_test(
        &self,
        mut job: JobTracker,
        kept: KeptLease,
        mut record: Record,
        vm: Vm,
        point: RecoveryPoint,
    ) -> Result<Job> {
        let _running = self.mark_running(job.id());
        let lost = kept.lost();
        let mut made = Vec::new();
        let run = self.run_test(&mut job, &kept, &mut record, &vm, &point, &mut made);
        // Dropping `run` drops the storage-writer calls, which then remove their partial
        // files (written under names of this run only).
        let outcome = tokio::select! {
            res = run => res.map_err(Ok),
            () = self.shutdown.cancelled() => Err(Err(Interrupted::Shutdown)),
            () = lost.cancelled() => Err(Err(Interrupted::LeaseLost)),
        };
        match outcome {
            Ok(()) => {
                let job = job.succeed().await;
                if let Err(e) = kept.release().await {
                    warn!(job = %job.id, error = %e, "releasing a job lease failed; it expires");
                }
                Ok(job)
            }
            Err(Err(why)) => {
                // The files stay for the replica that resumes the job: it removes what this
                // run planned before making it again.
                match why {
                    Interrupted::Shutdown => {
                        info!(job = %job.id(), vm = %vm.name, "shutting down mid-job; another replica resumes it");
                        let _ = kept.release().await;
                    }
                    Interrupted::LeaseLost => {
                        warn!(job = %job.id(), vm = %vm.name, "job lease lost; leaving the job to its new holder");
                    }
                }
                Ok(job.snapshot())
            }
            Err(Ok(e)) => {
                // A refused lease (lost, or Redis out of reach) means the job may be resumed
                // elsewhere: nothing may be undone here.
                if lost.is_cancelled() || matches!(e, FailoverError::Lease(_)) {
                    warn!(job = %job.id(), vm = %vm.name, error = %e, "job lease lost; leaving the job to its new holder");
                    return Ok(job.snapshot());
                }
                Ok(self.fail_test(job, kept, record, &vm, &made, &e).await)
            }
        }
    }

    /// Nothing of a failed test failover stays behind: removes what the run made and what
    /// the record planned (and the target directory if the job created it), records the
    /// failure, releases the lease and fails the job.
    async fn fail_test(
        &self,
        job: JobTracker,
        kept: KeptLease,
        mut record: Record,
        vm: &Vm,
        made: &[PathBuf],
        e: &FailoverError,
    ) -> Job {
        let dir = record
            .created_dir
            .then(|| PathBuf::from(&record.target_dir));
        let planned: Vec<PathBuf> = record.planned.iter().map(PathBuf::from).collect();
        for files in [made, planned.as_slice()] {
            if let Err(rm) = remove_files(files, dir.as_deref()) {
                warn!(vm = %vm.name, error = %rm, "cannot remove the files of a failed test failover");
            }
        }
        record.state = STATE_FAILED.into();
        record.files.clear();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        if let Err(put) = self
            .ledger
            .put_fenced(&mut record, &self.coord, kept.lease())
            .await
        {
            warn!(job = %job.id(), error = %put, "cannot record the failed test failover");
        }
        let _ = kept.release().await;
        job.fail(e).await
    }

    async fn run_test(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
        point: &RecoveryPoint,
        made: &mut Vec<PathBuf>,
    ) -> Result<()> {
        if record.on_host() {
            return self.run_test_on_host(job, kept, record, vm, point).await;
        }
        let dir = PathBuf::from(&record.target_dir);
        let (disks, description) = self.prepare_target(job, kept, record, vm, point).await?;

        job.enter_step(1).await?;
        self.materialize(job, kept, vm, point, &disks, made).await?;
        job.step_done(1, format!("{} disks written", disks.len()))
            .await;

        job.enter_step(2).await?;
        write_description(&description, vm, point, &disks)?;
        made.push(description.clone());
        record.files = made.iter().map(|p| p.display().to_string()).collect();
        record.state = STATE_ACTIVE.into();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        // From here on the record owns the files: cleanup removes them.
        made.clear();
        record.planned.clear();
        record.created_dir = false;
        if let Err(e) = self
            .set_failover_state(&vm.name, TestFailover::Active)
            .await
        {
            return Err(FailoverError::FailedPrecondition(format!(
                "{e}; the test copy in {} is recorded: run cleanup to remove it",
                dir.display()
            )));
        }
        job.step_done(2, format!("{}", description.display())).await;
        info!(vm = %vm.name, point = %point.id, dir = %dir.display(), "test failover ready");
        Ok(())
    }

    /// Step 0 of a test failover: plans the files of the point in the target directory
    /// (removing first what an earlier run of the job may have made), checks that none
    /// exists, creates the directory if needed and records the plan. The planned disks and
    /// the description's path.
    async fn prepare_target(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
        point: &RecoveryPoint,
    ) -> Result<(Vec<PlannedDisk>, PathBuf)> {
        let dir = PathBuf::from(&record.target_dir);
        job.enter_step(0).await?;
        let disks = plan_disks(vm, point, &dir)?;
        let description = dir.join(format!("{}.vm.json", vm.name));
        // A resumed job first removes what an earlier run of it may have made.
        if !record.planned.is_empty() {
            let planned: Vec<PathBuf> = record.planned.iter().map(PathBuf::from).collect();
            remove_files(&planned, None)?;
            remove_partials(&dir, &disks);
        }
        if let Some(taken) = disks
            .iter()
            .map(|d| d.path.as_path())
            .chain([description.as_path()])
            .find(|p| exists(p))
        {
            return Err(FailoverError::FailedPrecondition(format!(
                "{} already exists; choose another target_dir",
                taken.display()
            )));
        }
        if !exists(&dir) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| FailoverError::io(format!("creating {}", dir.display()), e))?;
            record.created_dir = true;
        }
        record.planned = disks
            .iter()
            .map(|d| d.path.as_path())
            .chain([description.as_path()])
            .map(|p| p.display().to_string())
            .collect();
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        job.step_done(
            0,
            format!(
                "point {} ({}, {} ms), {} disks",
                point.id,
                Consistency::wire_name(point.consistency),
                point.time_ms,
                disks.len()
            ),
        )
        .await;
        Ok((disks, description))
    }
}
