//! Cleanup of a test failover: removes exactly the recorded files and clears the VM's
//! failover state.
use std::path::{Path, PathBuf};

use ferry_coord::KeptLease;
use ferry_model::TestFailover;
use ferry_proto::common::v1::Job;
use ferry_proto::failover::v1::CleanupTestFailoverRequest;
use tracing::{info, warn};

use super::CLEANUP_STEPS;
use super::files::remove_files;
use super::plan::check_vm_name;
use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{Record, STATE_CLEANED_UP, STATE_CLEANING};

impl Orchestrator {
    /// Removes a VM's test copy (exactly the recorded files) and clears its failover state.
    pub async fn cleanup_test_failover(&self, req: CleanupTestFailoverRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(&req.vm)?;
        let starting = self.lock_vm_start(&req.vm).await?;
        let begun = async {
            let record = match self.ledger.current(&req.vm).await? {
                Some(r) if r.is_active() => r,
                Some(r) => {
                    return Err(FailoverError::FailedPrecondition(format!(
                        "a failover operation for vm {} is already running (job {})",
                        req.vm,
                        r.working_job()
                    )));
                }
                None => {
                    return Err(FailoverError::FailedPrecondition(format!(
                        "vm {} has no active test failover",
                        req.vm
                    )));
                }
            };
            let job = JobTracker::start(
                self.registry.clone(),
                "test-failover-cleanup",
                &req.vm,
                &CLEANUP_STEPS,
            )
            .await?;
            Ok((record, job))
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
            state: STATE_CLEANING.into(),
            updated_at_ms: chrono::Utc::now().timestamp_millis(),
            last_job_id: job.id().to_owned(),
            holder: self.holder(),
            ..record
        };
        let begun = self.lease_and_record(&mut record).await;
        self.unlock_vm_start(starting).await;
        match begun {
            Ok(kept) => self.drive_cleanup(job, kept, record).await,
            Err(e) => Ok(job.fail(&e).await),
        }
    }

    /// Runs (or re-runs) the cleanup of `record` under `kept` until it ends here.
    pub(super) async fn drive_cleanup(
        &self,
        mut job: JobTracker,
        kept: KeptLease,
        record: Record,
    ) -> Result<Job> {
        let _running = self.mark_running(job.id());
        let lost = kept.lost();
        let vm = record.vm.clone();
        let outcome = tokio::select! {
            res = self.run_cleanup(&mut job, &kept, record) => res,
            () = self.shutdown.cancelled() => {
                info!(job = %job.id(), vm = %vm, "shutting down mid-job; another replica resumes it");
                let _ = kept.release().await;
                return Ok(job.snapshot());
            }
            () = lost.cancelled() => {
                warn!(job = %job.id(), vm = %vm, "job lease lost; leaving the job to its new holder");
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
            Err(e) => {
                // The record stays "cleaning": the cleanup is resumed (it is idempotent) once
                // the lease is free again.
                Ok(job.fail(&e).await)
            }
        }
    }

    async fn run_cleanup(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: Record,
    ) -> Result<()> {
        job.step_running(0).await;
        if record.on_host() {
            self.remove_on_host(job.id(), &record).await?;
            job.step_done(
                0,
                format!(
                    "vm stopped and {} removed on {}",
                    record.target_dir, record.host
                ),
            )
            .await;
        } else {
            let files: Vec<PathBuf> = record.files.iter().map(PathBuf::from).collect();
            remove_files(&files, Some(Path::new(&record.target_dir)))?;
            job.step_done(
                0,
                format!("{} files removed from {}", files.len(), record.target_dir),
            )
            .await;
        }
        job.step_running(1).await;
        let vm = record.vm.clone();
        let mut cleaned = Record {
            state: STATE_CLEANED_UP.into(),
            updated_at_ms: chrono::Utc::now().timestamp_millis(),
            ..record
        };
        self.ledger
            .put_fenced(&mut cleaned, &self.coord, kept.lease())
            .await?;
        self.set_failover_state(&vm, TestFailover::None).await?;
        job.step_done(1, "failover state cleared".into()).await;
        info!(vm = %vm, dir = %cleaned.target_dir, "test failover cleaned up");
        Ok(())
    }
}
