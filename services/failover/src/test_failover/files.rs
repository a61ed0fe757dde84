//! The files of a test copy: per-run partial files, removal, and the VM description.
use std::path::{Path, PathBuf};

use ferry_model::Consistency;
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::registry::v1::Vm;
use serde::Serialize;
use tracing::{info, warn};

use super::plan::PlannedDisk;
use crate::error::{FailoverError, Result};

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

/// Where run `run` (its lease token) materializes a disk before linking it to its name.
pub(super) fn partial_path(d: &PlannedDisk, run: u64) -> PathBuf {
    d.path.with_file_name(format!(".{}.{run}.partial", d.file))
}

/// Removes partial files earlier runs of a job left in `dir` (best effort).
pub(super) fn remove_partials(dir: &Path, disks: &[PlannedDisk]) {
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

pub(super) fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Removes the given files (already gone is fine) and then `dir`, if given and left empty.
pub(super) fn remove_files(files: &[PathBuf], dir: Option<&Path>) -> Result<()> {
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

/// Writes `<target_dir>/<vm>.vm.json` (a new file: never replaces one).
pub(super) fn write_description(
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
            consistency: Consistency::wire_name(point.consistency),
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
