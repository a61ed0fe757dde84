//! Cancelling a job (`CancelJob`). A job says how far it may be cancelled
//! (`cancellable_until_step`: the first step that cannot be undone); the request is accepted
//! only while no such step has started, decided under the state lock against the catalog, so
//! a runner that marks its point of no return and an operator's cancel never both win. The
//! request is a sticky flag on the job; the job's runner (this registry for enable
//! protection and resync, the failover service for failovers) sees it at its next check,
//! stops the work it dispatched and ends the job as cancelled.
use ferry_model::Transition;
use ferry_model::job::cancel_refusal;
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::now_ms;
use ferry_proto::scheduler::v1::{CancelWorkRequest, scheduler_client::SchedulerClient};

use crate::error::RegistryError;
use crate::service::RegistryService;
use crate::state::{Event, JobRecord};

/// The message of a job an operator cancelled.
pub(crate) const CANCELLED_BY_OPERATOR: &str = "cancelled by an operator";

impl RegistryService {
    /// Records an operator's cancel request (idempotent), or refuses it saying why.
    pub(crate) async fn request_cancel(&self, id: &str) -> Result<Job, RegistryError> {
        let job = self
            .persist_checked(|st| {
                let job = st
                    .jobs
                    .get(id)
                    .ok_or_else(|| RegistryError::JobNotFound(id.to_owned()))?;
                if job.cancel_requested && job.status == StepStatus::Running as i32 {
                    return Ok((Vec::new(), job.clone()));
                }
                if let Some(why) = cancel_refusal(job) {
                    return Err(RegistryError::FailedPrecondition(why));
                }
                let mut job = job.clone();
                job.cancel_requested = true;
                job.updated_at_ms = now_ms();
                Ok((vec![Event::Job(JobRecord::encode(&job))], job))
            })
            .await?;
        tracing::info!(job = %job.id, kind = %job.kind, target = %job.target, "job cancel requested");
        Ok(job)
    }

    /// Whether an operator asked to cancel job `id` (registry-run jobs check between steps
    /// and while they wait).
    pub(crate) async fn cancel_requested(&self, id: &str) -> bool {
        self.state
            .lock()
            .await
            .jobs
            .get(id)
            .is_some_and(|j| j.cancel_requested)
    }

    /// Ends a registry-run job as cancelled: its host work (`job-<id>`) is stopped, the running
    /// step is cancelled and the rest skipped, and the VM moves by `transition`.
    pub(crate) async fn end_cancelled(
        &self,
        job: &mut Job,
        host: &str,
        transition: Transition,
    ) -> Result<(), RegistryError> {
        self.cancel_host_work(host, &format!("job-{}", job.id))
            .await;
        let end = now_ms();
        for s in &mut job.steps {
            if s.status == StepStatus::Running as i32 {
                s.status = StepStatus::Cancelled as i32;
                s.message = CANCELLED_BY_OPERATOR.to_owned();
                s.ended_at_ms = end;
            } else if s.status == StepStatus::Pending as i32 {
                s.status = StepStatus::Skipped as i32;
            }
        }
        job.status = StepStatus::Cancelled as i32;
        job.error = CANCELLED_BY_OPERATOR.to_owned();
        job.updated_at_ms = end;
        self.save_job(job).await?;
        let vm = job.target.clone();
        if let Err(e) = self.advance(&vm, transition).await {
            tracing::warn!(vm = %vm, job = %job.id, error = %e, "vm state not changed for the cancelled job");
        }
        tracing::info!(vm = %vm, job = %job.id, kind = %job.kind, "job cancelled");
        Ok(())
    }

    /// Tells the scheduler to stop the work; a scheduler that cannot be reached is logged
    /// (the work's completion is then a plain failure the job no longer waits on).
    async fn cancel_host_work(&self, host: &str, work_id: &str) {
        let res = async {
            let ch = self.peers.channel(ferry_mesh::Component::Scheduler)?;
            let r = SchedulerClient::new(ch)
                .cancel_work(CancelWorkRequest {
                    host_name: host.to_owned(),
                    work_id: work_id.to_owned(),
                })
                .await?
                .into_inner();
            anyhow::Ok(r.state)
        }
        .await;
        match res {
            Ok(state) => {
                tracing::info!(host, work = work_id, state = %state, "host work cancelled")
            }
            Err(e) => {
                tracing::warn!(host, work = work_id, error = %e, "cannot cancel the host work")
            }
        }
    }
}
