//! Opening a disk together with its parent chain: locators are tried in order, each candidate
//! must carry the identity the child recorded, and loops and absurd depths are refused.

use std::path::{Component, Path, PathBuf};

use crate::raw::RawDisk;
use crate::vhd::VhdDisk;
use crate::vhdx::VhdxDisk;
use crate::{BlockDevice, DiskError, Format, OpenOptions, detect};

/// Deeper chains than this are treated as corruption (Hyper-V itself stops far earlier).
const MAX_DEPTH: usize = 64;

/// A parent chain opened for a writer, with the parent's path.
pub(crate) type OpenedParent = (Box<dyn BlockDevice>, PathBuf);

/// What a child says its parent is.
pub(crate) enum ParentId {
    /// VHD: the parent footer's UniqueId.
    Vhd([u8; 16]),
    /// VHDX: accepted parent DataWriteGuids (parent_linkage, parent_linkage2).
    Vhdx(Vec<uuid::Uuid>),
}

pub(crate) fn open_chain(
    path: &Path,
    opts: &OpenOptions,
    visited: &mut Vec<PathBuf>,
) -> Result<Box<dyn BlockDevice>, DiskError> {
    let canon = std::fs::canonicalize(path).map_err(|e| DiskError::io(path, "file", 0, e))?;
    if visited.contains(&canon) {
        return Err(DiskError::Parent {
            path: path.to_path_buf(),
            reason: format!(
                "parent loop: {} is already in the chain {:?}",
                canon.display(),
                visited
            ),
        });
    }
    if visited.len() >= MAX_DEPTH {
        return Err(DiskError::Parent {
            path: path.to_path_buf(),
            reason: format!("chain deeper than {MAX_DEPTH} disks"),
        });
    }
    visited.push(canon);
    let format = match opts.format {
        Some(f) => f,
        None => detect(path)?,
    };
    match format {
        Format::Raw => Ok(Box::new(RawDisk::open(path)?)),
        Format::Vhd => {
            let mut d = VhdDisk::open(path, false)?;
            if d.is_differencing() {
                let id = ParentId::Vhd(d.header.as_ref().map_or([0; 16], |h| h.parent_unique_id));
                let (p, pp) = resolve_parent(
                    path,
                    d.parent_candidates()?,
                    &id,
                    opts.parent.as_deref(),
                    visited,
                )?;
                d.parent = Some(p);
                d.parent_path = Some(pp);
            }
            Ok(Box::new(d))
        }
        Format::Vhdx => {
            let mut d = VhdxDisk::open(path)?;
            if d.has_parent() {
                let id = ParentId::Vhdx(d.parent_linkage());
                let (p, pp) = resolve_parent(
                    path,
                    d.parent_candidates(),
                    &id,
                    opts.parent.as_deref(),
                    visited,
                )?;
                d.set_parent(p, pp);
            }
            Ok(Box::new(d))
        }
    }
}

/// Opens the parent chain of `path` for a writer that opens the child itself.
pub(crate) fn open_parent_for_rw(
    path: &Path,
    format: Format,
    opts: &OpenOptions,
) -> Result<Option<OpenedParent>, DiskError> {
    let canon = std::fs::canonicalize(path).map_err(|e| DiskError::io(path, "file", 0, e))?;
    let mut visited = vec![canon];
    match format {
        Format::Raw => Ok(None),
        Format::Vhd => {
            let d = VhdDisk::open(path, false)?;
            if !d.is_differencing() {
                return Ok(None);
            }
            let id = ParentId::Vhd(d.header.as_ref().map_or([0; 16], |h| h.parent_unique_id));
            let c = d.parent_candidates()?;
            Ok(Some(resolve_parent(
                path,
                c,
                &id,
                opts.parent.as_deref(),
                &mut visited,
            )?))
        }
        Format::Vhdx => {
            let d = VhdxDisk::open(path)?;
            if !d.has_parent() {
                return Ok(None);
            }
            let id = ParentId::Vhdx(d.parent_linkage());
            let c = d.parent_candidates();
            Ok(Some(resolve_parent(
                path,
                c,
                &id,
                opts.parent.as_deref(),
                &mut visited,
            )?))
        }
    }
}

fn identity_matches(candidate: &Path, id: &ParentId) -> Result<bool, DiskError> {
    match id {
        ParentId::Vhd(want) => Ok(&VhdDisk::open(candidate, false)?.footer.unique_id == want),
        ParentId::Vhdx(want) => {
            let got = VhdxDisk::open(candidate)?.data_write_guid();
            Ok(want.contains(&got))
        }
    }
}

fn resolve_parent(
    child: &Path,
    candidates: Vec<PathBuf>,
    id: &ParentId,
    explicit: Option<&Path>,
    visited: &mut Vec<PathBuf>,
) -> Result<(Box<dyn BlockDevice>, PathBuf), DiskError> {
    let mut tried = Vec::new();
    let list: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None => candidates,
    };
    for c in list {
        if !c.is_file() {
            tried.push(format!("{} (missing)", c.display()));
            continue;
        }
        match identity_matches(&c, id) {
            Ok(true) => {
                let p = open_chain(&c, &OpenOptions::default(), visited)?;
                return Ok((p, c));
            }
            Ok(false) => tried.push(format!("{} (identity does not match)", c.display())),
            Err(e) => tried.push(format!("{} ({e})", c.display())),
        }
    }
    Err(DiskError::Parent {
        path: child.to_path_buf(),
        reason: format!("no parent found; tried: {}", tried.join(", ")),
    })
}

/// Turns a locator string (Windows or POSIX, relative or absolute) into paths to try.
pub(crate) fn candidate_paths(child_dir: &Path, locator: &str) -> Vec<PathBuf> {
    let s = locator.trim_start_matches(r"\\?\").replace('\\', "/");
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let drive = bytes.len() >= 2 && bytes[1] == b':' && bytes[0].is_ascii_alphabetic();
    if s.starts_with('/') {
        out.push(PathBuf::from(&s));
    } else if !drive && !s.is_empty() {
        out.push(child_dir.join(s.trim_start_matches("./")));
    }
    // Absolute Windows paths mean nothing here; the same file name next to the child is the
    // usual layout after a copy.
    if let Some(name) = Path::new(&s).file_name() {
        let p = child_dir.join(name);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Path of `target` relative to `from_dir` (both absolute), in Windows notation (`.\x`).
pub(crate) fn relative_path(from_dir: &Path, target: &Path) -> String {
    let from: Vec<Component> = from_dir.components().collect();
    let to: Vec<Component> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if from.len() == common {
        parts.push(".".into());
    }
    for _ in common..from.len() {
        parts.push("..".into());
    }
    for c in &to[common..] {
        parts.push(c.as_os_str().to_string_lossy().into_owned());
    }
    parts.join("\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_paths() {
        let d = Path::new("/vm");
        assert_eq!(
            candidate_paths(d, r".\base.vhdx"),
            vec![PathBuf::from("/vm/base.vhdx")]
        );
        assert_eq!(
            candidate_paths(d, r"C:\images\base.vhd"),
            vec![PathBuf::from("/vm/base.vhd")]
        );
        assert_eq!(
            candidate_paths(d, r"..\x\base.vhd"),
            vec![
                PathBuf::from("/vm/../x/base.vhd"),
                PathBuf::from("/vm/base.vhd")
            ]
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/c/p.vhd")),
            r"..\c\p.vhd"
        );
        assert_eq!(
            relative_path(Path::new("/a"), Path::new("/a/p.vhd")),
            r".\p.vhd"
        );
    }
}
