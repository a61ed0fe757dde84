//! `ferry vm unprotect VM [--delete-points] [--force] [--wait]`: the disable-protection job.
use std::process::ExitCode;
use std::time::Duration;

use ferry::ctl::{Ctl, status_err};
use ferry_proto::registry::v1 as reg;

use crate::OutputFormat;
use crate::commands::{job_exit, print_job, wait_job};

pub(crate) async fn run(
    c: &Ctl,
    req: reg::UnprotectVmRequest,
    wait: bool,
    output: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let job = c
        .registry()
        .await?
        .unprotect_vm(req)
        .await
        .map_err(|s| status_err("disabling protection", s))?
        .into_inner();
    if !wait {
        print_job(&job, output)?;
        return Ok(ExitCode::SUCCESS);
    }
    let job = wait_job(c, &job.id, Duration::from_secs(3600)).await?;
    print_job(&job, output)?;
    Ok(job_exit(&job))
}
