//! The enable-protection job: prerequisites check → replication relationship → initial
//! replication → finalize protection. Its state lives in the catalog, so a registry restart
//! resumes running jobs where they were (the scheduler keeps undelivered work in Redis and
//! re-sends it; the agent skips blocks already stored).
use std::sync::Arc;
use std::time::Duration;

use ferry_mesh::{Component, GaveUp};
use ferry_model::Backoff;
use ferry_model::{Health, Operation, Transition, VmState};
use ferry_proto::common::v1::{Job, JobStep, StepStatus};
use ferry_proto::now_ms;
use ferry_proto::scheduler::v1::{DispatchRequest, WorkKind, scheduler_client::SchedulerClient};

use crate::error::RegistryError;
use crate::lifecycle::{transition_event, vm_event};
use crate::service::RegistryService;
use crate::state::{Event, JobRecord, PolicyRecord};

pub(crate) const KIND_ENABLE: &str = "enable-protection";
pub(crate) const KIND_RESYNC: &str = "resync";
/// How often a running job's work is queued again: `Dispatch` is idempotent while the work
/// is queued or in flight, and this rebuilds it after Redis lost its data.
pub(crate) const REDISPATCH_EVERY: Duration = Duration::from_secs(10);
const STEPS: [&str; 4] = [
    "prerequisites check",
    "replication relationship",
    "initial replication",
    "finalize protection",
];
const SUPPORTED_FORMATS: [&str; 3] = ["raw", "vhd", "vhdx"];

/// How far a registry job may be cancelled: enable protection until it is finalized, a
/// resync until its point commits; disabling protection not at all (it stops replication at
/// its first step).
fn cancellable_until_step(kind: &str) -> u32 {
    match kind {
        KIND_ENABLE => 3,
        KIND_RESYNC => 1,
        _ => 0,
    }
}

pub(crate) fn new_job(kind: &str, target: &str, steps: &[&str]) -> Job {
    Job {
        cancellable_until_step: cancellable_until_step(kind),
        id: uuid::Uuid::new_v4().to_string(),
        kind: kind.to_string(),
        target: target.to_string(),
        status: StepStatus::Running as i32,
        steps: steps
            .iter()
            .map(|s| JobStep {
                name: s.to_string(),
                status: StepStatus::Pending as i32,
                ..Default::default()
            })
            .collect(),
        created_at_ms: now_ms(),
        updated_at_ms: now_ms(),
        ..Default::default()
    }
}

pub(crate) enum Outcome {
    Done,
    Failed(String),
    /// An operator cancelled the job.
    Cancelled,
}

impl RegistryService {
    pub(crate) async fn start_protection(
        self: &Arc<Self>,
        vm: &str,
        policy: PolicyRecord,
    ) -> Result<Job, RegistryError> {
        policy.check()?;
        check_resync_window(&policy)?;
        let job = new_job(KIND_ENABLE, vm, &STEPS);
        let (enabling, had_point) = {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(vm)
                .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?;
            let enabling = vm_event(v, &Transition::ProtectionStarted)?;
            self.check_recovery_host(&st, v, &policy.recovery_host)?;
            (enabling, !v.last_point_id.is_empty())
        };
        let mut events = vec![
            Event::Job(JobRecord::encode(&job)),
            Event::VmProtection {
                vm: vm.to_string(),
                policy,
                job_id: job.id.clone(),
            },
            enabling,
        ];
        // Points kept from an earlier protection do not make the initial copy: the change
        // logs since then were removed when it was disabled. Forgotten here, the initial
        // replication step waits for this job's own point.
        if had_point {
            events.push(Event::VmPoint {
                vm: vm.to_string(),
                point_id: String::new(),
                time_ms: 0,
            });
        }
        self.persist(events).await?;
        tracing::info!(vm, job = %job.id, "enable protection started");
        self.spawn_job(job.id.clone());
        Ok(job)
    }

