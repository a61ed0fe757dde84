//! Opening disks for tracking (at start, leaving out the ones that fail; when a VM is added,
//! all or none) and binding the Unix socket.

use std::path::{Path, PathBuf};

use ferry_disk::{DiskRw, Format};
use tokio::net::UnixListener;
use tracing::warn;
use uuid::Uuid;

use super::log::{LogAppender, log_path, next_in_chain};
use super::{SOCKET_NAME, TrackedDisk, TrackerConfig, TrackerError};

/// A disk opened for tracking, before its thread starts.
pub(super) struct Opened {
    pub disk: TrackedDisk,
    pub image: Box<dyn DiskRw>,
    pub vhd2: Uuid,
}

fn valid_export(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

pub(super) fn validate(cfg: &TrackerConfig, disks: &[TrackedDisk]) -> Result<(), TrackerError> {
    if let Some(a) = cfg.tcp_listen
        && !a.ip().is_loopback()
    {
        return Err(TrackerError::Config(format!(
            "tcp_listen {a} is not a loopback address (nbd has no authentication)"
        )));
    }
    validate_exports(disks)
}

/// Export names are well-formed and unique among `disks`.
pub(super) fn validate_exports(disks: &[TrackedDisk]) -> Result<(), TrackerError> {
    let mut names = std::collections::HashSet::new();
    for d in disks {
        if !valid_export(&d.export) {
            return Err(TrackerError::Config(format!(
                "export name {:?} must be 1-255 letters, digits, '.', '_' or '-'",
                d.export
            )));
        }
        if !names.insert(d.export.as_str()) {
            return Err(TrackerError::Config(format!(
                "export name {:?} is used twice",
                d.export
            )));
        }
    }
    Ok(())
}

pub(super) fn canonical(path: &Path) -> Result<PathBuf, TrackerError> {
    std::fs::canonicalize(path).map_err(|e| TrackerError::Io {
        path: path.to_path_buf(),
        what: "disk file",
        source: e,
    })
}

/// Opens the image for writing. A VHDX gets its new DataWriteGuid now (the first write of a
/// session changes it), so the logs record the guid the tracked data carries.
fn open_image(disk: TrackedDisk) -> Result<Opened, TrackerError> {
    let derr = |path: &Path, source| TrackerError::Disk {
        path: path.to_path_buf(),
        source,
    };
    let path = canonical(&disk.path)?;
    let format = ferry_disk::detect(&path).map_err(|e| derr(&path, e))?;
    let mut image = ferry_disk::open_rw(&path).map_err(|e| derr(&path, e))?;
    let vhd2 = if format == Format::Vhdx {
        image.write_at(0, &[]).map_err(|e| derr(&path, e))?;
        ferry_disk::vhdx_data_write_guid(&path).map_err(|e| derr(&path, e))?
    } else {
        Uuid::nil()
    };
    Ok(Opened {
        disk: TrackedDisk { path, ..disk },
        image,
        vhd2,
    })
}

/// The disk's first log of this session, chained to the last one next to it.
fn first_log(o: &Opened) -> Result<LogAppender, TrackerError> {
    next_in_chain(&o.disk.path)
        .and_then(|(seq, prev)| {
            LogAppender::create(&log_path(&o.disk.path, seq), seq, prev, o.vhd2)
        })
        .map_err(|e| TrackerError::Io {
            path: o.disk.path.clone(),
            what: "first log",
            source: e,
        })
}

/// Disks opened with their first logs, and the ones that could not be (configured path, why).
pub(super) type OpenedAll = (Vec<(Opened, LogAppender)>, Vec<(TrackedDisk, String)>);

/// Opens every image, then every first log. A disk that fails is left out (and named in the
/// second list) so the others are still tracked; a disk listed twice is a configuration error,
/// after which the logs already created are removed.
pub(super) fn open_all(disks: Vec<TrackedDisk>) -> Result<OpenedAll, TrackerError> {
    let mut opened = Vec::with_capacity(disks.len());
    let mut failed = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for d in disks {
        let o = match open_image(d.clone()) {
            Ok(o) => o,
            Err(e) => {
                warn!(vm = %d.vm, disk = %d.path.display(), error = %e, "cannot track disk: it is not served over nbd and its vm cannot run delta cycles");
                failed.push((d, e.to_string()));
                continue;
            }
        };
        if !seen.insert(o.disk.path.clone()) {
            return Err(TrackerError::Config(format!(
                "{} is tracked twice",
                o.disk.path.display()
            )));
        }
        opened.push((d, o));
    }
    let mut out: Vec<(Opened, LogAppender)> = Vec::with_capacity(opened.len());
    for (d, o) in opened {
        match first_log(&o) {
            Ok(l) => out.push((o, l)),
            Err(e) => {
                warn!(vm = %d.vm, disk = %d.path.display(), error = %e, "cannot track disk: it is not served over nbd and its vm cannot run delta cycles");
                if let Err(e) = o.image.finish() {
                    warn!(disk = %d.path.display(), error = %e, "closing the untracked disk failed");
                }
                failed.push((d, e.to_string()));
            }
        }
    }
    Ok((out, failed))
}

/// Opens every disk of a VM being added, with its first log, or none: a VM brought up with a
/// disk missing would run, and be replicated, without it.
pub(super) fn open_vm(disks: Vec<TrackedDisk>) -> Result<Vec<(Opened, LogAppender)>, TrackerError> {
    let mut images = Vec::with_capacity(disks.len());
    for d in disks {
        match open_image(d) {
            Ok(o) => images.push(o),
            Err(e) => {
                abandon(images.into_iter().map(|o| (o, None)));
                return Err(e);
            }
        }
    }
    let mut out = Vec::with_capacity(images.len());
    let mut rest = images.into_iter();
    while let Some(o) = rest.next() {
        match first_log(&o) {
            Ok(l) => out.push((o, l)),
            Err(e) => {
                let started = out.into_iter().map(|(o, l)| (o, Some(l)));
                abandon(started.chain([(o, None)]).chain(rest.map(|o| (o, None))));
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Undoes a failed add: the new first logs hold no write, so they are deleted (the next log
/// chains to the one before, as if they had never been made), and the images are closed
/// cleanly.
pub(super) fn abandon(items: impl Iterator<Item = (Opened, Option<LogAppender>)>) {
    for (o, log) in items {
        if let Some(l) = log {
            let p = l.path().to_path_buf();
            drop(l);
            if let Err(e) = std::fs::remove_file(&p) {
                warn!(log = %p.display(), error = %e, "cannot remove the unused log");
            }
        }
        if let Err(e) = o.image.finish() {
            warn!(disk = %o.disk.path.display(), error = %e, "closing the untracked disk failed");
        }
    }
}

pub(super) async fn bind_unix(dir: &Path) -> Result<(UnixListener, PathBuf), TrackerError> {
    let ioerr = |path: &Path, what, source| TrackerError::Io {
        path: path.to_path_buf(),
        what,
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| ioerr(dir, "socket folder", e))?;
    let dir = std::fs::canonicalize(dir).map_err(|e| ioerr(dir, "socket folder", e))?;
    let sock = dir.join(SOCKET_NAME);
    if let Ok(meta) = std::fs::symlink_metadata(&sock) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(TrackerError::Config(format!(
                "{} exists and is not a socket",
                sock.display()
            )));
        }
        // A socket left by an earlier run that did not stop cleanly.
        std::fs::remove_file(&sock).map_err(|e| ioerr(&sock, "stale socket", e))?;
    }
    let l = UnixListener::bind(&sock).map_err(|e| ioerr(&sock, "bind", e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ioerr(&sock, "socket permissions", e))?;
    Ok((l, sock))
}
