//! Running a recovery plan: one plan job (`plan-test`, `plan-planned`, `plan-unplanned`,
//! `plan-cleanup`, `plan-failback`) whose steps are every group's before-actions, VMs and
//! after-actions, in order. The VMs of a group run in parallel, each as its own VM job (the
//! same orchestrator calls `ferry failover …` makes, so every check and crash path of those
//! holds); the next group starts only when every VM of this one has failed over and started.
//! A failure stops test and planned failovers (and cleanup, failback) at that group; an
//! unplanned failover carries on and reports every failure at the end.
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use ferry_model::Operation;
use ferry_model::VmState;
use ferry_model::plan::{Action, ActionKind, Plan, PlanMode};
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::failover::v1::{
    CleanupTestFailoverRequest, CompleteFailbackRequest, FailbackRequest, PlannedFailoverRequest,
    RunRecoveryPlanRequest, TestFailoverRequest, UnplannedFailoverRequest,
};
use ferry_proto::registry::v1::{CancelJobRequest, ListJobsRequest};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;

use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::{JOB_LEASE_TTL, Orchestrator, job_resource};

/// What one step of a plan job does.
#[derive(Clone, Debug)]
pub(super) enum Work {
    Action {
        group: usize,
        phase: &'static str,
        action: Action,
    },
    Vm {
        group: usize,
        vm: String,
    },
}

impl Work {
    fn group(&self) -> usize {
        match self {
            Work::Action { group, .. } | Work::Vm { group, .. } => *group,
        }
    }
}

/// A plan run as asked: the mode and its options.
#[derive(Clone, Debug)]
pub(super) struct PlanRun {
    pub plan: Plan,
    pub mode: PlanMode,
    pub point: String,
    pub sync: String,
    /// `--point latest-common`: each VM's point of the chosen group cut.
    pub points: BTreeMap<String, String>,
    /// Every VM recovers instantly.
    pub instant: bool,
}

impl PlanRun {
    /// What the job records of the run, for a replica that resumes it.
    pub(super) fn params(&self) -> Vec<(String, String)> {
        vec![
            ("mode".into(), self.mode.as_str().to_owned()),
            ("point".into(), self.point.clone()),
            ("sync".into(), self.sync.clone()),
            ("instant".into(), self.instant.to_string()),
            (
                "points".into(),
                serde_json::to_string(&self.points).unwrap_or_default(),
            ),
        ]
    }

    /// The run a plan job recorded (see [`PlanRun::params`]), of `plan` as it is now.
    pub(super) fn from_params(
        plan: Plan,
        params: &std::collections::HashMap<String, String>,
    ) -> Result<Self> {
        let get = |k: &str| params.get(k).cloned().unwrap_or_default();
        let mode = get("mode").parse().map_err(|e: ferry_model::UnknownName| {
            FailoverError::FailedPrecondition(format!("the job records no run to resume: {e}"))
        })?;
        let points = match params.get("points") {
            Some(p) if !p.is_empty() => serde_json::from_str(p).map_err(|e| {
                FailoverError::FailedPrecondition(format!("the job's points are unreadable: {e}"))
            })?,
            _ => BTreeMap::new(),
        };
        Ok(Self {
            plan,
            mode,
            point: get("point"),
            sync: get("sync"),
            points,
            instant: get("instant") == "true",
        })
    }

    /// The point asked for `vm`.
    fn point_of(&self, vm: &str) -> &str {
        self.points.get(vm).map_or(&self.point, String::as_str)
    }
}

/// How one VM's step ended.
enum VmOutcome {
    Done(String),
    Skipped(String),
    Failed(String),
}

