//! A VM's virtual disk as its host reports it: the one record of a disk that the registry's
//! catalog and ingest's cycles keep. The protobuf `Disk` converts to and from it once, in
//! [`crate::wire`]. (A disk *in a recovery point*, with its block size and map, is
//! `ferry_store::DiskManifest`: a different thing.)
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpec {
    /// Stable id, derived from the VM and the path (`ferry_proto::disk_id`): the storage and
    /// lease key.
    pub id: String,
    /// Path on the host, as named in the agent's config.
    pub path: String,
    /// "raw", "vhd" or "vhdx".
    pub format: String,
    /// "fixed", "dynamic", "differencing", or "" for raw.
    pub subformat: String,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    /// Bytes allocated in the image (what an initial copy reads at most).
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Why the host could not open the disk ("" when it could).
    #[serde(default)]
    pub error: String,
    /// NBD URI the host's tracker serves the disk on ("" when not tracked).
    #[serde(default)]
    pub nbd_uri: String,
}

/// A VM's virtual hardware as its host's config gives it: what a recovery host's driver
/// starts the replica with. Zero CPUs or memory means "not reported" (a driver applies its
/// defaults).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmHardware {
    pub cpus: u32,
    pub memory_mib: u64,
    /// One network name per NIC, in NIC order.
    #[serde(default)]
    pub networks: Vec<String>,
}

/// The file name of a disk path from a host (either separator: hosts may be Windows), when it
/// is usable as a file name in a folder of ours: not empty, not `.` or `..`, not hidden.
pub fn file_name(path: &str) -> Option<&str> {
    let name = path.rsplit(['/', '\\']).next()?;
    (!name.is_empty() && !name.starts_with('.') && !name.contains('\0')).then_some(name)
}

/// A VM name that is safe as a file or folder name.
pub fn is_file_safe_vm_name(vm: &str) -> bool {
    !vm.is_empty() && !vm.contains(['/', '\\', '\0']) && !vm.starts_with('.')
}

/// Why `dir` cannot be a folder an operator names on a host for Ferry to write into (a
/// failback's `--dir`); None when it can: an absolute path of plain components, without
/// `.` or `..` (nothing may climb out of the folder the operator meant).
pub fn folder_problem(dir: &str) -> Option<&'static str> {
    use std::path::Component;
    let path = std::path::Path::new(dir);
    if dir.is_empty() || !path.is_absolute() {
        return Some("must be an absolute path on the target host");
    }
    if dir.contains('\0') {
        return Some("holds a NUL byte");
    }
    let plain = path
        .components()
        .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    (!plain || dir.split('/').any(|c| c == "." || c == ".."))
        .then_some("may not hold `.` or `..` components")
}

/// Why Ferry may not write into `dir` on this machine: a folder an operator names must be a
/// plain absolute path ([`folder_problem`]) under one of `roots` once symbolic links are
/// resolved (its deepest existing folder is resolved; what follows does not exist yet, so it
/// cannot lead anywhere else). `None` when it may.
pub fn outside_roots(dir: &str, roots: &[std::path::PathBuf]) -> Option<String> {
    if let Some(why) = folder_problem(dir) {
        return Some(why.to_owned());
    }
    let shown = || {
        let r: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        if r.is_empty() {
            "none are configured (export_roots)".to_owned()
        } else {
            r.join(", ")
        }
    };
    let path = std::path::Path::new(dir);
    let mut existing = path;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    let Ok(real) = existing.canonicalize() else {
        return Some(format!(
            "cannot be resolved on this machine ({})",
            existing.display()
        ));
    };
    let rest = path
        .strip_prefix(existing)
        .unwrap_or(std::path::Path::new(""));
    let real = real.join(rest);
    let inside = roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| real.starts_with(&r));
    match (inside, real.as_path() == path) {
        (true, _) => None,
        (false, true) => Some(format!(
            "is not under a folder this machine lets operators name (allowed: {})",
            shown()
        )),
        (false, false) => Some(format!(
            "leads through a symbolic link to {}, which is not under a folder this machine lets operators name (allowed: {})",
            real.display(),
            shown()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_must_stay_under_the_roots() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let roots = vec![root.path().to_path_buf()];
        let under = root.path().join("new/deeper");
        assert_eq!(outside_roots(under.to_str().unwrap(), &roots), None);
        let why = outside_roots(outside.path().to_str().unwrap(), &roots).unwrap();
        assert!(
            why.contains("not under") && why.contains(root.path().to_str().unwrap()),
            "{why}"
        );
        let dots = format!("{}/../../etc", root.path().display());
        assert!(outside_roots(&dots, &roots).unwrap().contains(".."));
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        let through = root.path().join("link/x");
        let why = outside_roots(through.to_str().unwrap(), &roots).unwrap();
        assert!(why.contains("symbolic link"), "{why}");
        assert!(
            outside_roots(under.to_str().unwrap(), &[])
                .unwrap()
                .contains("none are configured")
        );
    }

    #[test]
    fn folders_an_operator_may_name() {
        assert_eq!(folder_problem("/srv/vms/new"), None);
        assert_eq!(folder_problem("/srv/vms/new/"), None);
        for bad in ["", "vms", "./vms", "/srv/../etc", "/srv/./x", "/srv/x/.."] {
            assert!(folder_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn file_names_from_host_paths() {
        assert_eq!(file_name("/var/lib/vms/a.vhdx"), Some("a.vhdx"));
        assert_eq!(file_name(r"C:\VMs\web\disk0.vhd"), Some("disk0.vhd"));
        assert_eq!(file_name("plain.raw"), Some("plain.raw"));
        assert_eq!(file_name("/var/lib/"), None);
        assert_eq!(file_name("/x/.."), None);
        assert_eq!(file_name("/x/.hidden"), None);
        assert!(is_file_safe_vm_name("web-1"));
        assert!(!is_file_safe_vm_name("../etc"));
        assert!(!is_file_safe_vm_name("a/b"));
        assert!(!is_file_safe_vm_name(""));
    }
}
