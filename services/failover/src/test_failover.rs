//! Test failover: an isolated copy of a VM's disks at a recovery point, plus a description
//! file, in a target directory; and its cleanup.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use ferry_proto::common::v1::{Job, RecoveryPoint};
use ferry_proto::failover::v1::{CleanupTestFailoverRequest, TestFailoverRequest};
use ferry_proto::registry::v1::{GetVmRequest, SetFailoverStateRequest, Vm};
use ferry_proto::storage::v1::{GetPointRequest, MaterializeDiskRequest};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use tracing::{info, warn};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{Record, STATE_ACTIVE, STATE_CLEANED_UP};

pub const TEST_FAILOVER_STEPS: [&str; 3] = [
    "resolve recovery point",
    "materialise disks",
    "write vm description",
];
pub const CLEANUP_STEPS: [&str; 2] = ["remove test copy", "clear failover state"];

/// One disk of the test copy.
#[derive(Clone, Debug)]
struct PlannedDisk {
    disk_id: String,
    file: String,
    path: PathBuf,
    format: String,
    subformat: String,
    virtual_size: u64,
}

/// `<target_dir>/<vm>.vm.json`.
#[derive(Debug, Serialize)]
struct VmDescription<'a> {
    name: &'a str,
    host: &'a str,
    point: PointDescription<'a>,
    disks: Vec<DiskDescription<'a>>,
}

#[derive(Debug, Serialize)]
struct PointDescription<'a> {
    id: &'a str,
    time_ms: i64,
    consistency: &'a str,
}

#[derive(Debug, Serialize)]
struct DiskDescription<'a> {
    file: &'a str,
    format: &'a str,
    subformat: &'a str,
    virtual_size: u64,
}

/// The file name of a disk path from a host (either separator: hosts may be Windows).
pub fn disk_file_name(path: &str) -> Option<&str> {
    let name = path.rsplit(['/', '\\']).next()?;
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

/// A VM name that is safe as a file name.
pub(crate) fn check_vm_name(vm: &str) -> Result<()> {
    if vm.is_empty() {
        return Err(FailoverError::InvalidArgument("vm is required".into()));
    }
    if vm.contains(['/', '\\', '\0']) || vm.starts_with('.') {
        return Err(FailoverError::InvalidArgument(format!(
            "vm name {vm:?} cannot name a file"
        )));
    }
    Ok(())
}

fn check_target_dir(dir: &str) -> Result<PathBuf> {
    let path = PathBuf::from(dir);
    if dir.is_empty() || !path.is_absolute() {
        return Err(FailoverError::InvalidArgument(format!(
            "target_dir {dir:?} must be an absolute path"
        )));
    }
    Ok(path)
}

/// Which file each disk of the point becomes: the basename of the VM's disk path (the
/// point's own path when the VM no longer lists the disk).
fn plan_disks(vm: &Vm, point: &RecoveryPoint, dir: &Path) -> Result<Vec<PlannedDisk>> {
    let mut names = HashSet::from([format!("{}.vm.json", vm.name)]);
    let mut out = Vec::with_capacity(point.disks.len());
    for d in &point.disks {
        let source = vm
            .disks
            .iter()
            .find(|v| v.id == d.disk_id)
            .map_or(d.path.as_str(), |v| v.path.as_str());
        let Some(file) = disk_file_name(source) else {
            return Err(FailoverError::FailedPrecondition(format!(
                "disk {} has no usable file name in its path {source:?}",
                d.disk_id
            )));
        };
        if !names.insert(file.to_owned()) {
            return Err(FailoverError::FailedPrecondition(format!(
                "two files of vm {} would both be named {file}",
                vm.name
            )));
        }
        out.push(PlannedDisk {
            disk_id: d.disk_id.clone(),
            file: file.to_owned(),
            path: dir.join(file),
            format: d.format.clone(),
            subformat: output_subformat(&d.format, &d.subformat).to_owned(),
            virtual_size: d.virtual_size,
        });
    }
    Ok(out)
}

/// What the storage-writer writes for a source's subformat when asked for its own format: a
/// differencing chain comes out flattened (dynamic); raw has none.
fn output_subformat(format: &str, subformat: &str) -> &'static str {
    if format.eq_ignore_ascii_case("raw") {
        ""
    } else if subformat.eq_ignore_ascii_case("fixed") {
        "fixed"
    } else {
        "dynamic"
    }
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Removes the given files (already gone is fine) and then `dir`, if given and left empty.
fn remove_files(files: &[PathBuf], dir: Option<&Path>) -> Result<()> {
    for f in files {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FailoverError::io(format!("removing {}", f.display()), e)),
        }
    }
    // Fails when other files are in it, which is the point: only an emptied dir goes.
    if let Some(dir) = dir
        && std::fs::remove_dir(dir).is_ok()
    {
        info!(dir = %dir.display(), "removed the emptied target directory");
    }
    Ok(())
}

