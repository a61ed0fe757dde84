//! The audit layer: the one place where calls become audit records. It wraps each Ferry
//! service of a component (see [`crate::serve_component`]), authenticates the caller (so it
//! also replaces the [`crate::AuthInterceptor`] there), lets the call run, and records into the
//! authenticator's [`AuditSink`]
//!
//! - every call that changes something (not a read, not routine replication traffic), with
//!   its result, and
//! - every refusal (UNAUTHENTICATED, PERMISSION_DENIED), of any call, reads included.
//!
//! The target is read from the request message itself: the first of a few well-known string
//! fields (`vm`, `plan`, `name`, ...), found by field number from the proto descriptors, so no
//! handler has to say it and no other field (a secret, a key) is ever copied.
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use ferry_model::{AuditRecord, AuditResult};
use http_body_util::{BodyExt as _, Full, Limited};
use prost::Message as _;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::{Code, Status};

use crate::{Authenticator, Caller};

/// The largest request body let through: the largest message any Ferry service decodes
/// (ingest's and storage-writer's 64 MiB) and its 5-byte frame header. Tonic would refuse a
/// larger one; here it is refused before it is buffered whole.
const MAX_BODY: usize = (64 << 20) + 5;
/// How much of a refused caller's request is read, for its target: refusing must not cost
/// the server a large buffer.
const MAX_REFUSED_BODY: usize = 64 << 10;

/// Calls that read only: never recorded unless refused.
const READS: &[&str] = &["BlockHashes", "PointChunks", "WorkStream"];
const READ_PREFIXES: &[&str] = &["List", "Get", "Has", "Watch"];
/// Replication's own traffic, thousands an hour per VM: its history is the VMs' points and
/// jobs; only its refusals are recorded.
const ROUTINE: &[&str] = &[
    "Heartbeat",
    "ReportCommitted",
    "ReportProgress",
    "UpsertJob",
    "CompleteWork",
    "Dispatch",
    "Reschedule",
    "WorkResult",
    "JoinCut",
    "BeginCycle",
    "RenewCycle",
    "CommitCycle",
    "ReportLanded",
    "AuthorizeUpload",
    "CommitPoint",
];
/// Request fields that name a call's target, in order of preference.
const TARGET_FIELDS: &[&str] = &[
    "vm",
    "plan",
    "name",
    "job_id",
    "cycle_id",
    "failover_id",
    "id",
    "host",
    "point",
];
/// Request fields that name the host a service call is made for.
const HOST_FIELDS: &[&str] = &["host_name"];

/// Whether a call of `method` (the method name alone) is recorded when it ends with `code`.
pub fn audited(method: &str, code: Code) -> bool {
    if matches!(code, Code::Unauthenticated | Code::PermissionDenied) {
        return true;
    }
    let read = READS.contains(&method) || READ_PREFIXES.iter().any(|p| method.starts_with(p));
    !read && !ROUTINE.contains(&method)
}

/// A Ferry service with authentication and auditing in front (see the module doc).
#[derive(Clone)]
pub struct Audited<S> {
    inner: S,
    auth: Authenticator,
    component: Arc<str>,
}

impl<S> Audited<S> {
    pub fn new(inner: S, auth: Authenticator, component: &str) -> Self {
        Self {
            inner,
            auth,
            component: component.to_ascii_lowercase().into(),
        }
    }
}

impl<S> tonic::server::NamedService for Audited<S>
where
    S: tonic::server::NamedService,
{
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> Service<http::Request<Body>> for Audited<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        let component = self.component.clone();
        Box::pin(serve_audited(inner, auth, component, req))
    }
}

