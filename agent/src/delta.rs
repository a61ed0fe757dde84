//! Delta replication: each cycle the tracker seals the logs of all the VM's disks at one
//! instant, the sealed `.hrl` files travel to storage as content-addressed chunks (the same
//! offer/need protocol as blocks), the cycle commits them as the VM's next recovery point, and
//! only then are the files deleted on the host. A cycle that fails leaves its sealed logs in
//! place; the next cycle ships them first (oldest first), so no write is lost in between.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_model::{Consistency, CycleKind};
use ferry_proto::common::v1::{Disk, RecoveryPoint, ShippedLog};
use ferry_proto::ingest::v1::{
    AbortCycleRequest, BeginCycleRequest, CommitCycleRequest, DiskBlockMap,
};
use tokio_util::sync::CancellationToken;

use crate::Agent;
use crate::replicate::{CopyStats, ReadBlock, ReplError, from_status};
use crate::tracker::list_logs;

/// Every log next to `disk` except the tracker's current one (the one writes go to now):
/// those are sealed and waiting to be shipped, oldest first.
pub(crate) fn sealed_logs(
    disk: &Path,
    tracker: Option<&crate::tracker::Tracker>,
) -> Result<Vec<PathBuf>, ReplError> {
    let logs = list_logs(disk)
        .map_err(|e| ReplError::Recoverable(format!("{}: listing logs: {e}", disk.display())))?;
    let current = tracker.and_then(|t| t.current_log(disk));
    Ok(logs
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| Some(p) != current.as_ref())
        .collect())
}

/// Where the agent remembers, per disk, the UniqueId of the last log it is done with
/// (committed in a point, or superseded by a full copy): the next sealed log must chain to it.
fn tip_path(data_dir: &Path, disk: &Path) -> PathBuf {
    let h = blake3::hash(disk.as_os_str().as_encoded_bytes());
    data_dir
        .join("chain")
        .join(format!("{}.tip", &h.to_hex()[..32]))
}

/// Forgets the chain tip of `disk`: its next log starts a new chain (its old logs were
/// discarded with what they held).
pub(crate) fn forget_chain_tip(data_dir: &Path, disk: &Path) {
    match std::fs::remove_file(tip_path(data_dir, disk)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(disk = %disk.display(), error = %e, "cannot forget the log chain tip");
        }
        _ => {}
    }
}

/// The chain tip of `disk`, when the agent recorded one.
pub(crate) fn chain_tip(data_dir: &Path, disk: &Path) -> Option<uuid::Uuid> {
    let text = std::fs::read_to_string(tip_path(data_dir, disk)).ok()?;
    uuid::Uuid::parse_str(text.trim()).ok()
}

/// The disk a log file belongs to: `<disk file>.<seq:08>.hrl` → `<disk file>`.
fn disk_of_log(log: &Path) -> Option<PathBuf> {
    let name = log.file_name()?.to_str()?;
    let stem = name.strip_suffix(".hrl")?;
    let (disk, seq) = stem.rsplit_once('.')?;
    seq.parse::<u64>().ok()?;
    Some(log.with_file_name(disk))
}

/// Records, for each disk, the last of `logs` (they are in order) as the chain tip, then
/// deletes them. Called once their writes are durable in a point or superseded by a copy.
pub(crate) fn remove_logs(data_dir: &Path, logs: &[PathBuf]) {
    let mut last: std::collections::HashMap<PathBuf, &PathBuf> = Default::default();
    for p in logs {
        if let Some(d) = disk_of_log(p) {
            last.insert(d, p);
        }
    }
    for (disk, log) in last {
        let tip = ferry_disk::hrl::HrlLog::open(log).map(|l| l.header.unique_id);
        let path = tip_path(data_dir, &disk);
        let res = match tip {
            Ok(id) => path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| ferry_mesh::write_secret(&path, id.to_string().as_bytes())),
            // An unreadable log has no id to chain to: forget the tip rather than keep a stale one.
            Err(_) => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = res {
            tracing::warn!(disk = %disk.display(), error = %e, "cannot record the log chain tip");
        }
    }
    for p in logs {
        if let Err(e) = std::fs::remove_file(p) {
            tracing::warn!(log = %p.display(), error = %e, "cannot remove a shipped log");
        }
    }
}

/// How a cycle's logs were sealed, as its point records it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sealing<'a> {
    /// "crash" or "app".
    pub(crate) consistency: Consistency,
    /// The group cut they were sealed in ("" = the VM was cut alone).
    pub(crate) cut: &'a str,
}

