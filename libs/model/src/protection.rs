//! The protection lifecycle of a VM (DESIGN §2 and §11) as one pure state machine: the states,
//! the health, the test-failover state and the replication direction; [`allowed_operations`]
//! says which operations each combination allows (the list ASR reports per protected item,
//! and `ferry vm show` prints); [`Lifecycle::apply`] is the only way from one lifecycle record
//! to the next. An operation or transition the current state does not allow is [`Refused`],
//! which names the VM, its state and what it allows now (FAILED_PRECONDITION at the edge).
//!
//! Strings on the wire and in the catalog are the kebab-case names below (`"resync-pending"`),
//! unchanged from the catalogs written before this module existed.

named_enum! {
    /// Where a VM is in its protection lifecycle.
    VmState {
        /// Reported by a host; nothing replicates.
        Unprotected => "unprotected",
        /// The enable-protection job checks prerequisites.
        Enabling => "enabling",
        /// The first full copy runs.
        InitialReplication => "initial-replication",
        /// Delta cycles run at the policy's frequency.
        Protected => "protected",
        /// Deltas cannot carry the VM (broken log chain, logs too large): waits for a resync.
        ResyncPending => "resync-pending",
        /// A checksum resync runs.
        Resyncing => "resyncing",
        /// A planned or unplanned failover job runs.
        FailingOver => "failing-over",
        /// The VM runs at the recovery host; commit pending (the point may still change).
        FailedOver => "failed-over",
        /// The failover is committed; nothing replicates until re-protect.
        FailoverCommitted => "failover-committed",
        /// Replication from the VM's new active host is being set up.
        Reprotecting => "reprotecting",
        /// A failback job (checksum phases or full copy) runs.
        FailingBack => "failing-back",
        /// Protection is being disabled.
        Unprotecting => "unprotecting",
        /// Protection could not be set up or kept; protect again or repair.
        Error => "error",
    }
}

named_enum! {
    /// How well a VM's replication goes.
    Health {
        Normal => "normal",
        /// Retrying, resync pending, or recovery points late.
        Warning => "warning",
        /// Stopped until an operator acts (`ferry vm repair` after fixing the cause).
        Critical => "critical",
    }
}

named_enum! {
    /// Whether a test failover's copy exists (its cleanup is then due before another).
    TestFailover {
        None => "none",
        Active => "active",
    }
}

named_enum! {
    /// Which way replication runs: from the primary site, or (after re-protect) from the
    /// recovery site back home.
    Direction {
        Forward => "forward",
        Reverse => "reverse",
    }
}

impl Default for Direction {
    /// Catalogs from before re-protect existed replicate forward.
    fn default() -> Self {
        Self::Forward
    }
}

named_enum! {
    /// What an operator (or a component on its behalf) asks of a VM.
    Operation {
        EnableProtection => "enable-protection",
        DisableProtection => "disable-protection",
        UpdatePolicy => "update-policy",
        TestFailover => "test-failover",
        CleanupTestFailover => "cleanup-test-failover",
        PlannedFailover => "planned-failover",
        UnplannedFailover => "unplanned-failover",
        ChangePoint => "change-point",
        Commit => "commit",
        Reprotect => "reprotect",
        Failback => "failback",
        /// Failback phase 2: shut the VM down where it runs, ship its last writes, start it
        /// on the target.
        CompleteFailback => "complete-failback",
        Resync => "resync",
        Repair => "repair",
    }
}

/// Everything the allowed operations depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protection {
    pub state: VmState,
    pub health: Health,
    pub test_failover: TestFailover,
    pub direction: Direction,
    /// Whether the VM has at least one recovery point.
    pub has_points: bool,
}

/// Which operations `p` allows, in [`Operation::ALL`] order.
pub fn allowed_operations(p: &Protection) -> Vec<Operation> {
    Operation::ALL
        .iter()
        .copied()
        .filter(|op| allows(p, *op))
        .collect()
}

