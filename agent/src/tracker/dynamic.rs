//! VMs added and removed while the tracker runs (failover brings a VM's disks up on a recovery
//! host; a VM that moved away is dropped), and fencing a VM's writes against split brain.
//!
//! Adds and removes run in a task of their own under the tracker's change lock, so a caller
//! that gives up half-way (drops the future) leaves no image opened and never served, or
//! removed and never closed.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::{info, warn};

use super::export::Export;
use super::fill::Fill;
use super::log::{LogAppender, SealedLog};
use super::open::{Opened, abandon, canonical, open_vm, validate_exports};
use super::registry::{Registry, Vm, VmShared};
use super::{Inner, TrackedDisk, Tracker, TrackerError, close_exports};

impl Tracker {
    /// Opens the disks of `vm` (all or none: an export name or image that is served already,
    /// an invalid or repeated export name, a disk that cannot be opened or given its first log
    /// refuses the whole VM), starts their logs as at start (chained to the logs already next
    /// to each disk) and serves them over NBD from now on. Returns each disk's
    /// `nbd+unix://` URI, in order. A VM served already with the same disks (same export names
    /// and images, in order) gets its URIs again; with other disks it is refused
    /// ([`TrackerError::Config`]). Every disk's `vm` must be `vm`. After shutdown:
    /// [`TrackerError::Stopped`].
    pub async fn add_vm(
        &self,
        vm: &str,
        disks: Vec<TrackedDisk>,
    ) -> Result<Vec<String>, TrackerError> {
        self.add_vm_filled(vm, disks, Vec::new()).await
    }

    /// [`add_vm`](Self::add_vm) where some disks are still being filled from their point
    /// (instant recovery, `fill.rs`): `fills[i]` belongs to `disks[i]`. Each fill is in place
    /// before any connection can reach its disk, and its background copy starts.
    pub async fn add_vm_filled(
        &self,
        vm: &str,
        disks: Vec<TrackedDisk>,
        fills: Vec<Option<Arc<Fill>>>,
    ) -> Result<Vec<String>, TrackerError> {
        let fills: HashMap<String, Arc<Fill>> = disks
            .iter()
            .zip(fills)
            .filter_map(|(d, f)| Some((d.export.clone(), f?)))
            .collect();
        let task = tokio::spawn(add(self.inner.clone(), vm.to_string(), disks, fills));
        task.await.unwrap_or(Err(TrackerError::Stopped))
    }

    /// Blocks local and blocks in all of the disk at `path` while it is being filled.
    pub fn fill_progress(&self, path: &std::path::Path) -> Option<(u64, u64)> {
        let e = self.export(path)?;
        e.pending_fill().map(|f| f.progress())
    }

    /// Stops serving `vm`: new connections to its exports are refused and open ones closed
    /// (requests still queued are answered ESHUTDOWN), its current logs are sealed and its
    /// images closed cleanly (as the stop does); returns the sealed logs. The files may be
    /// deleted afterwards. A disk that does not close cleanly is still forgotten; the first
    /// such error is returned (the logs sealed stay next to their disks).
    pub async fn remove_vm(&self, vm: &str) -> Result<Vec<SealedLog>, TrackerError> {
        let task = tokio::spawn(remove(self.inner.clone(), vm.to_string()));
        task.await.unwrap_or(Err(TrackerError::Stopped))
    }

    /// Refuses every write, write-zeroes and trim to the disks of `vm` with EPERM, on open
    /// connections too, until [`unfence_vm`](Self::unfence_vm); reads, flushes and cuts still
    /// work. Fencing a fenced VM replaces the reason. The fence lasts while the VM is served.
    pub fn fence_vm(&self, vm: &str, reason: &str) -> Result<(), TrackerError> {
        let entry = self.served(vm)?;
        entry.shared.fence.raise(reason);
        info!(
            vm,
            reason,
            disks = entry.disks.len(),
            "vm fenced: its writes are refused"
        );
        Ok(())
    }

    /// Accepts the writes of a fenced `vm` again (a VM not fenced stays as it is).
    pub fn unfence_vm(&self, vm: &str) -> Result<(), TrackerError> {
        let entry = self.served(vm)?;
        if entry.shared.fence.lower() {
            info!(vm, "vm unfenced: its writes are accepted again");
        }
        Ok(())
    }

    /// Whether `vm` is served and fenced.
    pub fn is_fenced(&self, vm: &str) -> bool {
        self.inner
            .registry
            .vm(vm)
            .is_some_and(|v| v.shared.fence.is_up())
    }

    fn served(&self, vm: &str) -> Result<Arc<Vm>, TrackerError> {
        self.inner
            .registry
            .vm(vm)
            .ok_or_else(|| TrackerError::UnknownVm(vm.to_string()))
    }
}

