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

/// Pieces of the extents the copy threads take one at a time.
const PIECE: i64 = 32 << 20;

/// Copies the data extents of `from` (`SEEK_DATA`/`SEEK_HOLE`) with `copy_file_range`, in
/// pieces spread over one thread per core (this machine's disk reads a cold file about three
/// times faster in two streams than in one), sets the length, and syncs.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let src = std::fs::File::open(from)?;
    let dst = std::fs::File::create(to)?;
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    let pieces = pieces(&extents(s, len as i64)?);
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let copy_pieces = || -> std::io::Result<()> {
        while let Some(&(from, to)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
            copy_range(s, d, from, to)?;
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..threads).map(|_| scope.spawn(copy_pieces)).collect();
        runs.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("a copy thread failed")))
        })
    })?;
    dst.sync_all()
}

/// The data extents `[start, end)` of the file open as `fd`, `len` bytes long.
fn extents(fd: i32, len: i64) -> std::io::Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        // SAFETY: plain syscalls on a descriptor the caller keeps open.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// The extents cut into pieces of at most [`PIECE`] bytes.
fn pieces(extents: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for &(mut from, to) in extents {
        while from < to {
            let end = to.min(from + PIECE);
            out.push((from, end));
            from = end;
        }
    }
    out
}

/// Copies `[from, to)` of `s` to the same offsets of `d`.
fn copy_range(s: i32, d: i32, from: i64, to: i64) -> std::io::Result<()> {
    let (mut off_in, mut off_out) = (from, from);
    while off_in < to {
        let want = (to - off_in) as usize;
        // SAFETY: the offsets are locals this call updates; the descriptors are open.
        let n = unsafe { libc::copy_file_range(s, &mut off_in, d, &mut off_out, want, 0) };
        match n {
            n if n < 0 => return Err(std::io::Error::last_os_error()),
            0 => return Err(std::io::Error::other("the image ended early")),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn a_sparse_copy_is_equal_and_keeps_its_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        let mut f = std::fs::File::create(&a).expect("create");
        f.set_len(160 << 20).expect("len");
        // Small extents, and one of 72 MiB that spans several pieces (its bytes vary, so a
        // piece copied to the wrong offset shows).
        for off in [0u64, 10 << 20, (160 << 20) - 4096] {
            f.seek(SeekFrom::Start(off)).expect("seek");
            f.write_all(&vec![0xab; 4096]).expect("write");
        }
        let big: Vec<u8> = (0..72u32 << 20)
            .map(|i| (i / 4096 % 251) as u8 + 1)
            .collect();
        f.seek(SeekFrom::Start(64 << 20)).expect("seek");
        f.write_all(&big).expect("write");
        f.sync_all().expect("sync");
        assert!(pieces(&extents(f.as_raw_fd(), 160 << 20).expect("extents")).len() >= 5);
        copy_sparse(&a, &b).expect("copy");
        assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&b).expect("meta").blocks() * 512;
        assert!(blocks < 80 << 20, "the copy allocated {blocks} bytes");
    }
}