impl Orchestrator {
    /// Runs a test failover of a VM and returns the finished job. Bad input, an unknown VM or
    /// point, and an active test failover are errors; a failure after the job started is a
    /// FAILED job (with nothing left behind).
    pub async fn test_failover(&self, req: TestFailoverRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        let dir = check_target_dir(&req.target_dir)?;
        let point_ref = if req.point.is_empty() {
            "latest"
        } else {
            req.point.as_str()
        };
        let _busy = self.claim(&req.vm)?;
        if let Some(active) = self.ledger.active(&req.vm).await? {
            return Err(FailoverError::FailedPrecondition(format!(
                "vm {} has an active test failover in {} (job {}); run cleanup first",
                req.vm, active.target_dir, active.job_id
            )));
        }
        let vm = self.get_vm(&req.vm).await?;
        let point = self.get_point(&req.vm, point_ref).await?;
        let mut job = JobTracker::start(
            self.registry.clone(),
            "test-failover",
            &req.vm,
            &TEST_FAILOVER_STEPS,
        )
        .await?;
        let mut created_dir = false;
        let mut made = Vec::new();
        let run = self.run_test(&mut job, &vm, &point, &dir, &mut created_dir, &mut made);
        // Dropping `run` on shutdown drops the storage-writer calls, which then remove their
        // partial files; the files already made are removed below.
        let outcome = tokio::select! {
            res = run => res,
            () = self.shutdown.cancelled() => Err(FailoverError::Cancelled),
        };
        match outcome {
            Ok(()) => Ok(job.succeed().await),
            Err(e) => {
                // Nothing of a failed test failover stays behind.
                let dir = created_dir.then_some(dir.as_path());
                if let Err(rm) = remove_files(&made, dir) {
                    warn!(vm = %req.vm, error = %rm, "cannot remove the files of a failed test failover");
                }
                Ok(job.fail(&e).await)
            }
        }
    }

    async fn run_test(
        &self,
        job: &mut JobTracker,
        vm: &Vm,
        point: &RecoveryPoint,
        dir: &Path,
        created_dir: &mut bool,
        made: &mut Vec<PathBuf>,
    ) -> Result<()> {
        job.step_running(0).await;
        let disks = plan_disks(vm, point, dir)?;
        let description = dir.join(format!("{}.vm.json", vm.name));
        if let Some(taken) = disks
            .iter()
            .map(|d| d.path.as_path())
            .chain([description.as_path()])
            .find(|p| exists(p))
        {
            return Err(FailoverError::FailedPrecondition(format!(
                "{} already exists; choose another target_dir",
                taken.display()
            )));
        }
        if !exists(dir) {
            std::fs::create_dir_all(dir)
                .map_err(|e| FailoverError::io(format!("creating {}", dir.display()), e))?;
            *created_dir = true;
        }
        job.step_done(
            0,
            format!(
                "point {} ({}, {} ms), {} disks",
                point.id,
                point.consistency,
                point.time_ms,
                disks.len()
            ),
        )
        .await;

        job.step_running(1).await;
        self.materialise(job, vm, point, &disks, made).await?;
        job.step_done(1, format!("{} disks written", disks.len()))
            .await;

        job.step_running(2).await;
        write_description(&description, vm, point, &disks)?;
        made.push(description.clone());
        let now = chrono::Utc::now().timestamp_millis();
        let record = Record {
            vm: vm.name.clone(),
            kind: "test".into(),
            point_id: point.id.clone(),
            target_dir: dir.display().to_string(),
            files: made.iter().map(|p| p.display().to_string()).collect(),
            state: STATE_ACTIVE.into(),
            created_at_ms: now,
            job_id: job.id().to_owned(),
            updated_at_ms: now,
            last_job_id: job.id().to_owned(),
        };
        self.ledger.put(&record).await?;
        // From here on the record owns the files: cleanup removes them.
        made.clear();
        *created_dir = false;
        if let Err(e) = self.set_failover_state(&vm.name, "test").await {
            return Err(FailoverError::FailedPrecondition(format!(
                "{e}; the test copy in {} is recorded: run cleanup to remove it",
                dir.display()
            )));
        }
        job.step_done(2, format!("{}", description.display())).await;
        info!(vm = %vm.name, point = %point.id, dir = %dir.display(), "test failover ready");
        Ok(())
    }

