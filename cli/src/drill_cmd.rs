//! `ferry drill …`: run a drill of a VM or a plan now, schedule one (`--every D`; the
//! failover service runs it when due), unschedule it, list the schedules.
use std::process::ExitCode;

use clap::Subcommand;
use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{print_json, table, time};
use ferry_proto::failover::v1::{
    ListDrillSchedulesRequest, RunDrillRequest, ScheduleDrillRequest, ScheduledDrill,
};
use serde_json::{Value, json};

use crate::OutputFormat;
use crate::commands::{job_exit, print_job};

#[derive(Subcommand)]
pub enum DrillCmd {
    /// Drill a VM on its recovery host: every block of the point read back and checked, a
    /// test failover started, `--boot-check` run there, the copy removed; the result is
    /// recorded (`vm show`: last_verified). A plan: each of its VMs in turn. Exit non-zero
    /// when the drill failed.
    Run {
        /// A VM or a recovery plan.
        vm: String,
        /// A command on the recovery host that probes the started VM (sh -c in the agent's
        /// config folder; FERRY_VMS is the vm; non-zero exit or stderr output = failed).
        #[arg(long)]
        boot_check: Option<String>,
        /// A point id or "latest".
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Drill a VM or a plan every `--every` (5 s to 366 d); a VM's health is warning while
    /// its drill is overdue or its last one failed.
    Schedule {
        target: String,
        #[arg(long)]
        every: humantime::Duration,
        #[arg(long)]
        boot_check: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Stop drilling a VM or a plan on a schedule.
    Unschedule {
        target: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// The drill schedules and where each stands.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

pub(crate) async fn run(c: &Ctl, cmd: &DrillCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DrillCmd::Run {
            vm,
            boot_check,
            point,
            output,
        } => {
            let job = c
                .failover()
                .await?
                .run_drill(RunDrillRequest {
                    vm: vm.clone(),
                    boot_check: boot_check.clone().unwrap_or_default(),
                    point: point.clone(),
                })
                .await
                .map_err(|s| status_err("drill", s))?
                .into_inner();
            print_job(&job, *output)?;
            Ok(job_exit(&job))
        }
        DrillCmd::Schedule {
            target,
            every,
            boot_check,
            output,
        } => {
            let every = std::time::Duration::from(*every);
            if every.subsec_nanos() != 0 || every.is_zero() {
                anyhow::bail!(
                    "--every {}: a drill interval is whole seconds, {} s to {} s",
                    humantime::format_duration(every),
                    ferry_model::drill::MIN_EVERY_SECONDS,
                    ferry_model::drill::MAX_EVERY_SECONDS
                );
            }
            ferry_model::drill::check_every(every.as_secs()).map_err(anyhow::Error::msg)?;
            let d = schedule(c, target, every.as_secs(), boot_check.clone()).await?;
            print_schedules(std::slice::from_ref(&d), *output, false)
        }
        DrillCmd::Unschedule { target, output } => {
            let d = schedule(c, target, 0, None).await?;
            match output {
                OutputFormat::Json => print_json(&json!({"target": d.target, "scheduled": false}))?,
                OutputFormat::Table => outln!("drills of {target} no longer scheduled"),
            }
            Ok(ExitCode::SUCCESS)
        }
        DrillCmd::List { output } => {
            let drills = c
                .failover()
                .await?
                .list_drill_schedules(ListDrillSchedulesRequest {})
                .await
                .map_err(|s| status_err("listing drill schedules", s))?
                .into_inner()
                .drills;
            print_schedules(&drills, *output, true)
        }
    }
}

async fn schedule(
    c: &Ctl,
    target: &str,
    every_seconds: u64,
    boot_check: Option<String>,
) -> anyhow::Result<ScheduledDrill> {
    Ok(c.failover()
        .await?
        .schedule_drill(ScheduleDrillRequest {
            target: target.to_owned(),
            every_seconds,
            boot_check: boot_check.unwrap_or_default(),
        })
        .await
        .map_err(|s| status_err("scheduling the drill", s))?
        .into_inner())
}

fn schedule_json(d: &ScheduledDrill) -> Value {
    let ms = |t: i64| {
        if t > 0 && t < i64::MAX {
            time(t)
        } else {
            String::new()
        }
    };
    json!({
        "target": d.target,
        "every_seconds": d.every_seconds,
        "boot_check": d.boot_check,
        "vms": d.vms,
        "last_run": ms(d.last_run_ms),
        "last_ok": d.last_ok,
        "last_message": d.last_message,
        "next_due": ms(d.next_due_ms),
        "overdue": d.overdue,
    })
}

/// Prints schedules (`list`: as an array in JSON; otherwise the one schedule).
fn print_schedules(
    drills: &[ScheduledDrill],
    output: OutputFormat,
    list: bool,
) -> anyhow::Result<ExitCode> {
    if output == OutputFormat::Json {
        let all: Vec<Value> = drills.iter().map(schedule_json).collect();
        match (list, all.first()) {
            (false, Some(one)) => print_json(one)?,
            _ => print_json(&Value::Array(all))?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = drills
        .iter()
        .map(|d| {
            let j = schedule_json(d);
            let state = if d.overdue {
                "overdue".to_owned()
            } else if d.last_ok {
                "passed".to_owned()
            } else if d.last_message.is_empty() {
                "not drilled yet".to_owned()
            } else {
                format!("failed: {}", d.last_message)
            };
            vec![
                d.target.clone(),
                format!("{} s", d.every_seconds),
                d.vms.join(","),
                j["last_run"].as_str().unwrap_or_default().to_owned(),
                j["next_due"].as_str().unwrap_or_default().to_owned(),
                state,
            ]
        })
        .collect();
    outln!(
        "{}",
        table(
            &["TARGET", "EVERY", "VMS", "LAST RUN", "NEXT DUE", "STATE"],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}
