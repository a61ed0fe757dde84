use ferry_mesh::{ErrorCode, ServiceError};

#[derive(thiserror::Error, Debug)]
pub enum RegistryError {
    #[error("vm {0} is not known to the vault (no registered host reports it)")]
    VmNotFound(String),
    #[error("host {0} is not registered in this vault")]
    HostNotFound(String),
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("registration key {0} is not valid for this vault")]
    BadKey(String),
    #[error("registration key {key_id} was already used by host {host}")]
    KeyReused { key_id: String, host: String },
    #[error("registration key {key_id} expired at {expired_at}")]
    KeyExpired { key_id: String, expired_at: String },
    #[error("host {0} was removed from the vault; register it again with a new key")]
    HostRemoved(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// The protection state machine does not allow it in the VM's state.
    #[error(transparent)]
    Refused(#[from] ferry_model::Refused),
    #[error("certificate authority: {0}")]
    Pki(String),
    #[error("catalog: {0}")]
    Store(#[from] ferry_store::StoreError),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError for RegistryError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::VmNotFound(_)
            | Self::HostNotFound(_)
            | Self::JobNotFound(_)
            | Self::NotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::BadKey(_) | Self::KeyExpired { .. } => ErrorCode::Unauthenticated,
            Self::KeyReused { .. } | Self::HostRemoved(_) => ErrorCode::PermissionDenied,
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::FailedPrecondition(_) | Self::Refused(_) => ErrorCode::FailedPrecondition,
            Self::Store(e) if e.is_transient() => ErrorCode::Unavailable,
            Self::Pki(_) | Self::Store(_) | Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<RegistryError> for tonic::Status {
    fn from(e: RegistryError) -> Self {
        ferry_mesh::to_status(&e)
    }
}
