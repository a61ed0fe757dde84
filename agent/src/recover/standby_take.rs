//! A failover from the standby copy (`standby.rs`): the disks of the recovered VM are made
//! from the copy instead of the whole point from the store, and then only the blocks that
//! differ between the copy's point and the point failed over to (plus the copy's dirty
//! blocks) are fetched or zeroed.
//!
//! A production failover *moves* the images into the VM's folder (a rename: the copy is
//! used up, and the VM runs on it from then on); a test failover copies them (holes stay
//! holes), so the copy goes on being kept current while the test VM runs.
//!
//! Crash safety: the images are moved or copied after the folder's unfinished marker is
//! written, so a crash from there on is a failed recovery like any other (the next delivery
//! removes the folder and materialises the whole point from the store); a copy is made under
//! a partial name first.
use std::path::Path;

use ferry_proto::common::v1::RecoveryPoint;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::remove_folder;
use super::standby::load;
use super::write::blocking;
use crate::{Agent, ReplError};

/// What the disks cost when made from the standby copy.
pub(super) struct FromStandby {
    /// The point the copy held.
    pub(super) point: String,
    pub(super) compared: u64,
    pub(super) rewritten: u64,
    pub(super) bytes: u64,
}

impl Agent {
    /// Makes the disks of `point` in `dest` (named `files`) from this host's standby copy of
    /// `vm`, moved (`copy` false) or copied; None when there is no copy that fits (the caller
    /// materialises from the store then).
    pub(super) async fn disks_from_standby(
        &self,
        vm: &str,
        point: &RecoveryPoint,
        files: &[String],
        dest: &Path,
        copy: bool,
        cancel: &CancellationToken,
    ) -> Result<Option<FromStandby>, ReplError> {
        let Some(root) = self.standby_root() else {
            return Ok(None);
        };
        let dir = root.join(vm);
        let _guard = self.standby.take(vm).await;
        let Some(state) = load(&dir) else {
            return Ok(None);
        };
        if let Some(why) = state.misfit(point, files) {
            info!(vm, point = %point.id, reason = %why, "the standby copy does not fit the point; materialising from the store");
            return Ok(None);
        }
        let plans = match self.standby_plans(&dir, vm, &state, point).await {
            Ok(p) => p,
            Err(e) => {
                info!(vm, error = %e, "the standby copy cannot be compared with the point; materialising from the store");
                return Ok(None);
            }
        };
        for sd in &state.disks {
            let (from, to) = (dir.join(&sd.file), dest.join(&sd.file));
            match copy {
                true => blocking(move || copy_image(&from, &to)).await?,
                false => std::fs::rename(&from, &to).map_err(|e| {
                    ReplError::Permanent(format!(
                        "moving {} to {}: {e}",
                        from.display(),
                        to.display()
                    ))
                })?,
            }
        }
        if !copy {
            remove_folder(&dir)?;
        }
        let mut out = FromStandby {
            point: state.point.clone(),
            compared: 0,
            rewritten: 0,
            bytes: 0,
        };
        for ((disk, sd), (plan, _)) in point.disks.iter().zip(&state.disks).zip(plans) {
            let path = dest.join(&sd.file);
            let r = self
                .apply_to_image(vm, &point.id, disk, &path, plan, cancel)
                .await?;
            out.compared += r.compared;
            out.rewritten += r.rewritten;
            out.bytes += r.bytes;
        }
        info!(vm, from = %out.point, to = %point.id, moved = !copy, blocks_rewritten = out.rewritten, bytes = out.bytes, "disks made from the standby copy");
        Ok(Some(out))
    }
}

/// Copies the image `from` to `to` (under a partial name, renamed when durable), extent by
/// extent so that holes stay holes.
fn copy_image(from: &Path, to: &Path) -> Result<(), ReplError> {
    let partial = to.with_file_name(format!(
        ".{}.partial",
        to.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let res = copy_sparse(from, &partial).and_then(|()| std::fs::rename(&partial, to));
    res.map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        ReplError::Permanent(format!(
            "copying the standby image {} to {}: {e}",
            from.display(),
            to.display()
        ))
    })
}

/// Copies the data extents of `from` (`SEEK_DATA`/`SEEK_HOLE`) with `copy_file_range`, sets
/// the length, and syncs.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(from)?;
    let dst = std::fs::File::create(to)?;
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: plain syscalls on descriptors this function owns.
        let data = unsafe { libc::lseek(s, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(s, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = (hole - off_in) as usize;
            // SAFETY: the offsets are locals this call updates; the descriptors are open.
            let n = unsafe { libc::copy_file_range(s, &mut off_in, d, &mut off_out, want, 0) };
            match n {
                n if n < 0 => return Err(std::io::Error::last_os_error()),
                0 => return Err(std::io::Error::other("the image ended early")),
                _ => {}
            }
        }
        pos = hole;
    }
    dst.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn a_sparse_copy_is_equal_and_keeps_its_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        let mut f = std::fs::File::create(&a).expect("create");
        f.set_len(64 << 20).expect("len");
        for off in [0u64, 10 << 20, (64 << 20) - 4096] {
            f.seek(SeekFrom::Start(off)).expect("seek");
            f.write_all(&vec![0xab; 4096]).expect("write");
        }
        f.sync_all().expect("sync");
        copy_sparse(&a, &b).expect("copy");
        assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&b).expect("meta").blocks() * 512;
        assert!(blocks < 4 << 20, "the copy allocated {blocks} bytes");
    }
}
