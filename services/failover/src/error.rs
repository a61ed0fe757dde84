//! The failover orchestrator's one error type; the gRPC layer maps it through
//! `ferry_mesh::to_status` only.
use ferry_mesh::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A call to another Ferry service failed; its code is kept.
    #[error("{service} {call}: {message}")]
    Remote {
        service: &'static str,
        call: &'static str,
        code: ErrorCode,
        message: String,
    },
    #[error("catalog: {0}")]
    Store(#[from] ferry_store::StoreError),
    /// The job lease (Redis) refused: lost, taken over, or Redis out of reach.
    #[error("job lease: {0}")]
    Lease(#[source] ferry_coord::CoordError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A host did not answer in time (a primary that may be gone).
    #[error("{0}")]
    Unavailable(String),
    /// The service is shutting down.
    #[error("cancelled: the failover service is shutting down")]
    Cancelled,
    /// An operator cancelled the job (`ferry jobs cancel`) before its point of no return.
    #[error("cancelled by an operator")]
    JobCancelled,
    #[error("internal: {0}")]
    Internal(String),
}

impl FailoverError {
    /// A failed call to `service`'s `call`, keeping the peer's status code.
    pub fn remote(service: &'static str, call: &'static str, status: &tonic::Status) -> Self {
        FailoverError::Remote {
            service,
            call,
            // This service's own credentials being refused is its problem, not the caller's.
            code: match ErrorCode::from_grpc(status.code()) {
                ErrorCode::Unauthenticated | ErrorCode::PermissionDenied => ErrorCode::Internal,
                code => code,
            },
            message: status.message().to_owned(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        FailoverError::Io {
            what: what.into(),
            source,
        }
    }
}

impl ServiceError for FailoverError {
    fn code(&self) -> ErrorCode {
        match self {
            FailoverError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            FailoverError::NotFound(_) => ErrorCode::NotFound,
            FailoverError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            FailoverError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            FailoverError::Remote { code, .. } => *code,
            FailoverError::Cancelled | FailoverError::JobCancelled => ErrorCode::Cancelled,
            FailoverError::Unavailable(_) => ErrorCode::Unavailable,
            FailoverError::Lease(e) if e.is_transient() => ErrorCode::Unavailable,
            FailoverError::Lease(_) => ErrorCode::Aborted,
            FailoverError::Store(e) if e.is_transient() => ErrorCode::Unavailable,
            FailoverError::Store(_) | FailoverError::Io { .. } | FailoverError::Internal(_) => {
                ErrorCode::Internal
            }
        }
    }
}

pub type Result<T, E = FailoverError> = std::result::Result<T, E>;
