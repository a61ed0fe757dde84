//! Consistent plans: their VMs share the replication group named after the plan (the
//! scheduler cuts a group at one instant across hosts), and `--point latest-common` picks the
//! newest group cut that every VM of the plan has a committed point of.
use std::collections::{BTreeMap, HashMap};

use ferry_model::plan::Plan;
use ferry_proto::registry::v1::UpdatePolicyRequest;
use ferry_proto::storage::v1::ListPointsRequest;

use crate::Orchestrator;
use crate::error::{FailoverError, Result};

impl Orchestrator {
    /// Puts every VM of consistent `plan` in the group named after it. Refused, changing
    /// nothing, when a VM is not protected or already in another group.
    pub(super) async fn group_plan_vms(&self, plan: &Plan) -> Result<()> {
        let mut policies = Vec::new();
        for vm in plan.vms() {
            let v = self.get_vm(vm).await?;
            let Some(p) = v.policy.filter(|p| p.frequency_seconds > 0) else {
                return Err(FailoverError::FailedPrecondition(format!(
                    "plan {}: vm {vm} has no replication policy (protect it first): the vms of a consistent plan replicate in one group",
                    plan.name
                )));
            };
            if !p.replication_group.is_empty() && p.replication_group != plan.name {
                return Err(FailoverError::FailedPrecondition(format!(
                    "plan {}: vm {vm} is in replication group {}; a consistent plan puts its vms in group {} (ferry vm set {vm} --group \"\" first)",
                    plan.name, p.replication_group, plan.name
                )));
            }
            policies.push((vm.to_owned(), p));
        }
        for (vm, mut p) in policies {
            if p.replication_group == plan.name {
                continue;
            }
            p.replication_group = plan.name.clone();
            self.set_policy(&vm, p).await?;
            tracing::info!(vm = %vm, group = %plan.name, "vm joined the replication group of a consistent plan");
        }
        Ok(())
    }

    /// Takes the VMs of consistent `plan` out of its group (a deleted plan); a VM that moved
    /// to another group since keeps it. Best effort: a VM that cannot be changed is logged.
    pub(super) async fn ungroup_plan_vms(&self, plan: &Plan) {
        for vm in plan.vms() {
            let res = async {
                let Some(mut p) = self.get_vm(vm).await?.policy else {
                    return Ok(());
                };
                if p.replication_group != plan.name {
                    return Ok(());
                }
                p.replication_group.clear();
                self.set_policy(vm, p).await
            }
            .await;
            if let Err(e) = res {
                tracing::warn!(vm, plan = %plan.name, error = %e, "cannot take the vm out of the plan's replication group");
            }
        }
    }

    async fn set_policy(
        &self,
        vm: &str,
        policy: ferry_proto::common::v1::ReplicationPolicy,
    ) -> Result<()> {
        self.registry
            .clone()
            .update_policy(UpdatePolicyRequest {
                name: vm.to_owned(),
                policy: Some(policy),
            })
            .await
            .map_err(|s| FailoverError::remote("registry", "update policy", &s))?;
        Ok(())
    }

    /// For `--point latest-common`: the point of each VM of `plan` in the newest group cut
    /// that every one of them has a point of.
    pub(super) async fn latest_common_points(
        &self,
        plan: &Plan,
    ) -> Result<BTreeMap<String, String>> {
        // cut id -> (vm -> point id), and each cut's time (its earliest point).
        let mut cuts: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        let mut times: HashMap<String, i64> = HashMap::new();
        let vms: Vec<&str> = plan.vms().collect();
        for vm in &vms {
            let points = self
                .storage
                .clone()
                .list_points(ListPointsRequest {
                    vm: (*vm).to_owned(),
                })
                .await
                .map_err(|s| FailoverError::remote("storage-writer", "list points", &s))?
                .into_inner()
                .points;
            for p in points.into_iter().filter(|p| !p.cut_id.is_empty()) {
                let t = times.entry(p.cut_id.clone()).or_insert(p.time_ms);
                *t = (*t).min(p.time_ms);
                cuts.entry(p.cut_id)
                    .or_default()
                    .insert((*vm).to_owned(), p.id);
            }
        }
        cuts.into_iter()
            .filter(|(_, members)| vms.iter().all(|vm| members.contains_key(*vm)))
            .max_by_key(|(cut, _)| (times.get(cut).copied().unwrap_or(0), cut.clone()))
            .map(|(cut, members)| {
                tracing::info!(plan = %plan.name, cut = %cut, "latest common cut chosen");
                members
            })
            .ok_or_else(|| {
                FailoverError::FailedPrecondition(format!(
                    "plan {}: no group cut is common to all its vms ({}){}",
                    plan.name,
                    vms.join(", "),
                    if plan.consistent {
                        " yet: the next cycles of its replication group make one"
                    } else {
                        ": the plan is not consistent (create it with --consistent, or put its vms in one group with ferry vm set VM --group G)"
                    }
                ))
            })
    }
}
