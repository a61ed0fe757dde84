//! Cancelling work a cancelled job dispatched. The mark `work-cancel-<id>` (kept as long as
//! failover outcomes) is what every path checks: a dispatch of the id again queues nothing,
//! the work stream drops the item instead of sending it (a host that reconnects is not
//! handed it again), and its completion neither retries nor reports an error. Work already
//! in flight is stopped by a cancel item on its host's stream.
use ferry_proto::now_ms;
use ferry_proto::scheduler::v1::{CancelWorkResponse, CompleteWorkRequest};

use crate::SchedulerService;
use crate::error::SchedulerError;
use crate::results::{self, RESULT_TTL};
use crate::work::QueuedWork;

/// The outcome recorded for failover work that was cancelled before its host finished it.
pub(crate) const CANCELLED: &str = "cancelled: its job was cancelled";

fn mark(work_id: &str) -> String {
    format!("work-cancel-{work_id}")
}

/// The id of the cancel item that stops `work_id`.
fn cancel_item_id(work_id: &str) -> String {
    format!("cancel-{work_id}")
}

impl SchedulerService {
    /// Whether the job that dispatched `work_id` cancelled it.
    pub(crate) async fn is_cancelled(&self, work_id: &str) -> Result<bool, SchedulerError> {
        Ok(self.coord.get(&mark(work_id)).await?.is_some())
    }

    /// Stops `work_id` of `host` wherever it is.
    pub(crate) async fn cancel_work(
        &self,
        host: &str,
        work_id: &str,
    ) -> Result<CancelWorkResponse, SchedulerError> {
        let state = |s: &str| {
            Ok(CancelWorkResponse {
                state: s.to_owned(),
            })
        };
        if results::get(&self.coord, work_id).await?.is_some() {
            return state("done");
        }
        self.coord
            .set_ex(&mark(work_id), &now_ms().to_string(), RESULT_TTL)
            .await?;
        let items = self.coord.list_work(host).await?;
        let found = items.iter().find(|(id, _, _)| id == work_id);
        match found {
            Some((_, queue_state, payload)) if queue_state == "in-flight" => {
                let w: QueuedWork = serde_json::from_str(payload).map_err(|e| {
                    SchedulerError::Internal(format!("work {work_id} is unreadable: {e}"))
                })?;
                self.push_cancel_item(host, &w).await?;
                tracing::info!(host, work = work_id, vm = %w.vm, "in-flight work told to stop");
                state("stopping")
            }
            Some((_, _, payload)) => {
                self.coord.ack_work(host, work_id).await?;
                self.record_cancelled(work_id, payload).await?;
                tracing::info!(
                    host,
                    work = work_id,
                    "queued work dropped: its job was cancelled"
                );
                state("dropped")
            }
            None => match self.coord.pending_retry(work_id).await? {
                Some((_, payload)) => {
                    self.coord.drop_retry(work_id).await?;
                    self.record_cancelled(work_id, &payload).await?;
                    tracing::info!(
                        host,
                        work = work_id,
                        "work waiting for its retry dropped: its job was cancelled"
                    );
                    state("dropped")
                }
                None => state("unknown"),
            },
        }
    }

    async fn push_cancel_item(&self, host: &str, w: &QueuedWork) -> Result<(), SchedulerError> {
        let item = QueuedWork {
            id: cancel_item_id(&w.id),
            kind: w.kind,
            vm: w.vm.clone(),
            job_id: w.job_id.clone(),
            attempt: 1,
            created_at_ms: now_ms(),
            host: host.to_owned(),
            last_error: String::new(),
            app_consistent: false,
            failover: String::new(),
            cancels: w.id.clone(),
            cut_id: String::new(),
        };
        let payload =
            serde_json::to_string(&item).map_err(|e| SchedulerError::Internal(e.to_string()))?;
        self.coord.push_work(host, &item.id, &payload).await?;
        Ok(())
    }

    /// Failover work's waiter learns the outcome: cancelled.
    async fn record_cancelled(&self, work_id: &str, payload: &str) -> Result<(), SchedulerError> {
        let Ok(w) = serde_json::from_str::<QueuedWork>(payload) else {
            return Ok(());
        };
        if !w.is_failover() {
            return Ok(());
        }
        results::record(
            &self.coord,
            &CompleteWorkRequest {
                work_id: work_id.to_owned(),
                host_name: w.host,
                ok: false,
                error: CANCELLED.to_owned(),
                ..Default::default()
            },
        )
        .await
    }

    /// A cancelled item about to be sent: dropped (acked, its outcome recorded) instead.
    pub(crate) async fn drop_cancelled(
        &self,
        host: &str,
        w: &QueuedWork,
        payload: &str,
    ) -> Result<bool, SchedulerError> {
        if !w.cancels.is_empty() || !self.is_cancelled(&w.id).await? {
            return Ok(false);
        }
        self.coord.ack_work(host, &w.id).await?;
        self.record_cancelled(&w.id, payload).await?;
        tracing::info!(host, work = %w.id, vm = %w.vm, "cancelled work not sent");
        Ok(true)
    }
}

impl crate::Api {
    /// The completion of cancelled work: acked; failover work keeps the host's outcome (or
    /// says cancelled); nothing is retried or reported as a replication error.
    pub(crate) async fn complete_cancelled(
        &self,
        host: &str,
        w: &QueuedWork,
        req: CompleteWorkRequest,
    ) -> Result<tonic::Response<ferry_proto::scheduler::v1::CompleteWorkResponse>, tonic::Status>
    {
        if w.is_failover() {
            let req = CompleteWorkRequest {
                error: if req.ok {
                    req.error.clone()
                } else {
                    format!("{CANCELLED} ({})", req.error)
                },
                ..req.clone()
            };
            results::record(&self.coord, &req).await?;
        }
        self.coord
            .ack_work(host, &w.id)
            .await
            .map_err(SchedulerError::from)?;
        tracing::info!(host, work = %w.id, vm = %w.vm, ok = req.ok, "cancelled work completed");
        Ok(tonic::Response::new(Default::default()))
    }
}
