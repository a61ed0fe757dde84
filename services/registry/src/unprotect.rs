//! The disable-protection job: stop replication (state `unprotecting`: the scheduler queues no
//! cycles) → remove the change logs on the host (`WORK_KIND_DISABLE_PROTECTION`, its outcome
//! kept by the scheduler; skipped with `--force`) → delete recovery points (only with
//! `--delete-points`, through storage-writer) → unprotected (the policy cleared). Its state
//! lives in the catalog like the other jobs', so a registry restart resumes it.
use std::sync::Arc;
use std::time::Duration;

use ferry_mesh::Component;
use ferry_model::Transition;
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::scheduler::v1::{WorkKind, WorkResultRequest, scheduler_client::SchedulerClient};
use ferry_proto::storage::v1::{DeletePointsRequest, storage_writer_client::StorageWriterClient};

use crate::error::RegistryError;
use crate::jobs::{KIND_ENABLE, KIND_RESYNC, REDISPATCH_EVERY, new_job};
use crate::lifecycle::{transition_event, vm_event};
use crate::service::RegistryService;
use crate::state::{Event, JobRecord};

pub(crate) const KIND_DISABLE: &str = "disable-protection";
const STEPS: [&str; 4] = [
    "stop replication",
    "remove change logs on the host",
    "delete recovery points",
    "unprotected",
];
const HOST_STEP: usize = 1;
const POINTS_STEP: usize = 2;

impl RegistryService {
    /// Starts disabling protection of `vm`. The options live in the job's steps (skipped
    /// ones are marked so when the job is made), so a resumed job does what was asked.
    pub(crate) async fn start_unprotect(
        self: &Arc<Self>,
        vm: &str,
        delete_points: bool,
        force: bool,
    ) -> Result<Job, RegistryError> {
        let mut job = new_job(KIND_DISABLE, vm, &STEPS);
        if force {
            let s = &mut job.steps[HOST_STEP];
            s.status = StepStatus::Skipped as i32;
            s.message =
                "skipped (--force): the change logs on the host are left as they are".to_string();
        }
        if !delete_points {
            let s = &mut job.steps[POINTS_STEP];
            s.status = StepStatus::Skipped as i32;
            s.message =
                "recovery points kept (under retention); --delete-points removes them".to_string();
        }
        let mut events = vec![Event::Job(JobRecord::encode(&job))];
        {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(vm)
                .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?;
            events.push(vm_event(v, &Transition::UnprotectStarted)?);
            // A job still setting protection up or resyncing ends here: cancelled.
            for j in st.jobs.values().filter(|j| {
                matches!(j.kind.as_str(), KIND_ENABLE | KIND_RESYNC)
                    && j.target == vm
                    && j.status == StepStatus::Running as i32
            }) {
                let mut j = j.clone();
                j.status = StepStatus::Cancelled as i32;
                j.error = format!("protection of vm {vm} was disabled (job {})", job.id);
                j.updated_at_ms = ferry_proto::now_ms();
                events.push(Event::Job(JobRecord::encode(&j)));
            }
        }
        events.push(Event::VmRetry {
            vm: vm.to_string(),
            attempts: 0,
            next_retry_ms: 0,
        });
        self.persist(events).await?;
        tracing::info!(vm, job = %job.id, delete_points, force, "disable protection started");
        self.spawn_job(job.id.clone());
        Ok(job)
    }

    pub(crate) async fn run_unprotect(self: &Arc<Self>, id: &str) -> Result<(), RegistryError> {
        let mut job = self.job(id).await?;
        let vm = job.target.clone();
        for (i, step_name) in STEPS.iter().enumerate() {
            match job.steps.get(i) {
                Some(s)
                    if s.status == StepStatus::Succeeded as i32
                        || s.status == StepStatus::Skipped as i32 =>
                {
                    continue;
                }
                Some(_) => {}
                None => {
                    return Err(RegistryError::Internal(format!(
                        "job {} has no step {step_name:?}",
                        job.id
                    )));
                }
            }
            self.set_step(&mut job, i, StepStatus::Running, "").await?;
            let outcome: Result<String, String> = match i {
                // The state changed when the job was made: no cycle is queued from now on.
                0 => Ok("replication stopped: no cycles are scheduled".to_string()),
                HOST_STEP => self.remove_host_logs(&vm, &job.id).await?,
                POINTS_STEP => self.delete_points(&vm).await?,
                _ => {
                    self.finish_unprotect(&vm).await?;
                    Ok(String::new())
                }
            };
            match outcome {
                Ok(msg) => {
                    self.set_step(&mut job, i, StepStatus::Succeeded, &msg)
                        .await?;
                }
                Err(err) => {
                    tracing::warn!(vm = %vm, job = %job.id, step = step_name, error = %err, "disable protection failed");
                    self.set_step(&mut job, i, StepStatus::Failed, &err).await?;
                    job.status = StepStatus::Failed as i32;
                    job.error = err.clone();
                    self.save_job(&job).await?;
                    if let Err(e) = self
                        .advance(&vm, Transition::UnprotectFailed { error: err })
                        .await
                    {
                        tracing::warn!(vm = %vm, error = %e, "vm state not changed for the failed disable protection");
                    }
                    return Ok(());
                }
            }
        }
        job.status = StepStatus::Succeeded as i32;
        self.save_job(&job).await?;
        tracing::info!(vm = %vm, job = %job.id, "protection disabled");
        Ok(())
    }