async fn serve_audited<S>(
    mut inner: S,
    auth: Authenticator,
    component: Arc<str>,
    req: http::Request<Body>,
) -> Result<http::Response<Body>, Infallible>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    let path = req.uri().path().to_owned();
    let (mut parts, body) = req.into_parts();
    let caller = {
        let mut probe = http::Request::new(());
        *probe.headers_mut() = parts.headers.clone();
        *probe.extensions_mut() = parts.extensions.clone();
        auth.authenticate(&tonic::Request::from_http(probe))
    };
    let Some(sink) = auth.audit_sink().cloned() else {
        return match caller {
            Ok(caller) => {
                parts.extensions.insert(caller);
                inner.call(http::Request::from_parts(parts, body)).await
            }
            Err(status) => Ok(status.into_http()),
        };
    };
    // Buffer the request message so its target can be read: every Ferry RPC takes one
    // message (no client streams), which tonic buffers whole anyway.
    let limit = if caller.is_ok() {
        MAX_BODY
    } else {
        MAX_REFUSED_BODY
    };
    let read = Limited::new(body, limit).collect().await;
    let (message, unreadable) = match read {
        Ok(collected) => (collected.to_bytes(), None),
        Err(e) => {
            tracing::debug!(method = %path, error = %e, "request body could not be read");
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let status = if too_large {
                Status::resource_exhausted(format!(
                    "the request is larger than {} bytes, the most a ferry service accepts",
                    MAX_BODY - 5
                ))
            } else {
                Status::cancelled(format!("the request body could not be read: {e}"))
            };
            (Bytes::new(), Some(status))
        }
    };
    let fields = RequestFields::read(&path, &message);
    let (caller, response) = match (caller, unreadable) {
        (Ok(caller), Some(status)) => (caller, status.into_http()),
        (Ok(caller), None) => {
            parts.extensions.insert(caller.clone());
            let req = http::Request::from_parts(parts, Body::new(Full::new(message)));
            (caller, inner.call(req).await?)
        }
        (Err(status), _) => (Caller::Anonymous, status.into_http()),
    };
    // Unary and server-streaming handlers that fail do so before any message: the status is
    // in the headers (trailers-only). Success carries its status in the trailers, so a
    // response without a grpc-status header counts as OK.
    let status = Status::from_header_map(response.headers());
    let code = status.as_ref().map_or(Code::Ok, Status::code);
    let method = path.rsplit('/').next().unwrap_or_default();
    if audited(method, code) {
        let record = record(&component, &caller, &path, fields, status.as_ref());
        sink.record(record).await;
    }
    Ok(response)
}

fn record(
    component: &str,
    caller: &Caller,
    path: &str,
    fields: RequestFields,
    status: Option<&Status>,
) -> AuditRecord {
    let code = status.map_or(Code::Ok, Status::code);
    let result = match code {
        Code::Ok => AuditResult::Ok,
        Code::Unauthenticated | Code::PermissionDenied => AuditResult::Refused,
        _ => AuditResult::Failed,
    };
    let (caller_name, role) = match caller {
        Caller::Operator { role, token } => (format!("token:{token}"), role.as_str().to_owned()),
        other => (other.to_string(), String::new()),
    };
    AuditRecord {
        time_ms: ferry_proto::now_ms(),
        component: component.to_owned(),
        caller: caller_name,
        role,
        operation: path.trim_start_matches('/').to_owned(),
        target: fields.target,
        for_host: fields.for_host,
        result,
        code: code_name(code).to_owned(),
        message: status.map(|s| s.message().to_owned()).unwrap_or_default(),
    }
}

/// The target fields a request message carries.
#[derive(Debug, Default, PartialEq, Eq)]
struct RequestFields {
    target: String,
    for_host: String,
}

impl RequestFields {
    /// Reads them from a gRPC-framed request message (5-byte prefix, then protobuf).
    fn read(path: &str, framed: &[u8]) -> Self {
        let Some(fields) = METHOD_FIELDS.get(path) else {
            return Self::default();
        };
        // Compressed messages (flag 1) are not read: Ferry's clients never compress requests.
        let Some(message) = framed.get(5..).filter(|_| framed.first() == Some(&0)) else {
            return Self::default();
        };
        let values = string_fields(message);
        let value = |name: &str| {
            fields
                .iter()
                .find(|(_, n)| n == name)
                .and_then(|(no, _)| values.get(no))
                .filter(|v| !v.is_empty())
        };
        let target = TARGET_FIELDS
            .iter()
            .find_map(|name| value(name).map(|v| format!("{name}:{v}")))
            .unwrap_or_default();
        let for_host = HOST_FIELDS
            .iter()
            .find_map(|name| value(name).cloned())
            .unwrap_or_default();
        Self { target, for_host }
    }
}

