//! Jobs as the lifecycle sees them: how far an operator may cancel one. The registry decides
//! with this, and the CLI and console show it, so both say the same.
use ferry_proto::common::v1::{Job, StepStatus};

/// A job's or step's status as the CLI, the console and messages spell it.
pub fn status_name(status: i32) -> &'static str {
    match StepStatus::try_from(status) {
        Ok(StepStatus::Pending) => "pending",
        Ok(StepStatus::Running) => "running",
        Ok(StepStatus::Succeeded) => "succeeded",
        Ok(StepStatus::Failed) => "failed",
        Ok(StepStatus::Cancelled) => "cancelled",
        Ok(StepStatus::Skipped) => "skipped",
        Ok(StepStatus::WaitingForInput) => "waiting-for-input",
        _ => "unknown",
    }
}

/// Whether a job with this status has not ended: running, or waiting for an operator's input.
pub fn is_in_progress(status: i32) -> bool {
    status == StepStatus::Running as i32
        || status == StepStatus::Pending as i32
        || status == StepStatus::WaitingForInput as i32
}

/// Why `job` cannot be cancelled now; `None` when it can.
pub fn cancel_refusal(job: &Job) -> Option<String> {
    let what = format!("job {} ({} of {})", job.id, job.kind, job.target);
    if !is_in_progress(job.status) {
        return Some(format!(
            "{what} is {}: there is nothing to cancel",
            status_name(job.status)
        ));
    }
    let until = job.cancellable_until_step as usize;
    if until == 0 {
        return Some(format!(
            "{what} cannot be cancelled: none of its steps can be undone"
        ));
    }
    let started = job
        .steps
        .iter()
        .enumerate()
        .skip(until)
        .find(|(_, s)| s.status != StepStatus::Pending as i32);
    started.map(|(_, s)| {
        format!(
            "{what} is past its point of no return: step {:?} has started and cannot be undone",
            s.name
        )
    })
}

/// Whether an operator may cancel `job` now.
pub fn is_cancellable(job: &Job) -> bool {
    cancel_refusal(job).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::common::v1::JobStep;

    fn job(until: u32, steps: &[StepStatus]) -> Job {
        Job {
            id: "j".into(),
            kind: "k".into(),
            target: "web".into(),
            status: StepStatus::Running as i32,
            cancellable_until_step: until,
            steps: steps
                .iter()
                .enumerate()
                .map(|(i, s)| JobStep {
                    name: format!("s{i}"),
                    status: *s as i32,
                    ..JobStep::default()
                })
                .collect(),
            ..Job::default()
        }
    }

    #[test]
    fn a_job_is_cancellable_until_its_point_of_no_return_starts() {
        use StepStatus::*;
        assert_eq!(
            cancel_refusal(&job(2, &[Succeeded, Running, Pending])),
            None
        );
        let e = cancel_refusal(&job(2, &[Succeeded, Succeeded, Running])).unwrap();
        assert!(
            e.contains("point of no return") && e.contains("\"s2\""),
            "{e}"
        );
        let e = cancel_refusal(&job(0, &[Running])).unwrap();
        assert!(e.contains("cannot be cancelled"), "{e}");
        let mut done = job(2, &[Succeeded, Succeeded, Succeeded]);
        done.status = Succeeded as i32;
        let e = cancel_refusal(&done).unwrap();
        assert!(e.contains("is succeeded"), "{e}");
    }
}
