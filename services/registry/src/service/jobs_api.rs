//! Jobs as the operator sees them: listing, showing, cancelling.
use ferry_mesh::Role;
use ferry_proto::common::v1::Job;
use ferry_proto::registry::v1 as pb;
use tonic::{Request, Response};

use super::{R, RegistryService};

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
}