/// The steps of `plan` run in `mode`, named as the job shows them.
pub(super) fn plan_steps(plan: &Plan, mode: PlanMode) -> Vec<(String, Work)> {
    let verb = match mode {
        PlanMode::Test => "test failover",
        PlanMode::Planned => "planned failover",
        PlanMode::Unplanned => "unplanned failover",
        PlanMode::Cleanup => "cleanup",
        PlanMode::Failback => "failback",
    };
    let mut steps = Vec::new();
    for (i, g) in plan.groups.iter().enumerate() {
        let n = i + 1;
        let actions = |phase: &'static str, list: &[Action]| {
            list.iter()
                .map(|a| {
                    let name = format!("group {n} {phase}: {}", a.label());
                    let work = Work::Action {
                        group: i,
                        phase,
                        action: a.clone(),
                    };
                    (name, work)
                })
                .collect::<Vec<_>>()
        };
        if mode.runs_actions() {
            steps.extend(actions("before", &g.before));
        }
        for vm in &g.vms {
            let work = Work::Vm {
                group: i,
                vm: vm.clone(),
            };
            steps.push((format!("group {n}: {verb} {vm}"), work));
        }
        if mode.runs_actions() {
            steps.extend(actions("after", &g.after));
        }
    }
    steps
}

impl Orchestrator {
    /// Checks the request, creates the plan job and runs it in the background; returns the
    /// job as it starts.
    pub async fn run_plan(&self, req: RunRecoveryPlanRequest) -> Result<Job> {
        let run = self.check_plan_run(&req).await?;
        if let Some(job) = self.running_plan_job(&run.plan.name).await? {
            return Err(FailoverError::FailedPrecondition(format!(
                "plan {} already has job {job} running",
                run.plan.name
            )));
        }
        let steps = plan_steps(&run.plan, run.mode);
        let names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
        // Cancellable until it ends: a cancel stops the plan at once — a waiting manual action,
        // the VM jobs in flight (each as far as its own point of no return allows) and every
        // step not started.
        let mut job = JobTracker::start_cancellable(
            self.registry.clone(),
            &run.mode.job_kind(),
            &run.plan.name,
            &names,
            names.len() as u32,
        )
        .await?;
        job.set_params(run.params()).await;
        let lease = self
            .coord
            .acquire_kept(&job_resource(job.id()), &self.holder(), JOB_LEASE_TTL)
            .await
            .map_err(FailoverError::Lease)?;
        let running = self.mark_running(job.id());
        let started = job.snapshot();
        let me = self.clone();
        tokio::spawn(async move {
            let job = me.drive_plan(job, run, steps, 0, Vec::new()).await;
            tracing::info!(job = %job.id, plan = %job.target, status = job.status, "plan job ended");
            drop(lease);
            drop(running);
        });
        Ok(started)
    }

    async fn check_plan_run(&self, req: &RunRecoveryPlanRequest) -> Result<PlanRun> {
        let bad = |m: String| FailoverError::InvalidArgument(m);
        let mode: PlanMode = req
            .mode
            .parse()
            .map_err(|e: ferry_model::UnknownName| bad(e.to_string()))?;
        let plan = self.get_plan(&req.plan).await?;
        if !req.point.is_empty() && !matches!(mode, PlanMode::Test | PlanMode::Unplanned) {
            return Err(bad(format!(
                "a point is chosen for test and unplanned failovers, not for {mode}"
            )));
        }
        let points = if req.point == "latest-common" {
            self.latest_common_points(&plan).await?
        } else {
            BTreeMap::new()
        };
        let sync = match (mode, req.sync.as_str()) {
            (PlanMode::Failback, "" | "checksum") => "checksum",
            (PlanMode::Failback, "full") => "full",
            (PlanMode::Failback, other) => {
                return Err(bad(format!("sync {other:?}: expected checksum or full")));
            }
            (_, "") => "",
            (_, _) => return Err(bad(format!("a sync mode is for failback, not for {mode}"))),
        };
        if req.instant
            && !matches!(
                mode,
                PlanMode::Test | PlanMode::Planned | PlanMode::Unplanned
            )
        {
            return Err(bad(format!(
                "--instant is for test, planned and unplanned failovers, not for {mode}"
            )));
        }
        if req.no_wait && mode == PlanMode::Unplanned && plan.has_action(ActionKind::Manual) {
            return Err(bad(format!(
                "plan {} has a manual action: an unplanned failover nobody follows (--no-wait) would wait for input nobody gives; run it waiting, or without the manual action",
                plan.name
            )));
        }
        Ok(PlanRun {
            plan,
            mode,
            point: req.point.clone(),
            sync: sync.to_owned(),
            points,
            instant: req.instant,
        })
    }

