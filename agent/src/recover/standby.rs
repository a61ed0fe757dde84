//! Standby copies (`[recovery] standby = true`): a recovery host keeps, for each VM it is the
//! recovery host of, a copy of the VM's disks at its latest point, brought forward point by
//! point as they are committed — the replica disks ASR keeps at the recovery site. A failover
//! then starts from that copy (`standby_take.rs`): it writes only the blocks that differ
//! between the copy's point and the point failed over to, instead of the whole point.
//!
//! Layout, under `[recovery] dir/.standby/<vm>/` (the folder `serve_folders` skips: it has
//! no marker):
//! * the disk images, named as in a recovered VM's folder (same filesystem, so a production
//!   failover moves them with a rename);
//! * `.<file>.standby-map`: the block map of the point the image holds (the fill map's
//!   layout, `tracker::fill_file`);
//! * `standby.json`: the point, the disks, and per disk the *dirty* blocks.
//!
//! Crash safety: the content of each image is its map, except its dirty blocks, whose content
//! is unknown. Before an image is touched, every block about to be written is added to its
//! dirty list (written durably); the maps of the new point are written only after the images
//! are flushed, and the dirty lists cleared last. Any later apply — or a failover — rewrites
//! the dirty blocks too, so a crash or a cancel at any step leaves a copy that is still
//! usable, never one that is silently wrong. A copy whose files are missing or unreadable is
//! rebuilt from the store.
//!
//! Which VMs: the registry says in each heartbeat answer (`standby_vms`: keep current;
//! `standby_kept_vms`: keep, but do not change — a failover is running). The copies of any
//! other VM are deleted.
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::common::v1::{PointDisk, RecoveryPoint};
use ferry_store::{ChunkId, VaultKey};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::repoint::{Plan, len_of};
use super::write::{blocking, check_map};
use super::{plan_files, remove_folder};
use crate::tracker::fill_file::{self, FillPlan};
use crate::{Agent, ReplError};

/// The folder under `[recovery] dir` that holds the standby copies.
pub const STANDBY_DIR: &str = ".standby";
const STATE: &str = "standby.json";
/// How often the copies are checked against the latest points.
const TICK: Duration = Duration::from_secs(2);

/// What the agent knows of its standby copies: what the registry asked for, a lock per VM
/// (a refresh and a failover never touch a copy at once) and the refresh running per VM.
#[derive(Default)]
pub(crate) struct Standbys {
    /// From the last heartbeat answer: VMs to keep current, and VMs to keep as they are.
    /// None until the first answer (nothing is deleted before it).
    wanted: std::sync::Mutex<Option<(Vec<String>, Vec<String>)>>,
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    refreshing: std::sync::Mutex<HashMap<String, CancellationToken>>,
}

impl Standbys {
    pub(crate) fn set_wanted(&self, update: Vec<String>, keep: Vec<String>) {
        if let Ok(mut w) = self.wanted.lock() {
            *w = Some((update, keep));
        }
    }

    fn wanted(&self) -> Option<(Vec<String>, Vec<String>)> {
        self.wanted.lock().ok().and_then(|w| w.clone())
    }

    fn lock_of(&self, vm: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(vm.to_owned()).or_default().clone()
    }

    /// The VM's copy, for the caller alone: a refresh running is cancelled first.
    pub(super) async fn take(&self, vm: &str) -> tokio::sync::OwnedMutexGuard<()> {
        if let Some(t) = self.refreshing.lock().ok().and_then(|r| r.get(vm).cloned()) {
            t.cancel();
        }
        self.lock_of(vm).lock_owned().await
    }
}

/// `standby.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct State {
    pub(super) vm: String,
    /// The point the images hold (outside their dirty blocks).
    pub(super) point: String,
    pub(super) disks: Vec<StandbyDisk>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct StandbyDisk {
    pub(super) disk_id: String,
    pub(super) file: String,
    pub(super) format: String,
    pub(super) virtual_size: u64,
    pub(super) block_size: u32,
    /// Blocks whose content is unknown (an apply was cut short): rewritten by the next.
    #[serde(default)]
    pub(super) dirty: BTreeSet<u64>,
}

