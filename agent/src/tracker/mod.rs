//! The write tracker: every protected disk is served over NBD, and every write a VM makes
//! through it is recorded in the disk's current MS-HRL log before it is acknowledged.
//!
//! ```text
//!  qemu / qemu-io / nbdcopy ──NBD (unix socket, loopback TCP)──▶ connection task (nbd.rs)
//!    reads: blocking pool, image read lock
//!    writes: queue ─▶ log thread: data + metadata block (log.rs) ─▶ apply thread: image, answer
//!  registry (registry.rs): exports by name and path, VMs (cut barrier, fence); add/remove
//! ```
//!
//! * [`Tracker::start`] opens each disk for writing (raw, VHD, VHDX through `ferry-disk`),
//!   starts a fresh `<disk file>.<seq:08>.hrl` next to it, chained by PreviousUniqueId to the
//!   last log already there, and serves all disks on one Unix socket
//!   (`<socket_dir>/ferry-tracker.sock`, mode 0600) and, when configured, one loopback TCP port.
//!   Disks are NBD exports named by [`TrackedDisk::export`]; [`Tracker::nbd_uri`] gives the
//!   URI to hand to qemu (`-drive file=nbd+unix:///EXPORT?socket=/abs/sock`).
//! * VMs come and go while the tracker runs (a recovery host serves the disks of a VM it has
//!   just materialised; a host drops a VM that moved away). [`Tracker::add_vm`] opens all of a
//!   VM's disks or none (same checks as at start, and no export name or image already
//!   served), starts their logs like a configured disk's and serves them on the same socket
//!   and port; adding a VM again with the same disks only returns its URIs, with other disks it
//!   is refused. [`Tracker::remove_vm`] stops serving the VM (new connections to its exports are
//!   refused, open ones are closed, requests still queued are answered ESHUTDOWN), seals its
//!   logs and closes its images as the stop does, and returns the sealed logs; the files may
//!   then be deleted. Every query (URIs, pending bytes, current log, cut, open disks, the stop)
//!   sees added VMs and forgets removed ones. Adds, removes and the stop run one at a time, so
//!   an image is never opened twice and the stop closes whatever was added.
//! * Fencing (against split brain: the VM runs elsewhere now): [`Tracker::fence_vm`] makes
//!   every write, write-zeroes and trim to the VM's disks fail with EPERM, on open connections
//!   too (checked per request, and again when the log stage takes it up, so nothing queued
//!   reaches the log or the image afterwards); reads and flushes still work, the first refusal
//!   is logged with the reason. Writes already logged when the fence goes up complete. Cuts
//!   still work, so the last acknowledged writes can be shipped. [`Tracker::unfence_vm`] lifts
//!   it. A fence lives as long as the VM is served: removing the VM forgets it, and it is not
//!   kept across a restart of the tracker.
//! * Durability: an acknowledged write is in the log (data and its metadata block) and in the
//!   image, so killing the agent loses nothing a client was told is written. FLUSH and FUA make
//!   both durable (fdatasync of the log, then the image's flush). Without them, a power loss
//!   can lose writes as with any disk cache; the log is written first, so after a process
//!   crash it never misses an image change. A log's writeback is started every 8 MiB so a
//!   FLUSH finds little dirty log data. An unclosed log (EOL 0, after a crash) is read back by
//!   `ferry_disk::hrl::HrlLog` up to its last metadata block; the next start chains to it.
//! * TRIM and WRITE_ZEROES are applied as zeros and recorded as write records of zeros (MS-HRL
//!   has only writes), in pieces of at most 1 MiB; pieces that already read as zero are
//!   skipped, so discarding free space does not fill the log.
//! * [`Tracker::cut`] seals the logs of all disks of a VM at one instant: new writes to the
//!   VM's disks wait, writes in flight finish and are acknowledged, each log is closed (EOL
//!   set, synced, after the image is flushed) and the next one opened, then writes resume.
//!   Every write acknowledged before the cut is in a sealed log, and no write that started
//!   after it is, on every disk of the VM: each sealed set is a consistent cut.
//! * A configured disk that cannot be opened for writing (missing file, unreadable image, no
//!   room for its first log) is not tracked: the tracker warns, serves the others, and
//!   [`Tracker::failure`] says why (the agent reports it as the disk's error). (An added VM
//!   with such a disk is refused as a whole instead.)
//! * When `shutdown` fires, the listeners close and connections are dropped (no new writes),
//!   each current log is sealed and each image closed cleanly (a VHDX's metadata log is
//!   applied and cleared, as qemu leaves a closed file; "disk closed" is logged per disk);
//!   [`Tracker::stopped`] returns those last sealed logs, and [`Tracker::open_disks`] lists
//!   the disks not closed yet (what a stop that times out leaves). The next start chains its
//!   new logs to them. No VM is added or removed once `shutdown` fired ([`TrackerError::Stopped`]).
//! * Instant recovery ([`Tracker::add_vm_filled`], `fill.rs`): a disk may be served before
//!   its blocks are local; a read first fetches the blocks it touches, a write is queued
//!   only once they are local and recorded so, and a background copy fetches the rest.
//! * Broken or hostile clients get an NBD error (out-of-range requests, unknown commands) or
//!   are disconnected with a warning (bad magic, oversized payloads, handshake garbage or
//!   timeout); other connections are not affected.
//!
//! Sealed logs stay next to the disk until the shipper deletes them after their recovery point
//! is durable: [`list_logs`] lists a disk's logs (also after a restart), and
//! [`Tracker::current_log`] says which one is still open; every other one is sealed.
//!
//! API: [`Tracker::start`], [`Tracker::cut`] (returns [`SealedLog`]s: disk, log, seq, unique
//! id, previous id, bytes, records), [`Tracker::nbd_uri`] / [`Tracker::nbd_tcp_uri`],
//! [`Tracker::pending_bytes`] (size of the open log), [`Tracker::current_log`],
//! [`Tracker::stopped`], [`Tracker::add_vm`] / [`Tracker::remove_vm`],
//! [`Tracker::fence_vm`] / [`Tracker::unfence_vm`] / [`Tracker::is_fenced`]; [`log_path`] is
//! the naming rule.

