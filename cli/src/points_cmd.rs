//! `ferry points list|verify`.
use std::process::ExitCode;

use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{point_consistency, point_json, point_kind, print_json, table, time};
use ferry::verify::{Verdict, check_points};
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::registry::v1::GetVmRequest;
use ferry_proto::storage::v1::ListPointsRequest;

use crate::{OutputFormat, PointsCmd};

pub async fn run(c: &Ctl, cmd: &PointsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        PointsCmd::List { vm, output } => list(c, vm, *output).await,
        PointsCmd::Verify { vm, output } => verify(c, vm, *output).await,
    }
}

async fn points(c: &Ctl, vm: &str) -> anyhow::Result<Vec<RecoveryPoint>> {
    Ok(c.storage()
        .await?
        .list_points(ListPointsRequest { vm: vm.to_string() })
        .await
        .map_err(|s| status_err("listing recovery points", s))?
        .into_inner()
        .points)
}

async fn list(c: &Ctl, vm: &str, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let points = points(c, vm).await?;
    if output == OutputFormat::Json {
        print_json(&serde_json::Value::Array(
            points.iter().map(point_json).collect(),
        ))?;
    } else {
        let rows: Vec<Vec<String>> = points
            .iter()
            .map(|p| {
                vec![
                    p.id.clone(),
                    time(p.time_ms),
                    point_consistency(p).to_string(),
                    point_kind(p).to_string(),
                    p.host.clone(),
                ]
            })
            .collect();
        outln!(
            "{}",
            table(&["id", "time", "consistency", "kind", "host"], &rows)
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(c: &Ctl, vm: &str, output: OutputFormat) -> anyhow::Result<ExitCode> {
    let history = c
        .registry()
        .await?
        .get_vm(GetVmRequest {
            name: vm.to_string(),
        })
        .await
        .map_err(|s| status_err("reading the vm", s))?
        .into_inner()
        .host_history;
    let checks = check_points(&points(c, vm).await?, &history);
    let flagged = checks
        .iter()
        .filter(|c| c.verdict == Verdict::WrongHost)
        .count();
    if output == OutputFormat::Json {
        print_json(&serde_json::json!({
            "vm": vm,
            "points": checks,
            "flagged": flagged,
        }))?;
    } else {
        let rows: Vec<Vec<String>> = checks
            .iter()
            .map(|p| {
                vec![
                    p.id.clone(),
                    time(p.time_ms),
                    p.host.clone(),
                    p.vm_host.clone(),
                    serde_json::to_value(&p.verdict)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        outln!(
            "{}",
            table(&["id", "time", "committed by", "vm host", "verdict"], &rows)
        );
    }
    if flagged > 0 {
        eprintln!(
            "error: {flagged} point(s) of vm {vm} were committed by a host that was not the vm's host at the time; do not fail over to them"
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
