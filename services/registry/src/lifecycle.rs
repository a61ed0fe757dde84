//! The registry's side of the protection state machine (`ferry_model::protection`): a VM
//! record's lifecycle and context, and the one way the registry changes a VM's state or
//! health — [`RegistryService::advance`], which writes `Event::VmState` only with what
//! [`Lifecycle::apply`] decided.
use ferry_model::protection::{Lifecycle, Operation, Protection, Transition, allowed_operations};

use crate::error::RegistryError;
use crate::service::RegistryService;
use crate::state::{Event, State, VmRecord};

impl VmRecord {
    /// What the allowed operations depend on.
    pub fn protection(&self) -> Protection {
        Protection {
            state: self.state,
            health: self.health,
            test_failover: self.failover_state,
            direction: self.site.direction,
            has_points: !self.last_point_id.is_empty(),
        }
    }

    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle::new(self.state, self.health, self.last_error.clone())
    }

    /// The operations the VM allows now, by name.
    pub fn allowed_operations(&self) -> Vec<String> {
        allowed_operations(&self.protection())
            .into_iter()
            .map(|o| o.as_str().to_string())
            .collect()
    }

    /// Refuses `op` with FAILED_PRECONDITION naming the state and what is allowed.
    pub fn check(&self, op: Operation) -> Result<(), RegistryError> {
        Ok(self.protection().check(&self.name, op)?)
    }
}

/// The event that moves `vm` through `t`, or the state machine's refusal.
pub(crate) fn transition_event(
    st: &State,
    vm: &str,
    t: &Transition,
) -> Result<Event, RegistryError> {
    let v = st
        .vms
        .get(vm)
        .ok_or_else(|| RegistryError::VmNotFound(vm.to_string()))?;
    vm_event(v, t)
}

/// [`transition_event`] for a record in hand.
pub(crate) fn vm_event(v: &VmRecord, t: &Transition) -> Result<Event, RegistryError> {
    let next = v.lifecycle().apply(&v.name, &v.protection(), t)?;
    Ok(Event::VmState {
        vm: v.name.clone(),
        state: next.state,
        health: next.health,
        last_error: next.last_error,
    })
}

impl RegistryService {
    /// Moves `vm` through `t` and persists the result.
    pub(crate) async fn advance(&self, vm: &str, t: Transition) -> Result<(), RegistryError> {
        let ev = transition_event(&*self.state.lock().await, vm, &t)?;
        self.persist(vec![ev]).await
    }
}
