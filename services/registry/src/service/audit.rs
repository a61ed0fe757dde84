//! The audit trail's read side (`ferry audit`): listing with filters, and the chain check.
//! Records are written by every component's audit layer (ferry-mesh), not here.
use ferry_mesh::Role;
use ferry_model::AuditRecord;
use ferry_proto::registry::v1 as pb;
use tonic::{Request, Response};

use super::{R, RegistryService};
use crate::error::RegistryError;

/// Records listed when the request sets no limit, and the most it may ask for.
const DEFAULT_LIMIT: u32 = 1000;
const MAX_LIMIT: u32 = 100_000;

impl RegistryService {
    pub(super) async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> R<pb::ListAuditResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let req = req.into_inner();
        let limit = match req.limit {
            0 => DEFAULT_LIMIT,
            l if l <= MAX_LIMIT => l,
            l => {
                return Err(RegistryError::InvalidArgument(format!(
                    "limit {l} is out of range: 1 to {MAX_LIMIT} (0 = {DEFAULT_LIMIT})"
                ))
                .into());
            }
        } as usize;
        let mut records: Vec<AuditRecord> = self
            .audit
            .records()
            .await
            .map_err(RegistryError::from)?
            .into_iter()
            .filter(|r| r.time_ms >= req.since_ms)
            .filter(|r| caller_matches(&r.caller, &req.caller))
            .collect();
        let truncated = records.len() > limit;
        if truncated {
            records.drain(..records.len() - limit);
        }
        Ok(Response::new(pb::ListAuditResponse {
            records: records.into_iter().map(to_proto).collect(),
            truncated,
        }))
    }

    pub(super) async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> R<pb::VerifyAuditResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let v = self.audit.verify().await.map_err(RegistryError::from)?;
        if !v.problems.is_empty() {
            tracing::warn!(problems = v.problems.len(), first = %v.problems[0], "the audit trail does not verify");
        }
        Ok(Response::new(pb::VerifyAuditResponse {
            entries: v.entries,
            records: v.records,
            problems: v.problems,
        }))
    }
}

/// `token:alice` matches `token:alice` and `alice`; an empty filter matches everyone.
fn caller_matches(caller: &str, filter: &str) -> bool {
    filter.is_empty()
        || caller == filter
        || caller
            .split_once(':')
            .is_some_and(|(_, name)| name == filter)
}

fn to_proto(r: AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        time_ms: r.time_ms,
        component: r.component,
        caller: r.caller,
        role: r.role,
        operation: r.operation,
        target: r.target,
        for_host: r.for_host,
        result: r.result.as_str().to_owned(),
        code: r.code,
        message: r.message,
    }
}

#[cfg(test)]
mod tests {
    use super::caller_matches;

    #[test]
    fn callers_match_by_full_or_bare_name() {
        assert!(caller_matches("token:alice", ""));
        assert!(caller_matches("token:alice", "alice"));
        assert!(caller_matches("token:alice", "token:alice"));
        assert!(caller_matches("host:hv01", "hv01"));
        assert!(!caller_matches("token:alice", "ali"));
        assert!(!caller_matches("token:alice", "host:alice"));
    }
}
