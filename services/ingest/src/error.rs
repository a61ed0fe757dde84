//! Ingest's one error type, mapped to `tonic::Status` in one place (`From<IngestError>`,
//! through `ferry_mesh::to_status`).
use ferry_coord::CoordError;
use ferry_mesh::{ErrorCode, ServiceError};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The cycle cannot go on (not open any more, a stale fencing token): the host begins a
    /// new one and ships the same data again, which storage mostly has already.
    #[error("{0}")]
    Aborted(String),
    #[error("disk {resource} is being replicated by host {holder}; its lease is held")]
    LeaseHeld { resource: String, holder: String },
    #[error("the lease on disk {resource} was lost; begin a new cycle")]
    LeaseLost { resource: String },
    #[error("lease store unavailable: {0}")]
    Coord(#[source] CoordError),
    /// A call to another component failed; its code and message are passed on.
    #[error("{message}")]
    Peer { code: ErrorCode, message: String },
    #[error("{0}")]
    Internal(String),
}

impl From<CoordError> for IngestError {
    fn from(e: CoordError) -> Self {
        match e {
            CoordError::LeaseHeld { resource, holder } => Self::LeaseHeld { resource, holder },
            CoordError::LeaseLost { resource } => Self::LeaseLost { resource },
            other => Self::Coord(other),
        }
    }
}

impl IngestError {
    /// A failed call to a peer (the storage-writer, the registry), keeping its status code.
    pub fn peer(s: &Status) -> Self {
        Self::Peer {
            code: ErrorCode::from_grpc(s.code()),
            message: s.message().to_owned(),
        }
    }
}

impl ServiceError for IngestError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::FailedPrecondition(_) | Self::LeaseHeld { .. } => ErrorCode::FailedPrecondition,
            Self::Aborted(_) | Self::LeaseLost { .. } => ErrorCode::Aborted,
            Self::Coord(_) => ErrorCode::Unavailable,
            Self::Peer { code, .. } => *code,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<IngestError> for Status {
    fn from(e: IngestError) -> Self {
        ferry_mesh::to_status(&e)
    }
}