/// The table: whether `p` allows `op`.
fn allows(p: &Protection, op: Operation) -> bool {
    use Operation as O;
    use VmState as S;
    let replicating = matches!(p.state, S::Protected | S::ResyncPending | S::Resyncing);
    match op {
        O::EnableProtection => matches!(p.state, S::Unprotected | S::Error),
        O::DisableProtection => {
            replicating
                || matches!(
                    p.state,
                    S::Enabling | S::InitialReplication | S::FailoverCommitted | S::Error
                )
        }
        O::UpdatePolicy => matches!(p.state, S::Protected | S::ResyncPending),
        // A test copy needs a point, and a VM not between sites; one copy at a time.
        O::TestFailover => {
            p.test_failover == TestFailover::None
                && p.has_points
                && (replicating || p.state == S::Unprotected)
        }
        O::CleanupTestFailover => p.test_failover == TestFailover::Active,
        // Planned: the source is healthy and shuts down, the last delta ships (zero loss).
        O::PlannedFailover => {
            p.state == S::Protected
                && p.direction == Direction::Forward
                && p.health != Health::Critical
        }
        O::Failback => {
            p.state == S::Protected
                && p.direction == Direction::Reverse
                && p.health != Health::Critical
        }
        // Unplanned: the site may be gone; any point there is.
        O::UnplannedFailover => replicating && p.has_points,
        O::ChangePoint | O::Commit => p.state == S::FailedOver,
        O::Reprotect => p.state == S::FailoverCommitted,
        O::CompleteFailback => p.state == S::FailingBack,
        O::Resync => replicating,
        O::Repair => matches!(
            p.state,
            S::InitialReplication | S::Protected | S::ResyncPending | S::Resyncing | S::Error
        ),
    }
}

impl Protection {
    /// Passes when the state allows `op`; otherwise the refusal naming what it allows.
    pub fn check(&self, vm: &str, op: Operation) -> Result<(), Refused> {
        if allows(self, op) {
            return Ok(());
        }
        Err(Refused {
            vm: vm.to_string(),
            asked: op.as_str().to_string(),
            state: self.state,
            health: self.health,
            allowed: allowed_operations(self),
        })
    }
}

/// An operation or transition the VM's state does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "vm {vm} is {state} (health {health}): {asked} is not allowed now; allowed: {}",
    allowed_list(allowed)
)]
pub struct Refused {
    pub vm: String,
    pub asked: String,
    pub state: VmState,
    pub health: Health,
    pub allowed: Vec<Operation>,
}

fn allowed_list(ops: &[Operation]) -> String {
    if ops.is_empty() {
        return "nothing until the running job ends".to_string();
    }
    ops.iter()
        .map(|o| o.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The part of a VM record the lifecycle owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    pub state: VmState,
    pub health: Health,
    pub last_error: String,
}

/// What happens to a VM. Each is an operation starting, a job step ending, or a report from
/// the data path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Enable protection starts (prerequisites next).
    ProtectionStarted,
    /// Enable protection failed at a step: back to unprotected, critical with the reason.
    ProtectionFailed { error: String },
    /// An operator cancelled enable protection before it was finalized: unprotected again,
    /// nothing failed (the chunks already shipped are kept for the next try).
    ProtectionCancelled,
    /// The replication relationship exists; the initial copy starts.
    InitialReplicationStarted,
    /// The initial copy is committed and protection finalized.
    ProtectionFinalized,
    /// A resync starts (by an operator, or the scheduler in the resync window).
    ResyncStarted,
    /// An operator cancelled a resync before its point was committed: the VM still needs
    /// one (its replica is consistent at the last point; deltas wait for the resync).
    ResyncCancelled,
    /// A resync's point is committed: protected again.
    ResyncCommitted,
    /// A delta point is committed: a warning from earlier failures is over.
    PointCommitted,
    /// A cycle failed recoverably: retried with backoff.
    RecoverableError { error: String },
    /// A cycle failed for good: stopped until an operator repairs.
    PermanentError { error: String },
    /// The logs cannot carry the VM: deltas stop until a resync.
    ResyncRequired { error: String },
    /// The VM's host was removed from the vault.
    HostRemoved { error: String },
    /// An operator fixed the cause and repaired the VM.
    Repaired,
    /// A planned or unplanned failover starts: the primary's replication stops (fenced).
    FailoverStarted { planned: bool },
    /// The VM runs at its recovery host: commit pending.
    FailedOver,
    /// The failover job failed before the VM ran at the recovery host: protected again, but
    /// critical until an operator repairs (the primary was fenced).
    FailoverFailed { error: String },
    /// The recovered VM now runs on another point (before commit).
    PointChanged,
    /// The failover is committed.
    FailoverCommitted,
    /// Re-protect: the host the VM runs on is its replication source now (the direction
    /// flips; the registry keeps which way).
    Reprotected,
    /// Failback phase 1 starts: the target's disks are brought near the latest point while
    /// the VM keeps running (and replicating) where it is.
    FailbackStarted,
    /// Failback phase 1 failed: nothing moved, the VM is protected as before (a warning with
    /// the reason).
    FailbackFailed { error: String },
    /// Failback phase 2: the VM was shut down and its last writes shipped; its host is
    /// fenced and the VM comes up on the target (then failed over, commit pending).
    FailbackCutover,
    /// Disable protection starts: replication stops.
    UnprotectStarted,
    /// Disable protection ended: nothing replicates, health normal.
    Unprotected,
    /// Disable protection failed at a step (the host could not be reached): the VM is in
    /// error, critical with the reason; disabling again (`--force`) or protecting is allowed.
    UnprotectFailed { error: String },
}

