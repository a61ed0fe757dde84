//! Work for a host's agent, through the scheduler: dispatched (idempotently: the work id is
//! named after the job and the kind) and then waited on until the scheduler holds the
//! outcome the host reported. A job an operator cancels while it waits has the work stopped
//! on the host (`CancelWork`) and waits for the host to say it stopped.
use std::time::Duration;

use ferry_proto::scheduler::v1::{
    CancelWorkRequest, DispatchRequest, FailoverWork, RecoveredVm, WorkKind, WorkResultRequest,
    WorkResultResponse,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;

/// How often a job asks the scheduler whether the host finished: soon at first (most host
/// work of a failover's last steps takes tens of milliseconds, and a job waiting on it is
/// downtime), then less and less often, up to `POLL`.
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL: Duration = Duration::from_millis(300);
/// How long a cancelled job waits for its host to stop the work (a host that does not
/// answer by then is left to finish or fail on its own; its outcome no longer matters).
const CANCEL_WAIT: Duration = Duration::from_secs(60);

/// How a recovery host made a VM's disks, for a job step: "" when from the store, else
/// which standby point they came from and what differed.
pub(crate) fn made_from(r: &RecoveredVm) -> String {
    match r.standby_point.is_empty() {
        true => String::new(),
        false => format!(
            "; from the standby copy at point {} ({} blocks rewritten, {} bytes)",
            r.standby_point, r.blocks_rewritten, r.bytes_written
        ),
    }
}

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
        let never = CancellationToken::new();
        self.dispatch_and_wait_until(host, kind, vm, job_id, work, timeout, &never)
            .await
    }

    /// [`Orchestrator::dispatch_and_wait`] for the last step an operator may cancel: the
    /// work is stopped on the host and the step ends with `JobCancelled`, unless the host had
    /// already finished it. Work that succeeded is the job's point of no return (the VM
    /// runs): a cancel that comes after it no longer stops the job.
    pub(crate) async fn dispatch_for_job(
        &self,
        host: &str,
        kind: WorkKind,
        vm: &str,
        job: &mut JobTracker,
        work: FailoverWork,
    ) -> Result<RecoveredVm> {
        let (id, cancel) = (job.id().to_owned(), job.cancel_token().clone());
        let res = self
            .dispatch_and_wait_until(host, kind, vm, &id, work, None, &cancel)
            .await;
        if res.is_ok() {
            if cancel.is_cancelled() {
                info!(vm, host, job = %id, "the host finished before it saw the cancel; the job carries on");
            }
            job.pass_point_of_no_return();
        }
        res
    }

    #[allow(clippy::too_many_arguments)]
    async fn dispatch_and_wait_until(
        &self,
        host: &str,
        kind: WorkKind,
        vm: &str,
        job_id: &str,
        work: FailoverWork,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
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
        let mut cancelled_at = None;
        let mut poll = POLL_FIRST;
        loop {
            let r = self.work_result(&work_id).await?;
            if r.done && r.ok {
                return Ok(r.recovered.unwrap_or_default());
            }
            if r.done && cancelled_at.is_some() {
                info!(vm = %vm, host = %host, work = %work_id, error = %r.error, "host work stopped for the cancelled job");
                return Err(FailoverError::JobCancelled);
            }
            if r.done {
                return Err(FailoverError::FailedPrecondition(format!(
                    "host {host}: {}",
                    r.error
                )));
            }
            let now = tokio::time::Instant::now();
            match cancelled_at {
                None if cancel.is_cancelled() => {
                    self.cancel_work(host, &work_id).await;
                    cancelled_at = Some(now);
                }
                Some(at) if now - at >= CANCEL_WAIT => {
                    warn!(vm = %vm, host = %host, work = %work_id, "the host did not stop the cancelled work in time");
                    return Err(FailoverError::JobCancelled);
                }
                _ => {}
            }
            if deadline.is_some_and(|d| now >= d) {
                return Err(FailoverError::Unavailable(format!(
                    "host {host} did not complete {work_id} within {:?}",
                    timeout.unwrap_or_default()
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(poll) => poll = (poll * 2).min(POLL),
                () = cancel.cancelled(), if cancelled_at.is_none() => {}
            }
        }
    }

    async fn work_result(&self, work_id: &str) -> Result<WorkResultResponse> {
        Ok(self
            .scheduler()?
            .work_result(WorkResultRequest {
                work_id: work_id.to_owned(),
            })
            .await
            .map_err(|s| FailoverError::remote("scheduler", "work result", &s))?
            .into_inner())
    }

    /// Tells the scheduler to stop `work_id` on `host`; a failure is logged (the wait then
    /// ends after [`CANCEL_WAIT`]).
    async fn cancel_work(&self, host: &str, work_id: &str) {
        let res = async {
            self.scheduler()?
                .cancel_work(CancelWorkRequest {
                    host_name: host.to_owned(),
                    work_id: work_id.to_owned(),
                })
                .await
                .map_err(|s| FailoverError::remote("scheduler", "cancel work", &s))
        }
        .await;
        match res {
            Ok(r) => info!(host, work = work_id, state = %r.get_ref().state, "host work cancelled"),
            Err(e) => warn!(host, work = work_id, error = %e, "cannot cancel the host work"),
        }
    }
}
