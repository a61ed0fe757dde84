//! Jobs as the operator sees them: listing, showing, cancelling, resuming one that waits for
//! input.
use ferry_mesh::Role;
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::now_ms;
use ferry_proto::registry::v1 as pb;
use tonic::{Request, Response};

use super::{R, RegistryService};
use crate::error::RegistryError;
use crate::state::{Event, JobRecord};

/// Longest comment an operator may leave when resuming a job.
const MAX_COMMENT: usize = 1000;

impl RegistryService {
    pub(super) async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> R<pb::ListJobsResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let target = req.into_inner().target;
        let st = self.state.lock().await;
        let mut jobs: Vec<Job> = st
            .jobs
            .values()
            .filter(|j| target.is_empty() || j.target == target)
            .cloned()
            .collect();
        jobs.sort_by_key(|j| j.created_at_ms);
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    pub(super) async fn get_job(&self, req: Request<pb::GetJobRequest>) -> R<Job> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        Ok(Response::new(self.job(&req.into_inner().id).await?))
    }

    pub(super) async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> R<Job> {
        ferry_mesh::require_role(&req, Role::Operator)?;
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(crate::error::RegistryError::InvalidArgument(
                "cancel_job needs the job's id".into(),
            )
            .into());
        }
        Ok(Response::new(self.request_cancel(&id).await?))
    }

    /// Continues the step waiting for input (a recovery plan's manual action): recorded on
    /// the job under the state lock (sticky, like a cancel request); the job's runner sees it
    /// and goes on. Refused unless the job waits.
    pub(super) async fn resume_job(&self, req: Request<pb::ResumeJobRequest>) -> R<Job> {
        ferry_mesh::require_role(&req, ferry_mesh::Role::Operator)?;
        let pb::ResumeJobRequest { id, comment } = req.into_inner();
        if id.is_empty() {
            return Err(
                RegistryError::InvalidArgument("resume_job needs the job's id".into()).into(),
            );
        }
        if comment.len() > MAX_COMMENT {
            return Err(RegistryError::InvalidArgument(format!(
                "the comment has {} bytes; at most {MAX_COMMENT} are kept with a job",
                comment.len()
            ))
            .into());
        }
        let job = self
            .persist_checked(|st| {
                let job = st
                    .jobs
                    .get(&id)
                    .ok_or_else(|| RegistryError::JobNotFound(id.clone()))?;
                let waiting = job
                    .steps
                    .iter()
                    .position(|s| s.status == StepStatus::WaitingForInput as i32);
                let Some(step) =
                    waiting.filter(|_| job.status == StepStatus::WaitingForInput as i32)
                else {
                    return Err(RegistryError::FailedPrecondition(format!(
                        "job {id} ({} of {}) is {}: only a job waiting for input can be resumed",
                        job.kind,
                        job.target,
                        ferry_model::job::status_name(job.status)
                    )));
                };
                let mut job = job.clone();
                if job.resumed_step as usize == step + 1 {
                    return Ok((Vec::new(), job));
                }
                job.resumed_step = step as u32 + 1;
                job.resume_comment = comment.clone();
                job.updated_at_ms = now_ms();
                Ok((vec![Event::Job(JobRecord::encode(&job))], job))
            })
            .await?;
        tracing::info!(job = %job.id, kind = %job.kind, target = %job.target, step = job.resumed_step, "job resumed by an operator");
        Ok(Response::new(job))
    }
}
