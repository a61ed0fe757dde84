//! `ferry vm set VM [--recovery-host H] [--frequency D] [--retention D] [--app-consistent D]`:
//! changes only the flags given; the new policy is checked here like `ferry vm protect`'s
//! (refused with the allowed range) and again by the registry, which also checks the
//! recovery host and that the VM's state allows a policy change.
use std::process::ExitCode;

use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{print_json, vm_json, vm_state};
use ferry_proto::registry::v1 as reg;

use crate::OutputFormat;

/// What `ferry vm set` was asked to change (`None`: keep).
pub struct Changes {
    pub recovery_host: Option<String>,
    pub frequency: Option<humantime::Duration>,
    pub retention: Option<humantime::Duration>,
    pub app_consistent: Option<humantime::Duration>,
}

pub async fn run(
    c: &Ctl,
    name: &str,
    changes: &Changes,
    output: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let Changes {
        recovery_host,
        frequency,
        retention,
        app_consistent,
    } = changes;
    let mut registry = c.registry().await?;
    let v = registry
        .get_vm(reg::GetVmRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|s| status_err("reading the vm", s))?
        .into_inner();
    let Some(current) = v.policy.as_ref().filter(|p| p.frequency_seconds > 0) else {
        anyhow::bail!(
            "vm {name} is {} and has no policy to change: protect it first (ferry vm protect {name})",
            vm_state(&v)
        );
    };
    let mut flags = crate::protect::flags_of(current);
    if let Some(d) = frequency {
        flags.frequency = (*d).into();
    }
    if let Some(d) = retention {
        flags.retention = (*d).into();
    }
    if let Some(d) = app_consistent {
        flags.app_consistent = (*d).into();
    }
    let mut policy = crate::protect::policy(&flags)?;
    policy.recovery_host = recovery_host
        .clone()
        .unwrap_or_else(|| current.recovery_host.clone());
    let v = registry
        .update_policy(reg::UpdatePolicyRequest {
            name: name.to_string(),
            policy: Some(policy),
        })
        .await
        .map_err(|s| status_err("changing the policy", s))?
        .into_inner();
    if output == OutputFormat::Json {
        print_json(&vm_json(&v))?;
    } else {
        let p = v.policy.unwrap_or_default();
        outln!(
            "vm {}: every {} s, {} h retention, recovery host {}",
            v.name,
            p.frequency_seconds,
            p.retention_hours,
            if p.recovery_host.is_empty() {
                "(none)"
            } else {
                &p.recovery_host
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
