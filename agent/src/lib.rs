//! The host agent: registers with the vault, reports its VMs and disks, takes work from the
//! scheduler over a server stream and replicates disks to the gateway over QUIC.
pub mod config;
mod delta;
pub mod driver;
mod group_cut;
pub mod identity;
pub mod inventory;
mod recover;
mod replicate;
mod resync;
pub mod tracker;
mod unprotect;
mod vault_keys;
mod work_cancel;

use std::sync::Arc;
use std::time::Duration;

use ferry_gateway::client::Uploader;
use ferry_mesh::Component;
use ferry_model::Backoff;
use ferry_proto::registry::v1::{HeartbeatRequest, registry_client::RegistryClient};
use ferry_proto::scheduler::v1::{
    CompleteWorkRequest, WorkItem, WorkKind, WorkStreamRequest, scheduler_client::SchedulerClient,
};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub use config::AgentConfig;
pub use identity::{Credentials, RegistrationKeyFile};
pub use replicate::ReplError;

#[derive(Clone)]
pub struct Agent {
    cfg: Arc<AgentConfig>,
    creds: Arc<Credentials>,
    /// The vault keyring (`vault_keys.rs`): key 0 from `creds`, then the rotated keys.
    keys: Arc<std::sync::RwLock<ferry_store::VaultKey>>,
    /// Channels to the registry, scheduler, ingest and storage-writer, made once.
    peers: ferry_mesh::Peers,
    uploader: Arc<Mutex<Option<Uploader>>>,
    /// VMs with a replication running, so a re-sent work item does not start a second copy;
    /// with the last work item for the VM that arrived while it ran (run after it, unless it
    /// is the same item and the running one's completion acknowledged it).
    busy: Arc<std::sync::Mutex<std::collections::HashMap<String, Option<WorkItem>>>>,
    /// The token of each running work item by id: a cancel item from the scheduler stops it.
    running: Arc<std::sync::Mutex<std::collections::HashMap<String, CancellationToken>>>,
    /// The write tracker, when `[tracker]` is configured.
    tracker: Option<tracker::Tracker>,
    /// The `[recovery]` folder exists (made at start): the host can receive failed-over VMs.
    recovery_ready: bool,
    /// The mesh's retry time unit in ms, as the last work item said (0: not known yet).
    retry_unit_ms: Arc<std::sync::atomic::AtomicU64>,
    /// How this host starts and stops VMs (`[driver]`; none: disks only).
    driver: driver::Driver,
    /// The standby copies this host keeps (`[recovery] standby`).
    standby: Arc<recover::standby::Standbys>,
}

