//! The registry and storage-writer calls of a test failover.
use ferry_model::TestFailover;
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::registry::v1::{GetVmRequest, SetFailoverStateRequest, Vm};
use ferry_proto::storage::v1::{GetPointRequest, ListPointsRequest};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};

impl Orchestrator {
    pub(crate) async fn get_vm(&self, name: &str) -> Result<Vm> {
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

    /// A point by id, "latest" or "latest-app" (the newest app-consistent one).
    pub(crate) async fn get_point(&self, vm: &str, point: &str) -> Result<RecoveryPoint> {
        if point == "latest-app" {
            return self.latest_app_point(vm).await;
        }
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

    async fn latest_app_point(&self, vm: &str) -> Result<RecoveryPoint> {
        let mut storage = self.storage.clone();
        let points = storage
            .list_points(ListPointsRequest { vm: vm.to_owned() })
            .await
            .map_err(|s| FailoverError::remote("storage-writer", "list points", &s))?
            .into_inner()
            .points;
        points
            .into_iter()
            .filter(|p| p.consistency == i32::from(ferry_model::Consistency::App))
            .max_by_key(|p| p.seq)
            .ok_or_else(|| {
                FailoverError::NotFound(format!("an app-consistent recovery point of vm {vm}"))
            })
    }

    pub(crate) async fn set_failover_state(&self, vm: &str, state: TestFailover) -> Result<()> {
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