    /// Picks up jobs that were running when the registry stopped.
    pub fn resume_jobs(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let running: Vec<String> = me
                .state
                .lock()
                .await
                .jobs
                .values()
                .filter(|j| {
                    matches!(
                        j.kind.as_str(),
                        KIND_ENABLE | KIND_RESYNC | crate::unprotect::KIND_DISABLE
                    ) && j.status == StepStatus::Running as i32
                })
                .map(|j| j.id.clone())
                .collect();
            for id in running {
                tracing::info!(job = %id, "resuming job");
                me.spawn_job(id);
            }
        });
    }

    pub(crate) fn spawn_job(self: &Arc<Self>, id: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let kind = me.job(&id).await.map(|j| j.kind).unwrap_or_default();
            let res = if kind == KIND_RESYNC {
                me.run_resync(&id).await
            } else if kind == crate::unprotect::KIND_DISABLE {
                me.run_unprotect(&id).await
            } else {
                me.run_protection(&id).await
            };
            if let Err(e) = res {
                tracing::error!(job = %id, error = %e, "job runner failed");
            }
        });
    }

    pub(crate) async fn set_step(
        &self,
        job: &mut Job,
        i: usize,
        status: StepStatus,
        msg: &str,
    ) -> Result<(), RegistryError> {
        // Progress reports update the job in memory; start from the newest copy.
        if let Ok(cur) = self.job(&job.id).await {
            job.bytes_total = cur.bytes_total;
            job.bytes_done = cur.bytes_done;
            job.bytes_skipped = cur.bytes_skipped;
        }
        let step = &mut job.steps[i];
        if status == StepStatus::Running && step.started_at_ms == 0 {
            step.started_at_ms = now_ms();
        }
        if matches!(status, StepStatus::Succeeded | StepStatus::Failed) {
            step.ended_at_ms = now_ms();
            if status == StepStatus::Succeeded {
                step.progress_percent = 100;
            }
        }
        step.status = status as i32;
        if !msg.is_empty() {
            step.message = msg.to_string();
        }
        job.updated_at_ms = now_ms();
        self.save_job(job).await
    }

    async fn run_protection(self: &Arc<Self>, id: &str) -> Result<(), RegistryError> {
        let mut job = self.job(id).await?;
        let vm = job.target.clone();
        for (i, step_name) in STEPS.iter().enumerate() {
            match job.steps.get(i) {
                Some(s) if s.status == StepStatus::Succeeded as i32 => continue,
                Some(_) => {}
                None => {
                    return Err(RegistryError::Internal(format!(
                        "job {} has no step {step_name:?}",
                        job.id
                    )));
                }
            }
            let cancellable = i < job.cancellable_until_step as usize;
            let outcome = if cancellable && self.cancel_requested(&job.id).await {
                Outcome::Cancelled
            } else {
                self.set_step(&mut job, i, StepStatus::Running, "").await?;
                match i {
                    0 => self.check_prerequisites(&vm).await?,
                    1 => self.create_relationship(&vm).await?,
                    2 => self.initial_replication(&vm, &job).await?,
                    _ => self.finalize(&vm).await?,
                }
            };
            match outcome {
                Outcome::Cancelled => {
                    let host = self.vm_host(&vm).await?;
                    let cancelled = Transition::ProtectionCancelled;
                    return self.end_cancelled(&mut job, &host, cancelled).await;
                }
                Outcome::Done => {
                    let msg = if i == 2 {
                        self.copy_summary(&job.id).await
                    } else {
                        String::new()
                    };
                    self.set_step(&mut job, i, StepStatus::Succeeded, &msg)
                        .await?;
                }
                Outcome::Failed(err) => {
                    tracing::warn!(vm = %vm, job = %job.id, step = step_name, error = %err, "enable protection failed");
                    self.set_step(&mut job, i, StepStatus::Failed, &err).await?;
                    job.status = StepStatus::Failed as i32;
                    job.error = err.clone();
                    self.save_job(&job).await?;
                    let failed = Transition::ProtectionFailed { error: err };
                    if let Err(e) = self.advance(&vm, failed).await {
                        // The job has failed either way; the vm keeps the state it has.
                        tracing::warn!(vm = %vm, error = %e, "vm state not changed for the failed protection");
                    }
                    return Ok(());
                }
            }
        }
        job.status = StepStatus::Succeeded as i32;
        self.save_job(&job).await?;
        tracing::info!(vm = %vm, job = %job.id, "vm protected");
        Ok(())
    }

    async fn copy_summary(&self, job_id: &str) -> String {
        match self.job(job_id).await {
            Ok(j) => format!(
                "{} bytes sent, {} bytes skipped as already stored",
                j.bytes_done, j.bytes_skipped
            ),
            Err(_) => String::new(),
        }
    }

    async fn check_prerequisites(&self, vm: &str) -> Result<Outcome, RegistryError> {
        let st = self.state.lock().await;
        let v = st
            .vms
            .get(vm)
            .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?;
        let mut problems = Vec::new();
        let connected = match st.hosts.get(&v.host) {
            None => {
                problems.push(format!("host {} is not registered", v.host));
                false
            }
            Some(h) if h.removed => {
                problems.push(format!("host {} was removed from the vault", v.host));
                false
            }
            Some(_) if !self.host_connected(&v.host) => {
                problems.push(format!("host {} has not sent a heartbeat recently", v.host));
                false
            }
            Some(_) => true,
        };
        // Every protection runs delta cycles at its frequency (the policy cannot ask for a
        // copy only), and a delta cycle needs the host's tracker: without it the first cycle
        // would make the vm critical. The flag comes with the fresh heartbeat checked above.
        if connected
            && let Some(p) = &v.policy
            && p.frequency_seconds >= 1
            && !self.host_tracks_changes(&v.host)
        {
            problems.push(format!(
                "host {} has no change tracking, so the vm cannot run delta cycles every {} s: add a [tracker] section to the host's agent.toml and restart the agent, then protect the vm again",
                v.host, p.frequency_seconds
            ));
        }
        if v.disks.is_empty() {
            problems.push("the vm has no disks".to_string());
        }
        for d in &v.disks {
            if !d.error.is_empty() {
                problems.push(format!(
                    "disk {} cannot be read on host {}: {}; fix the disk or its path in the host's agent.toml, then protect the vm again",
                    d.path, v.host, d.error
                ));
            } else if !SUPPORTED_FORMATS.contains(&d.format.as_str()) {
                problems.push(format!(
                    "disk {} has unsupported format {:?}",
                    d.path, d.format
                ));
            }
        }
        match &v.policy {
            Some(p) if p.frequency_seconds >= 1 => {}
            _ => problems.push("replication policy is missing or invalid".to_string()),
        }
        Ok(if problems.is_empty() {
            Outcome::Done
        } else {
            Outcome::Failed(problems.join("; "))
        })
    }

    async fn create_relationship(&self, vm: &str) -> Result<Outcome, RegistryError> {
        self.advance(vm, Transition::InitialReplicationStarted)
            .await?;
        Ok(Outcome::Done)
    }

    async fn initial_replication(
        self: &Arc<Self>,
        vm: &str,
        job: &Job,
    ) -> Result<Outcome, RegistryError> {
        let host = {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(vm)
                .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?;
            if !v.last_point_id.is_empty() {
                return Ok(Outcome::Done);
            }
            v.host.clone()
        };
        self.dispatch(&host, vm, &job.id, WorkKind::InitialReplication)
            .await?;
        let mut dispatched = tokio::time::Instant::now();
        loop {
            if dispatched.elapsed() >= REDISPATCH_EVERY {
                dispatched = tokio::time::Instant::now();
                self.redispatch(&host, vm, &job.id, WorkKind::InitialReplication)
                    .await;
            }
            let notified = self.changed.notified();
            {
                let st = self.state.lock().await;
                match st.jobs.get(&job.id) {
                    // Disabling protection ended the job.
                    Some(j) if j.status != StepStatus::Running as i32 => {
                        return Err(RegistryError::Internal(format!(
                            "job {} was cancelled",
                            job.id
                        )));
                    }
                    Some(j) if j.cancel_requested => return Ok(Outcome::Cancelled),
                    _ => {}
                }
                if let Some(v) = st.vms.get(vm) {
                    if !v.last_point_id.is_empty() {
                        return Ok(Outcome::Done);
                    }
                    if v.health == Health::Critical && !v.last_error.is_empty() {
                        return Ok(Outcome::Failed(v.last_error.clone()));
                    }
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = self.shutdown.cancelled() => return Err(RegistryError::Internal("registry shutting down".into())),
            }
        }
    }

    pub(crate) async fn vm_host(&self, vm: &str) -> Result<String, RegistryError> {
        let st = self.state.lock().await;
        st.vms
            .get(vm)
            .map(|v| v.host.clone())
            .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))
    }

    /// Queues a job's work with the scheduler, retrying while it is unreachable.
    pub(crate) async fn dispatch(
        &self,
        host: &str,
        vm: &str,
        job_id: &str,
        kind: WorkKind,
    ) -> Result<(), RegistryError> {
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        ferry_mesh::retry(
            "dispatching job work to the scheduler",
            backoff,
            None,
            &self.shutdown,
            ferry_mesh::transient_error,
            || self.try_dispatch(host, vm, job_id, kind),
        )
        .await
        .map_err(|e| match e {
            GaveUp::Cancelled => RegistryError::Internal("registry shutting down".into()),
            GaveUp::Failed(e) => RegistryError::Internal(format!("dispatching {vm}'s work: {e:#}")),
        })
    }

    /// Queues the work again, once; a failure waits for the next round.
    pub(crate) async fn redispatch(&self, host: &str, vm: &str, job_id: &str, kind: WorkKind) {
        if let Err(e) = self.try_dispatch(host, vm, job_id, kind).await {
            tracing::debug!(vm, job = job_id, error = %e, "re-dispatch failed; next round");
        }
    }

    async fn try_dispatch(
        &self,
        host: &str,
        vm: &str,
        job_id: &str,
        kind: WorkKind,
    ) -> anyhow::Result<()> {
        let ch = self.peers.channel(Component::Scheduler)?;
        SchedulerClient::new(ch)
            .dispatch(DispatchRequest {
                host_name: host.to_string(),
                kind: kind as i32,
                vm: vm.to_string(),
                job_id: job_id.to_string(),
                failover: None,
            })
            .await?;
        Ok(())
    }

    async fn finalize(&self, vm: &str) -> Result<Outcome, RegistryError> {
        self.advance(vm, Transition::ProtectionFinalized).await?;
        // Delta cycles start at once; the scheduler also finds the VM on its next sync.
        if let Err(e) = self.reschedule(vm).await {
            tracing::debug!(vm, error = %e, "scheduler not told of the new protected vm; it will sync");
        }
        Ok(Outcome::Done)
    }

    async fn reschedule(&self, vm: &str) -> anyhow::Result<()> {
        let ch = self.peers.channel(Component::Scheduler)?;
        SchedulerClient::new(ch)
            .reschedule(ferry_proto::scheduler::v1::RescheduleRequest { vm: vm.to_string() })
            .await?;
        Ok(())
    }
}