mod dynamic;
mod export;
pub mod fill;
pub mod fill_file;
mod log;
mod nbd;
mod open;
mod registry;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_disk::DiskError;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use export::{Export, Op};
pub use log::{SealedLog, list_logs, log_path};
use open::{bind_unix, open_all, validate};
use registry::{Registry, Vm, VmShared};

/// File name of the tracker's Unix socket inside [`TrackerConfig::socket_dir`].
pub const SOCKET_NAME: &str = "ferry-tracker.sock";

/// A disk to track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedDisk {
    /// The VM the disk belongs to: a cut seals the logs of all its disks at once.
    pub vm: String,
    /// The image file (raw, VHD or VHDX; detected by content).
    pub path: PathBuf,
    /// NBD export name: letters, digits, `.`, `_`, `-`.
    pub export: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Folder of the Unix socket (created if missing).
    pub socket_dir: PathBuf,
    /// Also serve NBD on this loopback address (port 0 picks one).
    pub tcp_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("invalid tracker configuration: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Disk {
        path: PathBuf,
        #[source]
        source: DiskError,
    },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown vm {0:?}")]
    UnknownVm(String),
    #[error("the tracker has stopped")]
    Stopped,
}

/// The running tracker; cheap to clone.
#[derive(Clone)]
pub struct Tracker {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<Registry>,
    socket: PathBuf,
    tcp: Option<SocketAddr>,
    /// The tracker's shutdown: once it fired, no VM is added or removed.
    shutdown: CancellationToken,
    /// Held by an add, a remove and the stop for their whole run: one at a time, so an image
    /// is never opened twice and the stop closes every disk an add opened.
    changes: tokio::sync::Mutex<()>,
    /// Fires once every disk is closed after shutdown.
    stopped: CancellationToken,
    last_logs: Mutex<Vec<SealedLog>>,
    /// Configured disks that could not be tracked, by configured and canonical path.
    failed: HashMap<PathBuf, String>,
    /// Fault injection for tests: how long the stop waits before closing the disks.
    close_stall: Mutex<std::time::Duration>,
}

