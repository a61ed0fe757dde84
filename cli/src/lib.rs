//! The `ferry` operator CLI and `ferry up`, the whole mesh in one process. The library half
//! is what the whole-mesh tests start.
pub mod ctl;
pub mod output;
pub mod status;
pub mod up;
pub mod verify;

pub use up::{Mesh, UpOptions};