impl RegistryService {
    /// Starts a checksum resync of `vm` now, or returns the one already running.
    pub(crate) async fn start_resync(self: &Arc<Self>, vm: &str) -> Result<Job, RegistryError> {
        let job = new_job(KIND_RESYNC, vm, &["resync"]);
        let resyncing = {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(vm)
                .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?;
            if let Some(running) = st.jobs.values().find(|j| {
                j.kind == KIND_RESYNC && j.target == vm && j.status == StepStatus::Running as i32
            }) {
                return Ok(running.clone());
            }
            // Failed-over VMs are in states that do not allow it: they replicate again
            // after reprotect.
            let resyncing = vm_event(v, &Transition::ResyncStarted)?;
            if st.hosts.get(&v.host).is_none_or(|h| h.removed) {
                return Err(RegistryError::FailedPrecondition(format!(
                    "host {} of vm {vm} is not registered; register it again first",
                    v.host
                )));
            }
            resyncing
        };
        self.persist(vec![
            Event::Job(JobRecord::encode(&job)),
            resyncing,
            Event::VmRetry {
                vm: vm.to_string(),
                attempts: 0,
                next_retry_ms: 0,
            },
        ])
        .await?;
        tracing::info!(vm, job = %job.id, "resync started");
        self.spawn_job(job.id.clone());
        Ok(job)
    }

