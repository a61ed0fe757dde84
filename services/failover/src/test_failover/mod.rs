//! Test failover: an isolated copy of a VM's disks at a recovery point, plus a description
//! file, in a target directory; and its cleanup.
//!
//! [`start`] starts and resumes the jobs (the per-VM start lock, the job lease, the record),
//! [`run`] runs the steps of a test failover under the lease, [`plan`] decides the file of
//! each disk, [`materialize`] has the storage-writer write them, [`files`] handles partial
//! files, removal and the description, [`cleanup`] removes a test copy, and [`remote`] holds
//! the registry and storage-writer calls.
mod cleanup;
mod files;
mod materialize;
mod on_host;
mod plan;
mod remote;
mod run;
mod start;

pub(crate) use plan::check_vm_name;
pub use plan::disk_file_name;

pub const TEST_FAILOVER_STEPS: [&str; 3] = [
    "resolve recovery point",
    "materialise disks",
    "write vm description",
];
/// A test failover on the VM's recovery host.
pub const ON_HOST_TEST_STEPS: [&str; 3] = [
    "resolve recovery point",
    "materialise disks and start the vm on the recovery host",
    "record the test failover",
];
pub const CLEANUP_STEPS: [&str; 2] = ["remove test copy", "clear failover state"];