    /// Dispatches `WORK_KIND_DISABLE_PROTECTION` to the VM's host and waits for its outcome.
    async fn remove_host_logs(
        self: &Arc<Self>,
        vm: &str,
        job_id: &str,
    ) -> Result<Result<String, String>, RegistryError> {
        let host = {
            let st = self.state.lock().await;
            st.vms
                .get(vm)
                .map(|v| v.host.clone())
                .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?
        };
        let gone = |why: &str| {
            Err(format!(
                "host {host} {why}, so the change logs of vm {vm} cannot be removed there; \
                 disable protection with --force to skip the host"
            ))
        };
        let removed = self
            .state
            .lock()
            .await
            .hosts
            .get(&host)
            .is_none_or(|h| h.removed);
        if removed {
            return Ok(gone("is not registered"));
        }
        let kind = WorkKind::DisableProtection;
        let work_id = format!("unprotect-{job_id}");
        let mut dispatched: Option<tokio::time::Instant> = None;
        loop {
            if !self.host_connected(&host) {
                return Ok(gone("is not connected (no recent heartbeat)"));
            }
            if dispatched.is_none_or(|t| t.elapsed() >= REDISPATCH_EVERY) {
                match dispatched {
                    None => self.dispatch(&host, vm, job_id, kind).await?,
                    Some(_) => self.redispatch(&host, vm, job_id, kind).await,
                }
                dispatched = Some(tokio::time::Instant::now());
            }
            match self.work_result(&work_id).await {
                Ok(Some(r)) if r.ok => {
                    let n = r.recovered.map_or(0, |r| r.logs_removed);
                    return Ok(Ok(format!(
                        "{n} sealed change log(s) removed on host {host}; its tracker keeps serving the disks"
                    )));
                }
                Ok(Some(r)) => {
                    return Ok(Err(format!(
                        "host {host} could not remove the change logs of vm {vm}: {}",
                        r.error
                    )));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(vm, job = job_id, error = %e, "work result not read; next round")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = self.shutdown.cancelled() => return Err(RegistryError::Internal("registry shutting down".into())),
            }
        }
    }

    async fn work_result(
        &self,
        work_id: &str,
    ) -> anyhow::Result<Option<ferry_proto::scheduler::v1::WorkResultResponse>> {
        let ch = self.peers.channel(Component::Scheduler)?;
        let r = SchedulerClient::new(ch)
            .work_result(WorkResultRequest {
                work_id: work_id.to_string(),
            })
            .await?
            .into_inner();
        Ok(r.done.then_some(r))
    }

    /// Deletes the VM's points through storage-writer (retrying while it is unreachable).
    async fn delete_points(&self, vm: &str) -> Result<Result<String, String>, RegistryError> {
        let backoff = ferry_model::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let res = ferry_mesh::retry(
            "deleting recovery points",
            backoff,
            Some(10),
            &self.shutdown,
            ferry_mesh::transient_error,
            || async {
                let ch = self.peers.channel(Component::StorageWriter)?;
                let r = StorageWriterClient::new(ch)
                    .delete_points(DeletePointsRequest { vm: vm.to_string() })
                    .await?
                    .into_inner();
                anyhow::Ok(r.points_deleted)
            },
        )
        .await;
        let n = match res {
            Ok(n) => n,
            Err(ferry_mesh::GaveUp::Cancelled) => {
                return Err(RegistryError::Internal("registry shutting down".into()));
            }
            Err(ferry_mesh::GaveUp::Failed(e)) => {
                return Ok(Err(format!(
                    "deleting the recovery points of vm {vm}: {e:#}"
                )));
            }
        };
        self.persist(vec![Event::VmPoint {
            vm: vm.to_string(),
            point_id: String::new(),
            time_ms: 0,
        }])
        .await?;
        Ok(Ok(format!(
            "{n} recovery point(s) deleted; their chunks go with the next garbage collection"
        )))
    }

    async fn finish_unprotect(&self, vm: &str) -> Result<(), RegistryError> {
        let done = transition_event(&*self.state.lock().await, vm, &Transition::Unprotected)?;
        self.persist(vec![done, Event::VmPolicyCleared { vm: vm.to_string() }])
            .await
    }
}
