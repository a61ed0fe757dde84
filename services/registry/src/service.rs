//! The registry service: its catalog, in-memory heartbeat state and VM views, and the gRPC
//! handlers of `ferry.registry.v1.Registry`, one module per concern (the trait impl here only
//! delegates to them).
mod audit;
mod failover;
mod hosts;
mod jobs_api;
mod reports;
mod tokens;
mod vault_keys;
mod vms;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_mesh::{Authenticator, MeshConfig};
use ferry_model::{Health, VmState};
use ferry_proto::common::v1::{Disk, Job};
use ferry_proto::now_ms;
use ferry_proto::registry::v1::{self as pb, registry_server::Registry};
use ferry_store::{AuditLog, Catalog, Store};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::RegistryError;
use crate::state::{Event, JobRecord, PolicyRecord, State};

/// Hosts heartbeat this often; a host silent for three intervals is disconnected.
pub(crate) const HEARTBEAT_SECS: u64 = 5;

/// What a host's heartbeat says it can do.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HostCapabilities {
    /// Its tracker runs: its VMs can run delta cycles.
    pub change_tracking: bool,
    /// It has a `[recovery]` section: it can receive failed-over VMs.
    pub recovery: bool,
}

pub struct RegistryService {
    pub(crate) cfg: MeshConfig,
    /// Channels to the scheduler (dispatching job work), made once.
    pub(crate) peers: ferry_mesh::Peers,
    catalog: Catalog,
    /// Key 0 of the vault's keyring (the data key file, read once at start): sent to hosts
    /// at registration and wrapping the keys rotations add.
    pub(crate) vault_key: ferry_store::VaultKey,
    /// The vault's audit trail (read by `ListAudit`; this registry writes into it too).
    audit: AuditLog,
    pub(crate) state: Mutex<State>,
    /// Last heartbeat per host (memory only: rebuilt by the next heartbeat).
    heartbeats: std::sync::Mutex<HashMap<String, i64>>,
    /// What each host's last heartbeat said it can do. Memory only, like the heartbeat time:
    /// the checks that read it also require a fresh heartbeat, which brings it again after a
    /// registry restart.
    capabilities: std::sync::Mutex<HashMap<String, HostCapabilities>>,
    /// Wakes job runners when something they wait for changed.
    pub(crate) changed: Notify,
    /// What changes every heartbeat or cycle is kept in memory only (rebuilt by the next
    /// heartbeat / cycle): pending log bytes per disk id, last cycle (duration ms, bytes) per VM.
    pending_logs: std::sync::Mutex<HashMap<String, u64>>,
    /// The point of each VM's standby copy, as its recovery host last reported it.
    standby_points: std::sync::Mutex<HashMap<String, String>>,
    last_cycle: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    /// Host certificates refused: revoked serials and removed hosts, read by the
    /// authenticator on every call (no await).
    revoked: ferry_mesh::RevocationList,
    /// Operator tokens in force, from the catalog.
    grants: ferry_mesh::TokenGrants,
    /// Progress writes are throttled: last persisted time per job.
    progress_flushed: std::sync::Mutex<HashMap<String, i64>>,
    /// The seq of the newest snapshot written or loaded.
    snapshot_at: AtomicU64,
    pub(crate) shutdown: CancellationToken,
}

