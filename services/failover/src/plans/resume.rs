//! Where a plan job cut off mid-way picks up: the run it recorded (mode, point, sync), the
//! plan as it is now (it must still have the same steps), and the first step that had not
//! ended. Steps that ended keep their outcome; a group cut off mid-way runs its remaining
//! VMs (those already where the run brings them are skipped, as in any run).
use ferry_proto::common::v1::StepStatus;

use super::run::{PlanRun, Work, plan_steps};
use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;

/// A plan job's run, its steps, the step to resume from and the failures before it.
pub(super) type ResumePoint = (PlanRun, Vec<(String, Work)>, usize, Vec<String>);

fn ended(status: i32) -> bool {
    [
        StepStatus::Succeeded,
        StepStatus::Skipped,
        StepStatus::Failed,
        StepStatus::Cancelled,
    ]
    .iter()
    .any(|s| *s as i32 == status)
}

impl Orchestrator {
    pub(super) async fn resume_point(&self, job: &JobTracker) -> Result<ResumePoint> {
        let snap = job.snapshot();
        let plan = self.get_plan(&snap.target).await.map_err(|e| match e {
            FailoverError::NotFound(_) => FailoverError::FailedPrecondition(format!(
                "plan {} was deleted since the job started",
                snap.target
            )),
            e => e,
        })?;
        let run = PlanRun::from_params(plan, &snap.params)?;
        if run.mode.job_kind() != snap.kind {
            return Err(FailoverError::FailedPrecondition(format!(
                "job kind {} does not match the run it recorded ({})",
                snap.kind, run.mode
            )));
        }
        let steps = plan_steps(&run.plan, run.mode);
        let same = steps.len() == snap.steps.len()
            && steps
                .iter()
                .zip(&snap.steps)
                .all(|((n, _), s)| *n == s.name);
        if !same {
            return Err(FailoverError::FailedPrecondition(format!(
                "plan {} changed since the job started",
                run.plan.name
            )));
        }
        let from = snap
            .steps
            .iter()
            .position(|s| !ended(s.status))
            .unwrap_or(snap.steps.len());
        let failures = snap.steps[..from]
            .iter()
            .filter(|s| s.status == StepStatus::Failed as i32)
            .map(|s| format!("{}: {}", s.name, s.message))
            .collect();
        Ok((run, steps, from, failures))
    }
}
