//! A failover job as the registry shows it: created through `UpsertJob`, then updated as each
//! step starts, progresses and ends. Updates after creation are best effort: a registry that
//! is briefly unreachable must not fail a failover that is otherwise going well.
use ferry_proto::common::v1::{Job, JobStep, StepStatus};
use ferry_proto::registry::v1::GetJobRequest;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::error::{FailoverError, Result};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) struct JobTracker {
    registry: RegistryClient<Channel>,
    job: Job,
}

impl JobTracker {
    /// Creates the job (running, every step pending) and learns its id.
    pub(crate) async fn start(
        registry: RegistryClient<Channel>,
        kind: &str,
        target: &str,
        steps: &[&str],
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
        Ok(Self {
            registry,
            job: Job {
                id: created.id,
                ..job
            },
        })
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
        Ok(Self { registry, job })
    }

    /// The job as it stands (a job handed over to another replica).
    pub(crate) fn snapshot(&self) -> Job {
        self.job.clone()
    }

    pub(crate) fn id(&self) -> &str {
        &self.job.id
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
        if let Some(s) = self.job.steps.get_mut(step) {
            s.status = StepStatus::Succeeded as i32;
            s.progress_percent = 100;
            s.message = message;
            s.ended_at_ms = now_ms();
        }
        self.push().await;
    }

    /// Ends the job as succeeded.
    pub(crate) async fn succeed(mut self) -> Job {
        self.job.status = StepStatus::Succeeded as i32;
        self.push().await;
        info!(job = %self.job.id, kind = %self.job.kind, target = %self.job.target, "job succeeded");
        self.job
    }

    /// Ends the job as failed: the running step failed, the ones not started are skipped.
    pub(crate) async fn fail(mut self, error: &FailoverError) -> Job {
        let end = now_ms();
        for s in &mut self.job.steps {
            if s.status == StepStatus::Running as i32 {
                s.status = StepStatus::Failed as i32;
                s.message = error.to_string();
                s.ended_at_ms = end;
            } else if s.status == StepStatus::Pending as i32 {
                s.status = StepStatus::Skipped as i32;
            }
        }
        self.job.status = StepStatus::Failed as i32;
        self.job.error = error.to_string();
        self.push().await;
        warn!(job = %self.job.id, kind = %self.job.kind, target = %self.job.target, error = %error, "job failed");
        self.job
    }

    async fn push(&mut self) {
        self.job.updated_at_ms = now_ms();
        if let Err(status) = self.registry.upsert_job(self.job.clone()).await {
            warn!(job = %self.job.id, code = ?status.code(), error = %status.message(), "cannot update the job in the registry");
        }
    }
}
