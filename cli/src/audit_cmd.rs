//! `ferry audit`: the vault's audit trail (who did what, to which target, with what result),
//! and `--verify`, the check of its hash chain (exit 1 when it is broken).
use std::process::ExitCode;

use clap::Args;
use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{print_json, table, time};
use ferry_proto::registry::v1::{AuditRecord, ListAuditRequest, VerifyAuditRequest};
use serde_json::{Value, json};

use crate::OutputFormat;

#[derive(Args)]
pub struct AuditArgs {
    /// Only records of the last this long (e.g. 24h, 7d).
    #[arg(long)]
    since: Option<humantime::Duration>,
    /// Only this caller: a token's name (alice), host:NAME or service:NAME.
    #[arg(long)]
    caller: Option<String>,
    /// The newest this many records (1-100000).
    #[arg(long, default_value_t = 1000)]
    limit: u32,
    /// Check the trail's hash chain instead of listing it; exit 1 when it is broken.
    #[arg(long)]
    verify: bool,
    #[arg(short, long, value_enum, default_value_t)]
    output: OutputFormat,
}

pub(crate) async fn run(c: &Ctl, args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let mut registry = c.registry().await?;
    if args.verify {
        let v = registry
            .verify_audit(VerifyAuditRequest {})
            .await
            .map_err(|s| status_err("verifying the audit trail", s))?
            .into_inner();
        let intact = v.problems.is_empty();
        match args.output {
            OutputFormat::Json => print_json(&json!({
                "intact": intact,
                "entries": v.entries,
                "records": v.records,
                "problems": v.problems,
            }))?,
            OutputFormat::Table if intact => outln!(
                "audit trail intact: {} entries, {} records",
                v.entries,
                v.records
            ),
            OutputFormat::Table => {
                outln!("audit trail BROKEN ({} entries read):", v.entries);
                for p in &v.problems {
                    outln!("  {p}");
                }
            }
        }
        return Ok(if intact {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    if args.limit == 0 {
        anyhow::bail!("--limit 0 is out of range: 1 to 100000");
    }
    let since_ms = match args.since {
        None => 0,
        Some(d) => {
            let d = std::time::Duration::from(d);
            ferry_proto::now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        }
    };
    let r = registry
        .list_audit(ListAuditRequest {
            since_ms,
            caller: args.caller.clone().unwrap_or_default(),
            limit: args.limit,
        })
        .await
        .map_err(|s| status_err("listing the audit trail", s))?
        .into_inner();
    match args.output {
        OutputFormat::Json => {
            print_json(&Value::Array(r.records.iter().map(record_json).collect()))?
        }
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = r
                .records
                .iter()
                .map(|a| {
                    vec![
                        time(a.time_ms),
                        a.caller.clone(),
                        a.operation
                            .rsplit('/')
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                        a.target.clone(),
                        result_text(a),
                    ]
                })
                .collect();
            outln!(
                "{}",
                table(&["TIME", "CALLER", "OPERATION", "TARGET", "RESULT"], &rows)
            );
            if r.truncated {
                outln!("(older records left out: raise --limit or narrow --since)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn result_text(a: &AuditRecord) -> String {
    match a.result.as_str() {
        "ok" => "ok".into(),
        other => format!("{other} ({}): {}", a.code, a.message),
    }
}

fn record_json(a: &AuditRecord) -> Value {
    json!({
        "time": time(a.time_ms),
        "time_ms": a.time_ms,
        "component": a.component,
        "caller": a.caller,
        "role": a.role,
        "operation": a.operation,
        "target": a.target,
        "for_host": a.for_host,
        "result": a.result,
        "code": a.code,
        "message": a.message,
    })
}
