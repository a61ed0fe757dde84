//! A failover job as the registry shows it: created through `UpsertJob`, then updated as each
//! step starts, progresses and ends. Updates after creation are best effort: a registry that
//! is briefly unreachable must not fail a failover that is otherwise going well.
//!
//! A job made with [`JobTracker::start_cancellable`] may be cancelled by an operator until
//! its point of no return (`cancellable_until_step`, decided by the registry): the tracker
//! watches the job in the registry and fires [`JobTracker::cancel_token`]; the runner checks
//! it on entering each step ([`JobTracker::enter_step`]) and while it waits on host work.
use ferry_proto::common::v1::{Job, JobStep, StepStatus};
use ferry_proto::registry::v1::GetJobRequest;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::error::{FailoverError, Result};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// How often a cancellable job looks for an operator's cancel request.
const CANCEL_POLL: Duration = Duration::from_millis(500);

pub(crate) struct JobTracker {
    registry: RegistryClient<Channel>,
    job: Job,
    /// Fired when an operator asked to cancel the job.
    cancel: CancellationToken,
    /// Past the point of no return: a cancel request is no longer honoured.
    past_return: bool,
    /// Stops the watcher with the tracker.
    _watch: Option<DropGuard>,
}

impl JobTracker {
    /// Creates the job (running, every step pending) and learns its id.
    pub(crate) async fn start(
        registry: RegistryClient<Channel>,
        kind: &str,
        target: &str,
        steps: &[&str],
    ) -> Result<Self> {
        Self::start_cancellable(registry, kind, target, steps, 0).await
    }

    /// Like [`JobTracker::start`], for a job that may be cancelled while none of its steps
    /// from `until` on has started.
    pub(crate) async fn start_cancellable(
        registry: RegistryClient<Channel>,
        kind: &str,
        target: &str,
        steps: &[&str],
        until: u32,
    ) -> Result<Self> {
        let now = now_ms();
        let job = Job {
            kind: kind.to_owned(),
            target: target.to_owned(),
            status: StepStatus::Running as i32,
            steps: steps
                .iter()
                .map(|name| JobStep {
                    name: (*name).to_owned(),
                    status: StepStatus::Pending as i32,
                    ..JobStep::default()
                })
                .collect(),
            created_at_ms: now,
            updated_at_ms: now,
            cancellable_until_step: until,
            ..Job::default()
        };
        let mut client = registry.clone();
        let created = client
            .upsert_job(job.clone())
            .await
            .map_err(|s| FailoverError::remote("registry", "upsert job", &s))?
            .into_inner();
        if created.id.is_empty() {
            return Err(FailoverError::Internal(
                "the registry created a job without an id".into(),
            ));
        }
        info!(job = %created.id, kind, target, "job started");
        Ok(Self::new(
            registry,
            Job {
                id: created.id,
                ..job
            },
        ))
    }

    fn new(registry: RegistryClient<Channel>, job: Job) -> Self {
        let cancel = CancellationToken::new();
        if job.cancel_requested {
            cancel.cancel();
        }
        let watch = (job.cancellable_until_step > 0 && !cancel.is_cancelled())
            .then(|| watch_cancel(registry.clone(), job.id.clone(), cancel.clone()));
        Self {
            registry,
            job,
            cancel,
            past_return: false,
            _watch: watch,
        }
    }

    /// Takes over a job another replica started (it stopped or died mid-way).
    pub(crate) async fn resume(registry: RegistryClient<Channel>, id: &str) -> Result<Self> {
        let mut client = registry.clone();
        let job = client
            .get_job(GetJobRequest { id: id.to_owned() })
            .await
            .map_err(|s| FailoverError::remote("registry", "get job", &s))?
            .into_inner();
        info!(job = %job.id, kind = %job.kind, target = %job.target, "job resumed");
        Ok(Self::new(registry, job))
    }

    /// Records what the job was asked to do (for a replica that resumes it).
    pub(crate) async fn set_params(&mut self, params: impl IntoIterator<Item = (String, String)>) {
        self.job.params = params.into_iter().collect();
        self.push().await;
    }

    /// Fired when an operator asked to cancel the job.
    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Marks step `step` running, unless an operator cancelled the job before its point of
    /// no return: then the step does not start (`JobCancelled`). A cancel the registry
    /// accepted is honoured even on entering the first step past that point: it was
    /// accepted because that step had not started.
    pub(crate) async fn enter_step(&mut self, step: usize) -> Result<()> {
        self.step_running(step).await;
        if self.cancel.is_cancelled() && !self.past_return {
            return Err(FailoverError::JobCancelled);
        }
        if step >= self.job.cancellable_until_step as usize {
            self.past_return = true;
        }
        Ok(())
    }

    /// The job did what cannot be undone (the host started the VM): a cancel request from
    /// now on is not honoured.
    pub(crate) fn pass_point_of_no_return(&mut self) {
        self.past_return = true;
    }

    /// The job as it stands (a job handed over to another replica).
    pub(crate) fn snapshot(&self) -> Job {
        self.job.clone()
    }

    pub(crate) fn id(&self) -> &str {
        &self.job.id
    }

