//! The one error type of this crate.

/// Errors of the coordination layer. Messages are lowercase and name the resource involved.
#[derive(thiserror::Error, Debug)]
pub enum CoordError {
    /// Another holder has the lease.
    #[error("lease on {resource} is held by {holder}")]
    LeaseHeld { resource: String, holder: String },
    /// The lease expired, was released, or was taken over.
    #[error("lease on {resource} lost")]
    LeaseLost { resource: String },
    /// A token that is no longer current was presented.
    #[error("fenced on {resource}: token {presented} is stale, current is {current}")]
    Fenced {
        resource: String,
        presented: u64,
        current: u64,
    },
    /// The caller passed something this crate refuses (a name with braces, a zero ttl).
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    /// Redis answered something this crate did not write.
    #[error("unexpected value in redis for {what}: {reason}")]
    Protocol { what: String, reason: String },
    /// A blocking call got no answer in time (the connection is dropped).
    #[error("timed out waiting for redis on {what}")]
    Timeout { what: String },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Starting or reaching a child `redis-server` failed.
    #[error("redis-server: {0}")]
    Spawn(String),
}

impl CoordError {
    /// True when retrying later may succeed: connection problems, timeouts, a busy or
    /// loading server, and a lease held by someone else (it may expire). Lost or fenced leases
    /// are final for the holder: it must stop and start over with a new lease.
    pub fn is_transient(&self) -> bool {
        match self {
            CoordError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
            }
            CoordError::LeaseHeld { .. } | CoordError::Timeout { .. } => true,
            CoordError::LeaseLost { .. }
            | CoordError::Fenced { .. }
            | CoordError::Invalid { .. }
            | CoordError::Protocol { .. }
            | CoordError::Spawn(_) => false,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        CoordError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
