//! Planning a test copy: which file each disk of a point becomes, and the checks on the
//! names a request gives.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::registry::v1::Vm;

use crate::error::{FailoverError, Result};

/// One disk of the test copy.
#[derive(Clone, Debug)]
pub(super) struct PlannedDisk {
    pub(super) disk_id: String,
    pub(super) file: String,
    pub(super) path: PathBuf,
    pub(super) format: String,
    pub(super) subformat: String,
    pub(super) virtual_size: u64,
}

pub use ferry_model::disk::file_name as disk_file_name;

/// A VM name that is safe as a file name.
pub(crate) fn check_vm_name(vm: &str) -> Result<()> {
    if vm.is_empty() {
        return Err(FailoverError::InvalidArgument("vm is required".into()));
    }
    if !ferry_model::disk::is_file_safe_vm_name(vm) {
        return Err(FailoverError::InvalidArgument(format!(
            "vm name {vm:?} cannot name a file"
        )));
    }
    Ok(())
}

/// Which file each disk of the point becomes: the basename of the VM's disk path (the
/// point's own path when the VM no longer lists the disk).
pub(super) fn plan_disks(vm: &Vm, point: &RecoveryPoint, dir: &Path) -> Result<Vec<PlannedDisk>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
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