    /// Whether step `step` succeeded.
    pub(crate) fn step_succeeded(&self, step: usize) -> bool {
        self.job
            .steps
            .get(step)
            .is_some_and(|s| s.status == StepStatus::Succeeded as i32)
    }

    /// Adds `note` to step `step`'s message (shown with the job's next update).
    pub(crate) fn note(&mut self, step: usize, note: &str) {
        if let Some(s) = self.job.steps.get_mut(step) {
            if s.message.is_empty() {
                s.message = note.to_owned();
            } else {
                s.message = format!("{}; {note}", s.message);
            }
        }
    }

    pub(crate) fn set_bytes(&mut self, total: u64, done: u64) {
        self.job.bytes_total = total;
        self.job.bytes_done = done;
    }

    pub(crate) async fn step_running(&mut self, step: usize) {
        if let Some(s) = self.job.steps.get_mut(step) {
            s.status = StepStatus::Running as i32;
            s.started_at_ms = now_ms();
        }
        self.push().await;
    }

    pub(crate) async fn step_progress(&mut self, step: usize, percent: u32, message: String) {
        if let Some(s) = self.job.steps.get_mut(step) {
            s.progress_percent = percent.min(100);
            s.message = message;
        }
        self.push().await;
    }

    pub(crate) async fn step_done(&mut self, step: usize, message: String) {
        self.step_ended(step, StepStatus::Succeeded, message).await;
    }

    /// Ends one step (succeeded, failed or skipped) while the job goes on.
    pub(crate) async fn step_ended(&mut self, step: usize, status: StepStatus, message: String) {
        if let Some(s) = self.job.steps.get_mut(step) {
            s.status = status as i32;
            if status == StepStatus::Succeeded {
                s.progress_percent = 100;
            }
            s.message = message;
            s.ended_at_ms = now_ms();
        }
        self.push().await;
    }

    /// Step `step` (and the job) wait for an operator's input (`ResumeJob`).
    pub(crate) async fn step_waiting(&mut self, step: usize, message: String) {
        if let Some(s) = self.job.steps.get_mut(step) {
            s.status = StepStatus::WaitingForInput as i32;
            s.started_at_ms = now_ms();
            s.message = message;
        }
        self.job.status = StepStatus::WaitingForInput as i32;
        self.push().await;
    }

    /// The operator's input came: the job runs on (the step is ended by the caller).
    pub(crate) fn input_received(&mut self, resumed_step: u32, comment: &str) {
        self.job.status = StepStatus::Running as i32;
        self.job.resumed_step = resumed_step;
        self.job.resume_comment = comment.to_owned();
    }

    pub(crate) fn registry(&self) -> RegistryClient<Channel> {
        self.registry.clone()
    }

    /// Ends the job as succeeded.
    pub(crate) async fn succeed(mut self) -> Job {
        self.job.status = StepStatus::Succeeded as i32;
        self.push().await;
        info!(job = %self.job.id, kind = %self.job.kind, target = %self.job.target, "job succeeded");
        self.job
    }

    /// Ends the job as failed (or cancelled, for `JobCancelled`): the running step failed,
    /// the ones not started are skipped.
    pub(crate) async fn fail(mut self, error: &FailoverError) -> Job {
        let end = now_ms();
        let status = match error {
            FailoverError::JobCancelled => StepStatus::Cancelled,
            _ => StepStatus::Failed,
        };
        for s in &mut self.job.steps {
            if s.status == StepStatus::Running as i32 {
                s.status = status as i32;
                s.message = error.to_string();
                s.ended_at_ms = end;
            } else if s.status == StepStatus::Pending as i32 {
                s.status = StepStatus::Skipped as i32;
            }
        }
        self.job.status = status as i32;
        self.job.error = error.to_string();
        self.push().await;
        warn!(job = %self.job.id, kind = %self.job.kind, target = %self.job.target, error = %error, "job failed");
        self.job
    }

    async fn push(&mut self) {
        self.job.updated_at_ms = now_ms();
        match self.registry.upsert_job(self.job.clone()).await {
            Ok(stored) if stored.get_ref().cancel_requested => {
                self.job.cancel_requested = true;
                self.cancel.cancel();
            }
            Ok(_) => {}
            Err(status) => {
                warn!(job = %self.job.id, code = ?status.code(), error = %status.message(), "cannot update the job in the registry")
            }
        }
    }
}

/// Polls the job until an operator asks to cancel it, then fires `cancel`; ends with the
/// tracker (the guard).
fn watch_cancel(
    registry: RegistryClient<Channel>,
    id: String,
    cancel: CancellationToken,
) -> DropGuard {
    let done = CancellationToken::new();
    let stop = done.clone();
    tokio::spawn(async move {
        let mut registry = registry;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(CANCEL_POLL) => {}
            }
            let asked = registry
                .get_job(GetJobRequest { id: id.clone() })
                .await
                .is_ok_and(|j| j.get_ref().cancel_requested);
            if asked {
                info!(job = %id, "an operator asked to cancel the job");
                cancel.cancel();
                return;
            }
        }
    });
    done.drop_guard()
}
