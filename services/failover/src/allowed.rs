//! Operations are allowed by the protection state machine (`ferry_model::protection`), as
//! the registry reports it for the VM; the orchestrator asks before it starts one.
use ferry_model::{Health, Operation, Refused, VmState};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};

impl Orchestrator {
    /// Passes when the VM's state allows `op`; otherwise FAILED_PRECONDITION naming the VM,
    /// its state and the operations it allows now.
    pub async fn require_allowed(&self, vm: &str, op: Operation) -> Result<()> {
        let v = self.get_vm(vm).await?;
        if v.allowed_operations.iter().any(|a| a == op.as_str()) {
            return Ok(());
        }
        let unreadable = |what: &str, e: &dyn std::fmt::Display| {
            FailoverError::Internal(format!("the registry's record of vm {vm}: {what}: {e}"))
        };
        let refused = Refused {
            vm: vm.to_owned(),
            asked: op.as_str().to_owned(),
            state: VmState::try_from(v.state).map_err(|e| unreadable("state", &e))?,
            health: Health::try_from(v.health).map_err(|e| unreadable("health", &e))?,
            // A name this build does not know (a newer registry) is left out of the list.
            allowed: v
                .allowed_operations
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect(),
        };
        Err(FailoverError::FailedPrecondition(refused.to_string()))
    }
}
