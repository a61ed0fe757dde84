//! The gateway's own refusals in the vault's audit trail: a removed host's certificate, an
//! upload or fetch the host may not make, a chunk outside the point it may read. (Refusals
//! decided by ingest or storage-writer are also in the trail from their gRPC edge, made by
//! `service:gateway` for the host; these say what the host itself tried over QUIC.)
use std::sync::Arc;

use ferry_mesh::Identity;
use ferry_model::audit::{AuditRecord, AuditResult, AuditSink};

use crate::frame::ErrorCode;

/// Where the gateway records its refusals; none in unit tests that run without a vault.
#[derive(Clone, Default)]
pub(crate) struct QuicAudit(Option<Arc<dyn AuditSink>>);

/// One refusal: who, what they tried (`quic/connect`, `quic/upload`, `quic/fetch`), on which
/// target (`vm:web01`, `cycle_id:…`), and why.
pub(crate) struct Refusal<'a> {
    pub caller: &'a Identity,
    pub operation: &'static str,
    pub target: String,
    pub code: ErrorCode,
    pub message: String,
}

impl QuicAudit {
    pub(crate) fn new(sink: Arc<dyn AuditSink>) -> Self {
        Self(Some(sink))
    }

    /// Whether a stream that ended with `code` was refused for who the host is (as opposed to
    /// a malformed frame, a slow peer or a failing dependency, which are not audited).
    pub(crate) fn is_refusal(code: ErrorCode) -> bool {
        matches!(
            code,
            ErrorCode::Denied | ErrorCode::NotHost | ErrorCode::NotEntitled
        )
    }

    /// Records `r`; returns once it is durable (or the trail gave up, which it logs).
    pub(crate) async fn refused(&self, r: Refusal<'_>) {
        let Some(sink) = &self.0 else { return };
        let (caller, for_host) = match r.caller {
            Identity::Host(h) => (r.caller.to_string(), h.clone()),
            Identity::Service(_) => (r.caller.to_string(), String::new()),
        };
        sink.record(AuditRecord {
            time_ms: ferry_proto::now_ms(),
            component: "gateway".into(),
            caller,
            role: String::new(),
            operation: r.operation.into(),
            target: r.target,
            for_host,
            result: AuditResult::Refused,
            code: code_name(r.code).into(),
            message: r.message,
        })
        .await;
    }
}

/// The QUIC error code's name in the trail, in the style of gRPC's.
fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadFrame => "BAD_FRAME",
        ErrorCode::Checksum => "CHECKSUM",
        ErrorCode::Denied => "DENIED",
        ErrorCode::Unavailable => "UNAVAILABLE",
        ErrorCode::Internal => "INTERNAL",
        ErrorCode::NotHost => "NOT_HOST",
        ErrorCode::Timeout => "TIMEOUT",
        ErrorCode::NotEntitled => "NOT_ENTITLED",
    }
}
