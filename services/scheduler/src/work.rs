//! A work item as the queues in Redis hold it.
use ferry_proto::scheduler::v1::WorkItem;
use serde::{Deserialize, Serialize};

/// The JSON form of a work item in Redis.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct QueuedWork {
    pub(crate) id: String,
    pub(crate) kind: i32,
    pub(crate) vm: String,
    pub(crate) job_id: String,
    pub(crate) attempt: u32,
    pub(crate) created_at_ms: i64,
    pub(crate) host: String,
    #[serde(default)]
    pub(crate) last_error: String,
    #[serde(default)]
    pub(crate) app_consistent: bool,
}

impl QueuedWork {
    pub(crate) fn to_proto(&self) -> WorkItem {
        WorkItem {
            id: self.id.clone(),
            kind: self.kind,
            vm: self.vm.clone(),
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            created_at_ms: self.created_at_ms,
            retry_time_unit_ms: 0,
            app_consistent: self.app_consistent,
        }
    }
}
