//! A recovery plan's script action (`RUN_SCRIPT` work): `sh -c COMMAND` in the agent's config
//! folder, told the plan, group, VMs, mode and phase in its environment, killed (with what it
//! started) after [`SCRIPT_TIMEOUT_SECS`] or when the job is cancelled. It fails on a non-zero
//! exit and on any output on stderr (an operator's check that complains has failed, whatever
//! its exit status).
use std::path::Path;
use std::time::Duration;

use ferry_model::plan::SCRIPT_TIMEOUT_SECS;
use ferry_proto::scheduler::v1::PlanScript;
use tokio_util::sync::CancellationToken;

use super::DriverError;
use super::process::{self, tail};

/// Runs the script; what it wrote on stdout (its end) when it succeeded.
pub async fn run_plan_script(
    cwd: &Path,
    script: &PlanScript,
    cancel: &CancellationToken,
) -> Result<String, DriverError> {
    run_with_timeout(
        cwd,
        script,
        Duration::from_secs(SCRIPT_TIMEOUT_SECS),
        cancel,
    )
    .await
}

async fn run_with_timeout(
    cwd: &Path,
    script: &PlanScript,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<String, DriverError> {
    // Errors read "vm <label>: <action>: …".
    let (label, action) = match script.plan.is_empty() {
        true => (script.vms.join(","), "boot check"),
        false => (
            format!("plan {} group {}", script.plan, script.group),
            "plan script",
        ),
    };
    if script.command.trim().is_empty() {
        return Err(DriverError::BadRun {
            vm: label,
            message: "the script action has no command".into(),
        });
    }
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(&script.command)
        .current_dir(cwd)
        .env("FERRY_PLAN", &script.plan)
        .env("FERRY_GROUP", script.group.to_string())
        .env("FERRY_VMS", script.vms.join(","))
        .env("FERRY_MODE", &script.mode)
        .env("FERRY_PHASE", &script.phase);
    let job = process::Job {
        vm: &label,
        action,
        command: script.command.clone(),
        deadline: tokio::time::Instant::now() + timeout,
        timeout,
        cancel,
    };
    tracing::info!(plan = %script.plan, group = script.group, phase = %script.phase, action, "running a script on this host");
    let out = job.check(job.run_piped(c).await?)?;
    if !out.stderr.trim().is_empty() {
        return Err(DriverError::Failed {
            vm: label,
            action,
            command: script.command.clone(),
            status: format!("{}, with output on stderr", out.status),
            output: out.stderr,
        });
    }
    Ok(tail(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(command: &str) -> PlanScript {
        PlanScript {
            command: command.into(),
            plan: "app".into(),
            group: 2,
            vms: vec!["db1".into(), "db2".into()],
            mode: "planned".into(),
            phase: "before".into(),
        }
    }

    #[tokio::test]
    async fn a_script_sees_its_plan_and_fails_on_exit_status_or_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let never = CancellationToken::new();
        let out = run_plan_script(
            dir.path(),
            &script("echo $FERRY_PLAN $FERRY_GROUP $FERRY_VMS $FERRY_MODE $FERRY_PHASE; pwd"),
            &never,
        )
        .await
        .unwrap();
        let cwd = std::fs::canonicalize(dir.path()).unwrap();
        assert!(out.starts_with("app 2 db1,db2 planned before"), "{out}");
        assert!(out.contains(&cwd.display().to_string()), "{out}");

        let e = run_plan_script(dir.path(), &script("echo db down >&2; exit 3"), &never)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("exit status: 3") && e.contains("db down"), "{e}");
        let e = run_plan_script(dir.path(), &script("echo warning >&2"), &never)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("output on stderr") && e.contains("warning"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_script_past_its_timeout_or_cancelled_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let never = CancellationToken::new();
        let e = run_with_timeout(
            dir.path(),
            &script("sleep 30"),
            Duration::from_millis(200),
            &never,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("did not finish within"), "{e}");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let e = run_plan_script(dir.path(), &script("sleep 30"), &cancel)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cancelled"), "{e}");
    }
}