    /// Materialises every disk through the storage-writer, in parallel. On the first error the
    /// other calls are dropped (the storage-writer removes their partial files).
    async fn materialise(
        &self,
        job: &mut JobTracker,
        vm: &Vm,
        point: &RecoveryPoint,
        disks: &[PlannedDisk],
        made: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let total: u64 = disks.iter().map(|d| d.virtual_size).sum();
        let mut done = 0u64;
        job.set_bytes(total, 0);
        let mut calls: FuturesUnordered<_> = disks
            .iter()
            .map(|d| {
                let mut storage = self.storage.clone();
                let req = MaterializeDiskRequest {
                    vm: vm.name.clone(),
                    point: point.id.clone(),
                    disk_id: d.disk_id.clone(),
                    target_path: d.path.display().to_string(),
                    // The source's own format, as the storage-writer defaults it.
                    format: String::new(),
                    subformat: String::new(),
                };
                async move { (d, storage.materialize_disk(req).await) }
            })
            .collect();
        let mut finished = 0usize;
        while let Some((disk, result)) = calls.next().await {
            let resp = result
                .map_err(|s| FailoverError::remote("storage-writer", "materialize disk", &s))?
                .into_inner();
            made.push(disk.path.clone());
            finished += 1;
            done += disk.virtual_size;
            job.set_bytes(total, done);
            info!(vm = %vm.name, disk = %disk.disk_id, file = %disk.file, bytes = resp.bytes_written, "disk materialised");
            let percent = u32::try_from(finished * 100 / disks.len().max(1)).unwrap_or(100);
            job.step_progress(
                1,
                percent,
                format!("{finished}/{} disks: {}", disks.len(), disk.file),
            )
            .await;
        }
        Ok(())
    }

    /// Removes a VM's test copy (exactly the recorded files) and clears its failover state.
    pub async fn cleanup_test_failover(&self, req: CleanupTestFailoverRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        let _busy = self.claim(&req.vm)?;
        let Some(record) = self.ledger.active(&req.vm).await? else {
            return Err(FailoverError::FailedPrecondition(format!(
                "vm {} has no active test failover",
                req.vm
            )));
        };
        let mut job = JobTracker::start(
            self.registry.clone(),
            "test-failover-cleanup",
            &req.vm,
            &CLEANUP_STEPS,
        )
        .await?;
        match self.run_cleanup(&mut job, record).await {
            Ok(()) => Ok(job.succeed().await),
            Err(e) => Ok(job.fail(&e).await),
        }
    }

    async fn run_cleanup(&self, job: &mut JobTracker, record: Record) -> Result<()> {
        job.step_running(0).await;
        let files: Vec<PathBuf> = record.files.iter().map(PathBuf::from).collect();
        remove_files(&files, Some(Path::new(&record.target_dir)))?;
        job.step_done(
            0,
            format!("{} files removed from {}", files.len(), record.target_dir),
        )
        .await;
        job.step_running(1).await;
        let vm = record.vm.clone();
        let cleaned = Record {
            state: STATE_CLEANED_UP.into(),
            updated_at_ms: chrono::Utc::now().timestamp_millis(),
            last_job_id: job.id().to_owned(),
            ..record
        };
        self.ledger.put(&cleaned).await?;
        self.set_failover_state(&vm, "").await?;
        job.step_done(1, "failover state cleared".into()).await;
        info!(vm = %vm, dir = %cleaned.target_dir, "test failover cleaned up");
        Ok(())
    }