impl RegistryService {
    pub async fn open(cfg: MeshConfig, shutdown: CancellationToken) -> Result<Self, RegistryError> {
        let store = Store::from_url(&cfg.store_url())?;
        let key = cfg
            .data_key()
            .map_err(|e| RegistryError::Internal(format!("the vault data key: {e}")))?;
        let audit = AuditLog::new(store.clone(), &key);
        let catalog = Catalog::new(store, "registry");
        let (state, loaded) = crate::snapshot::load(&catalog).await?;
        tracing::info!(
            seq = state.seq,
            from_snapshot = loaded.from_snapshot,
            replayed = loaded.replayed,
            hosts = state.hosts.len(),
            vms = state.vms.len(),
            jobs = state.jobs.len(),
            "registry catalog loaded"
        );
        let revoked = ferry_mesh::RevocationList::default();
        revoked.set(state.revoked_serials.iter().cloned(), removed_hosts(&state));
        let grants = ferry_mesh::TokenGrants::default();
        grants.set(tokens::grants(&state));
        Ok(Self {
            peers: ferry_mesh::Peers::service(&cfg)
                .map_err(|e| RegistryError::Pki(format!("the service certificate: {e}")))?,
            cfg,
            catalog,
            vault_key: ferry_store::VaultKey::from_bytes(key),
            audit,
            state: Mutex::new(state),
            heartbeats: Default::default(),
            capabilities: Default::default(),
            changed: Notify::new(),
            progress_flushed: Default::default(),
            revoked,
            grants,
            pending_logs: Default::default(),
            standby_points: Default::default(),
            last_cycle: Default::default(),
            snapshot_at: AtomicU64::new(loaded.from_snapshot),
            shutdown,
        })
    }