impl Inner {
    fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

impl Tracker {
    /// Opens the disks, starts their logs and serves NBD until `shutdown` fires.
    pub async fn start(
        cfg: TrackerConfig,
        disks: Vec<TrackedDisk>,
        shutdown: CancellationToken,
    ) -> Result<Self, TrackerError> {
        validate(&cfg, &disks)?;
        // Listeners first: a start that fails must not leave half-made logs behind.
        let (unix, socket) = bind_unix(&cfg.socket_dir).await?;
        let tcp = match cfg.tcp_listen {
            Some(a) => match TcpListener::bind(a).await {
                Ok(l) => Some(l),
                Err(e) => {
                    let _ = std::fs::remove_file(&socket);
                    return Err(TrackerError::Io {
                        path: PathBuf::from(a.to_string()),
                        what: "tcp bind",
                        source: e,
                    });
                }
            },
            None => None,
        };
        let (opened, not_tracked) = match tokio::task::spawn_blocking(move || open_all(disks)).await
        {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
            Err(_) => {
                let _ = std::fs::remove_file(&socket);
                return Err(TrackerError::Stopped);
            }
        };
        let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());

        // Disks grouped by VM, in the order given.
        let mut groups: Vec<(String, Vec<_>)> = Vec::new();
        for (o, first) in opened {
            match groups.iter_mut().find(|(vm, _)| *vm == o.disk.vm) {
                Some((_, g)) => g.push((o, first)),
                None => groups.push((o.disk.vm.clone(), vec![(o, first)])),
            }
        }
        let registry = Arc::new(Registry::default());
        let mut served: Vec<Arc<Export>> = Vec::new();
        for (vm, group) in groups {
            let shared = VmShared::new(&vm);
            let r = match dynamic::start_exports(&shared, group).await {
                Ok(disks) => {
                    served.extend(disks.iter().cloned());
                    registry.insert(Vm { shared, disks })
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                // Nothing is served yet: close what was started, as a stop would.
                close_exports(&served).await;
                let _ = std::fs::remove_file(&socket);
                return Err(e);
            }
        }
        let mut failed = HashMap::new();
        for (d, why) in not_tracked {
            if let Ok(p) = std::fs::canonicalize(&d.path) {
                failed.insert(p, why.clone());
            }
            failed.insert(d.path, why);
        }
        let inner = Arc::new(Inner {
            registry: registry.clone(),
            socket,
            tcp: tcp_addr,
            shutdown: shutdown.clone(),
            changes: tokio::sync::Mutex::new(()),
            stopped: CancellationToken::new(),
            last_logs: Mutex::new(Vec::new()),
            failed,
            close_stall: Mutex::new(std::time::Duration::ZERO),
        });
        let conns = shutdown.child_token();
        tokio::spawn(accept_unix(unix, registry.clone(), conns.clone()));
        if let Some(l) = tcp {
            tokio::spawn(accept_tcp(l, registry.clone(), conns.clone()));
        }
        tokio::spawn(stop_on(shutdown, inner.clone()));
        info!(socket = %inner.socket.display(), tcp = ?inner.tcp, disks = registry.len(), not_tracked = inner.failed.len(), "tracker serving nbd");
        Ok(Tracker { inner })
    }

    fn export(&self, path: &Path) -> Option<Arc<Export>> {
        let registry = &self.inner.registry;
        registry.by_path(path).or_else(|| {
            let p = std::fs::canonicalize(path).ok()?;
            registry.by_path(&p)
        })
    }