/// Per method path, the request message's string fields that name targets (number, name).
static METHOD_FIELDS: LazyLock<HashMap<String, Vec<(u32, String)>>> = LazyLock::new(|| {
    let set = match prost_types::FileDescriptorSet::decode(ferry_proto::FILE_DESCRIPTOR_SET) {
        Ok(set) => set,
        Err(e) => {
            tracing::error!(error = %e, "the proto descriptors do not decode: audit records carry no targets");
            return HashMap::new();
        }
    };
    let mut messages = HashMap::new();
    for file in &set.file {
        for m in &file.message_type {
            let wanted: Vec<(u32, String)> = m
                .field
                .iter()
                .filter(|f| f.r#type() == prost_types::field_descriptor_proto::Type::String)
                .filter(|f| TARGET_FIELDS.contains(&f.name()) || HOST_FIELDS.contains(&f.name()))
                .map(|f| (f.number() as u32, f.name().to_owned()))
                .collect();
            messages.insert(format!(".{}.{}", file.package(), m.name()), wanted);
        }
    }
    let mut methods = HashMap::new();
    for file in &set.file {
        for svc in &file.service {
            for m in &svc.method {
                let path = format!("/{}.{}/{}", file.package(), svc.name(), m.name());
                let fields = messages.get(m.input_type()).cloned().unwrap_or_default();
                methods.insert(path, fields);
            }
        }
    }
    methods
});

/// The top-level length-delimited fields of a protobuf message that are UTF-8, by number
/// (the last occurrence wins, as in protobuf). Stops quietly at malformed input.
fn string_fields(mut buf: &[u8]) -> HashMap<u32, String> {
    let mut out = HashMap::new();
    while !buf.is_empty() {
        let Some(key) = varint(&mut buf) else { break };
        let (number, wire) = ((key >> 3) as u32, key & 7);
        let skip = match wire {
            0 => match varint(&mut buf) {
                Some(_) => 0,
                None => break,
            },
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(&mut buf).and_then(|l| usize::try_from(l).ok()) else {
                    break;
                };
                let Some(bytes) = buf.get(..len) else { break };
                if let Ok(s) = std::str::from_utf8(bytes) {
                    out.insert(number, s.to_owned());
                }
                len
            }
            _ => break,
        };
        let Some(rest) = buf.get(skip..) else { break };
        buf = rest;
    }
    out
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in buf.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

/// The canonical gRPC name of a status code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(msg: &impl prost::Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn targets_come_from_the_request_message() {
        let req = ferry_proto::failover::v1::TestFailoverRequest {
            vm: "web01".into(),
            target_dir: "/x".into(),
            ..Default::default()
        };
        let f = RequestFields::read("/ferry.failover.v1.Failover/TestFailover", &framed(&req));
        assert_eq!(f.target, "vm:web01");
        let req = ferry_proto::storage::v1::PointChunksRequest {
            vm: "app01".into(),
            point: "p1".into(),
            host_name: "hvb".into(),
        };
        let f = RequestFields::read("/ferry.storage.v1.StorageWriter/PointChunks", &framed(&req));
        assert_eq!(
            (f.target.as_str(), f.for_host.as_str()),
            ("vm:app01", "hvb")
        );
        // Unknown methods, compressed or malformed messages: no target, no panic.
        assert_eq!(
            RequestFields::read("/x.Y/Z", &framed(&req)),
            RequestFields::default()
        );
        let mut compressed = framed(&req);
        compressed[0] = 1;
        let path = "/ferry.storage.v1.StorageWriter/PointChunks";
        assert_eq!(
            RequestFields::read(path, &compressed),
            RequestFields::default()
        );
        for cut in 0..framed(&req).len() {
            let _ = RequestFields::read(path, &framed(&req)[..cut]);
        }
        let _ = RequestFields::read(path, &[0, 0, 0, 0, 9, 0xff, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn reads_and_routine_calls_are_audited_only_when_refused() {
        assert!(audited("TestFailover", Code::Ok));
        assert!(audited("CreateToken", Code::InvalidArgument));
        assert!(!audited("ListVms", Code::Ok));
        assert!(!audited("BlockHashes", Code::NotFound));
        assert!(audited("BlockHashes", Code::PermissionDenied));
        assert!(!audited("Heartbeat", Code::Ok));
        assert!(audited("BeginCycle", Code::PermissionDenied));
        assert!(audited("GetVm", Code::Unauthenticated));
    }
}
