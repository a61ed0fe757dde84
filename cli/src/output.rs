//! Readable tables and stable JSON for operator commands.
use ferry_model::{Consistency, CycleKind, Health, TestFailover, VmState};
use ferry_proto::common::v1::{Job, RecoveryPoint};
use ferry_proto::registry::v1::Vm;
use serde_json::{Value, json};

pub fn time(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

pub fn step_status(s: i32) -> &'static str {
    ferry_model::job::status_name(s)
}

/// A VM's state as the JSON and tables spell it ("protected", "resync-pending", ...).
pub fn vm_state(v: &Vm) -> &'static str {
    VmState::wire_name(v.state)
}

/// A VM's health as the JSON and tables spell it ("normal", "warning", "critical").
pub fn vm_health(v: &Vm) -> &'static str {
    Health::wire_name(v.health)
}

/// "test" while a test failover's copy exists, "" otherwise (as before the enum).
fn failover_state(v: &Vm) -> &'static str {
    match TestFailover::try_from(v.failover_state) {
        Ok(TestFailover::Active) => "test",
        _ => "",
    }
}

/// A point's consistency and kind as the JSON and tables spell them ("crash", "delta", ...).
pub fn point_consistency(p: &RecoveryPoint) -> &'static str {
    Consistency::wire_name(p.consistency)
}

pub fn point_kind(p: &RecoveryPoint) -> &'static str {
    CycleKind::wire_name(p.kind)
}

pub fn vm_json(v: &Vm) -> Value {
    json!({
        "name": v.name,
        "host": v.host,
        "site": v.site,
        "state": vm_state(v),
        "health": vm_health(v),
        "disks": v.disks.iter().map(|d| json!({
            "id": d.id,
            "path": d.path,
            "format": d.format,
            "subformat": d.subformat,
            "virtual_size": d.virtual_size,
            "logical_sector_size": d.logical_sector_size,
            "allocated_bytes": d.allocated_bytes,
            "nbd_uri": d.nbd_uri,
            "pending_log_bytes": d.pending_log_bytes,
            "error": d.error,
        })).collect::<Vec<_>>(),
        "policy": v.policy.as_ref().map(|p| json!({
            "frequency_seconds": p.frequency_seconds,
            "retention_hours": p.retention_hours,
            "app_consistent_seconds": p.app_consistent_seconds,
            "keep_all_seconds": p.keep_all_seconds,
            "thin_to_seconds": p.thin_to_seconds,
            "resync_window": format!("{}-{}", p.resync_window_start, p.resync_window_end),
            "recovery_host": p.recovery_host,
            "network_map": p.network_map,
            "test_network": p.test_network,
            "replication_group": p.replication_group,
            "nic_addresses": p.nic_addresses,
        })),
        "rpo_seconds": v.rpo_seconds,
        "last_cycle_duration_ms": v.last_cycle_duration_ms,
        "last_cycle_bytes": v.last_cycle_bytes,
        "last_point_id": v.last_point_id,
        "last_point_time": time(v.last_point_ms),
        "last_error": v.last_error,
        "retry_attempts": v.retry_attempts,
        "next_retry_time": time(v.next_retry_ms),
        "protection_job_id": v.protection_job_id,
        "failover_state": failover_state(v),
        "active_host": v.active_host,
        "recovery_host": v.recovery_host,
        "direction": v.direction,
        "base_point": v.base_point,
        "standby_point": v.standby_point,
        "last_verified": v.last_verified.as_ref().map(|d| json!({
            "point": d.point_id,
            "time": time(d.time_ms),
            "result": if d.ok { "succeeded" } else { "failed" },
            "message": d.message,
            "job": d.job_id,
        })),
        "drill_schedule": v.drill_schedule.as_ref().map(|d| json!({
            "target": d.target,
            "every_seconds": d.every_seconds,
            "since": time(d.since_ms),
        })),
        "allowed_operations": v.allowed_operations,
    })
}

pub fn job_json(j: &Job) -> Value {
    json!({
        "id": j.id,
        "kind": j.kind,
        "target": j.target,
        "status": step_status(j.status),
        "steps": j.steps.iter().map(|s| json!({
            "name": s.name,
            "status": step_status(s.status),
            "progress_percent": s.progress_percent,
            "message": s.message,
            "started": time(s.started_at_ms),
            "ended": time(s.ended_at_ms),
        })).collect::<Vec<_>>(),
        "bytes_total": j.bytes_total,
        "bytes_done": j.bytes_done,
        "bytes_skipped": j.bytes_skipped,
        "cancellable": ferry_model::job::is_cancellable(j),
        "cancel_requested": j.cancel_requested,
        "error": j.error,
        "created": time(j.created_at_ms),
        "updated": time(j.updated_at_ms),
    })
}

pub fn failover_json(f: &ferry_proto::failover::v1::FailoverRecord) -> Value {
    json!({
        "vm": f.vm,
        "kind": f.kind,
        "state": f.state,
        "host": f.host,
        "point_id": f.point_id,
        "dir": f.target_dir,
        "disks": f.disks.iter().map(|d| json!({
            "disk_id": d.disk_id,
            "path": d.path,
            "format": d.format,
            "nbd_uri": d.nbd_uri,
        })).collect::<Vec<_>>(),
        "files": f.files,
        "driver": f.driver,
        "started": time(f.started_at_ms),
        "created": time(f.created_at_ms),
        "job_id": f.job_id,
        "instant": f.instant,
    })
}

pub fn point_json(p: &RecoveryPoint) -> Value {
    json!({
        "id": p.id,
        "time": time(p.time_ms),
        "consistency": point_consistency(p),
        "kind": point_kind(p),
        "seq": p.seq,
        "host": p.host,
        "cut_id": p.cut_id,
        "disks": p.disks.iter().map(|d| json!({
            "disk_id": d.disk_id,
            "path": d.path,
            "format": d.format,
            "virtual_size": d.virtual_size,
            "stored_blocks": d.stored_blocks,
        })).collect::<Vec<_>>(),
    })
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.clone()));
    }
    out
}

pub fn bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Pretty JSON on stdout (`-o json`).
pub fn print_json(v: &Value) -> anyhow::Result<()> {
    crate::outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Writes a line to stdout. A reader that went away (`ferry … -o json | head`) ends the
/// command quietly with status 0, as Unix tools do, instead of the panic `println!` gives.
pub fn emit(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` through [`emit`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::emit(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::emit(format_args!($($arg)*))
    };
}
