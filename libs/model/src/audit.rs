//! The audit trail's one record type: who did what to which target, and how it ended. The
//! gRPC edge of every component makes them (ferry-mesh's audit layer); `ferry-store`
//! keeps them hash-chained in the catalog; the registry lists and verifies them.
use serde::{Deserialize, Serialize};

/// One audited call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the call ended (ms since the Unix epoch).
    pub time_ms: i64,
    /// The component that served the call (`registry`, `failover`, ...).
    pub component: String,
    /// `token:<name>`, `host:<name>`, `service:<name>` or `anonymous`.
    pub caller: String,
    /// The operator role of a token caller; empty for others.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    /// The RPC, `package.Service/Method`.
    pub operation: String,
    /// What the call named, `kind:name` (`vm:web01`, `plan:app`); empty when nothing.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    /// The host a service call was made for (the gateway asking for a host), if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub for_host: String,
    pub result: AuditResult,
    /// The gRPC status code name (`OK`, `PERMISSION_DENIED`, ...).
    pub code: String,
    /// The status message of a call that did not succeed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// How an audited call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditResult {
    Ok,
    /// Refused for who the caller is: no or bad credentials, too low a role, another host's VM.
    Refused,
    /// Let through, but failed.
    Failed,
}

impl AuditResult {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditResult::Ok => "ok",
            AuditResult::Refused => "refused",
            AuditResult::Failed => "failed",
        }
    }
}

impl std::fmt::Display for AuditResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where audit records go; kept by the component's authenticator. `record` returns once the
/// record is durable (or could not be made so, which the sink logs).
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    fn record(
        &self,
        record: AuditRecord,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
}
