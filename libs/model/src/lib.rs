//! Ferry's domain model, shared by every component: the protection lifecycle of a VM (its
//! states, health, and which operations each state allows) as one pure state machine.
//! Components convert wire strings into these types once, at their edge.
pub mod policy;
pub mod protection;

pub use protection::{
    Direction, Health, Lifecycle, Operation, Protection, Refused, TestFailover, Transition, VmState,
};