impl Agent {
    pub(crate) fn tracker_for(&self, vm: &str) -> Result<&crate::tracker::Tracker, ReplError> {
        self.tracker.as_ref().ok_or_else(|| {
            ReplError::Permanent(format!(
                "vm {vm}: change tracking is not enabled on host {} (add a [tracker] section to agent.toml)",
                self.creds.host
            ))
        })
    }

    /// Seals the VM's current logs (one instant across its disks).
    pub(crate) async fn cut(&self, vm: &str) -> Result<(), ReplError> {
        self.tracker_for(vm)?
            .cut(vm)
            .await
            .map(|_| ())
            .map_err(|e| ReplError::Recoverable(format!("vm {vm}: sealing logs: {e}")))
    }

    /// Ships one sealed log, which must chain to `follows` when given (a log lost in between,
    /// or a tracker that restarted without its logs, breaks the chain: the VM needs a resync).
    /// Returns the log's UniqueId and what was shipped: None when it holds no write.
    pub(crate) async fn ship_log(
        &self,
        cycle: &str,
        path: &Path,
        block_size: u32,
        lost: &CancellationToken,
        follows: Option<uuid::Uuid>,
    ) -> Result<(uuid::Uuid, Option<ShippedLog>), ReplError> {
        let p = path.to_path_buf();
        let log = tokio::task::spawn_blocking(move || ferry_disk::hrl::HrlLog::open(&p))
            .await
            .map_err(|e| ReplError::Recoverable(format!("log reader: {e}")))?
            .map_err(|e| {
                ReplError::ResyncRequired(format!("{}: {e}; the vm needs a resync", path.display()))
            })?;
        if let Some(prev) = follows
            && log.header.previous_unique_id != prev
        {
            return Err(ReplError::ResyncRequired(format!(
                "{} does not follow log {prev} (it follows {}): a log of the chain is missing; the vm needs a resync",
                path.display(),
                log.header.previous_unique_id
            )));
        }
        let unique = log.header.unique_id;
        if !log.clean {
            return Err(ReplError::ResyncRequired(format!(
                "{} was not closed cleanly (the agent stopped without sealing it); the vm needs a resync",
                path.display()
            )));
        }
        if log.records.is_empty() {
            return Ok((unique, None));
        }
        let write_bytes: u64 = log.records.iter().map(|r| u64::from(r.length)).sum();
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|e| ReplError::Recoverable(format!("{}: {e}", path.display())))?;
        let length = bytes.len() as u64;
        let key = self.vault_key();
        let pieces: Vec<ReadBlock> = bytes
            .chunks(block_size.max(4096) as usize)
            .enumerate()
            .map(|(i, c)| ReadBlock {
                index: i as u64,
                id: ferry_store::chunk_id(&key, c),
                data: c.to_vec(),
            })
            .collect();
        let chunks: Vec<Vec<u8>> = pieces.iter().map(|b| b.id.to_vec()).collect();
        let stats = Arc::new(CopyStats::default());
        for batch in pieces.chunks(self.cfg.batch_blocks) {
            let batch: Vec<ReadBlock> = batch
                .iter()
                .map(|b| ReadBlock {
                    index: b.index,
                    id: b.id,
                    data: b.data.clone(),
                })
                .collect();
            self.clone()
                .upload_with_retry(cycle.to_string(), batch, stats.clone(), lost.clone())
                .await?;
        }
        Ok((
            unique,
            Some(ShippedLog {
                unique_id: log.header.unique_id.as_bytes().to_vec(),
                previous_id: log.header.previous_unique_id.as_bytes().to_vec(),
                length,
                chunks,
                records: log.records.len() as u64,
                write_bytes,
            }),
        ))
    }

    /// Seals the VM's logs between its quiesce hooks (pre: e.g. a guest freeze; post: the
    /// thaw), in group cut `cut` when not empty. Returns the consistency of the cut — app only
    /// when the pre hook succeeded; a VM without hooks, or whose hook failed, gets a
    /// crash-consistent cut instead — and the group cut the logs were sealed in ("" = none).
    pub(crate) async fn quiesced_cut(
        &self,
        vm: &str,
        cut: &str,
    ) -> Result<(Consistency, String), ReplError> {
        let Some(v) = self.cfg.vms.iter().find(|v| v.name == vm) else {
            // A VM recovered here has no hooks configured on this host.
            tracing::warn!(
                vm,
                "the vm has no quiesce hooks on this host; the point is crash-consistent"
            );
            return Ok((Consistency::Crash, self.cut_in(vm, cut).await?));
        };
        let Some(pre) = v.quiesce_pre.as_deref() else {
            tracing::warn!(
                vm,
                "the policy asks for an app-consistent point but the vm has no quiesce_pre hook; the point is crash-consistent"
            );
            return Ok((Consistency::Crash, self.cut_in(vm, cut).await?));
        };
        let timeout = v.quiesce_timeout.unwrap_or(Duration::from_secs(60));
        let frozen = match run_hook(vm, "pre", pre, timeout).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(vm, error = %e, "quiesce hook failed; the point is crash-consistent");
                false
            }
        };
        let sealed = self.cut_in(vm, cut).await;
        if let Some(post) = v.quiesce_post.as_deref()
            && let Err(e) = run_hook(vm, "post", post, timeout).await
        {
            tracing::warn!(vm, error = %e, "post-cut hook failed");
        }
        let cut = sealed?;
        Ok((
            if frozen {
                Consistency::App
            } else {
                Consistency::Crash
            },
            cut,
        ))
    }

    /// One delta cycle of a VM: cut (between the quiesce hooks when the policy wants this one
    /// app-consistent; in group cut `cut` when not empty), ship every sealed log, commit,
    /// delete what was shipped.
    pub(crate) async fn delta_cycle(
        &self,
        vm: &str,
        app_consistent: bool,
        cut: &str,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        let disks = self.vm_disks(vm)?;
        if self.resync_in_progress(vm) {
            // Its point carries the writes since it began; shipping (and deleting) those logs
            // on top of the old map would lose the ones made to blocks it already read.
            tracing::info!(vm, "a resync of the vm is in progress; delta cycle skipped");
            return Ok(());
        }
        let (consistency, cut) = if app_consistent {
            self.quiesced_cut(vm, cut).await?
        } else {
            (Consistency::Crash, self.cut_in(vm, cut).await?)
        };
        let mut shipped_files = Vec::new();
        let point = self
            .run_cycle_as(
                vm,
                CycleKind::Delta,
                "",
                Sealing {
                    consistency,
                    cut: &cut,
                },
                &disks,
                async |cycle, block_size, lost| {
                    let mut maps = Vec::new();
                    for d in &disks {
                        if cancel.is_cancelled() {
                            return Err(ReplError::Recoverable("cycle cancelled".into()));
                        }
                        let (logs, files) = self.ship_disk_logs(cycle, d, block_size, lost).await?;
                        shipped_files.extend(files);
                        maps.push(DiskBlockMap {
                            disk_id: d.id.clone(),
                            shipped_logs: logs,
                            ..Default::default()
                        });
                    }
                    Ok(maps)
                },
            )
            .await?;
        // The point is durable: the logs it holds may go.
        remove_logs(&self.cfg.data_dir, &shipped_files);
        tracing::info!(vm, point = %point.id, consistency = %consistency, cut = %cut, logs = shipped_files.len(), "delta cycle committed");
        Ok(())
    }

    /// A crash-consistent [`Agent::run_cycle_as`].
    pub(crate) async fn run_cycle(
        &self,
        vm: &str,
        kind: CycleKind,
        job_id: &str,
        disks: &[Disk],
        work: impl AsyncFnOnce(&str, u32, &CancellationToken) -> Result<Vec<DiskBlockMap>, ReplError>,
    ) -> Result<RecoveryPoint, ReplError> {
        let crash = Sealing {
            consistency: Consistency::Crash,
            cut: "",
        };
        self.run_cycle_as(vm, kind, job_id, crash, disks, work)
            .await
    }

    /// One replication cycle: begin it (each disk's lease and fencing token), run `work` while
    /// the leases are renewed, then commit the block maps it returns as a recovery point of
    /// the given consistency ("crash" or "app"), in group cut `cut` when not empty — or abort
    /// the cycle (releasing the leases) when it fails.
    pub(crate) async fn run_cycle_as(
        &self,
        vm: &str,
        kind: CycleKind,
        job_id: &str,
        sealing: Sealing<'_>,
        disks: &[Disk],
        work: impl AsyncFnOnce(&str, u32, &CancellationToken) -> Result<Vec<DiskBlockMap>, ReplError>,
    ) -> Result<RecoveryPoint, ReplError> {
        let mut ingest = self.ingest().await?;
        let begun = ingest
            .begin_cycle(BeginCycleRequest {
                vm: vm.to_string(),
                host_name: self.creds.host.clone(),
                kind: kind.into(),
                disks: disks.to_vec(),
                job_id: job_id.to_string(),
                consistency: sealing.consistency.into(),
                cut_id: sealing.cut.to_string(),
            })
            .await
            .map_err(|s| from_status("begin cycle", s))?
            .into_inner();
        let cycle = begun.cycle_id.clone();
        tracing::info!(vm, cycle = %cycle, kind = ?kind, disks = disks.len(), "cycle started");
        let lost = CancellationToken::new();
        let renew = self.spawn_renewer(
            cycle.clone(),
            Duration::from_millis(begun.lease_ttl_ms.max(3000) / 3),
            lost.clone(),
        );
        let result = work(&cycle, begun.block_size, &lost).await;
        renew.cancel();
        let maps = match result {
            Ok(m) => m,
            Err(e) => {
                let abort = AbortCycleRequest {
                    cycle_id: cycle.clone(),
                    reason: e.to_string(),
                };
                if let Err(s) = ingest.abort_cycle(abort).await {
                    tracing::debug!(cycle = %cycle, error = %s.message(), "abort failed; the leases will expire");
                }
                return Err(e);
            }
        };
        let commit = CommitCycleRequest {
            cycle_id: cycle.clone(),
            disks: maps,
            fencing_tokens: begun.fencing_tokens,
        };
        Ok(ingest
            .commit_cycle(commit)
            .await
            .map_err(|s| from_status("commit cycle", s))?
            .into_inner()
            .point
            .unwrap_or_default())
    }

    /// Ships a disk's sealed logs, oldest first. Returns them and every sealed file the cycle
    /// covers (empty logs included), to delete once the point is durable.
    pub(crate) async fn ship_disk_logs(
        &self,
        cycle: &str,
        d: &Disk,
        block_size: u32,
        lost: &CancellationToken,
    ) -> Result<(Vec<ShippedLog>, Vec<PathBuf>), ReplError> {
        let files = sealed_logs(Path::new(&d.path), self.tracker.as_ref())?;
        // Logs this large cost more than a checksum resync would (DESIGN §2.5).
        let pending: u64 = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        if d.virtual_size > 0 && pending >= d.virtual_size / 2 {
            return Err(ReplError::ResyncRequired(format!(
                "pending logs of disk {} reached {pending} bytes, half its size or more; the vm needs a resync",
                d.path
            )));
        }
        let mut logs = Vec::new();
        let mut follows = chain_tip(&self.cfg.data_dir, Path::new(&d.path));
        for f in &files {
            let (id, shipped) = self.ship_log(cycle, f, block_size, lost, follows).await?;
            follows = Some(id);
            logs.extend(shipped);
        }
        Ok((logs, files))
    }

    /// The disks of a configured VM, or of the VM recovered here (re-protected from here).
    pub(crate) fn vm_disks(&self, vm: &str) -> Result<Vec<Disk>, ReplError> {
        // A VM running here from a folder replicates from there (see `source_run`).
        let configured = self.cfg.vms.iter().find(|v| v.name == vm);
        let disks: Vec<Disk> = match (self.recovered_disks(vm), configured) {
            (Some(disks), _) => disks,
            (None, Some(v)) => v
                .disks
                .iter()
                .map(|p| crate::inventory::describe_disk(vm, p, self.tracker.as_ref()))
                .collect(),
            (None, None) => {
                return Err(ReplError::Permanent(format!(
                    "vm {vm} is neither configured nor recovered on host {}",
                    self.creds.host
                )));
            }
        };
        if let Some(d) = disks.iter().find(|d| !d.error.is_empty()) {
            return Err(ReplError::Permanent(format!(
                "disk {}: {}",
                d.path, d.error
            )));
        }
        Ok(disks)
    }
}

/// Runs a quiesce hook (`sh -c`, with `FERRY_VM` and `FERRY_QUIESCE=pre|post` set) and waits
/// for it, at most `timeout`.
async fn run_hook(vm: &str, stage: &str, cmd: &str, timeout: Duration) -> Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("FERRY_VM", vm)
        .env("FERRY_QUIESCE", stage)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{stage} hook: cannot start sh: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{stage} hook exited with {status}")),
        Ok(Err(e)) => Err(format!("{stage} hook: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!("{stage} hook did not finish within {timeout:?}"))
        }
    }
}