    /// Runs the steps in order from `from` (a group's VMs at once; `failures`: those of the
    /// steps before it) and ends the job. A stopping service leaves the job running, its
    /// lease free: another replica (or this one, started again) resumes it.
    pub(super) async fn drive_plan(
        &self,
        mut job: JobTracker,
        run: PlanRun,
        steps: Vec<(String, Work)>,
        from: usize,
        mut failures: Vec<String>,
    ) -> Job {
        let targets = match self.plan_targets(&run.plan).await {
            Ok(t) => t,
            Err(e) => return job.fail(&e).await,
        };
        let mut i = from;
        while i < steps.len() {
            if self.shutdown.is_cancelled() {
                tracing::info!(job = %job.id(), step = i, "service stopping: the plan job is left to resume");
                return job.snapshot();
            }
            // Cancelled (checked again after each step): nothing more starts; what already
            // failed over stays, for the plan's cleanup or failback.
            if job.cancel_token().is_cancelled() {
                return job.fail(&FailoverError::JobCancelled).await;
            }
            let group = steps[i].1.group();
            let failed_before = failures.len();
            match &steps[i].1 {
                Work::Action { phase, action, .. } => {
                    let res = self
                        .run_action(&mut job, i, &run, &targets, group, phase, action)
                        .await;
                    match res {
                        Ok(msg) => job.step_done(i, msg).await,
                        // Cut off by the service stopping: the step runs again on resume.
                        Err(_) if self.shutdown.is_cancelled() => return job.snapshot(),
                        Err(FailoverError::JobCancelled) => {
                            let why = "cancelled by an operator while it waited".to_owned();
                            job.step_ended(i, StepStatus::Cancelled, why).await;
                            return job.fail(&FailoverError::JobCancelled).await;
                        }
                        Err(e) => {
                            job.step_ended(i, StepStatus::Failed, e.to_string()).await;
                            failures.push(format!("{}: {e}", steps[i].0));
                        }
                    }
                    i += 1;
                }
                Work::Vm { .. } => {
                    let end = (i..steps.len())
                        .find(|&k| !matches!(&steps[k].1, Work::Vm { group: g, .. } if *g == group))
                        .unwrap_or(steps.len());
                    failures.extend(self.run_vms(&mut job, &run, &steps, i..end).await);
                    i = end;
                }
            }
            if job.cancel_token().is_cancelled() {
                return job.fail(&FailoverError::JobCancelled).await;
            }
            if failures.len() > failed_before && run.mode.stops_at_failure() {
                break;
            }
        }
        if failures.is_empty() {
            return job.succeed().await;
        }
        let summary = format!("{} step(s) failed: {}", failures.len(), failures.join("; "));
        job.fail(&FailoverError::FailedPrecondition(summary)).await
    }

    /// The VMs of `range` (one group) at once; the failures, named by step.
    async fn run_vms(
        &self,
        job: &mut JobTracker,
        run: &PlanRun,
        steps: &[(String, Work)],
        range: std::ops::Range<usize>,
    ) -> Vec<String> {
        let mut pending = FuturesUnordered::new();
        let mut vms = Vec::new();
        for k in range {
            let Work::Vm { vm, .. } = &steps[k].1 else {
                continue;
            };
            job.step_running(k).await;
            vms.push(vm.clone());
            let vm = vm.clone();
            pending.push(async move { (k, self.run_vm(run, &vm).await) });
        }
        let cancel = job.cancel_token().clone();
        let since = job.snapshot().created_at_ms;
        // Once cancelled, asked again until the group ends: a VM whose own job did not exist
        // yet when the cancel came (it was still being checked or started) is reached too.
        let mut asked = HashSet::new();
        let mut repeat = tokio::time::interval(CANCEL_REPEAT);
        repeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = Vec::new();
        loop {
            let next = tokio::select! {
                n = pending.next() => n,
                () = async {
                    cancel.cancelled().await;
                    repeat.tick().await;
                } => {
                    self.cancel_vm_jobs(&vms, since, &mut asked).await;
                    continue;
                }
            };
            let Some((k, outcome)) = next else { break };
            match outcome {
                VmOutcome::Done(m) => job.step_done(k, m).await,
                VmOutcome::Skipped(m) => job.step_ended(k, StepStatus::Skipped, m).await,
                // Cut off by the service stopping: left running, it runs again on resume.
                VmOutcome::Failed(_) if self.shutdown.is_cancelled() => {}
                VmOutcome::Failed(m) => {
                    failures.push(format!("{}: {m}", steps[k].0));
                    job.step_ended(k, StepStatus::Failed, m).await;
                }
            }
        }
        failures
    }

