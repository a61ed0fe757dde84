//! `ferry plan …`: recovery plans (create, show, list, delete) and their runs (failover in a
//! mode, cleanup of a test failover, failback). A run is a plan job; the command follows it
//! until it ends (saying when it waits for `ferry jobs resume`) unless `--no-wait`.
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{print_json, table, time};
use ferry_model::plan::{Group, Plan, parse_action_flag};
use ferry_proto::failover::v1::{
    DeleteRecoveryPlanRequest, GetRecoveryPlanRequest, ListRecoveryPlansRequest, RecoveryPlan,
    RunRecoveryPlanRequest,
};
use serde_json::{Value, json};

use crate::OutputFormat;
use crate::commands::{job_exit, print_job, wait_job};

#[derive(Subcommand)]
pub enum PlanCmd {
    /// Create a plan: `--group` once per group, in order (VMs comma separated); actions with
    /// `--before/--after GROUP:script:COMMAND` (sh -c on the recovery host, 600 s) or
    /// `GROUP:manual:INSTRUCTION` (the job waits for `ferry jobs resume`).
    Create {
        name: String,
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
        #[arg(long)]
        before: Vec<String>,
        #[arg(long)]
        after: Vec<String>,
        /// Put every VM of the plan in the replication group named after the plan: they are
        /// cut at one instant across hosts, and `--point latest-common` fails them over to
        /// one such cut.
        #[arg(long)]
        consistent: bool,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    Show {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    Delete {
        name: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Fail every VM of the plan over, group by group.
    Failover {
        name: String,
        #[arg(long, value_parser = ["test", "planned", "unplanned"])]
        mode: String,
        /// Test and unplanned: "latest" or "latest-app" (each VM's own), or "latest-common"
        /// (the latest group cut every VM of the plan has a point of).
        #[arg(long)]
        point: Option<String>,
        /// Every VM recovers instantly: started at once on disks served from the store and
        /// copied in the background.
        #[arg(long)]
        instant: bool,
        #[command(flatten)]
        follow: Follow,
    },
    /// Remove the test copies of a test failover of the plan, group by group.
    Cleanup {
        name: String,
        #[command(flatten)]
        follow: Follow,
    },
    /// Fail every VM of the plan back (both phases), group by group.
    Failback {
        name: String,
        #[arg(long, default_value = "checksum", value_parser = ["checksum", "full"])]
        sync: String,
        #[command(flatten)]
        follow: Follow,
    },
}

/// How a run is followed.
#[derive(clap::Args)]
pub struct Follow {
    /// Follow the job until it ends (the default).
    #[arg(long, conflicts_with = "no_wait")]
    wait: bool,
    /// Print the job as it starts and return.
    #[arg(long)]
    no_wait: bool,
    /// Longest the command follows the job.
    #[arg(long, default_value = "24h")]
    timeout: humantime::Duration,
    #[arg(short, long, value_enum, default_value_t)]
    output: OutputFormat,
}

pub(crate) async fn run(c: &Ctl, cmd: &PlanCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PlanCmd::Create {
            name,
            groups,
            before,
            after,
            consistent,
            output,
        } => {
            let mut plan = plan_from_flags(name, groups, before, after)?;
            plan.consistent = *consistent;
            let stored = c
                .failover()
                .await?
                .create_recovery_plan(RecoveryPlan::from(&plan))
                .await
                .map_err(|s| status_err("creating the plan", s))?
                .into_inner();
            print_plan(&stored, *output)
        }
        PlanCmd::Show { name, output } => {
            let p = c
                .failover()
                .await?
                .get_recovery_plan(GetRecoveryPlanRequest { name: name.clone() })
                .await
                .map_err(|s| status_err("reading the plan", s))?
                .into_inner();
            print_plan(&p, *output)
        }
        PlanCmd::List { output } => list(c, *output).await,
        PlanCmd::Delete { name, output } => {
            c.failover()
                .await?
                .delete_recovery_plan(DeleteRecoveryPlanRequest { name: name.clone() })
                .await
                .map_err(|s| status_err("deleting the plan", s))?;
            match output {
                OutputFormat::Json => print_json(&json!({"name": name, "deleted": true}))?,
                OutputFormat::Table => outln!("plan {name} deleted"),
            }
            Ok(ExitCode::SUCCESS)
        }
        PlanCmd::Failover {
            name,
            mode,
            point,
            instant,
            follow,
        } => {
            let req = RunRecoveryPlanRequest {
                plan: name.clone(),
                mode: mode.clone(),
                point: point.clone().unwrap_or_default(),
                instant: *instant,
                ..Default::default()
            };
            start(c, req, follow).await
        }
        PlanCmd::Cleanup { name, follow } => {
            let req = RunRecoveryPlanRequest {
                plan: name.clone(),
                mode: "cleanup".into(),
                ..Default::default()
            };
            start(c, req, follow).await
        }
        PlanCmd::Failback { name, sync, follow } => {
            let req = RunRecoveryPlanRequest {
                plan: name.clone(),
                mode: "failback".into(),
                sync: sync.clone(),
                ..Default::default()
            };
            start(c, req, follow).await
        }
    }
}

/// The plan the flags describe (checked by the service; the action flags' form here).
fn plan_from_flags(
    name: &str,
    groups: &[String],
    before: &[String],
    after: &[String],
) -> anyhow::Result<Plan> {
    let mut plan = Plan {
        name: name.to_owned(),
        groups: groups
            .iter()
            .map(|g| Group {
                vms: g
                    .split(',')
                    .map(str::trim)
                    .filter(|v| !v.is_empty())
                    .map(str::to_owned)
                    .collect(),
                ..Group::default()
            })
            .collect(),
        created_at_ms: 0,
        consistent: false,
    };
    for (flags, after) in [(before, false), (after, true)] {
        for f in flags {
            let (g, action) = parse_action_flag(f).map_err(anyhow::Error::msg)?;
            let n = plan.groups.len();
            let Some(group) = plan.groups.get_mut(g) else {
                anyhow::bail!("{f:?} names group {} but the plan has {n} group(s)", g + 1);
            };
            match after {
                false => group.before.push(action),
                true => group.after.push(action),
            }
        }
    }
    Ok(plan)
}

async fn start(c: &Ctl, mut req: RunRecoveryPlanRequest, f: &Follow) -> anyhow::Result<ExitCode> {
    req.no_wait = f.no_wait;
    let job = c
        .failover()
        .await?
        .run_recovery_plan(req)
        .await
        .map_err(|s| status_err("running the plan", s))?
        .into_inner();
    if f.no_wait {
        print_job(&job, f.output)?;
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("plan job {} started", job.id);
    let job = wait_job(c, &job.id, Duration::from(f.timeout)).await?;
    print_job(&job, f.output)?;
    Ok(job_exit(&job))
}

async fn list(c: &Ctl, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let plans = c
        .failover()
        .await?
        .list_recovery_plans(ListRecoveryPlansRequest {})
        .await
        .map_err(|s| status_err("listing plans", s))?
        .into_inner()
        .plans;
    if output == OutputFormat::Json {
        print_json(&Value::Array(plans.iter().map(plan_json).collect()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = plans
        .iter()
        .map(|p| {
            let vms: usize = p.groups.iter().map(|g| g.vms.len()).sum();
            vec![
                p.name.clone(),
                p.groups.len().to_string(),
                vms.to_string(),
                time(p.created_at_ms),
            ]
        })
        .collect();
    outln!("{}", table(&["PLAN", "GROUPS", "VMS", "CREATED"], &rows));
    Ok(ExitCode::SUCCESS)
}

fn print_plan(p: &RecoveryPlan, output: OutputFormat) -> anyhow::Result<ExitCode> {
    if output == OutputFormat::Json {
        print_json(&plan_json(p))?;
        return Ok(ExitCode::SUCCESS);
    }
    let cut = if p.consistent {
        format!(
            ", consistent: its vms are cut together as replication group {}",
            p.name
        )
    } else {
        String::new()
    };
    outln!("plan {} (created {}{cut})", p.name, time(p.created_at_ms));
    for (i, g) in p.groups.iter().enumerate() {
        for a in &g.before {
            outln!("  group {} before: {} {}", i + 1, a.kind, a.command);
        }
        outln!("  group {}: {}", i + 1, g.vms.join(", "));
        for a in &g.after {
            outln!("  group {} after: {} {}", i + 1, a.kind, a.command);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn plan_json(p: &RecoveryPlan) -> Value {
    let actions = |list: &[ferry_proto::failover::v1::PlanAction]| -> Vec<Value> {
        list.iter()
            .map(|a| json!({"name": a.name, "kind": a.kind, "command": a.command}))
            .collect()
    };
    json!({
        "name": p.name,
        "groups": p.groups.iter().map(|g| json!({
            "vms": g.vms,
            "before": actions(&g.before),
            "after": actions(&g.after),
        })).collect::<Vec<_>>(),
        "created": time(p.created_at_ms),
        "consistent": p.consistent,
    })
}