/// Registers if needed, then heartbeats and works until `shutdown`. A configured disk that
/// cannot be opened is warned about here and reported with its error; the rest still work.
///
/// On `shutdown` the agent stops taking work and NBD connections, and returns only once the
/// tracker has sealed every log and closed every disk — or, past `shutdown_timeout` (30 s),
/// with an error naming the disks it left open.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    warn_unopenable_disks(&cfg).await;
    for root in cfg.export_roots.iter().flatten() {
        // A root that does not exist lets nothing in: make it, as `ferry up` does its own.
        if let Err(e) = std::fs::create_dir_all(root) {
            tracing::warn!(root = %root.display(), error = %e, "cannot create an export root; failbacks into it are refused");
        }
    }
    let creds = identity::load_or_register(&cfg).await?;
    let tracker = match &cfg.tracker {
        Some(t) => Some(start_tracker(&cfg, t, shutdown.clone()).await?),
        None => {
            tracing::info!(
                "no [tracker] section in agent.toml: disks are not tracked, so this host can copy disks but not run delta cycles"
            );
            None
        }
    };
    let stop_timeout = cfg
        .shutdown_timeout
        .unwrap_or(config::DEFAULT_SHUTDOWN_TIMEOUT);
    let peers = ferry_mesh::Peers::new(creds.endpoints.components(), creds.client_tls());
    let recovery_ready = cfg.recovery.as_ref().is_some_and(|r| {
        std::fs::create_dir_all(&r.dir)
            .inspect_err(|e| {
                tracing::warn!(dir = %r.dir.display(), error = %e, "the [recovery] folder cannot be made; this host cannot receive failed-over vms");
            })
            .is_ok()
    });
    let driver_dir = cfg
        .driver
        .as_ref()
        .map(|d| d.base_dir.clone())
        .unwrap_or_default();
    let driver = driver::Driver::from_config(cfg.driver.as_ref(), &driver_dir)?;
    let agent = Agent {
        cfg: Arc::new(cfg),
        keys: Arc::new(std::sync::RwLock::new(creds.vault_key.clone())),
        creds: Arc::new(creds),
        peers,
        uploader: Default::default(),
        busy: Default::default(),
        running: Default::default(),
        tracker,
        recovery_ready,
        retry_unit_ms: Default::default(),
        driver,
        standby: Default::default(),
    };
    agent.serve_folders().await;
    let hb = tokio::spawn(agent.clone().heartbeat_loop(shutdown.clone()));
    let standby = tokio::spawn(agent.clone().standby_loop(shutdown.clone()));
    agent.work_loop(shutdown.clone()).await;
    hb.abort();
    standby.abort();
    tracing::info!("stopping: no new work or nbd connections");
    if let Some(t) = &agent.tracker {
        wait_tracker_stopped(t, stop_timeout).await?;
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Waits, at most `timeout`, for a tracker whose shutdown fired to seal its logs and close
/// its disks. Past it, logs each disk still open (and its unsealed log) and fails naming them.
pub async fn wait_tracker_stopped(
    tracker: &tracker::Tracker,
    timeout: Duration,
) -> anyhow::Result<()> {
    match tokio::time::timeout(timeout, tracker.stopped()).await {
        Ok(sealed) => {
            tracing::info!(logs = sealed.len(), "change logs sealed and disks closed");
            Ok(())
        }
        Err(_) => {
            let open = tracker.open_disks();
            let mut names = Vec::with_capacity(open.len());
            for (disk, log) in &open {
                let log = log
                    .as_ref()
                    .map(|l| l.display().to_string())
                    .unwrap_or_default();
                tracing::error!(disk = %disk.display(), log = %log, timeout_ms = timeout.as_millis() as u64, "stop timed out with the disk still open: its log is not sealed (the vm will need a resync) and a vhdx may keep a metadata log to replay");
                names.push(if log.is_empty() {
                    disk.display().to_string()
                } else {
                    format!("{} (log {log})", disk.display())
                });
            }
            anyhow::bail!(
                "stop did not finish within {timeout:?}; left open: {}",
                if names.is_empty() {
                    "the tracker (its disks closed, its socket not yet removed)".to_string()
                } else {
                    names.join(", ")
                }
            )
        }
    }
}

/// Warns about every configured disk that cannot be opened: it is still reported to the
/// registry, with the error, and protecting its VM is refused until it opens.
async fn warn_unopenable_disks(cfg: &AgentConfig) {
    let vms = cfg.vms.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for vm in &vms {
            for p in &vm.disks {
                if let Err(e) = ferry_disk::open(p) {
                    tracing::warn!(vm = %vm.name, disk = %p.display(), error = %e, "configured disk cannot be opened; it is reported with this error and the vm cannot be protected until it opens");
                }
            }
        }
    })
    .await;
}

/// Whether `a` is `b` delivered again (not a new item that reuses its id).
fn same_delivery(a: &WorkItem, b: &WorkItem) -> bool {
    a.id == b.id && a.attempt == b.attempt && a.created_at_ms == b.created_at_ms
}