    /// Asks the registry to cancel the jobs of `vms` started since `since_ms` (by this plan
    /// run) that have not ended and are not in `asked` yet; a job past its point of no return
    /// goes on (it says so).
    async fn cancel_vm_jobs(&self, vms: &[String], since_ms: i64, asked: &mut HashSet<String>) {
        let mut registry = self.registry.clone();
        for vm in vms {
            let jobs = match registry
                .list_jobs(ListJobsRequest { target: vm.clone() })
                .await
            {
                Ok(r) => r.into_inner().jobs,
                Err(s) => {
                    tracing::warn!(vm = %vm, error = %s.message(), "cannot list the vm's jobs to cancel them");
                    continue;
                }
            };
            for j in jobs.iter().filter(|j| {
                j.created_at_ms >= since_ms
                    && ferry_model::job::is_in_progress(j.status)
                    && asked.insert(j.id.clone())
            }) {
                match registry
                    .cancel_job(CancelJobRequest { id: j.id.clone() })
                    .await
                {
                    Ok(_) => {
                        tracing::info!(vm = %vm, job = %j.id, "vm job of a cancelled plan cancelled")
                    }
                    Err(s) => {
                        tracing::info!(vm = %vm, job = %j.id, why = %s.message(), "vm job of a cancelled plan goes on")
                    }
                }
            }
        }
    }

    /// One VM's operation of the plan, as its own VM job.
    async fn run_vm(&self, run: &PlanRun, vm: &str) -> VmOutcome {
        match self.vm_skip_reason(run.mode, vm).await {
            Ok(Some(why)) => return VmOutcome::Skipped(why),
            Ok(None) => {}
            Err(e) => return VmOutcome::Failed(e.to_string()),
        }
        let res = match run.mode {
            PlanMode::Test => self.plan_test(vm, run.point_of(vm), run.instant).await,
            PlanMode::Planned => self.plan_planned(vm, run.instant).await,
            PlanMode::Unplanned => self.plan_unplanned(vm, run.point_of(vm), run.instant).await,
            PlanMode::Cleanup => self
                .cleanup_test_failover(CleanupTestFailoverRequest { vm: vm.to_owned() })
                .await
                .map(|j| vec![j]),
            PlanMode::Failback => self.plan_failback(vm, &run.sync).await,
        };
        let jobs = match res {
            Ok(jobs) => jobs,
            Err(e) => return VmOutcome::Failed(e.to_string()),
        };
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        match jobs
            .iter()
            .find(|j| j.status != StepStatus::Succeeded as i32)
        {
            None => VmOutcome::Done(format!("job {} succeeded", ids.join(", "))),
            Some(j) => VmOutcome::Failed(format!("job {} failed: {}", j.id, j.error)),
        }
    }

