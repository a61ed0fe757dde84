//! A plan group's actions. A script runs on the host where the group's VMs come up (each
//! VM's recovery host as the plan starts: the recovery site for a failover, home for a
//! failback), once per host with that host's VMs, as `RUN_SCRIPT` host work; a manual action
//! puts the step and the job in `waiting-for-input` until an operator resumes it.
use std::collections::BTreeMap;
use std::time::Duration;

use ferry_model::plan::{Action, ActionKind, SCRIPT_TIMEOUT_SECS};
use ferry_proto::registry::v1::GetJobRequest;
use ferry_proto::scheduler::v1::{FailoverWork, PlanScript, WorkKind};

use super::run::{INPUT_POLL, PlanRun};
use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;

/// How long past the script's own timeout a job waits for its host's answer (a host that
/// never takes the work fails the step instead of holding the plan forever).
const HOST_GRACE: Duration = Duration::from_secs(120);

/// Per VM of the plan, the host its scripts run on.
pub(super) type Targets = BTreeMap<String, String>;

impl Orchestrator {
    /// Where each VM of the plan comes up: its recovery host, read once as the plan starts
    /// (a failover moves it).
    pub(super) async fn plan_targets(&self, plan: &ferry_model::plan::Plan) -> Result<Targets> {
        let mut targets = Targets::new();
        for vm in plan.vms() {
            let v = self.get_vm(vm).await?;
            targets.insert(vm.to_owned(), v.recovery_host);
        }
        Ok(targets)
    }

    /// Runs step `step`, an action of group `group`; the step's message when it succeeded.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_action(
        &self,
        job: &mut JobTracker,
        step: usize,
        run: &PlanRun,
        targets: &Targets,
        group: usize,
        phase: &'static str,
        action: &Action,
    ) -> Result<String> {
        match action.kind {
            ActionKind::Manual => self.wait_for_input(job, step, action).await,
            ActionKind::Script => {
                job.step_running(step).await;
                let vms = &run.plan.groups[group].vms;
                let mut by_host: BTreeMap<&str, Vec<String>> = BTreeMap::new();
                for vm in vms {
                    let host = targets.get(vm).map(String::as_str).unwrap_or_default();
                    if host.is_empty() {
                        return Err(FailoverError::FailedPrecondition(format!(
                            "vm {vm} has no recovery host to run the script on"
                        )));
                    }
                    by_host.entry(host).or_default().push(vm.clone());
                }
                let mut said = Vec::new();
                for (n, (host, vms)) in by_host.into_iter().enumerate() {
                    let script = PlanScript {
                        command: action.command.clone(),
                        plan: run.plan.name.clone(),
                        group: group as u32 + 1,
                        vms,
                        mode: run.mode.as_str().to_owned(),
                        phase: phase.to_owned(),
                    };
                    let out = self.script_on(host, job.id(), step, n, script).await?;
                    said.push(match out.is_empty() {
                        true => format!("{host}: ok"),
                        false => format!("{host}: {out}"),
                    });
                }
                Ok(said.join("; "))
            }
        }
    }

    async fn script_on(
        &self,
        host: &str,
        job_id: &str,
        step: usize,
        n: usize,
        script: PlanScript,
    ) -> Result<String> {
        let plan = script.plan.clone();
        let work = FailoverWork {
            script: Some(script),
            ..Default::default()
        };
        // One work item per step and host: a re-dispatch finds it.
        let id = format!("{job_id}-s{step}-{n}");
        let timeout = Duration::from_secs(SCRIPT_TIMEOUT_SECS) + HOST_GRACE;
        let done = self
            .dispatch_and_wait(host, WorkKind::RunScript, &plan, &id, work, Some(timeout))
            .await?;
        Ok(done.script_output)
    }

    /// Waits until an operator resumes the job at `step` (`ferry jobs resume`); the step's
    /// message then says who said what.
    async fn wait_for_input(
        &self,
        job: &mut JobTracker,
        step: usize,
        action: &Action,
    ) -> Result<String> {
        let id = job.id().to_owned();
        job.step_waiting(
            step,
            format!(
                "waiting for input: {} (then: ferry jobs resume {id} [--comment TEXT])",
                action.command
            ),
        )
        .await;
        tracing::info!(job = %id, step, "plan job waiting for input");
        let mut registry = job.registry();
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Err(FailoverError::Cancelled),
                () = job.cancel_token().cancelled() => return Err(FailoverError::JobCancelled),
                () = tokio::time::sleep(INPUT_POLL) => {}
            }
            let stored = match registry.get_job(GetJobRequest { id: id.clone() }).await {
                Ok(j) => j.into_inner(),
                Err(s) => {
                    tracing::warn!(job = %id, error = %s.message(), "cannot read the waiting job");
                    continue;
                }
            };
            if stored.cancel_requested {
                return Err(FailoverError::JobCancelled);
            }
            if stored.resumed_step as usize == step + 1 {
                job.input_received(stored.resumed_step, &stored.resume_comment);
                tracing::info!(job = %id, step, "plan job resumed");
                return Ok(match stored.resume_comment.is_empty() {
                    true => "resumed by an operator".to_owned(),
                    false => format!("resumed by an operator: {}", stored.resume_comment),
                });
            }
        }
    }
}