    /// Every `catalog.snapshot_every` entries, saves the state (serialised here, under the
    /// state lock, so it is exactly the state at its seq; written in the background).
    fn maybe_snapshot(&self, st: &State) {
        let every = self.cfg.catalog.snapshot_every;
        if st.seq
            < self
                .snapshot_at
                .load(Ordering::Relaxed)
                .saturating_add(every)
        {
            return;
        }
        self.snapshot_at.store(st.seq, Ordering::Relaxed);
        let value = match serde_json::to_value(st) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(seq = st.seq, error = %e, "cannot serialise a registry snapshot");
                return;
            }
        };
        let (catalog, seq) = (self.catalog.clone(), st.seq);
        tokio::spawn(async move {
            let written = catalog
                .write_snapshot(seq, crate::snapshot::FORMAT, &value)
                .await;
            match written {
                Ok(()) => {
                    tracing::info!(seq, "registry snapshot written");
                    if let Err(e) = catalog.prune_snapshots(crate::snapshot::KEEP).await {
                        tracing::warn!(error = %e, "cannot prune old registry snapshots");
                    }
                }
                // The next one is due in `every` entries; until then a start replays more.
                Err(e) => tracing::warn!(seq, error = %e, "cannot write a registry snapshot"),
            }
        });
    }

    /// Hosts removed from the vault are refused even though their certificate is valid.
    pub fn authenticator(self: &Arc<Self>) -> anyhow::Result<Authenticator> {
        let token = self.cfg.admin_token()?;
        Ok(Authenticator::with_admin_token(&token)
            .with_revocation(self.revoked.check())
            .with_grants(self.grants.clone())
            .with_audit(ferry_store::AuditWriter::spawn(self.audit.clone())))
    }

    /// Appends events (after catching up with other writers) and applies them.
    pub(crate) async fn persist(&self, events: Vec<Event>) -> Result<(), RegistryError> {
        self.persist_checked(|_| Ok((events, ()))).await
    }

    /// Appends the events `decide` makes from the state as it is once caught up with the
    /// catalog, under the state lock: nothing changes between the check and the write.
    pub(crate) async fn persist_checked<T>(
        &self,
        decide: impl FnOnce(&State) -> Result<(Vec<Event>, T), RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut st = self.state.lock().await;
        for (seq, ev) in self.catalog.read_from::<Event>(st.seq).await? {
            st.apply(seq, &ev);
        }
        let (events, out) = decide(&st)?;
        for ev in events {
            let seq = self.catalog.append(&ev).await?;
            st.apply(seq, &ev);
        }
        self.maybe_snapshot(&st);
        self.revoked
            .set(st.revoked_serials.iter().cloned(), removed_hosts(&st));
        self.grants.set(tokens::grants(&st));
        drop(st);
        self.changed.notify_waiters();
        Ok(out)
    }

    pub(crate) async fn save_job(&self, job: &Job) -> Result<(), RegistryError> {
        self.persist(vec![Event::Job(JobRecord::encode(job))]).await
    }

    pub(crate) async fn job(&self, id: &str) -> Result<Job, RegistryError> {
        self.state
            .lock()
            .await
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::JobNotFound(id.to_string()))
    }

    pub(crate) fn host_connected(&self, host: &str) -> bool {
        let last = self
            .heartbeats
            .lock()
            .map(|h| h.get(host).copied())
            .unwrap_or(None);
        last.is_some_and(|t| now_ms() - t < (3 * HEARTBEAT_SECS * 1000) as i64)
    }

    /// What the host's last heartbeat said it can do (nothing before any heartbeat).
    fn host_capabilities(&self, host: &str) -> HostCapabilities {
        self.capabilities
            .lock()
            .map(|c| c.get(host).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Whether the host's last heartbeat said its tracker runs.
    pub(crate) fn host_tracks_changes(&self, host: &str) -> bool {
        self.host_capabilities(host).change_tracking
    }

    /// Whether the host's last heartbeat said it can receive failed-over VMs.
    pub(crate) fn host_has_recovery(&self, host: &str) -> bool {
        self.host_capabilities(host).recovery
    }

    pub(crate) fn set_host_capabilities(&self, host: &str, caps: HostCapabilities) {
        if let Ok(mut c) = self.capabilities.lock() {
            c.insert(host.to_string(), caps);
        }
    }

    pub(crate) async fn vm_proto(&self, name: &str) -> Result<pb::Vm, RegistryError> {
        let st = self.state.lock().await;
        let v = st
            .vms
            .get(name)
            .ok_or_else(|| RegistryError::VmNotFound(name.to_string()))?;
        let site = st
            .hosts
            .get(&v.host)
            .map(|h| h.site.clone())
            .unwrap_or_default();
        Ok(self.vm_view(v, site))
    }

    /// The operator's view of a VM: durable state plus what heartbeats and cycles reported
    /// lately; a protected VM whose newest point is older than three cycles is in warning.
    fn vm_view(&self, v: &crate::state::VmRecord, site: String) -> pb::Vm {
        let mut vm = vm_to_proto(v, site);
        let recovery = v.policy.as_ref().map_or("", |p| p.recovery_host.as_str());
        if let Ok(s) = self.standby_points.lock()
            && v.standby_on(recovery).is_some()
        {
            vm.standby_point = s.get(&v.name).cloned().unwrap_or_default();
        }
        if let Ok(p) = self.pending_logs.lock() {
            for d in &mut vm.disks {
                d.pending_log_bytes = p.get(&d.id).copied().unwrap_or(0);
            }
        }
        if let Some((ms, bytes)) = self
            .last_cycle
            .lock()
            .ok()
            .and_then(|c| c.get(&v.name).copied())
        {
            vm.last_cycle_duration_ms = ms;
            vm.last_cycle_bytes = bytes;
        }
        let every = v.policy.as_ref().map_or(0, |p| p.frequency_seconds);
        // A view only (nothing is persisted): late points show as a warning.
        if v.state == VmState::Protected
            && v.health == Health::Normal
            && every > 0
            && vm.rpo_seconds > 3 * every + 5
        {
            vm.health = Health::Warning.into();
            if vm.last_error.is_empty() {
                vm.last_error = format!(
                    "no recovery point for {} s (policy: every {every} s)",
                    vm.rpo_seconds
                );
            }
        }
        if let Some(why) = drill_warning(v)
            && vm.health == i32::from(Health::Normal)
            && v.state == VmState::Protected
        {
            vm.health = Health::Warning.into();
            if vm.last_error.is_empty() {
                vm.last_error = why;
            }
        }
        vm
    }
}

/// The warning a VM's drill schedule puts on its health (a view, like a late point).
fn drill_warning(v: &crate::state::VmRecord) -> Option<String> {
    let s = v.drill_schedule.as_ref()?;
    let last = v
        .last_verified
        .as_ref()
        .filter(|l| l.time_ms >= s.since_ms)
        .map(|l| ferry_model::drill::LastDrill {
            time_ms: l.time_ms,
            ok: l.ok,
            message: &l.message,
        });
    ferry_model::drill::warning(s.every_seconds, s.since_ms, last, now_ms())
}

/// Hosts removed and not registered again: their certificates are refused by name.
fn removed_hosts(st: &State) -> Vec<String> {
    st.hosts
        .values()
        .filter(|h| h.removed)
        .map(|h| h.name.clone())
        .collect()
}

fn vm_to_proto(v: &crate::state::VmRecord, site: String) -> pb::Vm {
    let rpo = if v.last_point_ms > 0 {
        ((now_ms() - v.last_point_ms).max(0) / 1000) as u64
    } else {
        0
    };
    pb::Vm {
        name: v.name.clone(),
        host: v.host.clone(),
        site,
        state: v.state.into(),
        health: v.health.into(),
        allowed_operations: v.allowed_operations(),
        disks: v.disks.iter().map(Disk::from).collect(),
        policy: v.policy.as_ref().map(PolicyRecord::to_proto),
        rpo_seconds: rpo,
        last_point_id: v.last_point_id.clone(),
        last_point_ms: v.last_point_ms,
        last_error: v.last_error.clone(),
        retry_attempts: v.retry_attempts,
        next_retry_ms: v.next_retry_ms,
        protection_job_id: v.protection_job_id.clone(),
        failover_state: v.failover_state.into(),
        active_host: v.active_host().to_owned(),
        epoch: v.site.epoch,
        failover_point: v.site.point.clone(),
        failover_id: v.site.failover_id.clone(),
        direction: v.site.direction.as_str().to_owned(),
        base_point: v.site.base_point.clone(),
        recovery_host: v
            .policy
            .as_ref()
            .map(|p| p.recovery_host.clone())
            .unwrap_or_default(),
        hardware: Some((&v.hardware).into()),
        last_cycle_duration_ms: 0,
        last_cycle_bytes: 0,
        host_history: v
            .host_history
            .iter()
            .map(|s| pb::HostSpan {
                host: s.host.clone(),
                since_ms: s.since_ms,
            })
            .collect(),
        last_verified: v.last_verified.as_ref().map(|d| pb::Verification {
            point_id: d.point_id.clone(),
            time_ms: d.time_ms,
            ok: d.ok,
            message: d.message.clone(),
            job_id: d.job_id.clone(),
        }),
        drill_schedule: v.drill_schedule.as_ref().map(|d| pb::DrillSchedule {
            target: d.target.clone(),
            every_seconds: d.every_seconds,
            boot_check: d.boot_check.clone(),
            since_ms: d.since_ms,
        }),
        // Reported by heartbeats: `vm_view` fills it in.
        standby_point: String::new(),
    }
}

type R<T> = Result<Response<T>, Status>;

/// The gRPC face of the registry (a newtype: the orphan rule forbids `impl Registry for Arc<_>`).
#[derive(Clone)]
pub struct RegistryApi(pub Arc<RegistryService>);

impl std::ops::Deref for RegistryApi {
    type Target = RegistryService;
    fn deref(&self) -> &RegistryService {
        &self.0
    }
}

#[tonic::async_trait]
impl Registry for RegistryApi {
    async fn create_registration_key(
        &self,
        req: Request<pb::CreateRegistrationKeyRequest>,
    ) -> R<pb::CreateRegistrationKeyResponse> {
        self.0.create_registration_key(req).await
    }

    async fn register_host(
        &self,
        req: Request<pb::RegisterHostRequest>,
    ) -> R<pb::RegisterHostResponse> {
        self.0.register_host(req).await
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> R<pb::HeartbeatResponse> {
        self.0.heartbeat(req).await
    }

    async fn list_hosts(&self, req: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
        self.0.list_hosts(req).await
    }

    async fn remove_host(&self, req: Request<pb::RemoveHostRequest>) -> R<pb::RemoveHostResponse> {
        self.0.remove_host(req).await
    }

    async fn list_vms(&self, req: Request<pb::ListVmsRequest>) -> R<pb::ListVmsResponse> {
        self.0.list_vms(req).await
    }

    async fn get_vm(&self, req: Request<pb::GetVmRequest>) -> R<pb::Vm> {
        self.0.get_vm(req).await
    }

    async fn protect_vm(&self, req: Request<pb::ProtectVmRequest>) -> R<Job> {
        self.0.protect_vm(req).await
    }

    async fn unprotect_vm(&self, req: Request<pb::UnprotectVmRequest>) -> R<Job> {
        self.0.unprotect_vm(req).await
    }

    async fn update_policy(&self, req: Request<pb::UpdatePolicyRequest>) -> R<pb::Vm> {
        self.0.update_policy(req).await
    }

    async fn resync_vm(&self, req: Request<pb::ResyncVmRequest>) -> R<Job> {
        self.0.resync_vm(req).await
    }

    async fn repair_vm(&self, req: Request<pb::RepairVmRequest>) -> R<pb::Vm> {
        self.0.repair_vm(req).await
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> R<pb::ListJobsResponse> {
        self.0.list_jobs(req).await
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> R<Job> {
        self.0.get_job(req).await
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> R<Job> {
        self.0.cancel_job(req).await
    }

    async fn resume_job(&self, req: Request<pb::ResumeJobRequest>) -> R<Job> {
        self.0.resume_job(req).await
    }

    async fn record_verification(&self, req: Request<pb::RecordVerificationRequest>) -> R<pb::Vm> {
        self.0.record_verification(req).await
    }

    async fn set_drill_schedule(&self, req: Request<pb::SetDrillScheduleRequest>) -> R<pb::Vm> {
        self.0.set_drill_schedule(req).await
    }

    async fn report_committed(
        &self,
        req: Request<pb::ReportCommittedRequest>,
    ) -> R<pb::ReportCommittedResponse> {
        self.0.report_committed(req).await
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> R<pb::ReportProgressResponse> {
        self.0.report_progress(req).await
    }

    async fn report_replication_error(
        &self,
        req: Request<pb::ReportReplicationErrorRequest>,
    ) -> R<pb::ReportReplicationErrorResponse> {
        self.0.report_replication_error(req).await
    }

    async fn upsert_job(&self, req: Request<Job>) -> R<Job> {
        self.0.upsert_job(req).await
    }

    async fn list_revoked_certificates(
        &self,
        req: Request<pb::ListRevokedCertificatesRequest>,
    ) -> R<pb::ListRevokedCertificatesResponse> {
        self.0.list_revoked_certificates(req).await
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> R<pb::CreateTokenResponse> {
        self.0.create_token(req).await
    }

    async fn list_tokens(&self, req: Request<pb::ListTokensRequest>) -> R<pb::ListTokensResponse> {
        self.0.list_tokens(req).await
    }

    async fn revoke_token(&self, req: Request<pb::RevokeTokenRequest>) -> R<pb::TokenInfo> {
        self.0.revoke_token(req).await
    }

    async fn rotate_vault_key(
        &self,
        req: Request<pb::RotateVaultKeyRequest>,
    ) -> R<pb::VaultKeyInfo> {
        self.0.rotate_vault_key(req).await
    }

    async fn list_vault_keys(
        &self,
        req: Request<pb::ListVaultKeysRequest>,
    ) -> R<pb::ListVaultKeysResponse> {
        self.0.list_vault_keys(req).await
    }

    async fn get_vault_keys(
        &self,
        req: Request<pb::GetVaultKeysRequest>,
    ) -> R<pb::GetVaultKeysResponse> {
        self.0.get_vault_keys(req).await
    }

    async fn list_token_grants(
        &self,
        req: Request<pb::ListTokenGrantsRequest>,
    ) -> R<pb::ListTokenGrantsResponse> {
        self.0.list_token_grants(req).await
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> R<pb::ListAuditResponse> {
        self.0.list_audit(req).await
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> R<pb::VerifyAuditResponse> {
        self.0.verify_audit(req).await
    }

    async fn set_failover_state(&self, req: Request<pb::SetFailoverStateRequest>) -> R<pb::Vm> {
        self.0.set_failover_state(req).await
    }

    async fn record_failover(&self, req: Request<pb::RecordFailoverRequest>) -> R<pb::Vm> {
        self.0.record_failover(req).await
    }
}