impl State {
    fn clean(&self) -> bool {
        self.disks.iter().all(|d| d.dirty.is_empty())
    }

    /// Why the copy cannot be brought to `point` in place (other disks, files, formats,
    /// sizes or block sizes); None when it can.
    pub(super) fn misfit(&self, point: &RecoveryPoint, files: &[String]) -> Option<String> {
        if self.disks.len() != point.disks.len() {
            return Some(format!(
                "the copy has {} disks, the point {}",
                self.disks.len(),
                point.disks.len()
            ));
        }
        for ((s, d), file) in self.disks.iter().zip(&point.disks).zip(files) {
            if s.disk_id != d.disk_id || s.file != *file {
                return Some(format!("disk {} is not disk {}", s.disk_id, d.disk_id));
            }
            if !s.format.eq_ignore_ascii_case(&d.format)
                || s.virtual_size != d.virtual_size
                || s.block_size != d.block_size
            {
                return Some(format!(
                    "disk {} is {} of {} bytes in {} byte blocks here, {} of {} in {} at the point",
                    d.disk_id,
                    s.format,
                    s.virtual_size,
                    s.block_size,
                    d.format,
                    d.virtual_size,
                    d.block_size
                ));
            }
        }
        None
    }
}

/// `.<file>.standby-map` next to a standby image.
pub(super) fn map_path(image: &Path) -> PathBuf {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    image.with_file_name(format!(".{name}.standby-map"))
}

/// The copy's state; None when there is no usable copy (missing, unreadable: logged).
pub(super) fn load(dir: &Path) -> Option<State> {
    let path = dir.join(STATE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot read a standby copy's state; it is rebuilt");
            return None;
        }
    };
    match serde_json::from_slice::<State>(&text) {
        Ok(s) if s.disks.iter().all(|d| dir.join(&d.file).is_file()) => Some(s),
        Ok(_) => {
            warn!(path = %path.display(), "a standby copy lacks a disk; it is rebuilt");
            None
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "a standby copy's state is unreadable; it is rebuilt");
            None
        }
    }
}

