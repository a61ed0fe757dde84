//! The scheduler's one error type, mapped to `tonic::Status` in one place
//! (`From<SchedulerError>`, through `ferry_mesh::to_status`).
use ferry_mesh::{ErrorCode, ServiceError};
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    /// Redis (the work queues and the retry set) failed or is out of reach.
    #[error("work queue unavailable: {0}")]
    Queue(#[from] ferry_coord::CoordError),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError for SchedulerError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::Queue(_) => ErrorCode::Unavailable,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<SchedulerError> for Status {
    fn from(e: SchedulerError) -> Self {
        if let SchedulerError::Queue(q) = &e {
            tracing::warn!(error = %q, "redis operation failed");
        }
        ferry_mesh::to_status(&e)
    }
}