async fn add(
    inner: Arc<Inner>,
    vm: String,
    disks: Vec<TrackedDisk>,
    fills: HashMap<String, Arc<Fill>>,
) -> Result<Vec<String>, TrackerError> {
    check_request(&vm, &disks)?;
    if inner.shutdown.is_cancelled() {
        return Err(TrackerError::Stopped);
    }
    let _changes = inner.changes.lock().await;
    // Checked again: the stop may have run while this waited, and it closes only what it saw.
    if inner.shutdown.is_cancelled() {
        return Err(TrackerError::Stopped);
    }
    let registry = inner.registry.clone();
    let name = vm.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&registry, &name, disks))
        .await
        .map_err(|_| TrackerError::Stopped)??;
    let names = match prepared {
        Prepared::Served(names) => {
            if let Some(served) = inner.registry.vm(&vm) {
                attach_fills(&inner, &served.disks, fills);
            }
            names
        }
        Prepared::Opened(opened) => {
            let shared = VmShared::new(&vm);
            let disks = start_exports(&shared, opened).await?;
            // Before the insert: no connection finds the disks without their fills.
            attach_fills(&inner, &disks, fills);
            let names: Vec<String> = disks.iter().map(|e| e.name.clone()).collect();
            let n = disks.len();
            if let Err(e) = inner.registry.insert(Vm {
                shared,
                disks: disks.clone(),
            }) {
                close_exports(&disks).await;
                return Err(e);
            }
            info!(vm, disks = n, "vm added: its disks are served over nbd");
            names
        }
    };
    Ok(names.iter().map(|n| inner.unix_uri(n)).collect())
}

/// Puts each fill on its disk (a disk that has one keeps it) and starts its background copy.
fn attach_fills(inner: &Inner, exports: &[Arc<Export>], mut fills: HashMap<String, Arc<Fill>>) {
    for e in exports {
        if let Some(f) = fills.remove(&e.name)
            && e.fill.set(f.clone()).is_ok()
            && !f.is_complete()
        {
            tokio::spawn(super::fill::copy(e.clone(), f, inner.shutdown.clone()));
        }
    }
}

fn check_request(vm: &str, disks: &[TrackedDisk]) -> Result<(), TrackerError> {
    if vm.is_empty() {
        return Err(TrackerError::Config("a vm to add needs a name".into()));
    }
    if disks.is_empty() {
        return Err(TrackerError::Config(format!(
            "vm {vm:?} has no disks to add"
        )));
    }
    if let Some(d) = disks.iter().find(|d| d.vm != vm) {
        return Err(TrackerError::Config(format!(
            "disk {} is given for vm {:?}, not {vm:?}",
            d.path.display(),
            d.vm
        )));
    }
    validate_exports(disks)
}

enum Prepared {
    /// The VM is served with these disks already: their export names.
    Served(Vec<String>),
    Opened(Vec<(Opened, LogAppender)>),
}

/// Compares the request with what is served, then opens the disks (blocking).
fn prepare(
    registry: &Registry,
    vm: &str,
    disks: Vec<TrackedDisk>,
) -> Result<Prepared, TrackerError> {
    let served = registry.vm(vm).is_some();
    let mut wanted: Vec<(String, std::path::PathBuf)> = Vec::with_capacity(disks.len());
    for d in &disks {
        let path = match canonical(&d.path) {
            Ok(p) => p,
            // Compared as given: it then differs from the served disks, which names the VM.
            Err(_) if served => d.path.clone(),
            Err(e) => return Err(e),
        };
        if wanted.iter().any(|(_, p)| *p == path) {
            return Err(TrackerError::Config(format!(
                "{} is tracked twice",
                path.display()
            )));
        }
        wanted.push((d.export.clone(), path));
    }
    if let Some(names) = registry.served_as(vm, &wanted)? {
        return Ok(Prepared::Served(names));
    }
    // Open exactly the files that were checked.
    let disks = disks
        .into_iter()
        .zip(wanted)
        .map(|(d, (_, path))| TrackedDisk { path, ..d })
        .collect();
    open_vm(disks).map(Prepared::Opened)
}

/// Starts the threads of a VM's opened disks. When one cannot start, the ones started are
/// closed and the rest abandoned, so nothing is left half-open.
pub(super) async fn start_exports(
    shared: &Arc<VmShared>,
    opened: Vec<(Opened, LogAppender)>,
) -> Result<Vec<Arc<Export>>, TrackerError> {
    let mut started = Vec::with_capacity(opened.len());
    let mut rest = opened.into_iter();
    while let Some((o, first)) = rest.next() {
        info!(export = %o.disk.export, vm = %o.disk.vm, disk = %o.disk.path.display(), log = %first.path().display(), "tracking disk");
        match Export::start(
            o.disk.export,
            shared.clone(),
            o.disk.path,
            o.image,
            first,
            o.vhd2,
        ) {
            Ok(e) => started.push(e),
            Err(e) => {
                close_exports(&started).await;
                let rest: Vec<_> = rest.map(|(o, l)| (o, Some(l))).collect();
                let _ = tokio::task::spawn_blocking(move || abandon(rest.into_iter())).await;
                return Err(e);
            }
        }
    }
    Ok(started)
}

async fn remove(inner: Arc<Inner>, vm: String) -> Result<Vec<SealedLog>, TrackerError> {
    if inner.shutdown.is_cancelled() {
        return Err(TrackerError::Stopped);
    }
    let _changes = inner.changes.lock().await;
    // The stop has sealed and closed everything already.
    if inner.shutdown.is_cancelled() {
        return Err(TrackerError::Stopped);
    }
    let entry = inner
        .registry
        .remove(&vm)
        .ok_or_else(|| TrackerError::UnknownVm(vm.clone()))?;
    // No new connection finds the exports now; the open ones end here. Requests they queued
    // before are answered by the close below (or ESHUTDOWN after it).
    for e in &entry.disks {
        e.detached.cancel();
    }
    let (sealed, err) = close_exports(&entry.disks).await;
    inner.registry.retired(&entry.disks);
    if let Some(e) = err {
        warn!(vm, error = %e, sealed = sealed.len(), "vm removed, but not every disk closed cleanly");
        return Err(e);
    }
    info!(
        vm,
        disks = entry.disks.len(),
        "vm removed: its disks are no longer served"
    );
    Ok(sealed)
}
