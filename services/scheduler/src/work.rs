//! A work item as the queues in Redis hold it.
use ferry_proto::scheduler::v1::{FailoverWork, WorkItem, WorkKind};
use prost::Message as _;
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
    /// Failover work: its `FailoverWork`, protobuf-encoded in hex (the message is the
    /// contract with the agent; the scheduler only carries it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) failover: String,
    /// A cancel item: the id of the work to stop.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) cancels: String,
    /// A delta cycle of a replication group: the group cut it belongs to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub(crate) cut_id: String,
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
            failover: self.failover_work(),
            cancels: self.cancels.clone(),
            cut_id: self.cut_id.clone(),
        }
    }

    pub(crate) fn set_failover(&mut self, work: Option<&FailoverWork>) {
        self.failover = work
            .map(|w| hex::encode(w.encode_to_vec()))
            .unwrap_or_default();
    }

    fn failover_work(&self) -> Option<FailoverWork> {
        if self.failover.is_empty() {
            return None;
        }
        let bytes = hex::decode(&self.failover).ok()?;
        FailoverWork::decode(bytes.as_slice()).ok()
    }

    /// Failover work (and disable protection's host work) is not replication: its outcome is kept for the orchestrator that
    /// waits on it, and a failure neither retries nor touches the VM's replication health.
    pub(crate) fn is_failover(&self) -> bool {
        is_failover_kind(self.kind)
    }
}

pub(crate) fn is_failover_kind(kind: i32) -> bool {
    matches!(
        WorkKind::try_from(kind),
        Ok(WorkKind::RecoverVm
            | WorkKind::RemoveRecovered
            | WorkKind::ShutdownVm
            | WorkKind::DisableProtection
            | WorkKind::ResumeVm
            | WorkKind::Failback
            | WorkKind::RunScript
            | WorkKind::VerifyPoint)
    )
}

/// The work id prefix of a failover kind.
pub(crate) fn failover_prefix(kind: i32) -> &'static str {
    match WorkKind::try_from(kind) {
        Ok(WorkKind::RecoverVm) => "recover",
        Ok(WorkKind::RemoveRecovered) => "remove",
        Ok(WorkKind::ShutdownVm) => "shutdown",
        Ok(WorkKind::DisableProtection) => "unprotect",
        Ok(WorkKind::ResumeVm) => "resume",
        Ok(WorkKind::Failback) => "failback",
        Ok(WorkKind::RunScript) => "script",
        Ok(WorkKind::VerifyPoint) => "verify",
        _ => "work",
    }
}