impl Transition {
    fn name(&self) -> &'static str {
        match self {
            Self::ProtectionStarted => "enable-protection",
            Self::ProtectionFailed { .. } => "protection-failed",
            Self::ProtectionCancelled => "protection-cancelled",
            Self::InitialReplicationStarted => "initial-replication",
            Self::ProtectionFinalized => "finalize-protection",
            Self::ResyncStarted => "resync",
            Self::ResyncCancelled => "resync-cancelled",
            Self::ResyncCommitted => "resync-committed",
            Self::PointCommitted => "point-committed",
            Self::RecoverableError { .. } => "recoverable-error",
            Self::PermanentError { .. } => "permanent-error",
            Self::ResyncRequired { .. } => "resync-required",
            Self::HostRemoved { .. } => "host-removed",
            Self::Repaired => "repair",
            Self::FailoverStarted { planned: true } => "planned-failover",
            Self::FailoverStarted { planned: false } => "unplanned-failover",
            Self::FailedOver => "failed-over",
            Self::FailoverFailed { .. } => "failover-failed",
            Self::PointChanged => "change-point",
            Self::FailoverCommitted => "commit",
            Self::Reprotected => "reprotect",
            Self::FailbackStarted => "failback",
            Self::FailbackFailed { .. } => "failback-failed",
            Self::FailbackCutover => "complete-failback",
            Self::UnprotectStarted => "disable-protection",
            Self::Unprotected => "unprotected",
            Self::UnprotectFailed { .. } => "disable-protection-failed",
        }
    }
}

impl Lifecycle {
    pub fn new(state: VmState, health: Health, last_error: impl Into<String>) -> Self {
        Self {
            state,
            health,
            last_error: last_error.into(),
        }
    }

