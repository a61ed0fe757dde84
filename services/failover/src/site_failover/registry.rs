//! The registry's record of a failover (`RecordFailover`): the state machine there decides
//! whether each step may happen; a refusal comes back as FAILED_PRECONDITION naming the state.
use ferry_proto::registry::v1::{FailoverEvent, RecordFailoverRequest, Vm};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::records::Record;

impl Orchestrator {
    pub(crate) async fn record_failover(
        &self,
        vm: &str,
        event: FailoverEvent,
        record: &Record,
        error: &str,
    ) -> Result<Vm> {
        let mut registry = self.registry.clone();
        registry
            .record_failover(RecordFailoverRequest {
                vm: vm.to_owned(),
                event: event as i32,
                failover_id: record.job_id.clone(),
                host: record.host.clone(),
                point: record.point_id.clone(),
                error: error.to_owned(),
                disks: Vec::new(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition => {
                    FailoverError::FailedPrecondition(s.message().to_owned())
                }
                _ => FailoverError::remote("registry", "record failover", &s),
            })
    }
}
