//! The gRPC face of the scheduler: work streams, completions, dispatch, queue listings.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_mesh::Role;
use ferry_model::ErrorClass;
use ferry_proto::now_ms;
use ferry_proto::registry::v1::ReportReplicationErrorRequest;
use ferry_proto::scheduler::v1::{self as pb, WorkItem, scheduler_server::Scheduler};
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::error::SchedulerError;
use crate::results;
use crate::work::{QueuedWork, failover_prefix, is_failover_kind};

/// Retries read for one `ListQueue` (the retry set is shared by every host).
const LIST_RETRIES_MAX: usize = 10_000;
use crate::{SchedulerService, backoff};

type WorkStream = Pin<Box<dyn Stream<Item = Result<WorkItem, Status>> + Send>>;

/// The gRPC face of the service (a newtype: the orphan rule forbids `impl Trait for Arc<_>`).
#[derive(Clone)]
pub struct Api(pub Arc<SchedulerService>);

impl std::ops::Deref for Api {
    type Target = SchedulerService;
    fn deref(&self) -> &SchedulerService {
        &self.0
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Scheduler for Api {
    type WorkStreamStream = WorkStream;

    async fn work_stream(&self, req: Request<pb::WorkStreamRequest>) -> R<WorkStream> {
        let host = ferry_mesh::require_host(&req)?;
        let requeued = self
            .coord
            .requeue_inflight(&host)
            .await
            .map_err(SchedulerError::from)?;
        tracing::info!(host = %host, requeued, "agent connected to the work stream");
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<WorkItem, Status>>(4);
        let me = self.0.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => break,
                    _ = me.shutdown.cancelled() => break,
                    n = me.coord.next_work(&host, Duration::from_secs(2)) => n,
                };
                match next {
                    Ok(Some((id, payload))) => match serde_json::from_str::<QueuedWork>(&payload) {
                        Ok(w) if me.drop_cancelled(&host, &w, &payload).await.unwrap_or_else(|e| {
                            tracing::warn!(work = %id, error = %e, "cannot tell whether work was cancelled; sending it");
                            false
                        }) => {}
                        Ok(w) => {
                            tracing::info!(host = %host, work = %id, vm = %w.vm, attempt = w.attempt, "work sent");
                            let mut item = w.to_proto();
                            item.retry_time_unit_ms = me.cfg.retry.time_unit.as_millis() as u64;
                            if tx.send(Ok(item)).await.is_err() {
                                // The agent left; the item stays in flight and is re-sent on reconnect.
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(work = %id, error = %e, "dropping unreadable work item");
                            let _ = me.coord.ack_work(&host, &id).await;
                        }
                    },
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(host = %host, error = %e, "work queue read failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            tracing::info!(host = %host, "work stream closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn complete_work(
        &self,
        req: Request<pb::CompleteWorkRequest>,
    ) -> R<pb::CompleteWorkResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        if !req.host_name.is_empty() && req.host_name != host {
            return Err(SchedulerError::PermissionDenied(format!(
                "host {host} may not complete work {} of host {}",
                req.work_id, req.host_name
            ))
            .into());
        }
        // Only the caller's own queue is searched: another host's work is never found here.
        let items = self
            .coord
            .list_work(&host)
            .await
            .map_err(SchedulerError::from)?;
        let Some((_, _, payload)) = items.into_iter().find(|(id, _, _)| *id == req.work_id) else {
            return Err(SchedulerError::NotFound(format!(
                "work {} is not queued for host {host}",
                req.work_id
            ))
            .into());
        };
        // A failure nobody classified stops like a permanent one (nothing retries it blindly).
        let class = ErrorClass::try_from(req.error_class).unwrap_or(ErrorClass::Permanent);
        let mut w: QueuedWork = serde_json::from_str(&payload).map_err(|e| {
            SchedulerError::Internal(format!("work {} is unreadable: {e}", req.work_id))
        })?;
        if !w.cancels.is_empty() {
            self.coord
                .ack_work(&host, &req.work_id)
                .await
                .map_err(SchedulerError::from)?;
            return Ok(Response::new(pb::CompleteWorkResponse {}));
        }
        if self.is_cancelled(&w.id).await? {
            return self.complete_cancelled(&host, &w, req).await;
        }
        if w.is_failover() {
            // Recorded before the ack: an outcome is never lost between the two.
            results::record(&self.coord, &req).await?;
            self.coord
                .ack_work(&host, &req.work_id)
                .await
                .map_err(SchedulerError::from)?;
            tracing::info!(host = %host, work = %req.work_id, vm = %w.vm, ok = req.ok, error = %req.error, "failover work completed");
            return Ok(Response::new(pb::CompleteWorkResponse {}));
        }
        let retry = !req.ok && class == ErrorClass::Recoverable;
        if !retry {
            self.coord
                .ack_work(&host, &req.work_id)
                .await
                .map_err(SchedulerError::from)?;
        }
        if req.ok {
            tracing::info!(host = %host, work = %req.work_id, vm = %w.vm, "work completed");
        } else if retry {
            let delay = backoff(w.attempt, self.cfg.retry.time_unit);
            w.attempt += 1;
            w.last_error = req.error.clone();
            let due = now_ms() + delay.as_millis() as i64;
            let payload =
                serde_json::to_string(&w).map_err(|e| SchedulerError::Internal(e.to_string()))?;
            self.coord
                .ack_and_retry(&host, &req.work_id, due, &payload)
                .await
                .map_err(SchedulerError::from)?;
            tracing::warn!(host = %host, work = %w.id, vm = %w.vm, attempt = w.attempt, delay_ms = delay.as_millis() as u64, error = %req.error, "work failed; retry scheduled");
            let report = ReportReplicationErrorRequest {
                vm: w.vm.clone(),
                job_id: w.job_id.clone(),
                error: req.error.clone(),
                error_class: class.into(),
                attempts: w.attempt - 1,
                next_retry_ms: due,
                host: host.clone(),
            };
            self.report_error(&w, report).await;
        } else {
            tracing::warn!(host = %host, work = %w.id, vm = %w.vm, error = %req.error, class = %class, "work failed; not recoverable");
            let report = ReportReplicationErrorRequest {
                vm: w.vm.clone(),
                job_id: w.job_id.clone(),
                error: req.error.clone(),
                error_class: class.into(),
                attempts: w.attempt,
                host: host.clone(),
                ..Default::default()
            };
            self.report_error(&w, report).await;
        }
        Ok(Response::new(pb::CompleteWorkResponse {}))
    }

    async fn dispatch(&self, req: Request<pb::DispatchRequest>) -> R<pb::DispatchResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        if req.host_name.is_empty() || req.vm.is_empty() {
            return Err(SchedulerError::InvalidArgument(
                "dispatch needs a host_name and a vm".into(),
            )
            .into());
        }
        // One work item per job: a registry that resumes a job re-dispatches the same id.
        let id = if req.job_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else if is_failover_kind(req.kind) {
            format!("{}-{}", failover_prefix(req.kind), req.job_id)
        } else {
            format!("job-{}", req.job_id)
        };
        let mut w = QueuedWork {
            id: id.clone(),
            kind: req.kind,
            vm: req.vm,
            job_id: req.job_id,
            attempt: 1,
            created_at_ms: now_ms(),
            host: req.host_name.clone(),
            last_error: String::new(),
            app_consistent: false,
            failover: String::new(),
            cancels: String::new(),
            cut_id: String::new(),
        };
        w.set_failover(req.failover.as_ref());
        // Failover work runs once: a job resumed elsewhere dispatches again and finds it done.
        // Work of a cancelled job is not queued again (the registry re-dispatches its jobs).
        if (w.is_failover() && results::get(&self.coord, &id).await?.is_some())
            || self.is_cancelled(&id).await?
        {
            return Ok(Response::new(pb::DispatchResponse { work_id: id }));
        }
        // Work waiting for its retry stays there: dispatching it again (the registry does so
        // periodically, to rebuild queues Redis lost) must not cut its backoff short.
        if self
            .coord
            .pending_retry(&id)
            .await
            .map_err(SchedulerError::from)?
            .is_some()
        {
            return Ok(Response::new(pb::DispatchResponse { work_id: id }));
        }
        let payload =
            serde_json::to_string(&w).map_err(|e| SchedulerError::Internal(e.to_string()))?;
        self.coord
            .push_work(&req.host_name, &id, &payload)
            .await
            .map_err(SchedulerError::from)?;
        tracing::debug!(host = %req.host_name, work = %id, vm = %w.vm, "work queued");
        Ok(Response::new(pb::DispatchResponse { work_id: id }))
    }

    async fn list_queue(&self, req: Request<pb::ListQueueRequest>) -> R<pb::ListQueueResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let host = req.into_inner().host_name;
        if host.is_empty() {
            return Err(
                SchedulerError::InvalidArgument("list_queue needs a host_name".into()).into(),
            );
        }
        let entry = |state: String, next_attempt_ms: i64, payload: &str| {
            let w: QueuedWork = serde_json::from_str(payload).ok()?;
            Some(pb::QueueEntry {
                item: Some(w.to_proto()),
                host_name: w.host.clone(),
                state,
                next_attempt_ms,
                last_error: w.last_error,
            })
        };
        let mut entries: Vec<pb::QueueEntry> = self
            .coord
            .list_work(&host)
            .await
            .map_err(SchedulerError::from)?
            .into_iter()
            .filter_map(|(_, state, payload)| entry(state, 0, &payload))
            .collect();
        // Work waiting for its backoff sits in the (global) retry set, not the host's queue.
        let retries = self
            .coord
            .pending_retries(LIST_RETRIES_MAX)
            .await
            .map_err(SchedulerError::from)?;
        entries.extend(
            retries
                .into_iter()
                .filter_map(|(_, due, payload)| entry("retry".into(), due, &payload))
                .filter(|e| e.host_name == host),
        );
        Ok(Response::new(pb::ListQueueResponse { entries }))
    }

    async fn work_result(&self, req: Request<pb::WorkResultRequest>) -> R<pb::WorkResultResponse> {
        ferry_mesh::require_service(&req)?;
        let id = req.into_inner().work_id;
        match results::get(&self.coord, &id).await? {
            Some(r) => Ok(Response::new(r)),
            None => Ok(Response::new(pb::WorkResultResponse {
                state: "pending".into(),
                ..Default::default()
            })),
        }
    }

    async fn cancel_work(&self, req: Request<pb::CancelWorkRequest>) -> R<pb::CancelWorkResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        if req.host_name.is_empty() || req.work_id.is_empty() {
            return Err(SchedulerError::InvalidArgument(
                "cancel_work needs a host_name and a work_id".into(),
            )
            .into());
        }
        Ok(Response::new(
            self.0.cancel_work(&req.host_name, &req.work_id).await?,
        ))
    }

    async fn join_cut(&self, req: Request<pb::JoinCutRequest>) -> R<pb::JoinCutResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        if !req.host_name.is_empty() && req.host_name != host {
            return Err(SchedulerError::PermissionDenied(format!(
                "host {host} may not join a cut as host {}",
                req.host_name
            ))
            .into());
        }
        Ok(Response::new(
            self.0.join_cut(&host, &req.cut_id, &req.vm).await?,
        ))
    }

    async fn reschedule(&self, req: Request<pb::RescheduleRequest>) -> R<pb::RescheduleResponse> {
        ferry_mesh::require_service(&req)?;
        Err(ferry_mesh::unimplemented(
            "delta cycle scheduling (change tracking issue)",
        ))
    }
}
