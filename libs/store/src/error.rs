//! The one error type of this crate.

/// Errors of the object layout. Messages are lowercase, name the object or entity involved and
/// never contain key material.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// The object or entity does not exist.
    #[error("not found: {what}")]
    NotFound { what: String },
    /// A concurrent writer got there first (stale sequence number, existing key).
    #[error("conflict: {what}")]
    Conflict { what: String },
    /// A writer presented a fencing token lower than the one already committed.
    #[error(
        "fenced: disk {disk_id} presented fencing token {presented}, latest point has {latest}"
    )]
    Fenced {
        disk_id: String,
        presented: u64,
        latest: u64,
    },
    /// Stored bytes failed validation (authentication, hash, format).
    #[error("corrupt {what}: {reason}")]
    Corrupt { what: String, reason: String },
    /// A sealed object names a vault key this keyring does not hold (rotated after the holder
    /// last fetched the keys): fetch them again. Not corruption.
    #[error(
        "{what} is sealed with vault key {key_id}, which this keyring does not hold (it holds keys up to {newest}); fetch the vault keys again"
    )]
    UnknownKey {
        what: String,
        key_id: u16,
        newest: u16,
    },
    /// The caller passed something this crate refuses (bad name, bad hex, bad url).
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// (De)serialising a manifest or catalog entry failed.
    #[error("encoding {what}: {source}")]
    Encoding {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// Local I/O (creating the store directory).
    #[error("io on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The backend failed.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
}

impl StoreError {
    /// True when retrying the same operation later may succeed (network, throttling, injected
    /// faults). Conflicts, fencing, corruption and bad input are permanent for that attempt.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::ObjectStore(e) => object_store_transient(e),
            // The keys are fetched again by their holder's next refresh.
            StoreError::UnknownKey { .. } => true,
            StoreError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::InvalidInput
            ),
            StoreError::NotFound { .. }
            | StoreError::Conflict { .. }
            | StoreError::Fenced { .. }
            | StoreError::Corrupt { .. }
            | StoreError::Invalid { .. }
            | StoreError::Encoding { .. } => false,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

fn object_store_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        // Backends report network, throttling and server errors (after their own retries) as
        // Generic; the unreliable wrapper injects its faults the same way.
        E::Generic { .. } | E::JoinError { .. } => true,
        _ => false,
    }
}