/// NBD export name of a disk: `<vm>-<file name>`, restricted to what the tracker accepts.
pub fn export_name(vm: &str, path: &std::path::Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_default();
    format!("{vm}-{file}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn start_tracker(
    cfg: &AgentConfig,
    t: &config::TrackerSection,
    shutdown: CancellationToken,
) -> anyhow::Result<tracker::Tracker> {
    let disks = cfg
        .vms
        .iter()
        .flat_map(|vm| {
            vm.disks.iter().map(|p| tracker::TrackedDisk {
                vm: vm.name.clone(),
                path: p.clone(),
                export: export_name(&vm.name, p),
            })
        })
        .collect();
    let tcfg = tracker::TrackerConfig {
        socket_dir: t
            .socket_dir
            .clone()
            .unwrap_or_else(|| cfg.data_dir.join("nbd")),
        tcp_listen: t.tcp_listen,
    };
    Ok(tracker::Tracker::start(tcfg, disks, shutdown).await?)
}

impl Agent {
    pub fn host(&self) -> &str {
        &self.creds.host
    }

    async fn heartbeat_loop(self, shutdown: CancellationToken) {
        let mut interval = Duration::from_secs(5);
        // VMs fenced because the registry said they failed over away from this host.
        let mut fenced = std::collections::HashSet::new();
        loop {
            let inv: Vec<_> = {
                // A configured VM that runs here from a folder (failed back into one) is not
                // reported with its configured disks: the registry knows the folder's.
                let vms: Vec<_> = (self.cfg.vms.iter())
                    .filter(|v| !self.runs_from_folder(&v.name))
                    .cloned()
                    .collect();
                let tracker = self.tracker.clone();
                tokio::task::spawn_blocking(move || {
                    vms.iter()
                        .map(|v| inventory::describe_vm(v, tracker.as_ref()))
                        .collect()
                })
                .await
                .unwrap_or_default()
            };
            let res = async {
                let ch = self.peers.channel(Component::Registry)?;
                let r = RegistryClient::new(ch)
                    .heartbeat(HeartbeatRequest {
                        host_name: self.creds.host.clone(),
                        vms: inv,
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                        change_tracking: self.tracker.as_ref().is_some_and(|t| !t.is_stopped()),
                        recovery: self.recovery_ready,
                        standby: self.standby_report(),
                    })
                    .await?
                    .into_inner();
                anyhow::Ok(r)
            }
            .await;
            match res {
                Ok(r) => {
                    if r.heartbeat_interval_seconds > 0 {
                        interval = Duration::from_secs(r.heartbeat_interval_seconds);
                    }
                    self.apply_fences(&r.fenced_vms, &mut fenced);
                    self.standby.set_wanted(r.standby_vms, r.standby_kept_vms);
                    self.learn_vault_key(r.vault_key_id).await;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Fences the VMs that failed over to another host (their writes are refused from now
    /// on, so nothing this host's copy does becomes a recovery point) and lifts the fence of
    /// those the registry no longer lists (their failover failed before the VM moved).
    fn apply_fences(&self, now: &[String], fenced: &mut std::collections::HashSet<String>) {
        let Some(tracker) = &self.tracker else {
            return;
        };
        for vm in now {
            if !tracker.is_fenced(vm) {
                match tracker.fence_vm(vm, "the vm failed over to another host") {
                    Ok(()) => {
                        tracing::warn!(vm = %vm, "vm failed over to another host: its writes here are refused")
                    }
                    // Not served here (a failback target writing its disks): nothing to fence.
                    Err(tracker::TrackerError::UnknownVm(_)) => {}
                    Err(e) => {
                        tracing::warn!(vm = %vm, error = %e, "cannot fence a vm that failed over")
                    }
                }
            }
            fenced.insert(vm.clone());
        }
        fenced.retain(|vm| {
            if now.contains(vm) {
                return true;
            }
            if let Err(e) = tracker.unfence_vm(vm) {
                tracing::warn!(vm = %vm, error = %e, "cannot lift the fence of a vm");
            } else {
                tracing::info!(vm = %vm, "the registry no longer fences the vm: its writes are accepted again");
            }
            false
        });
    }

    async fn work_loop(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let streamed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.stream_work(&shutdown) => r,
            };
            let e = match streamed {
                Ok(()) => return,
                Err(e) => e,
            };
            // Refused credentials (the host was removed from the vault) do not heal by
            // retrying fast: ask again rarely, until the host is registered again.
            let delay = if e
                .downcast_ref::<tonic::Status>()
                .is_some_and(|s| s.code() == tonic::Code::Unauthenticated)
            {
                Duration::from_secs(60)
            } else {
                backoff.next_delay()
            };
            tracing::warn!(error = %e, retry_ms = delay.as_millis() as u64, "work stream lost");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn scheduler(&self) -> anyhow::Result<SchedulerClient<tonic::transport::Channel>> {
        let ch = self.peers.channel(Component::Scheduler)?;
        Ok(SchedulerClient::new(ch))
    }

    /// Returns Ok only on shutdown.
    async fn stream_work(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut stream = self
            .scheduler()
            .await?
            .work_stream(WorkStreamRequest {
                host_name: self.creds.host.clone(),
            })
            .await?
            .into_inner();
        tracing::info!(host = %self.creds.host, "waiting for work");
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = stream.message() => m?,
            };
            let Some(item) = item else {
                anyhow::bail!("scheduler closed the work stream")
            };
            if !item.cancels.is_empty() {
                self.cancel_work(item);
                continue;
            }
            let fresh = self
                .busy
                .lock()
                .map(|mut b| match b.get_mut(&item.vm) {
                    Some(later) => {
                        *later = Some(item.clone());
                        false
                    }
                    None => {
                        b.insert(item.vm.clone(), None);
                        true
                    }
                })
                .unwrap_or(false);
            if !fresh {
                // Not dropped: an item in flight that nobody completes would stay in flight
                // (a re-dispatch of it is a no-op) until the agent reconnects.
                tracing::info!(vm = %item.vm, work = %item.id, "vm is already replicating; the work runs after it");
                continue;
            }
            let me = self.clone();
            let stop = shutdown.child_token();
            tokio::spawn(async move {
                let mut item = item;
                loop {
                    let cancel = me.register_running(&item.id, &stop);
                    let completed = me.handle(item.clone(), &stop, cancel).await;
                    me.unregister_running(&item.id);
                    if stop.is_cancelled() {
                        break;
                    }
                    let Ok(mut b) = me.busy.lock() else { break };
                    match b.get_mut(&item.vm).and_then(Option::take) {
                        // The same item re-sent (a re-dispatch after Redis lost it): the
                        // completion just made acknowledged it, unless it failed. A new
                        // item under the same id (the next cycle, queued right after that
                        // acknowledgement) has its own creation time and attempt, and runs.
                        Some(next) if !(completed && same_delivery(&next, &item)) => item = next,
                        _ => {
                            b.remove(&item.vm);
                            break;
                        }
                    }
                }
            });
        }
    }

    /// Runs one work item and completes it; false when it could not be completed.
    /// `shutdown` is the agent's; `stop` (its child) also ends when the item's job is cancelled.
    async fn handle(
        &self,
        item: WorkItem,
        shutdown: &CancellationToken,
        stop: CancellationToken,
    ) -> bool {
        tracing::info!(vm = %item.vm, work = %item.id, kind = item.kind, attempt = item.attempt, "work received");
        if item.retry_time_unit_ms > 0 {
            self.retry_unit_ms.store(
                item.retry_time_unit_ms,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        let mut recovered = None;
        let result = match WorkKind::try_from(item.kind) {
            Ok(WorkKind::RecoverVm) => self.recover_vm(&item, &stop).await.map(|r| {
                recovered = Some(r);
            }),
            Ok(WorkKind::Failback) => self.failback_target(&item, &stop).await.map(|r| {
                recovered = Some(r);
            }),
            Ok(WorkKind::RemoveRecovered) => self.remove_recovered(&item, &stop).await,
            Ok(WorkKind::VerifyPoint) => self.verify_work(&item, &stop).await.map(|report| {
                recovered = Some(report);
            }),
            Ok(WorkKind::RunScript) => self.run_script(&item, &stop).await.map(|out| {
                recovered = Some(ferry_proto::scheduler::v1::RecoveredVm {
                    script_output: out,
                    ..Default::default()
                });
            }),
            Ok(WorkKind::ResumeVm) => self.resume_source(&item, &stop).await,
            Ok(WorkKind::ShutdownVm) => self.shutdown_source(&item, &stop).await.map(|p| {
                recovered = p.map(|final_point| ferry_proto::scheduler::v1::RecoveredVm {
                    final_point,
                    ..Default::default()
                });
            }),
            Ok(WorkKind::InitialReplication) => {
                self.initial_replication(&item.vm, &item.job_id, &stop)
                    .await
            }
            Ok(WorkKind::DeltaCycle) => {
                self.delta_cycle(&item.vm, item.app_consistent, &item.cut_id, &stop)
                    .await
            }
            Ok(WorkKind::Resync) => self.resync(&item.vm, &item.job_id, &stop).await,
            Ok(WorkKind::DisableProtection) => self
                .disable_protection(&item.vm)
                .map(|r| recovered = Some(r)),
            _ => Err(ReplError::Permanent(format!(
                "work kind {} is not supported by this agent",
                item.kind
            ))),
        };
        if shutdown.is_cancelled() {
            return true; // shutting down: the work stays in flight and is re-sent on reconnect
        }
        let (ok, error, error_class) = match &result {
            Ok(()) => (true, String::new(), 0),
            Err(e) => {
                tracing::warn!(vm = %item.vm, work = %item.id, error = %e, class = %e.class(), "work failed");
                (false, e.to_string(), e.class().into())
            }
        };
        let req = CompleteWorkRequest {
            work_id: item.id.clone(),
            host_name: self.creds.host.clone(),
            ok,
            error,
            error_class,
            recovered,
        };
        self.send_completion(req).await
    }

    /// A drill's read-back of a point on this host (its recovery host).
    async fn verify_work(
        &self,
        item: &WorkItem,
        stop: &CancellationToken,
    ) -> Result<ferry_proto::scheduler::v1::RecoveredVm, ReplError> {
        let point = item
            .failover
            .as_ref()
            .map(|f| f.point.as_str())
            .unwrap_or_default();
        if point.is_empty() {
            return Err(ReplError::Permanent(format!(
                "work {} names no point",
                item.id
            )));
        }
        self.verify_point(&item.vm, point, stop).await
    }

    /// A recovery plan's script action on this host (see [`driver::run_plan_script`]).
    async fn run_script(
        &self,
        item: &WorkItem,
        stop: &CancellationToken,
    ) -> Result<String, ReplError> {
        let script = item
            .failover
            .as_ref()
            .and_then(|f| f.script.as_ref())
            .ok_or_else(|| ReplError::Permanent(format!("work {} names no script", item.id)))?;
        driver::run_plan_script(&self.cfg.base_dir, script, stop)
            .await
            .map_err(|e| ReplError::Permanent(e.to_string()))
    }

    /// Sends a completion: five calls over about 3 s; the work stays in flight (re-sent on
    /// reconnect) if all fail. Whether it was sent.
    pub(crate) async fn send_completion(&self, req: CompleteWorkRequest) -> bool {
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        ferry_mesh::retry(
            "completing work",
            backoff,
            Some(5),
            &CancellationToken::new(),
            ferry_mesh::transient_error,
            || async {
                let mut s = self.scheduler().await?;
                s.complete_work(req.clone()).await?;
                anyhow::Ok(())
            },
        )
        .await
        .is_ok()
    }
}