    /// The lifecycle after `t`, or the refusal when the state does not allow it. `context`
    /// gives the parts of the record the table reads (test failover, direction, points).
    pub fn apply(&self, vm: &str, context: &Protection, t: &Transition) -> Result<Self, Refused> {
        use Transition as T;
        use VmState as S;
        let me = Protection {
            state: self.state,
            health: self.health,
            ..*context
        };
        let op_check = |op| me.check(vm, op);
        let refuse = || Refused {
            vm: vm.to_string(),
            asked: t.name().to_string(),
            state: self.state,
            health: self.health,
            allowed: allowed_operations(&me),
        };
        let stay = |health, error: &str| Self::new(self.state, health, error);
        Ok(match t {
            T::ProtectionStarted => {
                op_check(Operation::EnableProtection)?;
                Self::new(S::Enabling, Health::Normal, "")
            }
            // Protected too: a job resumed after a restart may fail after its finalize landed.
            T::ProtectionFailed { error } => match self.state {
                S::Enabling | S::InitialReplication | S::Protected | S::Error => {
                    Self::new(S::Unprotected, Health::Critical, error.as_str())
                }
                _ => return Err(refuse()),
            },
            T::ProtectionCancelled => match self.state {
                S::Enabling | S::InitialReplication => {
                    Self::new(S::Unprotected, Health::Normal, "")
                }
                _ => return Err(refuse()),
            },
            T::InitialReplicationStarted => match self.state {
                S::Enabling | S::InitialReplication => {
                    Self::new(S::InitialReplication, Health::Normal, "")
                }
                _ => return Err(refuse()),
            },
            T::ProtectionFinalized => match self.state {
                S::InitialReplication | S::Protected => Self::new(S::Protected, Health::Normal, ""),
                _ => return Err(refuse()),
            },
            T::ResyncStarted => {
                op_check(Operation::Resync)?;
                Self::new(S::Resyncing, Health::Warning, "")
            }
            T::ResyncCancelled => match self.state {
                S::Resyncing => Self::new(
                    S::ResyncPending,
                    Health::Warning,
                    "the resync was cancelled by an operator; the vm needs one before its deltas resume",
                ),
                _ => return Err(refuse()),
            },
            T::ResyncCommitted => match self.state {
                S::Resyncing | S::ResyncPending | S::Protected => {
                    Self::new(S::Protected, Health::Normal, "")
                }
                _ => return Err(refuse()),
            },
            // Only a warning clears: critical waits for a repair, and other states keep theirs.
            T::PointCommitted if self.state == S::Protected && self.health == Health::Warning => {
                stay(Health::Normal, "")
            }
            T::PointCommitted => self.clone(),
            T::ResyncRequired { error } if matches!(self.state, S::Protected | S::Resyncing) => {
                Self::new(S::ResyncPending, Health::Warning, error.as_str())
            }
            T::RecoverableError { error } => stay(Health::Warning, error),
            // A resync-required failure elsewhere (the initial copy) stops like a permanent one.
            T::PermanentError { error } | T::ResyncRequired { error } => {
                stay(Health::Critical, error)
            }
            T::HostRemoved { error } => {
                if self.state == S::Unprotected {
                    return Err(refuse());
                }
                stay(Health::Critical, error)
            }
            T::Repaired => {
                op_check(Operation::Repair)?;
                stay(Health::Normal, "")
            }
            T::FailoverStarted { planned } => {
                op_check(match planned {
                    true => Operation::PlannedFailover,
                    false => Operation::UnplannedFailover,
                })?;
                Self::new(S::FailingOver, Health::Normal, "")
            }
            T::FailedOver if self.state == S::FailingOver => {
                Self::new(S::FailedOver, Health::Normal, "")
            }
            T::FailoverFailed { error } if self.state == S::FailingOver => {
                Self::new(S::Protected, Health::Critical, error.as_str())
            }
            T::PointChanged => {
                op_check(Operation::ChangePoint)?;
                self.clone()
            }
            T::FailoverCommitted => {
                op_check(Operation::Commit)?;
                Self::new(S::FailoverCommitted, Health::Normal, "")
            }
            T::Reprotected => {
                op_check(Operation::Reprotect)?;
                Self::new(S::Protected, Health::Normal, "")
            }
            T::FailbackStarted => {
                op_check(Operation::Failback)?;
                Self::new(S::FailingBack, Health::Normal, "")
            }
            T::FailbackFailed { error } if self.state == S::FailingBack => {
                Self::new(S::Protected, Health::Warning, error.as_str())
            }
            T::FailbackCutover => {
                op_check(Operation::CompleteFailback)?;
                Self::new(S::FailingOver, Health::Normal, "")
            }
            T::UnprotectStarted => {
                op_check(Operation::DisableProtection)?;
                Self::new(S::Unprotecting, Health::Normal, "")
            }
            T::Unprotected if self.state == S::Unprotecting => {
                Self::new(S::Unprotected, Health::Normal, "")
            }
            T::UnprotectFailed { error } if self.state == S::Unprotecting => {
                Self::new(S::Error, Health::Critical, error.as_str())
            }
            T::FailedOver
            | T::FailoverFailed { .. }
            | T::FailbackFailed { .. }
            | T::Unprotected
            | T::UnprotectFailed { .. } => return Err(refuse()),
        })
    }
}

#[cfg(test)]
mod tests;