    async fn get_vm(&self, name: &str) -> Result<Vm> {
        let mut registry = self.registry.clone();
        registry
            .get_vm(GetVmRequest {
                name: name.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => FailoverError::NotFound(format!("vm {name}")),
                _ => FailoverError::remote("registry", "get vm", &s),
            })
    }

    async fn get_point(&self, vm: &str, point: &str) -> Result<RecoveryPoint> {
        let mut storage = self.storage.clone();
        storage
            .get_point(GetPointRequest {
                vm: vm.to_owned(),
                point: point.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => {
                    FailoverError::NotFound(format!("recovery point {point:?} of vm {vm}"))
                }
                _ => FailoverError::remote("storage-writer", "get point", &s),
            })
    }

    async fn set_failover_state(&self, vm: &str, state: &str) -> Result<()> {
        let mut registry = self.registry.clone();
        registry
            .set_failover_state(SetFailoverStateRequest {
                vm: vm.to_owned(),
                failover_state: state.to_owned(),
            })
            .await
            .map_err(|s| FailoverError::remote("registry", "set failover state", &s))?;
        Ok(())
    }
}

fn write_description(
    path: &Path,
    vm: &Vm,
    point: &RecoveryPoint,
    disks: &[PlannedDisk],
) -> Result<()> {
    let desc = VmDescription {
        name: &vm.name,
        host: &vm.host,
        point: PointDescription {
            id: &point.id,
            time_ms: point.time_ms,
            consistency: &point.consistency,
        },
        disks: disks
            .iter()
            .map(|d| DiskDescription {
                file: &d.file,
                format: &d.format,
                subformat: &d.subformat,
                virtual_size: d.virtual_size,
            })
            .collect(),
    };
    let text = serde_json::to_vec_pretty(&desc)
        .map_err(|e| FailoverError::Internal(format!("encoding the vm description: {e}")))?;
    let what = || format!("writing {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| FailoverError::io(what(), e))?;
    std::io::Write::write_all(&mut f, &text).map_err(|e| FailoverError::io(what(), e))?;
    f.sync_all().map_err(|e| FailoverError::io(what(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_from_host_paths() {
        assert_eq!(disk_file_name("/var/lib/vms/a.vhdx"), Some("a.vhdx"));
        assert_eq!(disk_file_name(r"C:\VMs\web\disk0.vhd"), Some("disk0.vhd"));
        assert_eq!(disk_file_name("plain.raw"), Some("plain.raw"));
        assert_eq!(disk_file_name("/var/lib/"), None);
        assert_eq!(disk_file_name("/x/.."), None);
        assert!(check_vm_name("web-1").is_ok());
        assert!(check_vm_name("../etc").is_err());
        assert!(check_vm_name("a/b").is_err());
        assert!(check_vm_name("").is_err());
    }

    #[test]
    fn plan_refuses_clashing_names() {
        let vm = Vm {
            name: "web".into(),
            ..Vm::default()
        };
        let disk = |id: &str, path: &str| ferry_proto::common::v1::PointDisk {
            disk_id: id.into(),
            path: path.into(),
            format: "raw".into(),
            virtual_size: 1 << 20,
            ..Default::default()
        };
        let point = RecoveryPoint {
            disks: vec![disk("d1", "/a/x.raw"), disk("d2", "/b/y.raw")],
            ..RecoveryPoint::default()
        };
        let plan = plan_disks(&vm, &point, Path::new("/t")).unwrap();
        assert_eq!(plan[1].path, Path::new("/t/y.raw"));
        let clash = RecoveryPoint {
            disks: vec![disk("d1", "/a/x.raw"), disk("d2", "/b/x.raw")],
            ..RecoveryPoint::default()
        };
        assert!(plan_disks(&vm, &clash, Path::new("/t")).is_err());
        let desc_clash = RecoveryPoint {
            disks: vec![disk("d1", "/a/web.vm.json")],
            ..RecoveryPoint::default()
        };
        assert!(plan_disks(&vm, &desc_clash, Path::new("/t")).is_err());
    }
}
