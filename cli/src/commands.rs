//! What each `ferry` subcommand does.
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{self, bytes, job_json, print_json, table, time, vm_health, vm_json, vm_state};
use ferry::up::{Mesh, UpOptions};
use ferry_mesh::Component;
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::registry::v1 as reg;

use crate::{Cli, Cmd, HostCmd, JobsCmd, OutputFormat, VaultCmd, VmCmd};

fn config_path(cli: &Cli) -> anyhow::Result<std::path::PathBuf> {
    cli.config
        .clone()
        .context("--config D/ferry.toml is required (or FERRY_CONFIG)")
}

fn ctl(cli: &Cli) -> anyhow::Result<Ctl> {
    Ctl::load(&config_path(cli)?)
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.cmd {
        Cmd::Up {
            data_dir,
            redis,
            store,
            without,
        } => {
            let without = without
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<Component>())
                .collect::<Result<Vec<_>, _>>()?;
            let mut mesh = Mesh::start(UpOptions {
                data_dir: data_dir.clone(),
                redis: redis.clone(),
                store: store.clone(),
                without,
                retry_time_unit: None,
                retention_interval: None,
                export_roots: None,
            })
            .await?;
            // Not `outln!`: a closed stdout must not end the process before the mesh stops.
            let _ = writeln!(
                std::io::stdout(),
                "ferry is up; operate it with: ferry --config {} status",
                mesh.config_path.display()
            );
            let stop = ferry_mesh::shutdown_on_signal();
            let res = tokio::select! {
                _ = stop.cancelled() => Ok(()),
                r = mesh.wait() => r,
            };
            mesh.stop().await;
            res?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status {
            output,
            component,
            endpoint,
        } => {
            // No token: a probe's pod holds none.
            let cfg = ferry::ctl::load_config(&config_path(&cli)?)?;
            let st = match component {
                Some(name) => {
                    vec![ferry::status::collect_one(&cfg, name, endpoint.as_deref()).await?]
                }
                None => ferry::status::collect(&cfg).await,
            };
            if *output == OutputFormat::Json {
                print_json(&serde_json::to_value(&st)?)?;
            } else {
                let rows: Vec<Vec<String>> = st
                    .iter()
                    .map(|s| vec![s.component.clone(), s.endpoint.clone(), s.status.clone()])
                    .collect();
                outln!("{}", table(&["component", "endpoint", "status"], &rows));
            }
            Ok(if st.iter().all(|s| s.ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Vault {
            cmd: VaultCmd::RegistrationKey { out, ttl, site },
        } => {
            let c = ctl(&cli)?;
            let r = c
                .registry()
                .await?
                .create_registration_key(reg::CreateRegistrationKeyRequest {
                    ttl_seconds: registration_key_ttl(*ttl)?,
                    site: site.clone(),
                })
                .await
                .map_err(|s| status_err("creating a registration key", s))?
                .into_inner();
            let file = ferry_agent::RegistrationKeyFile {
                vault_id: r.vault_id,
                key_id: r.key_id.clone(),
                secret: r.secret,
                registry_endpoint: r.registry_endpoint,
                ca_pem: r.ca_pem,
                expires_at_ms: r.expires_at_ms,
            };
            ferry_mesh::write_secret(out, serde_json::to_string_pretty(&file)?.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            outln!(
                "registration key {} written to {} (valid until {})",
                r.key_id,
                out.display(),
                time(r.expires_at_ms)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vault {
            cmd: VaultCmd::RotateKey { output },
        } => crate::vault_cmd::rotate(&ctl(&cli)?, *output).await,
        Cmd::Vault {
            cmd: VaultCmd::Keys { output },
        } => crate::vault_cmd::list(&ctl(&cli)?, *output).await,
        Cmd::Host { cmd } => host(&cli, cmd).await,
        Cmd::Vm { cmd } => vm(&cli, cmd).await,
        Cmd::Jobs { cmd } => jobs(&cli, cmd).await,
        Cmd::Points { cmd } => crate::points_cmd::run(&ctl(&cli)?, cmd).await,
        Cmd::Failover { cmd } => crate::failover_cmd::run(&ctl(&cli)?, cmd).await,
        Cmd::Plan { cmd } => crate::plan_cmd::run(&ctl(&cli)?, cmd).await,
        Cmd::Drill { cmd } => crate::drill_cmd::run(&ctl(&cli)?, cmd).await,
        Cmd::Token { cmd } => crate::token_cmd::run(&ctl(&cli)?, cmd).await,
        Cmd::Audit(args) => crate::audit_cmd::run(&ctl(&cli)?, args).await,
        Cmd::Failback { cmd, args } => {
            crate::failover_cmd::failback(&ctl(&cli)?, cmd.as_ref(), args).await
        }
        Cmd::Disk { .. } | Cmd::Hrl { .. } => {
            anyhow::bail!("disk and hrl commands run without the mesh")
        }
    }
}

/// Longest validity a registration key may have.
const KEY_TTL_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// The key's validity in whole seconds, refused (not rounded) outside 1 s..365 days.
fn registration_key_ttl(ttl: humantime::Duration) -> anyhow::Result<u64> {
    let ttl = Duration::from(ttl);
    if ttl.subsec_nanos() != 0 || ttl.is_zero() || ttl > KEY_TTL_MAX {
        anyhow::bail!(
            "--ttl {} is out of range: a registration key is valid for whole seconds from 1s to 365d",
            humantime::format_duration(ttl)
        );
    }
    Ok(ttl.as_secs())
}

async fn host(cli: &Cli, cmd: &HostCmd) -> anyhow::Result<ExitCode> {
    let c = ctl(cli)?;
    match cmd {
        HostCmd::List { output } => {
            let hosts = c
                .registry()
                .await?
                .list_hosts(reg::ListHostsRequest {})
                .await
                .map_err(|s| status_err("listing hosts", s))?
                .into_inner()
                .hosts;
            if *output == OutputFormat::Json {
                let v: Vec<_> = hosts
                    .iter()
                    .map(|h| serde_json::json!({"name": h.name, "site": h.site, "status": h.status,
                        "registered": time(h.registered_at_ms), "last_heartbeat": time(h.last_heartbeat_ms), "vms": h.vms}))
                    .collect();
                print_json(&serde_json::Value::Array(v))?;
            } else {
                let rows: Vec<Vec<String>> = hosts
                    .iter()
                    .map(|h| {
                        vec![
                            h.name.clone(),
                            h.site.clone(),
                            h.status.clone(),
                            time(h.last_heartbeat_ms),
                            h.vms.join(","),
                        ]
                    })
                    .collect();
                outln!(
                    "{}",
                    table(&["name", "site", "status", "last heartbeat", "vms"], &rows)
                );
            }
        }
        HostCmd::Remove { host } => {
            c.registry()
                .await?
                .remove_host(reg::RemoveHostRequest { host: host.clone() })
                .await
                .map_err(|s| status_err("removing the host", s))?;
            outln!("host {host} removed; its certificate is no longer accepted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn vm(cli: &Cli, cmd: &VmCmd) -> anyhow::Result<ExitCode> {
    let c = ctl(cli)?;
    match cmd {
        VmCmd::List { output } => {
            let vms = c
                .registry()
                .await?
                .list_vms(reg::ListVmsRequest {})
                .await
                .map_err(|s| status_err("listing vms", s))?
                .into_inner()
                .vms;
            if *output == OutputFormat::Json {
                print_json(&serde_json::Value::Array(vms.iter().map(vm_json).collect()))?;
            } else {
                let rows: Vec<Vec<String>> = vms
                    .iter()
                    .map(|v| {
                        vec![
                            v.name.clone(),
                            v.host.clone(),
                            vm_state(v).to_string(),
                            vm_health(v).to_string(),
                            v.disks.len().to_string(),
                            time(v.last_point_ms),
                        ]
                    })
                    .collect();
                outln!(
                    "{}",
                    table(
                        &["name", "host", "state", "health", "disks", "last point"],
                        &rows
                    )
                );
            }
        }
        VmCmd::Show { name, output } => {
            let v = c
                .registry()
                .await?
                .get_vm(reg::GetVmRequest { name: name.clone() })
                .await
                .map_err(|s| status_err("showing the vm", s))?
                .into_inner();
            if *output == OutputFormat::Json {
                print_json(&vm_json(&v))?;
            } else {
                outln!(
                    "name:        {}\nhost:        {}\nstate:       {}\nhealth:      {}",
                    v.name,
                    v.host,
                    vm_state(&v),
                    vm_health(&v)
                );
                outln!(
                    "last point:  {} {}\nrpo:         {} s",
                    v.last_point_id,
                    time(v.last_point_ms),
                    v.rpo_seconds
                );
                if !v.last_error.is_empty() {
                    outln!("last error:  {}", v.last_error);
                }
                outln!("allowed:     {}", v.allowed_operations.join(", "));
                if v.retry_attempts > 0 {
                    outln!(
                        "retrying:    attempt {} failed; next retry {}",
                        v.retry_attempts,
                        time(v.next_retry_ms)
                    );
                }
                if v.last_cycle_duration_ms > 0 {
                    outln!(
                        "last cycle:  {} ms, {}",
                        v.last_cycle_duration_ms,
                        bytes(v.last_cycle_bytes)
                    );
                }
                let rows: Vec<Vec<String>> = v
                    .disks
                    .iter()
                    .map(|d| {
                        vec![
                            d.path.clone(),
                            d.format.clone(),
                            d.subformat.clone(),
                            bytes(d.virtual_size),
                            bytes(d.allocated_bytes),
                            bytes(d.pending_log_bytes),
                        ]
                    })
                    .collect();
                outln!(
                    "{}",
                    table(
                        &[
                            "disk",
                            "format",
                            "subformat",
                            "size",
                            "allocated",
                            "pending logs"
                        ],
                        &rows
                    )
                );
            }
        }
        VmCmd::Resync { name, wait, output } => {
            let job = c
                .registry()
                .await?
                .resync_vm(reg::ResyncVmRequest { name: name.clone() })
                .await
                .map_err(|s| status_err("starting the resync", s))?
                .into_inner();
            if !*wait {
                print_job(&job, *output)?;
                return Ok(ExitCode::SUCCESS);
            }
            let job = wait_job(&c, &job.id, Duration::from_secs(24 * 3600)).await?;
            print_job(&job, *output)?;
            return Ok(job_exit(&job));
        }
        VmCmd::Set {
            name,
            changes,
            output,
        } => return crate::vm_set::run(&c, name, changes, *output).await,
        VmCmd::Unprotect {
            name,
            delete_points,
            force,
            wait,
            output,
        } => {
            let req = reg::UnprotectVmRequest {
                name: name.clone(),
                delete_points: *delete_points,
                force: *force,
            };
            return crate::unprotect_cmd::run(&c, req, *wait, *output).await;
        }
        VmCmd::Reprotect { name, output } => {
            let job = c
                .failover()
                .await?
                .reprotect(ferry_proto::failover::v1::ReprotectRequest { vm: name.clone() })
                .await
                .map_err(|s| status_err("re-protect", s))?
                .into_inner();
            print_job(&job, *output)?;
            return Ok(job_exit(&job));
        }
        VmCmd::Repair { name, output } => {
            let v = c
                .registry()
                .await?
                .repair_vm(reg::RepairVmRequest { name: name.clone() })
                .await
                .map_err(|s| status_err("repairing the vm", s))?
                .into_inner();
            if *output == OutputFormat::Json {
                print_json(&vm_json(&v))?;
            } else {
                outln!("vm {}: {} ({})", v.name, vm_state(&v), vm_health(&v));
            }
        }
        VmCmd::Protect {
            name,
            frequency,
            retention,
            keep_all,
            thin_to,
            app_consistent,
            resync_window,
            recovery_host,
            wait,
            output,
        } => {
            // Refused here, with the allowed range, before anything reaches the registry.
            let mut policy = crate::protect::policy(&crate::protect::PolicyFlags {
                frequency: (*frequency).into(),
                retention: (*retention).into(),
                keep_all: (*keep_all).into(),
                thin_to: (*thin_to).into(),
                app_consistent: (*app_consistent).into(),
                resync_window: resync_window.clone(),
            })?;
            policy.recovery_host = recovery_host.clone().unwrap_or_default();
            let job = c
                .registry()
                .await?
                .protect_vm(reg::ProtectVmRequest {
                    name: name.clone(),
                    policy: Some(policy),
                })
                .await
                .map_err(|s| status_err("enabling protection", s))?
                .into_inner();
            if !*wait {
                print_job(&job, *output)?;
                return Ok(ExitCode::SUCCESS);
            }
            let job = wait_job(&c, &job.id, Duration::from_secs(3600)).await?;
            print_job(&job, *output)?;
            return Ok(job_exit(&job));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn print_job(j: &Job, output: OutputFormat) -> anyhow::Result<()> {
    if output == OutputFormat::Json {
        return print_json(&job_json(j));
    }
    outln!(
        "job {} ({} {}): {}",
        j.id,
        j.kind,
        j.target,
        output::step_status(j.status)
    );
    for s in &j.steps {
        outln!(
            "  {:<26} {:<10} {:>3}%  {}",
            s.name,
            output::step_status(s.status),
            s.progress_percent,
            s.message
        );
    }
    if !j.error.is_empty() {
        outln!("  error: {}", j.error);
    }
    Ok(())
}

pub(crate) fn job_exit(j: &Job) -> ExitCode {
    if j.status == StepStatus::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub(crate) async fn wait_job(c: &Ctl, id: &str, timeout: Duration) -> anyhow::Result<Job> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_pct = u32::MAX;
    let mut waiting_for: Option<String> = None;
    loop {
        let j = c
            .registry()
            .await?
            .get_job(reg::GetJobRequest { id: id.to_string() })
            .await
            .map_err(|s| status_err("reading the job", s))?
            .into_inner();
        if !ferry_model::job::is_in_progress(j.status) {
            return Ok(j);
        }
        if let Some(s) = j
            .steps
            .iter()
            .find(|s| s.status == StepStatus::WaitingForInput as i32)
        {
            if waiting_for.as_deref() != Some(s.name.as_str()) {
                waiting_for = Some(s.name.clone());
                eprintln!("{}: {}", s.name, s.message);
            }
        } else if let Some(s) = j
            .steps
            .iter()
            .find(|s| s.status == StepStatus::Running as i32)
            && s.progress_percent != last_pct
        {
            last_pct = s.progress_percent;
            eprintln!("{}: {}% {}", s.name, s.progress_percent, s.message);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "job {id} still running after {}",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn jobs(cli: &Cli, cmd: &JobsCmd) -> anyhow::Result<ExitCode> {
    let c = ctl(cli)?;
    match cmd {
        JobsCmd::List { vm, output } => {
            let jobs = c
                .registry()
                .await?
                .list_jobs(reg::ListJobsRequest {
                    target: vm.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| status_err("listing jobs", s))?
                .into_inner()
                .jobs;
            if *output == OutputFormat::Json {
                print_json(&serde_json::Value::Array(
                    jobs.iter().map(job_json).collect(),
                ))?;
            } else {
                let rows: Vec<Vec<String>> = jobs
                    .iter()
                    .map(|j| {
                        let step = j
                            .steps
                            .iter()
                            .find(|s| s.status == StepStatus::Running as i32)
                            .map(|s| s.name.clone())
                            .unwrap_or_default();
                        vec![
                            j.id.clone(),
                            j.kind.clone(),
                            j.target.clone(),
                            output::step_status(j.status).into(),
                            step,
                            time(j.created_at_ms),
                        ]
                    })
                    .collect();
                outln!(
                    "{}",
                    table(
                        &["id", "kind", "target", "status", "current step", "created"],
                        &rows
                    )
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCmd::Show { id, output } => {
            let j = c
                .registry()
                .await?
                .get_job(reg::GetJobRequest { id: id.clone() })
                .await
                .map_err(|s| status_err("reading the job", s))?
                .into_inner();
            print_job(&j, *output)?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCmd::Cancel {
            id,
            wait,
            timeout,
            output,
        } => {
            let mut j = c
                .registry()
                .await?
                .cancel_job(reg::CancelJobRequest { id: id.clone() })
                .await
                .map_err(|s| status_err("cancelling the job", s))?
                .into_inner();
            if *wait {
                j = wait_job(&c, id, (*timeout).into()).await?;
            }
            print_job(&j, *output)?;
            Ok(match *wait && j.status != StepStatus::Cancelled as i32 {
                true => ExitCode::FAILURE,
                false => ExitCode::SUCCESS,
            })
        }
        JobsCmd::Resume {
            id,
            comment,
            output,
        } => {
            let j = c
                .registry()
                .await?
                .resume_job(reg::ResumeJobRequest {
                    id: id.clone(),
                    comment: comment.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| status_err("resuming the job", s))?
                .into_inner();
            print_job(&j, *output)?;
            Ok(ExitCode::SUCCESS)
        }
        JobsCmd::Wait { id, timeout } => {
            let j = wait_job(&c, id, (*timeout).into()).await?;
            print_job(&j, OutputFormat::Table)?;
            Ok(job_exit(&j))
        }
    }
}
