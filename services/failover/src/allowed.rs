//! Operations are allowed by the protection state machine (`ferry_model::protection`), as
//! the registry reports it for the VM; the orchestrator asks before it starts one.
use ferry_model::Operation;
use ferry_proto::registry::v1::GetVmRequest;

use crate::Orchestrator;
use crate::error::{FailoverError, Result};

impl Orchestrator {
    /// Passes when the VM's state allows `op`; otherwise FAILED_PRECONDITION naming the VM,
    /// its state and the operations it allows now.
    pub async fn require_allowed(&self, vm: &str, op: Operation) -> Result<()> {
        let mut registry = self.registry.clone();
        let v = registry
            .get_vm(GetVmRequest {
                name: vm.to_owned(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => FailoverError::NotFound(format!("vm {vm}")),
                _ => FailoverError::remote("registry", "get vm", &s),
            })?
            .into_inner();
        if v.allowed_operations.iter().any(|a| a == op.as_str()) {
            return Ok(());
        }
        Err(FailoverError::FailedPrecondition(format!(
            "vm {vm} is {} (health {}): {op} is not allowed now; allowed: {}",
            v.state,
            v.health,
            if v.allowed_operations.is_empty() {
                "nothing until the running job ends".to_string()
            } else {
                v.allowed_operations.join(", ")
            }
        )))
    }
}
