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

use ferry_coord::{KeptLease, Lease};

use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{
    Record, STATE_ACTIVE, STATE_CLEANED_UP, STATE_CLEANING, STATE_FAILED, STATE_RUNNING,
};
use crate::{JOB_LEASE_TTL, Orchestrator, job_resource};

/// How long a replica may take from checking a VM to recording the job it starts.
const VM_START_TTL: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Where run `run` (its lease token) materialises a disk before linking it to its name.
fn partial_path(d: &PlannedDisk, run: u64) -> PathBuf {
    d.path.with_file_name(format!(".{}.{run}.partial", d.file))
}

/// Removes partial files earlier runs of a job left in `dir` (best effort).
fn remove_partials(dir: &Path, disks: &[PlannedDisk]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = disks.iter().any(|d| {
            name.strip_prefix(&format!(".{}.", d.file))
                .and_then(|rest| rest.strip_suffix(".partial"))
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        });
        if ours && let Err(err) = std::fs::remove_file(e.path()) {
            warn!(path = %e.path().display(), error = %err, "cannot remove an earlier run's partial file");
        }
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

/// What ended a job's run here without finishing it.
enum Interrupted {
    /// This replica is shutting down: the job is left to another one.
    Shutdown,
    /// The job lease was lost: another replica may hold the job now.
    LeaseLost,
}

impl Orchestrator {
    /// Runs a test failover of a VM and returns the finished job. Bad input, an unknown VM or
    /// point, and an active test failover are errors; a failure after the job started is a
    /// FAILED job (with nothing left behind). If this replica stops mid-job, the job is
    /// returned still running: another replica resumes it.
    pub async fn test_failover(&self, req: TestFailoverRequest) -> Result<Job> {
        check_vm_name(&req.vm)?;
        let dir = check_target_dir(&req.target_dir)?;
        let point_ref = if req.point.is_empty() {
            "latest"
        } else {
            req.point.as_str()
        };
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(&req.vm)?;
        let starting = self.lock_vm_start(&req.vm).await?;
        if let Some(current) = self.ledger.current(&req.vm).await? {
            self.unlock_vm_start(starting).await;
            return Err(FailoverError::FailedPrecondition(if current.is_active() {
                format!(
                    "vm {} has an active test failover in {} (job {}); run cleanup first",
                    req.vm, current.target_dir, current.job_id
                )
            } else {
                format!(
                    "a failover operation for vm {} is already running (job {})",
                    req.vm,
                    current.working_job()
                )
            }));
        }
        let prepared = async {
            let vm = self.get_vm(&req.vm).await?;
            let point = self.get_point(&req.vm, point_ref).await?;
            Ok::<_, FailoverError>((vm, point))
        }
        .await;
        let (vm, point) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.unlock_vm_start(starting).await;
                return Err(e);
            }
        };
        let job = JobTracker::start(
            self.registry.clone(),
            "test-failover",
            &req.vm,
            &TEST_FAILOVER_STEPS,
        )
        .await;
        let job = match job {
            Ok(j) => j,
            Err(e) => {
                self.unlock_vm_start(starting).await;
                return Err(e);
            }
        };
        let holder = self.holder();
        let now = chrono::Utc::now().timestamp_millis();
        let mut record = Record {
            vm: vm.name.clone(),
            kind: "test".into(),
            point_id: point.id.clone(),
            target_dir: dir.display().to_string(),
            files: Vec::new(),
            state: STATE_RUNNING.into(),
            created_at_ms: now,
            job_id: job.id().to_owned(),
            updated_at_ms: now,
            last_job_id: job.id().to_owned(),
            fence: 0,
            holder: holder.clone(),
            planned: Vec::new(),
            created_dir: false,
        };
        // The lease first, then the record: a replica that sees the record finds it leased.
        let begun = async {
            let kept = self
                .coord
                .acquire_kept(&job_resource(job.id()), &holder, JOB_LEASE_TTL)
                .await
                .map_err(FailoverError::Lease)?;
            self.ledger
                .put_fenced(&mut record, &self.coord, kept.lease())
                .await?;
            Ok::<_, FailoverError>(kept)
        }
        .await;
        self.unlock_vm_start(starting).await;
        match begun {
            Ok(kept) => self.drive_test(job, kept, record, vm, point).await,
            Err(e) => Ok(job.fail(&e).await),
        }
    }

    /// Resumes the job working on `rec`, whose lease this replica just took. None when there
    /// was nothing left to do (the job ended meanwhile).
    pub(crate) async fn resume(&self, rec: Record, kept: KeptLease) -> Result<Option<Job>> {
        // Read again under the lease: the previous holder may have finished just before
        // releasing it.
        let Some(mut record) = self.ledger.get(&rec.job_id).await? else {
            return Ok(None);
        };
        if !record.is_in_progress() || record.fence >= kept.token() {
            let _ = kept.release().await;
            return Ok(None);
        }
        let _busy = match self.claim(&record.vm) {
            Ok(b) => b,
            Err(_) => {
                let _ = kept.release().await;
                return Ok(None);
            }
        };
        let job = match JobTracker::resume(self.registry.clone(), record.working_job()).await {
            Ok(j) => j,
            Err(e) => {
                let _ = kept.release().await;
                return Err(e);
            }
        };
        info!(job = %job.id(), vm = %record.vm, state = %record.state, previous = %record.holder, "resuming a failover job");
        record.holder = kept.lease().holder.clone();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        if let Err(e) = self
            .ledger
            .put_fenced(&mut record, &self.coord, kept.lease())
            .await
        {
            return Ok(Some(job.fail(&e).await));
        }
        if record.state == STATE_CLEANING {
            return self.drive_cleanup(job, kept, record).await.map(Some);
        }
        let prepared = async {
            let vm = self.get_vm(&record.vm).await?;
            let point = self.get_point(&record.vm, &record.point_id).await?;
            Ok::<_, FailoverError>((vm, point))
        }
        .await;
        match prepared {
            Ok((vm, point)) => self
                .drive_test(job, kept, record, vm, point)
                .await
                .map(Some),
            Err(e) => {
                record.state = STATE_FAILED.into();
                let _ = self
                    .ledger
                    .put_fenced(&mut record, &self.coord, kept.lease())
                    .await;
                let _ = kept.release().await;
                Ok(Some(job.fail(&e).await))
            }
        }
    }

    /// Other replicas: one failover operation per VM starts at a time.
    async fn lock_vm_start(&self, vm: &str) -> Result<Lease> {
        self.coord
            .acquire_lease(&format!("failover-vm-{vm}"), &self.holder(), VM_START_TTL)
            .await
            .map_err(|e| match e {
                ferry_coord::CoordError::LeaseHeld { .. } => FailoverError::FailedPrecondition(
                    format!("a failover operation for vm {vm} is starting on another replica"),
                ),
                e => FailoverError::Lease(e),
            })
    }

    async fn unlock_vm_start(&self, lease: Lease) {
        if let Err(e) = self.coord.release_lease(&lease).await {
            warn!(resource = %lease.resource, error = %e, "releasing a start lock failed; it expires");
        }
    }

    /// Runs (or re-runs) the test failover of `record` under `kept` until it ends here.
    async fn drive_test(
        &self,
        mut job: JobTracker,
        kept: KeptLease,
        mut record: Record,
        vm: Vm,
        point: RecoveryPoint,
    ) -> Result<Job> {
        let _running = self.mark_running(job.id());
        let lost = kept.lost();
        let mut made = Vec::new();
        let run = self.run_test(&mut job, &kept, &mut record, &vm, &point, &mut made);
        // Dropping `run` drops the storage-writer calls, which then remove their partial
        // files (written under names of this run only).
        let outcome = tokio::select! {
            res = run => res.map_err(Ok),
            () = self.shutdown.cancelled() => Err(Err(Interrupted::Shutdown)),
            () = lost.cancelled() => Err(Err(Interrupted::LeaseLost)),
        };
        match outcome {
            Ok(()) => {
                let job = job.succeed().await;
                if let Err(e) = kept.release().await {
                    warn!(job = %job.id, error = %e, "releasing a job lease failed; it expires");
                }
                Ok(job)
            }
            Err(Err(why)) => {
                // The files stay for the replica that resumes the job: it removes what this
                // run planned before making it again.
                match why {
                    Interrupted::Shutdown => {
                        info!(job = %job.id(), vm = %vm.name, "shutting down mid-job; another replica resumes it");
                        let _ = kept.release().await;
                    }
                    Interrupted::LeaseLost => {
                        warn!(job = %job.id(), vm = %vm.name, "job lease lost; leaving the job to its new holder");
                    }
                }
                Ok(job.snapshot())
            }
            Err(Ok(e)) => {
                // A refused lease (lost, or Redis out of reach) means the job may be resumed
                // elsewhere: nothing may be undone here.
                if lost.is_cancelled() || matches!(e, FailoverError::Lease(_)) {
                    warn!(job = %job.id(), vm = %vm.name, error = %e, "job lease lost; leaving the job to its new holder");
                    return Ok(job.snapshot());
                }
                // Nothing of a failed test failover stays behind.
                let dir = record
                    .created_dir
                    .then(|| PathBuf::from(&record.target_dir));
                let planned: Vec<PathBuf> = record.planned.iter().map(PathBuf::from).collect();
                for files in [&made, &planned] {
                    if let Err(rm) = remove_files(files, dir.as_deref()) {
                        warn!(vm = %vm.name, error = %rm, "cannot remove the files of a failed test failover");
                    }
                }
                record.state = STATE_FAILED.into();
                record.files.clear();
                record.updated_at_ms = chrono::Utc::now().timestamp_millis();
                if let Err(put) = self
                    .ledger
                    .put_fenced(&mut record, &self.coord, kept.lease())
                    .await
                {
                    warn!(job = %job.id(), error = %put, "cannot record the failed test failover");
                }
                let _ = kept.release().await;
                Ok(job.fail(&e).await)
            }
        }
    }

    async fn run_test(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
        point: &RecoveryPoint,
        made: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let dir = PathBuf::from(&record.target_dir);
        job.step_running(0).await;
        let disks = plan_disks(vm, point, &dir)?;
        let description = dir.join(format!("{}.vm.json", vm.name));
        // A resumed job first removes what an earlier run of it may have made.
        if !record.planned.is_empty() {
            let planned: Vec<PathBuf> = record.planned.iter().map(PathBuf::from).collect();
            remove_files(&planned, None)?;
            remove_partials(&dir, &disks);
        }
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
        if !exists(&dir) {
            std::fs::create_dir_all(&dir)
                .map_err(|e| FailoverError::io(format!("creating {}", dir.display()), e))?;
            record.created_dir = true;
        }
        record.planned = disks
            .iter()
            .map(|d| d.path.as_path())
            .chain([description.as_path()])
            .map(|p| p.display().to_string())
            .collect();
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
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
        self.materialise(job, kept, vm, point, &disks, made).await?;
        job.step_done(1, format!("{} disks written", disks.len()))
            .await;

        job.step_running(2).await;
        write_description(&description, vm, point, &disks)?;
        made.push(description.clone());
        record.files = made.iter().map(|p| p.display().to_string()).collect();
        record.state = STATE_ACTIVE.into();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        // From here on the record owns the files: cleanup removes them.
        made.clear();
        record.planned.clear();
        record.created_dir = false;
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

    /// Materialises every disk through the storage-writer, in parallel, each into a partial
    /// file named for this run and linked to its final name when written (so a partial file
    /// a storage-writer removes late never is a file of another run). On the first error the
    /// other calls are dropped (the storage-writer removes their partial files).
    async fn materialise(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        vm: &Vm,
        point: &RecoveryPoint,
        disks: &[PlannedDisk],
        made: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let total: u64 = disks.iter().map(|d| d.virtual_size).sum();
        let mut done = 0u64;
        job.set_bytes(total, 0);
        let run = kept.token();
        let mut calls: FuturesUnordered<_> = disks
            .iter()
            .map(|d| {
                let mut storage = self.storage.clone();
                let partial = partial_path(d, run);
                let req = MaterializeDiskRequest {
                    vm: vm.name.clone(),
                    point: point.id.clone(),
                    disk_id: d.disk_id.clone(),
                    target_path: partial.display().to_string(),
                    // The source's own format, as the storage-writer defaults it.
                    format: String::new(),
                    subformat: String::new(),
                };
                async move { (d, partial, storage.materialize_disk(req).await) }
            })
            .collect();
        let mut finished = 0usize;
        while let Some((disk, partial, result)) = calls.next().await {
            let resp = result
                .map_err(|s| FailoverError::remote("storage-writer", "materialize disk", &s))?
                .into_inner();
            made.push(partial.clone());
            // Never replaces a file: the target was checked empty, a newcomer is not ours.
            std::fs::hard_link(&partial, &disk.path).map_err(|e| {
                FailoverError::io(
                    format!("linking {} to {}", partial.display(), disk.path.display()),
                    e,
                )
            })?;
            made.push(disk.path.clone());
            std::fs::remove_file(&partial)
                .map_err(|e| FailoverError::io(format!("removing {}", partial.display()), e))?;
            made.retain(|p| p != &partial);
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
        if self.shutdown.is_cancelled() {
            return Err(FailoverError::Cancelled);
        }
        let _busy = self.claim(&req.vm)?;
        let starting = self.lock_vm_start(&req.vm).await?;
        let begun = async {
            let record = match self.ledger.current(&req.vm).await? {
                Some(r) if r.is_active() => r,
                Some(r) => {
                    return Err(FailoverError::FailedPrecondition(format!(
                        "a failover operation for vm {} is already running (job {})",
                        req.vm,
                        r.working_job()
                    )));
                }
                None => {
                    return Err(FailoverError::FailedPrecondition(format!(
                        "vm {} has no active test failover",
                        req.vm
                    )));
                }
            };
            let job = JobTracker::start(
                self.registry.clone(),
                "test-failover-cleanup",
                &req.vm,
                &CLEANUP_STEPS,
            )
            .await?;
            Ok((record, job))
        }
        .await;
        let (record, job) = match begun {
            Ok(b) => b,
            Err(e) => {
                self.unlock_vm_start(starting).await;
                return Err(e);
            }
        };
        let mut record = Record {
            state: STATE_CLEANING.into(),
            updated_at_ms: chrono::Utc::now().timestamp_millis(),
            last_job_id: job.id().to_owned(),
            holder: self.holder(),
            ..record
        };
        let begun = async {
            let kept = self
                .coord
                .acquire_kept(&job_resource(&record.job_id), &record.holder, JOB_LEASE_TTL)
                .await
                .map_err(FailoverError::Lease)?;
            self.ledger
                .put_fenced(&mut record, &self.coord, kept.lease())
                .await?;
            Ok::<_, FailoverError>(kept)
        }
        .await;
        self.unlock_vm_start(starting).await;
        match begun {
            Ok(kept) => self.drive_cleanup(job, kept, record).await,
            Err(e) => Ok(job.fail(&e).await),
        }
    }

    /// Runs (or re-runs) the cleanup of `record` under `kept` until it ends here.
    async fn drive_cleanup(
        &self,
        mut job: JobTracker,
        kept: KeptLease,
        record: Record,
    ) -> Result<Job> {
        let _running = self.mark_running(job.id());
        let lost = kept.lost();
        let vm = record.vm.clone();
        let outcome = tokio::select! {
            res = self.run_cleanup(&mut job, &kept, record) => res,
            () = self.shutdown.cancelled() => {
                info!(job = %job.id(), vm = %vm, "shutting down mid-job; another replica resumes it");
                let _ = kept.release().await;
                return Ok(job.snapshot());
            }
            () = lost.cancelled() => {
                warn!(job = %job.id(), vm = %vm, "job lease lost; leaving the job to its new holder");
                return Ok(job.snapshot());
            }
        };
        match outcome {
            Ok(()) => {
                let _ = kept.release().await;
                Ok(job.succeed().await)
            }
            Err(e) if lost.is_cancelled() || matches!(e, FailoverError::Lease(_)) => {
                Ok(job.snapshot())
            }
            Err(e) => {
                // The record stays "cleaning": the cleanup is resumed (it is idempotent) once
                // the lease is free again.
                Ok(job.fail(&e).await)
            }
        }
    }

    async fn run_cleanup(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: Record,
    ) -> Result<()> {
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
        let mut cleaned = Record {
            state: STATE_CLEANED_UP.into(),
            updated_at_ms: chrono::Utc::now().timestamp_millis(),
            ..record
        };
        self.ledger
            .put_fenced(&mut cleaned, &self.coord, kept.lease())
            .await?;
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