    /// Why the VM's step is skipped (it is already where this run would bring it, e.g.
    /// failed over by another plan), or `None` when it runs.
    async fn vm_skip_reason(&self, mode: PlanMode, vm: &str) -> Result<Option<String>> {
        let v = self.get_vm(vm).await?;
        let state = VmState::try_from(v.state).ok();
        let test_copy = self.ledger.active(vm).await?.filter(|r| r.kind == "test");
        let why = match mode {
            PlanMode::Planned | PlanMode::Unplanned
                if matches!(
                    state,
                    Some(VmState::FailedOver | VmState::FailoverCommitted)
                ) =>
            {
                let by = self.ledger.current(vm).await?.map(|r| r.job_id);
                Some(format!(
                    "vm {vm} has already failed over ({}{}); skipped",
                    VmState::wire_name(v.state),
                    by.map(|j| format!(", job {j}")).unwrap_or_default()
                ))
            }
            PlanMode::Test => test_copy.map(|r| {
                format!(
                    "vm {vm} already has a test copy (job {}); skipped",
                    r.job_id
                )
            }),
            PlanMode::Cleanup if test_copy.is_none() => {
                Some(format!("vm {vm} has no test copy to clean up; skipped"))
            }
            _ => None,
        };
        Ok(why)
    }

    async fn plan_test(&self, vm: &str, point: &str, instant: bool) -> Result<Vec<Job>> {
        self.require_allowed(vm, Operation::TestFailover).await?;
        let req = TestFailoverRequest {
            vm: vm.to_owned(),
            point: point.to_owned(),
            target_dir: String::new(),
            instant,
        };
        Ok(vec![self.test_failover(req).await?])
    }

    async fn plan_planned(&self, vm: &str, instant: bool) -> Result<Vec<Job>> {
        self.require_allowed(vm, Operation::PlannedFailover).await?;
        let req = PlannedFailoverRequest {
            vm: vm.to_owned(),
            target_dir: String::new(),
            instant,
        };
        Ok(vec![self.planned_failover(req).await?])
    }

    async fn plan_unplanned(&self, vm: &str, point: &str, instant: bool) -> Result<Vec<Job>> {
        self.require_allowed(vm, Operation::UnplannedFailover)
            .await?;
        let req = UnplannedFailoverRequest {
            vm: vm.to_owned(),
            point: point.to_owned(),
            instant,
            ..Default::default()
        };
        Ok(vec![self.unplanned_failover(req).await?])
    }

    /// Both phases: a plan's group is back only when its VMs run at home.
    async fn plan_failback(&self, vm: &str, sync: &str) -> Result<Vec<Job>> {
        self.require_allowed(vm, Operation::Failback).await?;
        let req = FailbackRequest {
            vm: vm.to_owned(),
            mode: sync.to_owned(),
            ..Default::default()
        };
        let phase1 = self.failback(req).await?;
        if phase1.status != StepStatus::Succeeded as i32 {
            return Ok(vec![phase1]);
        }
        let phase2 = self
            .complete_failback(CompleteFailbackRequest { vm: vm.to_owned() })
            .await?;
        Ok(vec![phase1, phase2])
    }
}

/// How often a cancelled plan looks again for VM jobs of its running group to cancel.
const CANCEL_REPEAT: Duration = Duration::from_millis(250);

/// How often a plan job waiting for input asks the registry whether it was resumed.
pub(super) const INPUT_POLL: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::plan::Group;

    #[test]
    fn steps_run_each_groups_actions_around_its_vms_in_order() {
        let action = |kind, command: &str| Action {
            name: String::new(),
            kind,
            command: command.into(),
        };
        let plan = Plan {
            name: "app".into(),
            groups: vec![
                Group {
                    vms: vec!["db1".into(), "db2".into()],
                    before: vec![],
                    after: vec![action(ActionKind::Manual, "check")],
                },
                Group {
                    vms: vec!["web1".into()],
                    before: vec![action(ActionKind::Script, "./up.sh")],
                    after: vec![],
                },
            ],
            created_at_ms: 0,
            consistent: false,
        };
        let names: Vec<String> = plan_steps(&plan, PlanMode::Planned)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "group 1: planned failover db1",
                "group 1: planned failover db2",
                "group 1 after: manual \"check\"",
                "group 2 before: script \"./up.sh\"",
                "group 2: planned failover web1",
            ]
        );
        // A cleanup removes the test copies only: no action runs.
        let cleanup: Vec<String> = plan_steps(&plan, PlanMode::Cleanup)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            cleanup,
            [
                "group 1: cleanup db1",
                "group 1: cleanup db2",
                "group 2: cleanup web1"
            ]
        );
    }
}
