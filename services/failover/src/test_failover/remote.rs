//! The registry and storage-writer calls of a test failover.
use ferry_model::TestFailover;
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::registry::v1::{GetVmRequest, SetFailoverStateRequest, Vm};
use ferry_proto::storage::v1::GetPointRequest;

use crate::Orchestrator;
use crate::error::{FailoverError, Result};

impl Orchestrator {
    pub(super) async fn get_vm(&self, name: &str) -> Result<Vm> {
        let mut registry = self.registry.clone();
        registry
            .get_vm(GetVmRequest {
                name: name.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => FailoverError::NotFound(format!("vm {name}")),
                _ => FailoverError::remote("registry", "get vm", &s),
            })
    }

    pub(super) async fn get_point(&self, vm: &str, point: &str) -> Result<RecoveryPoint> {
        let mut storage = self.storage.clone();
        storage
            .get_point(GetPointRequest {
                vm: vm.to_owned(),
                point: point.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => {
                    FailoverError::NotFound(format!("recovery point {point:?} of vm {vm}"))
                }
                _ => FailoverError::remote("storage-writer", "get point", &s),
            })
    }

    pub(super) async fn set_failover_state(&self, vm: &str, state: TestFailover) -> Result<()> {
        let mut registry = self.registry.clone();
        registry
            .set_failover_state(SetFailoverStateRequest {
                vm: vm.to_owned(),
                failover_state: state.into(),
            })
            .await
            .map_err(|s| FailoverError::remote("registry", "set failover state", &s))?;
        Ok(())
    }
}
