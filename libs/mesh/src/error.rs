//! One small error-code enum mapped to [`tonic::Code`] (Quickwit style), so every service maps
//! its domain errors to gRPC statuses the same way, and the crate's own error types.

use std::fmt;

use tonic::{Code, Status};

use crate::config::ConfigError;
use crate::pki::PkiError;

/// What kind of failure an error is, as far as a caller is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    ResourceExhausted,
    Aborted,
    Cancelled,
    Unimplemented,
    Internal,
}

impl ErrorCode {
    /// The gRPC status code for this error code.
    pub fn grpc_code(self) -> Code {
        match self {
            ErrorCode::InvalidArgument => Code::InvalidArgument,
            ErrorCode::NotFound => Code::NotFound,
            ErrorCode::AlreadyExists => Code::AlreadyExists,
            ErrorCode::FailedPrecondition => Code::FailedPrecondition,
            ErrorCode::PermissionDenied => Code::PermissionDenied,
            ErrorCode::Unauthenticated => Code::Unauthenticated,
            ErrorCode::Unavailable => Code::Unavailable,
            ErrorCode::ResourceExhausted => Code::ResourceExhausted,
            ErrorCode::Aborted => Code::Aborted,
            ErrorCode::Cancelled => Code::Cancelled,
            ErrorCode::Unimplemented => Code::Unimplemented,
            ErrorCode::Internal => Code::Internal,
        }
    }

    /// The error code for a gRPC status code received from a peer (unknown codes are internal).
    pub fn from_grpc(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorCode::InvalidArgument,
            Code::NotFound => ErrorCode::NotFound,
            Code::AlreadyExists => ErrorCode::AlreadyExists,
            Code::FailedPrecondition => ErrorCode::FailedPrecondition,
            Code::PermissionDenied => ErrorCode::PermissionDenied,
            Code::Unauthenticated => ErrorCode::Unauthenticated,
            Code::Unavailable | Code::DeadlineExceeded => ErrorCode::Unavailable,
            Code::ResourceExhausted => ErrorCode::ResourceExhausted,
            Code::Aborted => ErrorCode::Aborted,
            Code::Cancelled => ErrorCode::Cancelled,
            Code::Unimplemented => ErrorCode::Unimplemented,
            _ => ErrorCode::Internal,
        }
    }

    /// Whether retrying the same call later may succeed (network, load, lost races).
    /// Everything else needs a different request or an operator.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::ResourceExhausted | ErrorCode::Aborted
        )
    }
}

impl From<ErrorCode> for Code {
    fn from(code: ErrorCode) -> Self {
        code.grpc_code()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ErrorCode::InvalidArgument => "invalid argument",
            ErrorCode::NotFound => "not found",
            ErrorCode::AlreadyExists => "already exists",
            ErrorCode::FailedPrecondition => "failed precondition",
            ErrorCode::PermissionDenied => "permission denied",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ResourceExhausted => "resource exhausted",
            ErrorCode::Aborted => "aborted",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Unimplemented => "unimplemented",
            ErrorCode::Internal => "internal",
        };
        f.write_str(text)
    }
}

/// An error a service can return over gRPC.
pub trait ServiceError: std::error::Error {
    fn code(&self) -> ErrorCode;
}

/// Converts a service error to a status whose message is the error text, starting lowercase.
///
/// Only the first letter is lowercased (and only when the next one is lowercase too), so
/// identifiers such as `VM` or hex ids in the message keep their case.
pub fn to_status<E: ServiceError + ?Sized>(e: &E) -> Status {
    Status::new(e.code().grpc_code(), lowercase_first(&e.to_string()))
}

/// The status for an RPC that exists in the API but has no implementation yet.
pub fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not implemented yet (tracked in the ferry issue tracker)"
    ))
}

/// An error and its sources, joined with ": ".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        // Some errors repeat their source's message; skip the repeat.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        (Some(first), Some(second)) if first.is_uppercase() && !second.is_uppercase() => {
            let mut out = String::with_capacity(text.len());
            out.extend(first.to_lowercase());
            out.push_str(&text[first.len_utf8()..]);
            out
        }
        _ => text.to_owned(),
    }
}

/// Errors of the server and client plumbing.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// `reason` is the whole cause chain: tonic's own message is just "transport error".
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("grpc server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    #[error("invalid bearer token: it must be visible ascii without spaces")]
    InvalidToken,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl ServiceError for MeshError {
    fn code(&self) -> ErrorCode {
        match self {
            MeshError::Config(e) => e.code(),
            MeshError::Pki(e) => e.code(),
            MeshError::InvalidEndpoint { .. } | MeshError::InvalidToken => {
                ErrorCode::InvalidArgument
            }
            MeshError::Connect { .. } => ErrorCode::Unavailable,
            MeshError::Serve(_) | MeshError::Reflection(_) | MeshError::Io(_) => {
                ErrorCode::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("Disk {0} not found")]
    struct DiskNotFound(&'static str);

    impl ServiceError for DiskNotFound {
        fn code(&self) -> ErrorCode {
            ErrorCode::NotFound
        }
    }

    #[test]
    fn status_is_lowercase_with_mapped_code() {
        let status = to_status(&DiskNotFound("d1"));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "disk d1 not found");
    }

    #[test]
    fn acronyms_keep_their_case() {
        assert_eq!(lowercase_first("VM x is gone"), "VM x is gone");
        assert_eq!(lowercase_first("É"), "É");
        assert_eq!(lowercase_first(""), "");
    }

    #[test]
    fn unimplemented_names_the_feature() {
        let status = unimplemented("planned failover");
        assert_eq!(status.code(), Code::Unimplemented);
        assert!(
            status
                .message()
                .starts_with("planned failover is not implemented yet")
        );
    }

    #[test]
    fn codes_round_trip() {
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::AlreadyExists,
            ErrorCode::FailedPrecondition,
            ErrorCode::PermissionDenied,
            ErrorCode::Unauthenticated,
            ErrorCode::Unavailable,
            ErrorCode::ResourceExhausted,
            ErrorCode::Aborted,
            ErrorCode::Cancelled,
            ErrorCode::Unimplemented,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_grpc(code.grpc_code()), code);
        }
    }
}
