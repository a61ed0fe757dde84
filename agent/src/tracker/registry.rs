//! What the tracker serves, changeable while it runs: exports by NBD name and by image path,
//! and VMs with the state their disks share (the cut barrier and the fence).
//!
//! The maps sit behind one `std::sync::RwLock`, taken for a lookup or a change and never held
//! across an `.await`. Only the handshake of a connection and the management calls (URIs,
//! cuts, add, remove) look things up; a connection keeps its `Arc<Export>`, and that export's
//! [`VmShared`], for its whole life, so the write path takes no lock of the registry. A
//! removed export is cut off through its own token ([`Export::detached`]) and refuses work
//! once its thread has closed, so the connections that still hold it see it go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tracing::warn;

use super::TrackerError;
use super::export::Export;

/// What all disks of one VM share; every export of the VM holds the same one.
pub(crate) struct VmShared {
    pub name: String,
    /// The VM's cut barrier: each write holds it shared until answered, a cut exclusively.
    pub gate: Arc<tokio::sync::RwLock<()>>,
    pub fence: Fence,
}

impl VmShared {
    pub(crate) fn new(name: &str) -> Arc<Self> {
        Arc::new(VmShared {
            name: name.to_string(),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            fence: Fence::default(),
        })
    }
}

/// Whether the VM's writes are refused. Checked per write (one atomic load while the fence is
/// down), when a connection takes the request and again when the log stage takes it up, so a
/// write queued before the fence went up is refused too unless it was already logged.
#[derive(Default)]
pub(crate) struct Fence {
    up: AtomicBool,
    /// Whether this fence's first refusal was logged (one warning per fence, not per write).
    warned: AtomicBool,
    reason: Mutex<String>,
}

impl Fence {
    pub(crate) fn raise(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            *r = reason.to_string();
        }
        self.warned.store(false, Ordering::Relaxed);
        self.up.store(true, Ordering::SeqCst);
    }

    /// Lowers the fence; true when it was up.
    pub(crate) fn lower(&self) -> bool {
        self.up.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Whether a write to `export` of `vm` must be refused; logs the first refusal.
    pub(crate) fn refuses(&self, vm: &str, export: &str) -> bool {
        if !self.up.load(Ordering::Acquire) {
            return false;
        }
        if !self.warned.swap(true, Ordering::Relaxed) {
            let reason = self.reason.lock().map(|r| r.clone()).unwrap_or_default();
            warn!(vm, export, reason = %reason, "write refused: the vm is fenced");
        }
        true
    }
}

/// A served VM: its shared state and its disks in the order they were given.
pub(crate) struct Vm {
    pub shared: Arc<VmShared>,
    pub disks: Vec<Arc<Export>>,
}

#[derive(Default)]
struct Maps {
    by_name: HashMap<String, Arc<Export>>,
    by_path: HashMap<PathBuf, Arc<Export>>,
    vms: HashMap<String, Arc<Vm>>,
    /// Removed exports whose close has not finished: no longer served, still open.
    retiring: Vec<Arc<Export>>,
}

#[derive(Default)]
pub(crate) struct Registry {
    maps: RwLock<Maps>,
}

impl Registry {
    // A panic while the lock was held cannot leave the maps half-changed (every change is a
    // few inserts or removes), so a poisoned lock is used as it is.
    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.read().by_name.get(name).cloned()
    }

    /// Served export names, sorted.
    pub(crate) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().by_name.keys().cloned().collect();
        names.sort();
        names
    }

    pub(crate) fn by_path(&self, path: &Path) -> Option<Arc<Export>> {
        self.read().by_path.get(path).cloned()
    }

    pub(crate) fn vm(&self, name: &str) -> Option<Arc<Vm>> {
        self.read().vms.get(name).cloned()
    }

    /// Number of served disks.
    pub(crate) fn len(&self) -> usize {
        self.read().by_path.len()
    }

    /// Every disk not forgotten yet: the served ones and removed ones still closing.
    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        let m = self.read();
        m.by_path
            .values()
            .chain(m.retiring.iter())
            .cloned()
            .collect()
    }

    /// Checks `wanted` (export name, canonical path) for `vm` against what is served: the
    /// export names when the VM is served with exactly these disks, None when the VM is new and
    /// clashes with nothing, an error naming the clash otherwise.
    pub(crate) fn served_as(
        &self,
        vm: &str,
        wanted: &[(String, PathBuf)],
    ) -> Result<Option<Vec<String>>, TrackerError> {
        check(&self.read(), vm, wanted)
    }

    /// Serves `vm` (checked again under the lock: nothing may clash).
    pub(crate) fn insert(&self, vm: Vm) -> Result<(), TrackerError> {
        let wanted: Vec<(String, PathBuf)> = vm
            .disks
            .iter()
            .map(|e| (e.name.clone(), e.path.clone()))
            .collect();
        let mut m = self.write();
        if check(&m, &vm.shared.name, &wanted)?.is_some() {
            return Err(TrackerError::Config(format!(
                "vm {:?} is already served",
                vm.shared.name
            )));
        }
        for e in &vm.disks {
            m.by_name.insert(e.name.clone(), e.clone());
            m.by_path.insert(e.path.clone(), e.clone());
        }
        m.vms.insert(vm.shared.name.clone(), Arc::new(vm));
        Ok(())
    }

    /// Stops serving `vm`: its exports can no longer be found; they stay listed by
    /// [`all`](Self::all) until [`retired`](Self::retired).
    pub(crate) fn remove(&self, vm: &str) -> Option<Arc<Vm>> {
        let mut m = self.write();
        let entry = m.vms.remove(vm)?;
        for e in &entry.disks {
            m.by_name.remove(&e.name);
            m.by_path.remove(&e.path);
            m.retiring.push(e.clone());
        }
        Some(entry)
    }

    /// Forgets removed exports once their close has finished.
    pub(crate) fn retired(&self, gone: &[Arc<Export>]) {
        self.write()
            .retiring
            .retain(|e| !gone.iter().any(|g| Arc::ptr_eq(e, g)));
    }
}

fn check(
    m: &Maps,
    vm: &str,
    wanted: &[(String, PathBuf)],
) -> Result<Option<Vec<String>>, TrackerError> {
    if let Some(served) = m.vms.get(vm) {
        let same = served.disks.len() == wanted.len()
            && served
                .disks
                .iter()
                .zip(wanted)
                .all(|(e, (name, path))| e.name == *name && e.path == *path);
        if same {
            return Ok(Some(wanted.iter().map(|(n, _)| n.clone()).collect()));
        }
        let have: Vec<&str> = served.disks.iter().map(|e| e.name.as_str()).collect();
        return Err(TrackerError::Config(format!(
            "vm {vm:?} is already served with other disks (exports {have:?}); remove it first"
        )));
    }
    for (name, path) in wanted {
        if let Some(e) = m.by_name.get(name) {
            return Err(TrackerError::Config(format!(
                "export name {name:?} is already served for vm {:?}",
                e.vm.name
            )));
        }
        let tracked = m.by_path.get(path).or_else(|| {
            // A disk still closing after its removal may not be opened a second time.
            m.retiring.iter().find(|e| e.path == *path)
        });
        if let Some(e) = tracked {
            return Err(TrackerError::Config(format!(
                "{} is already tracked for vm {:?} (export {:?})",
                path.display(),
                e.vm.name,
                e.name
            )));
        }
    }
    Ok(None)
}