/// Writes `standby.json` whole (temporary file, fsync, rename, folder fsync).
pub(super) fn save(dir: &Path, s: &State) -> Result<(), ReplError> {
    let path = dir.join(STATE);
    let tmp = dir.join(format!("{STATE}.tmp"));
    let fail = |e: std::io::Error| ReplError::Permanent(format!("writing {}: {e}", path.display()));
    let json = serde_json::to_vec_pretty(s)
        .map_err(|e| ReplError::Permanent(format!("encoding {}: {e}", path.display())))?;
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp).map_err(fail)?;
        f.write_all(&json).map_err(fail)?;
        f.sync_all().map_err(fail)?;
    }
    std::fs::rename(&tmp, &path).map_err(fail)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The blocks of one image to rewrite to move it from `old` (its map) to `new` (the target
/// point's map, both ordered by block), plus every `dirty` block: a block of `new` that
/// `old` names otherwise (or that is dirty) is fetched; a block `new` lacks that `old` names
/// (or that is dirty) is zeroed. `is_zero` says whether a map's chunk is an all-zero block
/// (merges drop those, but a map naming one means zeros all the same).
pub(super) fn diff_plan(
    old: &[(u64, ChunkId)],
    new: &[(u64, ChunkId)],
    dirty: &BTreeSet<u64>,
    is_zero: impl Fn(u64, &ChunkId) -> bool,
) -> Plan {
    let data = |m: &[(u64, ChunkId)]| -> Vec<(u64, ChunkId)> {
        m.iter()
            .filter(|(i, id)| !is_zero(*i, id))
            .copied()
            .collect()
    };
    let (old, new) = (data(old), data(new));
    let mut plan = Plan::default();
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    let mut dirty = dirty.iter().copied().peekable();
    loop {
        let next = [
            o.peek().map(|e| e.0),
            n.peek().map(|e| e.0),
            dirty.peek().copied(),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(i) = next else { break };
        let have = o.next_if(|e| e.0 == i).map(|e| e.1);
        let want = n.next_if(|e| e.0 == i).map(|e| e.1);
        let is_dirty = dirty.next_if_eq(&i).is_some();
        plan.compared += 1;
        match (want, have) {
            (Some(w), Some(h)) if w == h && !is_dirty => {}
            (Some(w), _) => plan.fetch.push((i, w)),
            (None, Some(_)) => plan.zero.push(i),
            (None, None) if is_dirty => plan.zero.push(i),
            (None, None) => {}
        }
    }
    plan
}

/// A test saying whether a map entry of `disk` names an all-zero block (by its length).
pub(super) fn zero_test(key: &VaultKey, disk: &PointDisk) -> impl Fn(u64, &ChunkId) -> bool {
    let (bs, vsize) = (u64::from(disk.block_size), disk.virtual_size);
    let full = ferry_store::chunk_id(key, &vec![0u8; bs as usize]);
    let last = vsize.div_ceil(bs.max(1)).saturating_sub(1);
    let tail = ferry_store::chunk_id(key, &vec![0u8; len_of(last, bs, vsize) as usize]);
    move |i, id| match i == last {
        true => *id == tail,
        false => *id == full,
    }
}

/// Reads the map of a standby image (an error: the copy is rebuilt).
pub(super) fn read_map(image: &Path) -> Result<FillPlan, ReplError> {
    fill_file::read_plan(&map_path(image))
        .map_err(|e| ReplError::Permanent(format!("standby map: {e}")))
}

impl Agent {
    /// `[recovery] dir/.standby` when this host keeps standby copies.
    pub(super) fn standby_root(&self) -> Option<PathBuf> {
        match (&self.cfg.recovery, self.recovery_ready) {
            (Some(r), true) if r.standby => Some(r.dir.join(STANDBY_DIR)),
            _ => None,
        }
    }

    /// The copies kept here and their points, for the heartbeat.
    pub(crate) fn standby_report(&self) -> Vec<ferry_proto::registry::v1::StandbyCopy> {
        let Some(root) = self.standby_root() else {
            return Vec::new();
        };
        super::subfolders(&root)
            .iter()
            .filter_map(|d| load(d))
            .map(|s| ferry_proto::registry::v1::StandbyCopy {
                vm: s.vm,
                point: s.point,
            })
            .collect()
    }

    /// Keeps the standby copies the registry asks for current, every [`TICK`], until
    /// `shutdown`; deletes the others.
    pub(crate) async fn standby_loop(self, shutdown: CancellationToken) {
        let Some(root) = self.standby_root() else {
            return;
        };
        info!(dir = %root.display(), "keeping standby copies of the vms this host is the recovery host of");
        loop {
            if let Some((update, keep)) = self.standby.wanted() {
                self.drop_unwanted(&root, &update, &keep).await;
                for vm in update {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    self.refresh_one(&root, &vm, &shutdown).await;
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(TICK) => {}
            }
        }
    }

    async fn refresh_one(&self, root: &Path, vm: &str, shutdown: &CancellationToken) {
        if !ferry_model::disk::is_file_safe_vm_name(vm) {
            return;
        }
        let cancel = shutdown.child_token();
        // Registered before the lock is taken, so a failover that comes while this refresh
        // holds it always finds the token to cancel.
        if let Ok(mut r) = self.standby.refreshing.lock() {
            r.insert(vm.to_owned(), cancel.clone());
        }
        let _guard = self.standby.lock_of(vm).lock_owned().await;
        if let Err(e) = self.refresh_standby(&root.join(vm), vm, &cancel).await {
            match cancel.is_cancelled() {
                true => debug!(vm, error = %e, "standby refresh stopped"),
                false => warn!(vm, error = %e, "cannot bring the standby copy forward; retrying"),
            }
        }
        if let Ok(mut r) = self.standby.refreshing.lock() {
            r.remove(vm);
        }
    }

    /// Deletes the copies of VMs the registry no longer lists.
    async fn drop_unwanted(&self, root: &Path, update: &[String], keep: &[String]) {
        for dir in super::subfolders(root) {
            let Some(vm) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if update.contains(&vm) || keep.contains(&vm) {
                continue;
            }
            let _guard = self.standby.take(&vm).await;
            match remove_folder(&dir) {
                Ok(()) => info!(vm, "standby copy deleted: this host no longer keeps one"),
                Err(e) => warn!(vm, error = %e, "cannot delete a standby copy"),
            }
        }
    }

    /// Brings the copy in `dir` to the VM's latest point (built whole when there is none).
    async fn refresh_standby(
        &self,
        dir: &Path,
        vm: &str,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        let point = self.get_point(vm, "latest").await?;
        let files = plan_files(vm, &point)?;
        match load(dir) {
            Some(s) if s.point == point.id && s.clean() => Ok(()),
            Some(s) => match s.misfit(&point, &files) {
                None => self.apply_standby(dir, vm, s, &point, cancel).await,
                Some(why) => {
                    info!(vm, reason = %why, "the standby copy does not fit the latest point; rebuilding it");
                    self.build_standby(dir, vm, &point, &files, cancel).await
                }
            },
            None => self.build_standby(dir, vm, &point, &files, cancel).await,
        }
    }

    /// A new copy of `point` in `dir` from the store.
    async fn build_standby(
        &self,
        dir: &Path,
        vm: &str,
        point: &RecoveryPoint,
        files: &[String],
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        remove_folder(dir)?;
        std::fs::create_dir_all(dir)
            .map_err(|e| ReplError::Permanent(format!("creating {}: {e}", dir.display())))?;
        let mut state = State {
            vm: vm.to_owned(),
            point: point.id.clone(),
            disks: Vec::new(),
        };
        let mut bytes = 0;
        for (disk, file) in point.disks.iter().zip(files) {
            let path = dir.join(file);
            let map = self.block_map(vm, &point.id, &disk.disk_id).await?;
            check_map(&point.id, disk, &map)?;
            bytes += self
                .write_disk_from(vm, &point.id, disk, &path, map.clone(), cancel)
                .await?;
            write_map(&path, vm, &point.id, disk, map).await?;
            state.disks.push(standby_disk(disk, file));
        }
        save(dir, &state)?;
        info!(vm, point = %point.id, disks = state.disks.len(), bytes, "standby copy built");
        Ok(())
    }

    /// Moves the copy from its point to `point`, writing only the blocks that differ.
    async fn apply_standby(
        &self,
        dir: &Path,
        vm: &str,
        mut state: State,
        point: &RecoveryPoint,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        let plans = self.standby_plans(dir, vm, &state, point).await?;
        // The blocks about to change are dirty before any is written.
        for (sd, (plan, _)) in state.disks.iter_mut().zip(&plans) {
            sd.dirty.extend(plan.fetch.iter().map(|(i, _)| *i));
            sd.dirty.extend(plan.zero.iter().copied());
        }
        save(dir, &state)?;
        let (mut rewritten, mut bytes) = (0, 0);
        for ((disk, sd), (plan, map)) in point.disks.iter().zip(&state.disks).zip(plans) {
            let path = dir.join(&sd.file);
            let r = self
                .apply_to_image(vm, &point.id, disk, &path, plan, cancel)
                .await?;
            write_map(&path, vm, &point.id, disk, map).await?;
            (rewritten, bytes) = (rewritten + r.rewritten, bytes + r.bytes);
        }
        let from = std::mem::replace(&mut state.point, point.id.clone());
        state.disks.iter_mut().for_each(|d| d.dirty.clear());
        save(dir, &state)?;
        info!(vm, from = %from, to = %point.id, blocks_rewritten = rewritten, bytes, "standby copy brought forward");
        Ok(())
    }

    /// Per disk of `point`: what to rewrite in the copy's image, and the point's map.
    pub(super) async fn standby_plans(
        &self,
        dir: &Path,
        vm: &str,
        state: &State,
        point: &RecoveryPoint,
    ) -> Result<Vec<(Plan, Vec<(u64, ChunkId)>)>, ReplError> {
        let mut out = Vec::with_capacity(point.disks.len());
        for (disk, sd) in point.disks.iter().zip(&state.disks) {
            let map = self.block_map(vm, &point.id, &disk.disk_id).await?;
            check_map(&point.id, disk, &map)?;
            let old = read_map(&dir.join(&sd.file))?;
            let plan = diff_plan(
                &old.blocks,
                &map,
                &sd.dirty,
                zero_test(&self.vault_key(), disk),
            );
            out.push((plan, map));
        }
        Ok(out)
    }

    /// Writes `plan` into the image at `path` and flushes it.
    pub(super) async fn apply_to_image(
        &self,
        vm: &str,
        point: &str,
        disk: &PointDisk,
        path: &Path,
        plan: Plan,
        cancel: &CancellationToken,
    ) -> Result<super::repoint::Rewritten, ReplError> {
        let p = path.to_path_buf();
        let image = blocking(move || {
            ferry_disk::open_rw(&p)
                .map_err(|e| ReplError::Permanent(format!("opening {}: {e}", p.display())))
        })
        .await?;
        self.apply_plan(vm, point, disk, path, image, plan, cancel)
            .await
    }
}

fn standby_disk(disk: &PointDisk, file: &str) -> StandbyDisk {
    StandbyDisk {
        disk_id: disk.disk_id.clone(),
        file: file.to_owned(),
        format: disk.format.clone(),
        virtual_size: disk.virtual_size,
        block_size: disk.block_size,
        dirty: BTreeSet::new(),
    }
}

async fn write_map(
    image: &Path,
    vm: &str,
    point: &str,
    disk: &PointDisk,
    blocks: Vec<(u64, ChunkId)>,
) -> Result<(), ReplError> {
    let plan = super::write::fill_plan(vm, point, disk, blocks);
    let path = map_path(image);
    blocking(move || {
        fill_file::write_plan(&path, &plan)
            .map_err(|e| ReplError::Permanent(format!("standby map: {e}")))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> ChunkId {
        [b; 32]
    }

    fn no_zero(_: u64, id: &ChunkId) -> bool {
        *id == [0u8; 32]
    }

    #[test]
    fn only_blocks_that_differ_or_are_dirty_are_rewritten() {
        let old = [(0, id(1)), (1, id(2)), (3, id(4)), (5, id(6)), (7, id(0))];
        let new = [(0, id(1)), (1, id(9)), (2, id(3)), (5, id(6)), (6, id(0))];
        // 0 equal, 1 changed, 2 new, 3 gone (zeroed), 5 equal but dirty, 6 and 7 zero blocks
        // in either map (equal to absent), 8 dirty and absent from both (zeroed).
        let dirty = BTreeSet::from([5, 8]);
        let plan = diff_plan(&old, &new, &dirty, no_zero);
        assert_eq!(plan.fetch, [(1, id(9)), (2, id(3)), (5, id(6))]);
        assert_eq!(plan.zero, [3, 8]);
        assert_eq!(plan.compared, 6);
    }

    #[test]
    fn equal_maps_need_nothing_and_an_empty_target_zeroes_all() {
        let m = [(0, id(1)), (4, id(2))];
        let same = diff_plan(&m, &m, &BTreeSet::new(), no_zero);
        assert!(same.fetch.is_empty() && same.zero.is_empty());
        let gone = diff_plan(&m, &[], &BTreeSet::new(), no_zero);
        assert_eq!(gone.zero, [0, 4]);
        let all = diff_plan(&[], &m, &BTreeSet::new(), no_zero);
        assert_eq!(all.fetch, m);
    }

    #[test]
    fn a_state_survives_its_file_and_a_missing_disk_means_no_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = State {
            vm: "web".into(),
            point: "p1".into(),
            disks: vec![StandbyDisk {
                disk_id: "d0".into(),
                file: "web.raw".into(),
                format: "raw".into(),
                virtual_size: 1 << 20,
                block_size: 65536,
                dirty: BTreeSet::from([3, 9]),
            }],
        };
        save(dir.path(), &s).expect("save");
        assert_eq!(load(dir.path()), None, "its disk is missing");
        std::fs::write(dir.path().join("web.raw"), b"").expect("disk");
        assert_eq!(load(dir.path()), Some(s));
        std::fs::write(dir.path().join(STATE), b"{ torn").expect("torn");
        assert_eq!(load(dir.path()), None);
    }
}
