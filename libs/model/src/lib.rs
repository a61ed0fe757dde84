//! Ferry's domain model, shared by every component: the protection lifecycle of a VM (its
//! states, health, and which operations each state allows) as one pure state machine, and
//! the data path's cycle kinds, consistency and error classes. Components convert wire
//! values into these types once, at their edge ([`wire`]).
#[macro_use]
mod names;
pub mod audit;
pub mod disk;
pub mod drill;
pub mod job;
pub mod plan;
pub mod policy;
pub mod protection;
pub mod replication;
pub mod retry;
pub mod wire;

pub use audit::{AuditRecord, AuditResult, AuditSink};
pub use disk::{DiskSpec, VmHardware};
pub use names::UnknownName;
pub use protection::{
    Direction, Health, Lifecycle, Operation, Protection, Refused, TestFailover, Transition, VmState,
};
pub use replication::{Consistency, CycleKind, ErrorClass};
pub use retry::Backoff;
pub use wire::UnknownValue;
