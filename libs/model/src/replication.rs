//! What the data path says about a cycle and its point: the kind of cycle, whether the point
//! is crash- or app-consistent, and how a failure goes on.
named_enum! {
    /// What a replication cycle (and the point it commits) is.
    CycleKind {
        /// The first full copy.
        Initial => "initial",
        /// The changes since the last point, from the change logs.
        Delta => "delta",
        /// A checksum pass over the whole disk that ships only what differs.
        Resync => "resync",
    }
}

named_enum! {
    /// Whether a recovery point is crash-consistent, or application-consistent (the host's
    /// quiesce hooks ran around the cut).
    Consistency {
        Crash => "crash",
        App => "app",
    }
}

named_enum! {
    /// How a failed piece of work goes on.
    ErrorClass {
        /// Retried with backoff (network, a component restarting, a lease lost).
        Recoverable => "recoverable",
        /// Stopped until an operator fixes the cause and repairs the VM.
        Permanent => "permanent",
        /// The change logs cannot carry the VM: it waits for a checksum resync.
        ResyncRequired => "resync-required",
    }
}