    /// `nbd+unix:///EXPORT?socket=/abs/sock` for a tracked disk.
    pub fn nbd_uri(&self, path: &Path) -> Option<String> {
        let e = self.export(path)?;
        Some(self.inner.unix_uri(&e.name))
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` when TCP is configured.
    pub fn nbd_tcp_uri(&self, path: &Path) -> Option<String> {
        let e = self.export(path)?;
        let a = self.inner.tcp?;
        Some(format!("nbd://{a}/{}", e.name))
    }

    pub fn socket_path(&self) -> &Path {
        &self.inner.socket
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.inner.tcp
    }

    /// Why a configured disk is not tracked (it could not be opened for writing, or its first
    /// log not created, when the tracker started); None for a tracked or unknown disk.
    pub fn failure(&self, path: &Path) -> Option<String> {
        if self.export(path).is_some() {
            return None;
        }
        self.inner.failed.get(path).cloned().or_else(|| {
            let p = std::fs::canonicalize(path).ok()?;
            self.inner.failed.get(&p).cloned()
        })
    }

    /// Tracked disks not closed yet (before shutdown: all of them), each with its open log.
    pub fn open_disks(&self) -> Vec<(PathBuf, Option<PathBuf>)> {
        let mut open: Vec<_> = self
            .inner
            .registry
            .all()
            .iter()
            .filter(|e| !e.closed.load(Ordering::Acquire))
            .map(|e| {
                let log = match e.current.load(Ordering::Relaxed) {
                    0 => None,
                    seq => Some(log_path(&e.path, seq)),
                };
                (e.path.clone(), log)
            })
            .collect();
        open.sort();
        open
    }

    /// Whether the tracker has stopped (every disk closed, or given up on) after shutdown.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.is_cancelled()
    }

    /// Fault injection for tests: the stop waits this long before it closes the disks (a
    /// disk on a hung filesystem), so a bounded stop can be seen giving up.
    #[doc(hidden)]
    pub fn stall_close(&self, d: std::time::Duration) {
        if let Ok(mut s) = self.inner.close_stall.lock() {
            *s = d;
        }
    }

    /// Size of the disk's current log file (0 for an unknown disk).
    pub fn pending_bytes(&self, path: &Path) -> u64 {
        self.export(path)
            .map_or(0, |e| e.pending.load(Ordering::Relaxed))
    }

    /// The disk's open log (the one writes go to now); every other log of the disk in
    /// [`list_logs`] is sealed. None for an unknown disk, after shutdown, or while a failed
    /// log creation is being retried.
    pub fn current_log(&self, path: &Path) -> Option<PathBuf> {
        let e = self.export(path)?;
        match e.current.load(Ordering::Relaxed) {
            0 => None,
            seq => Some(log_path(&e.path, seq)),
        }
    }

    /// Seals the current logs of all disks of `vm` at one instant and opens the next ones.
    pub async fn cut(&self, vm: &str) -> Result<Vec<SealedLog>, TrackerError> {
        self.cut_staggered(vm, std::time::Duration::ZERO).await
    }

    /// Fault injection for tests: [`cut`](Self::cut) with a pause between the rotations of
    /// successive disks. The barrier must keep the cut consistent all the same; without it the
    /// pause lets writes cross the cut.
    #[doc(hidden)]
    pub async fn cut_staggered(
        &self,
        vm: &str,
        stagger: std::time::Duration,
    ) -> Result<Vec<SealedLog>, TrackerError> {
        Ok(self.cut_with(vm, stagger, async {}).await?.0)
    }

    /// [`cut`](Self::cut) for a group cut: `rendezvous` runs while the VM's writes are paused
    /// (every write in flight answered, new ones held), and the logs are sealed after it, so
    /// they hold exactly what the VM had written when it paused. Writes wait for it: keep it
    /// short.
    pub async fn cut_paused<T>(
        &self,
        vm: &str,
        rendezvous: impl std::future::Future<Output = T>,
    ) -> Result<(Vec<SealedLog>, T), TrackerError> {
        self.cut_with(vm, std::time::Duration::ZERO, rendezvous)
            .await
    }

    async fn cut_with<T>(
        &self,
        vm: &str,
        stagger: std::time::Duration,
        rendezvous: impl std::future::Future<Output = T>,
    ) -> Result<(Vec<SealedLog>, T), TrackerError> {
        let entry = self
            .inner
            .registry
            .vm(vm)
            .ok_or_else(|| TrackerError::UnknownVm(vm.to_string()))?;
        let disks = &entry.disks;
        let t0 = Instant::now();
        let barrier = entry.shared.gate.write().await;
        let waited = t0.elapsed();
        let met = rendezvous.await;
        let mut waits = Vec::with_capacity(disks.len());
        for (i, d) in disks.iter().enumerate() {
            if i > 0 && !stagger.is_zero() {
                tokio::time::sleep(stagger).await;
            }
            let (tx, rx) = oneshot::channel();
            d.submit(Op::Rotate { done: tx });
            waits.push(rx);
        }
        let mut sealed = Vec::with_capacity(disks.len());
        let mut first_err = None;
        for rx in waits {
            match rx.await.unwrap_or(Err(TrackerError::Stopped)) {
                Ok(s) => sealed.push(s),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        drop(barrier);
        let held = t0.elapsed().saturating_sub(waited);
        if let Some(e) = first_err {
            warn!(vm, error = %e, sealed = sealed.len(), "cut failed; logs sealed so far stay on disk");
            return Err(e);
        }
        info!(
            vm,
            disks = sealed.len(),
            drain_us = waited.as_micros() as u64,
            barrier_us = held.as_micros() as u64,
            "logs cut"
        );
        Ok((sealed, met))
    }

    /// Waits until the tracker stopped after shutdown; returns the logs sealed at shutdown.
    pub async fn stopped(&self) -> Vec<SealedLog> {
        self.inner.stopped.cancelled().await;
        self.inner
            .last_logs
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }
}

async fn stop_on(shutdown: CancellationToken, inner: Arc<Inner>) {
    shutdown.cancelled().await;
    // Waits for an add or remove under way: the disks an add opens are closed below too.
    let _changes = inner.changes.lock().await;
    let stall = inner.close_stall.lock().map(|s| *s).unwrap_or_default();
    if !stall.is_zero() {
        tokio::time::sleep(stall).await;
    }
    let (last, _) = close_exports(&inner.registry.all()).await;
    let _ = std::fs::remove_file(&inner.socket);
    if let Ok(mut l) = inner.last_logs.lock() {
        *l = last;
    }
    info!("tracker stopped");
    inner.stopped.cancel();
}

/// Seals the logs of `exports` and closes their images (all at once, each on its own thread);
/// returns the sealed logs and the first failure, each failure logged.
async fn close_exports(exports: &[Arc<Export>]) -> (Vec<SealedLog>, Option<TrackerError>) {
    let mut waits = Vec::with_capacity(exports.len());
    for e in exports {
        let (tx, rx) = oneshot::channel();
        e.submit(Op::Close { done: tx });
        waits.push((e, rx));
    }
    let mut sealed = Vec::new();
    let mut first_err = None;
    for (e, rx) in waits {
        match rx.await {
            Ok(Ok(Some(s))) => sealed.push(s),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => {
                warn!(export = %e.name, disk = %e.path.display(), error = %err, "disk did not close cleanly");
                first_err.get_or_insert(err);
            }
            Err(_) => {
                warn!(export = %e.name, disk = %e.path.display(), "disk thread ended before closing");
                first_err.get_or_insert(TrackerError::Stopped);
            }
        }
    }
    (sealed, first_err)
}

async fn accept_unix(l: UnixListener, registry: Arc<Registry>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = l.accept() => a,
        };
        match accepted {
            Ok((s, _)) => {
                tokio::spawn(nbd::serve(
                    s,
                    "unix".into(),
                    registry.clone(),
                    cancel.clone(),
                ));
            }
            Err(e) => {
                warn!(error = %e, "nbd accept failed on the unix socket");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_tcp(l: TcpListener, registry: Arc<Registry>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = l.accept() => a,
        };
        match accepted {
            Ok((s, peer)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(nbd::serve(
                    s,
                    peer.to_string(),
                    registry.clone(),
                    cancel.clone(),
                ));
            }
            Err(e) => {
                warn!(error = %e, "nbd accept failed on tcp");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