    /// The resync job: the agent compares the disks with the latest point's block hashes and
    /// ships what differs; ingest's `ReportCommitted` for this job ends it (and makes the VM
    /// protected again). A non-recoverable failure fails it and leaves the VM critical.
    async fn run_resync(self: &Arc<Self>, id: &str) -> Result<(), RegistryError> {
        let mut job = self.job(id).await?;
        let vm = job.target.clone();
        let host = self.vm_host(&vm).await?;
        self.set_step(&mut job, 0, StepStatus::Running, "").await?;
        self.dispatch(&host, &vm, id, WorkKind::Resync).await?;
        let mut dispatched = tokio::time::Instant::now();
        loop {
            if dispatched.elapsed() >= REDISPATCH_EVERY {
                dispatched = tokio::time::Instant::now();
                self.redispatch(&host, &vm, id, WorkKind::Resync).await;
            }
            let notified = self.changed.notified();
            let failed = {
                let st = self.state.lock().await;
                match st.jobs.get(id) {
                    Some(j) if j.status != StepStatus::Running as i32 => return Ok(()),
                    Some(j) if j.cancel_requested => {
                        let mut job = j.clone();
                        drop(st);
                        let cancelled = Transition::ResyncCancelled;
                        return self.end_cancelled(&mut job, &host, cancelled).await;
                    }
                    _ => {}
                }
                st.vms
                    .get(&vm)
                    .filter(|v| v.health == Health::Critical && !v.last_error.is_empty())
                    .map(|v| v.last_error.clone())
            };
            if let Some(err) = failed {
                tracing::warn!(vm = %vm, job = %id, error = %err, "resync failed");
                self.set_step(&mut job, 0, StepStatus::Failed, &err).await?;
                job.status = StepStatus::Failed as i32;
                job.error = err;
                self.save_job(&job).await?;
                return Ok(());
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = self.shutdown.cancelled() => return Err(RegistryError::Internal("registry shutting down".into())),
            }
        }
    }

