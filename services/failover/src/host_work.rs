//! Work for a host's agent, through the scheduler: dispatched (idempotently: the work id is
//! named after the job and the kind) and then waited on until the scheduler holds the
//! outcome the host reported.
use std::time::Duration;

use ferry_proto::scheduler::v1::{
    DispatchRequest, FailoverWork, RecoveredVm, WorkKind, WorkResultRequest,
};
use tracing::info;

use crate::Orchestrator;
use crate::error::{FailoverError, Result};

/// How often a job asks the scheduler whether the host finished.
const POLL: Duration = Duration::from_millis(300);

impl Orchestrator {
    /// Queues failover work for `host` and waits until the host completed it. A failure on
    /// the host is the job's failure, with the host's message.
    pub(crate) async fn dispatch_and_wait(
        &self,
        host: &str,
        kind: WorkKind,
        vm: &str,
        job_id: &str,
        work: FailoverWork,
        timeout: Option<Duration>,
    ) -> Result<RecoveredVm> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut scheduler = self.scheduler()?;
        let work_id = scheduler
            .dispatch(DispatchRequest {
                host_name: host.to_owned(),
                kind: kind as i32,
                vm: vm.to_owned(),
                job_id: job_id.to_owned(),
                failover: Some(work),
            })
            .await
            .map_err(|s| FailoverError::remote("scheduler", "dispatch", &s))?
            .into_inner()
            .work_id;
        info!(vm = %vm, host = %host, work = %work_id, kind = ?kind, "failover work dispatched");
        loop {
            let r = scheduler
                .work_result(WorkResultRequest {
                    work_id: work_id.clone(),
                })
                .await
                .map_err(|s| FailoverError::remote("scheduler", "work result", &s))?
                .into_inner();
            if r.done && r.ok {
                return Ok(r.recovered.unwrap_or_default());
            }
            if r.done {
                return Err(FailoverError::FailedPrecondition(format!(
                    "host {host}: {}",
                    r.error
                )));
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Err(FailoverError::Unavailable(format!(
                    "host {host} did not complete {work_id} within {:?}",
                    timeout.unwrap_or_default()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
