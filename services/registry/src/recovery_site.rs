//! The recovery side of a VM's policy (DESIGN §11): which host it fails over to, checked
//! whenever the policy is set (enable protection, `ferry vm set`), and the operator's policy
//! changes of a protected VM.
use ferry_model::Operation;

use crate::error::RegistryError;
use crate::service::RegistryService;
use crate::state::{Event, PolicyRecord, State, VmRecord};

impl RegistryService {
    /// A recovery host must be registered (not removed), another host than the VM's, have a
    /// `[recovery]` section, and be connected. "" (none chosen) passes.
    pub(crate) fn check_recovery_host(
        &self,
        st: &State,
        v: &VmRecord,
        recovery_host: &str,
    ) -> Result<(), RegistryError> {
        if recovery_host.is_empty() {
            return Ok(());
        }
        let refuse = |msg: String| Err(RegistryError::FailedPrecondition(msg));
        match st.hosts.get(recovery_host) {
            None => {
                return Err(RegistryError::InvalidArgument(format!(
                    "recovery host {recovery_host} is not registered in this vault"
                )));
            }
            Some(h) if h.removed => {
                return refuse(format!(
                    "recovery host {recovery_host} was removed from the vault"
                ));
            }
            Some(_) => {}
        }
        if recovery_host == v.host {
            return Err(RegistryError::InvalidArgument(format!(
                "vm {} runs on host {recovery_host}: its recovery host must be another host",
                v.name
            )));
        }
        if !self.host_connected(recovery_host) {
            return refuse(format!(
                "recovery host {recovery_host} has not sent a heartbeat recently: start its agent"
            ));
        }
        if !self.host_has_recovery(recovery_host) {
            return refuse(format!(
                "host {recovery_host} cannot receive failed-over vms: add a [recovery] section (dir = \"recovered\") to its agent.toml and restart the agent"
            ));
        }
        Ok(())
    }

    /// Replaces a protected VM's policy (checked like at enable protection); the scheduler
    /// picks up a new frequency at its next sync with the registry.
    pub(crate) async fn update_policy_of(
        &self,
        vm: &str,
        policy: PolicyRecord,
    ) -> Result<(), RegistryError> {
        policy.check()?;
        crate::jobs::check_resync_window(&policy)?;
        {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(vm)
                .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?;
            v.check(Operation::UpdatePolicy)?;
            self.check_recovery_host(&st, v, &policy.recovery_host)?;
        }
        tracing::info!(vm, frequency_s = policy.frequency_seconds, recovery_host = %policy.recovery_host, "policy updated");
        self.persist(vec![Event::VmPolicy {
            vm: vm.to_string(),
            policy,
        }])
        .await
    }
}