    /// Clears a VM's critical health after the operator fixed the cause. A VM that needs a
    /// resync gets it now; otherwise replication resumes with the next cycle.
    pub(crate) async fn repair(self: &Arc<Self>, vm: &str) -> Result<(), RegistryError> {
        let (state, needs_resync) = {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(vm)
                .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?;
            match st.hosts.get(&v.host) {
                Some(h) if !h.removed => {}
                _ => {
                    return Err(RegistryError::FailedPrecondition(format!(
                        "host {} of vm {vm} is not registered; register it again with a new registration key, then repair",
                        v.host
                    )));
                }
            }
            v.check(Operation::Repair)?;
            let needs_resync = v.state == VmState::ResyncPending
                || (v.state == VmState::Resyncing
                    && !st.jobs.values().any(|j| {
                        j.kind == KIND_RESYNC
                            && j.target == vm
                            && j.status == StepStatus::Running as i32
                    }));
            (v.state, needs_resync)
        };
        tracing::info!(vm, state = %state, needs_resync, "vm repaired by an operator");
        if needs_resync {
            self.start_resync(vm).await?;
            return Ok(());
        }
        let repaired = transition_event(&*self.state.lock().await, vm, &Transition::Repaired)?;
        self.persist(vec![
            repaired,
            Event::VmRetry {
                vm: vm.to_string(),
                attempts: 0,
                next_retry_ms: 0,
            },
        ])
        .await?;
        if let Err(e) = self.reschedule(vm).await {
            tracing::debug!(vm, error = %e, "scheduler not told of the repaired vm; it will sync");
        }
        Ok(())
    }
}

/// Both ends of the policy's resync window are times of day.
pub(crate) fn check_resync_window(policy: &PolicyRecord) -> Result<(), RegistryError> {
    for t in [&policy.resync_window_start, &policy.resync_window_end] {
        if chrono::NaiveTime::parse_from_str(t, "%H:%M").is_err() {
            return Err(RegistryError::InvalidArgument(format!(
                "resync window time {t:?} is not a time of day (HH:MM)"
            )));
        }
    }
    Ok(())
}
