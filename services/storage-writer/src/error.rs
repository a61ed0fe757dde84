//! The storage-writer's one error type. Handlers return it; the gRPC layer maps it to a
//! `tonic::Status` through `ferry_mesh::to_status` only.
use ferry_mesh::{ErrorCode, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    /// A disk's fencing token is not the current lease token: a stale cycle.
    #[error("disk {disk}: fencing token {token} is not current ({reason})")]
    Fenced {
        disk: String,
        token: u64,
        reason: String,
    },
    /// A commit would reference a chunk the store does not hold.
    #[error("disk {disk}: block {index} references chunk {chunk} which is not stored")]
    MissingChunk {
        disk: String,
        index: u64,
        chunk: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Another writer kept committing points in between our attempts.
    #[error("vm {0}: too many concurrent commits, retry later")]
    Contended(String),
    #[error("cancelled")]
    Cancelled,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("storage: {0}")]
    Store(#[from] ferry_store::StoreError),
    #[error("coordination: {0}")]
    Coord(#[from] ferry_coord::CoordError),
    #[error("disk image: {0}")]
    Disk(#[from] ferry_disk::DiskError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal: {0}")]
    Internal(String),
}

impl ServiceError for WriterError {
    fn code(&self) -> ErrorCode {
        match self {
            WriterError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            WriterError::NotFound(_) => ErrorCode::NotFound,
            WriterError::Fenced { .. }
            | WriterError::MissingChunk { .. }
            | WriterError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            WriterError::AlreadyExists(_) => ErrorCode::AlreadyExists,
            WriterError::Contended(_) => ErrorCode::Aborted,
            WriterError::Cancelled => ErrorCode::Cancelled,
            WriterError::Corrupt(_) => ErrorCode::Internal,
            WriterError::Store(e) => store_code(e),
            WriterError::Coord(e) => coord_code(e),
            WriterError::Disk(_) | WriterError::Io(_) | WriterError::Internal(_) => {
                ErrorCode::Internal
            }
        }
    }
}

/// How a store error looks to a caller of this service.
pub(crate) fn store_code(e: &ferry_store::StoreError) -> ErrorCode {
    use ferry_store::StoreError as S;
    match e {
        S::NotFound { .. } => ErrorCode::NotFound,
        S::Conflict { .. } => ErrorCode::Aborted,
        S::Fenced { .. } => ErrorCode::FailedPrecondition,
        S::Invalid { .. } => ErrorCode::InvalidArgument,
        e if e.is_transient() => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

/// How a coordination error looks to a caller of this service.
pub(crate) fn coord_code(e: &ferry_coord::CoordError) -> ErrorCode {
    use ferry_coord::CoordError as C;
    match e {
        C::Invalid { .. } => ErrorCode::InvalidArgument,
        C::Fenced { .. } | C::LeaseLost { .. } => ErrorCode::FailedPrecondition,
        e if e.is_transient() => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}

pub type Result<T, E = WriterError> = std::result::Result<T, E>;
