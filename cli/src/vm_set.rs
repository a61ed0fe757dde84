//! `ferry vm set VM [--recovery-host H] [--frequency D] [--retention D] [--app-consistent D]
//! [--network-map FROM=TO]... [--test-network NET] [--ip nicN=ADDR/PREFIX]... [--group G]`: changes only
//! the flags given (a map entry with an empty value is removed); the new policy is checked here like `ferry vm protect`'s
//! (refused with the allowed range) and again by the registry, which also checks the
//! recovery host and that the VM's state allows a policy change.
use std::process::ExitCode;

use ferry::ctl::{Ctl, status_err};
use ferry::outln;
use ferry::output::{print_json, vm_json, vm_state};
use ferry_proto::registry::v1 as reg;

use crate::OutputFormat;

/// What `ferry vm set` was asked to change (`None`, empty: keep).
#[derive(clap::Args)]
pub struct Changes {
    #[arg(long)]
    pub recovery_host: Option<String>,
    #[arg(long)]
    pub frequency: Option<humantime::Duration>,
    #[arg(long)]
    pub retention: Option<humantime::Duration>,
    #[arg(long)]
    pub app_consistent: Option<humantime::Duration>,
    /// A network of the VM and the recovery site's network it maps to (repeatable;
    /// `FROM=` removes the entry).
    #[arg(long, value_name = "FROM=TO")]
    pub network_map: Vec<String>,
    /// The network a test failover's NICs join (default ferry-test).
    #[arg(long)]
    pub test_network: Option<String>,
    /// An address for a NIC when the VM runs at the recovery site (repeatable; `nicN=`
    /// removes it).
    #[arg(long, value_name = "nicN=ADDR/PREFIX")]
    pub ip: Vec<String>,
    /// The VM's replication group: the VMs of a group are cut at one instant across their
    /// hosts (`""` leaves the group).
    #[arg(long)]
    pub group: Option<String>,
}

/// Applies `FROM=TO` entries of `flag` to `map` (an empty TO removes FROM).
fn merge_entries(
    flag: &str,
    entries: &[String],
    map: &mut std::collections::HashMap<String, String>,
) -> anyhow::Result<()> {
    for e in entries {
        let Some((k, v)) = e.split_once('=') else {
            anyhow::bail!("{flag} {e:?}: expected KEY=VALUE");
        };
        if v.is_empty() {
            map.remove(k);
        } else {
            map.insert(k.to_owned(), v.to_owned());
        }
    }
    Ok(())
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
        network_map,
        test_network,
        ip,
        group,
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
    policy.network_map = current.network_map.clone();
    merge_entries("--network-map", network_map, &mut policy.network_map)?;
    policy.test_network = test_network
        .clone()
        .unwrap_or_else(|| current.test_network.clone());
    policy.nic_addresses = current.nic_addresses.clone();
    merge_entries("--ip", ip, &mut policy.nic_addresses)?;
    policy.replication_group = group
        .clone()
        .unwrap_or_else(|| current.replication_group.clone());
    if !policy.replication_group.is_empty()
        && let Some(p) = ferry_model::plan::group_name_problem(&policy.replication_group)
    {
        anyhow::bail!("--group: {p}");
    }
    for (nic, addr) in &policy.nic_addresses {
        ferry_model::policy::check_nic_address(nic, addr).map_err(anyhow::Error::msg)?;
    }
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
