//! What the replication services report: committed points, job progress, replication
//! errors, and jobs they create or update.
use ferry_model::{ErrorClass, Transition};
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::now_ms;
use ferry_proto::registry::v1 as pb;
use tonic::{Request, Response, Status};

use super::{R, RegistryService};
use crate::error::RegistryError;
use crate::lifecycle::{transition_event, vm_event};
use crate::state::{Event, JobRecord};

impl RegistryService {
    pub(super) async fn report_committed(
        &self,
        req: Request<pb::ReportCommittedRequest>,
    ) -> R<pb::ReportCommittedResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        let point = req.point.unwrap_or_default();
        if let Ok(mut c) = self.last_cycle.lock() {
            c.insert(req.vm.clone(), (req.cycle_duration_ms, req.cycle_bytes));
        }
        let mut events = vec![Event::VmPoint {
            vm: req.vm.clone(),
            point_id: point.id.clone(),
            time_ms: point.time_ms,
        }];
        {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(&req.vm)
                .ok_or_else(|| RegistryError::VmNotFound(req.vm.clone()))?;
            // A point after failed attempts: the retries are over and the warning with them.
            if v.retry_attempts > 0 {
                events.push(Event::VmRetry {
                    vm: v.name.clone(),
                    attempts: 0,
                    next_retry_ms: 0,
                });
            }
            let resync_job = st.jobs.get(&req.job_id).filter(|j| {
                j.kind == crate::jobs::KIND_RESYNC && j.status == StepStatus::Running as i32
            });
            if let Some(job) = resync_job {
                let mut job = job.clone();
                let summary = format!(
                    "{} bytes sent, {} bytes equal or already stored",
                    job.bytes_done, job.bytes_skipped
                );
                for s in &mut job.steps {
                    s.status = StepStatus::Succeeded as i32;
                    s.progress_percent = 100;
                    s.ended_at_ms = now_ms();
                    s.message = summary.clone();
                }
                job.status = StepStatus::Succeeded as i32;
                job.updated_at_ms = now_ms();
                events.push(Event::Job(JobRecord::encode(&job)));
                events.push(vm_event(v, &Transition::ResyncCommitted)?);
            } else {
                let next = vm_event(v, &Transition::PointCommitted)?;
                if !matches!(&next, Event::VmState { state, health, last_error, .. }
                    if *state == v.state && *health == v.health && *last_error == v.last_error)
                {
                    events.push(next);
                }
            }
        }
        self.persist(events).await?;
        tracing::info!(vm = %req.vm, point = %point.id, job = %req.job_id, "recovery point committed");
        Ok(Response::new(pb::ReportCommittedResponse {}))
    }

    pub(super) async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> R<pb::ReportProgressResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        let mut job = self.job(&req.job_id).await?;
        job.bytes_total = job.bytes_total.max(req.bytes_total);
        job.bytes_done = req.bytes_done;
        job.bytes_skipped = req.bytes_skipped;
        job.updated_at_ms = now_ms();
        if let Some(step) = job
            .steps
            .iter_mut()
            .find(|s| s.status == StepStatus::Running as i32)
        {
            if job.bytes_total > 0 {
                let done = (job.bytes_done + job.bytes_skipped).min(job.bytes_total);
                step.progress_percent = (done * 100 / job.bytes_total) as u32;
            }
            if !req.message.is_empty() {
                step.message = req.message.clone();
            }
        }
        // Progress is advisory: keep it in memory and persist at most every two seconds.
        let flush = {
            let mut f = self
                .progress_flushed
                .lock()
                .map_err(|_| Status::internal("progress lock poisoned"))?;
            let last = f.get(&job.id).copied().unwrap_or(0);
            if now_ms() - last > 2000 {
                f.insert(job.id.clone(), now_ms());
                true
            } else {
                false
            }
        };
        if flush {
            self.save_job(&job).await?;
        } else {
            self.state.lock().await.jobs.insert(job.id.clone(), job);
        }
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    pub(super) async fn report_replication_error(
        &self,
        req: Request<pb::ReportReplicationErrorRequest>,
    ) -> R<pb::ReportReplicationErrorResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        // Resync required: never replicated from an inconsistent log; deltas stop until a
        // resync (the scheduler starts it in the policy's window; `ferry vm resync` now).
        let class = ErrorClass::try_from(req.error_class)
            .map_err(|e| RegistryError::InvalidArgument(format!("error_class: {e}")))?;
        let error = req.error.clone();
        {
            let st = self.state.lock().await;
            if let Some(v) = st.vms.get(&req.vm)
                && !req.host.is_empty()
                && v.host != req.host
            {
                tracing::info!(vm = %req.vm, host = %req.host, source = %v.host, error = %req.error, "replication error from a host that no longer replicates the vm; ignored");
                return Ok(Response::new(pb::ReportReplicationErrorResponse {}));
            }
        }
        let t = match class {
            ErrorClass::ResyncRequired => Transition::ResyncRequired { error },
            ErrorClass::Recoverable => Transition::RecoverableError { error },
            ErrorClass::Permanent => Transition::PermanentError { error },
        };
        let state_event = transition_event(&*self.state.lock().await, &req.vm, &t)?;
        tracing::warn!(vm = %req.vm, class = %class, attempts = req.attempts, error = %req.error, "replication error");
        let (attempts, next_retry_ms) = if class == ErrorClass::Recoverable {
            (req.attempts.max(1), req.next_retry_ms)
        } else {
            (0, 0)
        };
        self.persist(vec![
            state_event,
            Event::VmRetry {
                vm: req.vm,
                attempts,
                next_retry_ms,
            },
        ])
        .await?;
        Ok(Response::new(pb::ReportReplicationErrorResponse {}))
    }

    pub(super) async fn upsert_job(&self, req: Request<Job>) -> R<Job> {
        ferry_mesh::require_service(&req)?;
        let mut job = req.into_inner();
        if job.id.is_empty() {
            job.id = uuid::Uuid::new_v4().to_string();
            job.created_at_ms = now_ms();
        }
        job.updated_at_ms = now_ms();
        self.save_job(&job).await?;
        // The stored job: its runner learns of an operator's cancel request from it.
        Ok(Response::new(self.job(&job.id).await?))
    }
}
