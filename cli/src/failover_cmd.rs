//! `ferry failover …`: test failover (on the recovery host, or an export into a folder),
//! cleanup, and the list of failovers.
use std::process::ExitCode;

use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{failover_json, print_json, table, time};
use ferry_proto::failover::v1::{
    ChangeRecoveryPointRequest, CleanupTestFailoverRequest, CommitFailoverRequest,
    CompleteFailbackRequest, FailbackRequest, ListFailoversRequest, PlannedFailoverRequest,
    TestFailoverRequest, UnplannedFailoverRequest,
};

use crate::commands::{job_exit, print_job};
use crate::{FailbackArgs, FailbackCmd, FailoverCmd, OutputFormat};

/// `ferry failback VM …` (phase 1, and phase 2 at once with --wait) and
/// `ferry failback complete VM`.
pub(crate) async fn failback(
    c: &Ctl,
    cmd: Option<&FailbackCmd>,
    args: &FailbackArgs,
) -> anyhow::Result<ExitCode> {
    if let Some(FailbackCmd::Complete { vm, output }) = cmd {
        let job = complete(c, vm).await?;
        print_job(&job, *output)?;
        return Ok(job_exit(&job));
    }
    let Some(vm) = args.vm.clone() else {
        anyhow::bail!(
            "ferry failback: name the vm (ferry failback VM, or ferry failback complete VM)"
        );
    };
    // A folder on the target host, passed as given (the service refuses a relative one).
    let target_dir = args
        .dir
        .as_ref()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let req = FailbackRequest {
        vm: vm.clone(),
        mode: args.sync.clone(),
        target_dir,
        to_host: args.to_host.clone().unwrap_or_default(),
    };
    let job = c
        .failover()
        .await?
        .failback(req)
        .await
        .map_err(|s| status_err("failback", s))?
        .into_inner();
    let ok = job.status == ferry_proto::common::v1::StepStatus::Succeeded as i32;
    if !args.wait || !ok {
        print_job(&job, args.output)?;
        return Ok(job_exit(&job));
    }
    if args.output != OutputFormat::Json {
        print_job(&job, args.output)?;
    }
    let job = complete(c, &vm).await?;
    print_job(&job, args.output)?;
    Ok(job_exit(&job))
}

async fn complete(c: &Ctl, vm: &str) -> anyhow::Result<ferry_proto::common::v1::Job> {
    Ok(c.failover()
        .await?
        .complete_failback(CompleteFailbackRequest { vm: vm.to_owned() })
        .await
        .map_err(|s| status_err("complete failback", s))?
        .into_inner())
}

pub(crate) async fn run(c: &Ctl, cmd: &FailoverCmd) -> anyhow::Result<ExitCode> {
    let (job, output) = match cmd {
        FailoverCmd::Test {
            vm,
            point,
            target,
            instant,
            output,
        } => {
            let target_dir = match target {
                Some(t) => std::path::absolute(t)?.to_string_lossy().into(),
                None => String::new(),
            };
            let job = c
                .failover()
                .await?
                .test_failover(TestFailoverRequest {
                    vm: vm.clone(),
                    point: point.clone(),
                    target_dir,
                    instant: *instant,
                })
                .await
                .map_err(|s| status_err("test failover", s))?
                .into_inner();
            (job, *output)
        }
        FailoverCmd::Cleanup { vm, output } => {
            let job = c
                .failover()
                .await?
                .cleanup_test_failover(CleanupTestFailoverRequest { vm: vm.clone() })
                .await
                .map_err(|s| status_err("test failover cleanup", s))?
                .into_inner();
            (job, *output)
        }
        FailoverCmd::Unplanned {
            vm,
            point,
            shutdown,
            wait: _,
            instant,
            output,
        } => {
            let req = UnplannedFailoverRequest {
                vm: vm.clone(),
                point: point.clone(),
                shutdown: *shutdown,
                instant: *instant,
                ..Default::default()
            };
            let job = c.failover().await?.unplanned_failover(req).await;
            (
                job.map_err(|s| status_err("unplanned failover", s))?
                    .into_inner(),
                *output,
            )
        }
        FailoverCmd::Planned {
            vm,
            wait: _,
            instant,
            output,
        } => {
            let req = PlannedFailoverRequest {
                vm: vm.clone(),
                instant: *instant,
                ..Default::default()
            };
            let job = c.failover().await?.planned_failover(req).await;
            (
                job.map_err(|s| status_err("planned failover", s))?
                    .into_inner(),
                *output,
            )
        }
        FailoverCmd::ChangePoint { vm, point, output } => {
            let req = ChangeRecoveryPointRequest {
                vm: vm.clone(),
                point: point.clone(),
            };
            let job = c.failover().await?.change_recovery_point(req).await;
            (
                job.map_err(|s| status_err("change point", s))?.into_inner(),
                *output,
            )
        }
        FailoverCmd::Commit { vm, output } => {
            let req = CommitFailoverRequest { vm: vm.clone() };
            let job = c.failover().await?.commit_failover(req).await;
            (
                job.map_err(|s| status_err("commit", s))?.into_inner(),
                *output,
            )
        }
        FailoverCmd::List { output } => return list(c, *output).await,
    };
    print_job(&job, output)?;
    Ok(job_exit(&job))
}

async fn list(c: &Ctl, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let failovers = c
        .failover()
        .await?
        .list_failovers(ListFailoversRequest {})
        .await
        .map_err(|s| status_err("list failovers", s))?
        .into_inner()
        .failovers;
    if output == OutputFormat::Json {
        print_json(&serde_json::Value::Array(
            failovers.iter().map(failover_json).collect(),
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = failovers
        .iter()
        .map(|f| {
            vec![
                f.vm.clone(),
                f.kind.clone(),
                f.state.clone(),
                if f.host.is_empty() {
                    "-".into()
                } else {
                    f.host.clone()
                },
                f.point_id.clone(),
                f.target_dir.clone(),
                time(f.created_at_ms),
            ]
        })
        .collect();
    outln!(
        "{}",
        table(
            &["VM", "KIND", "STATE", "HOST", "POINT", "DIR", "CREATED"],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}
