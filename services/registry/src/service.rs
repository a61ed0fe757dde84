//! gRPC handlers of `ferry.registry.v1.Registry`.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_mesh::{Authenticator, Component, MeshConfig, Role};
use ferry_model::{Health, Transition, VmState};
use ferry_proto::common::v1::{Disk, Job, StepStatus};
use ferry_proto::now_ms;
use ferry_proto::registry::v1::{self as pb, registry_server::Registry};
use ferry_store::{Catalog, Store};
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::error::RegistryError;
use crate::lifecycle::{transition_event, vm_event};
use crate::state::{DiskRecord, Event, HostRecord, JobRecord, KeyRecord, PolicyRecord, State};

/// Hosts heartbeat this often; a host silent for three intervals is disconnected.
pub(crate) const HEARTBEAT_SECS: u64 = 5;
const KEY_TTL_DEFAULT_SECS: u64 = 24 * 3600;

pub struct RegistryService {
    pub(crate) cfg: MeshConfig,
    catalog: Catalog,
    pub(crate) state: Mutex<State>,
    /// Last heartbeat per host (memory only: rebuilt by the next heartbeat).
    heartbeats: std::sync::Mutex<HashMap<String, i64>>,
    /// Whether each host's last heartbeat said it tracks changes. Memory only, like the
    /// heartbeat time: the prerequisites that read it also require a fresh heartbeat, which
    /// brings it again after a registry restart.
    change_tracking: std::sync::Mutex<HashMap<String, bool>>,
    /// Wakes job runners when something they wait for changed.
    pub(crate) changed: Notify,
    /// What changes every heartbeat or cycle is kept in memory only (rebuilt by the next
    /// heartbeat / cycle): pending log bytes per disk id, last cycle (duration ms, bytes) per VM.
    pending_logs: std::sync::Mutex<HashMap<String, u64>>,
    last_cycle: std::sync::Mutex<HashMap<String, (u64, u64)>>,
    /// Host certificates refused: revoked serials and removed hosts, read by the
    /// authenticator on every call (no await).
    revoked: ferry_mesh::RevocationList,
    /// Progress writes are throttled: last persisted time per job.
    progress_flushed: std::sync::Mutex<HashMap<String, i64>>,
    pub(crate) shutdown: CancellationToken,
}

impl RegistryService {
    pub async fn open(cfg: MeshConfig, shutdown: CancellationToken) -> Result<Self, RegistryError> {
        let store = Store::from_url(&cfg.store_url())?;
        let catalog = Catalog::new(store, "registry");
        let mut state = State::default();
        for (seq, ev) in catalog.read_from::<Event>(0).await? {
            state.apply(seq, &ev);
        }
        tracing::info!(
            seq = state.seq,
            hosts = state.hosts.len(),
            vms = state.vms.len(),
            jobs = state.jobs.len(),
            "registry catalog loaded"
        );
        let revoked = ferry_mesh::RevocationList::default();
        revoked.set(state.revoked_serials.iter().cloned(), removed_hosts(&state));
        Ok(Self {
            cfg,
            catalog,
            state: Mutex::new(state),
            heartbeats: Default::default(),
            change_tracking: Default::default(),
            changed: Notify::new(),
            progress_flushed: Default::default(),
            revoked,
            pending_logs: Default::default(),
            last_cycle: Default::default(),
            shutdown,
        })
    }

    /// Hosts removed from the vault are refused even though their certificate is valid.
    pub fn authenticator(self: &Arc<Self>) -> anyhow::Result<Authenticator> {
        let token = self.cfg.admin_token()?;
        Ok(Authenticator::with_admin_token(&token).with_revocation(self.revoked.check()))
    }

    /// Appends events (after catching up with other writers) and applies them.
    pub(crate) async fn persist(&self, events: Vec<Event>) -> Result<(), RegistryError> {
        let mut st = self.state.lock().await;
        for (seq, ev) in self.catalog.read_from::<Event>(st.seq).await? {
            st.apply(seq, &ev);
        }
        for ev in events {
            let seq = self.catalog.append(&ev).await?;
            st.apply(seq, &ev);
        }
        self.revoked
            .set(st.revoked_serials.iter().cloned(), removed_hosts(&st));
        drop(st);
        self.changed.notify_waiters();
        Ok(())
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

    /// Whether the host's last heartbeat said its tracker runs (false before any heartbeat).
    pub(crate) fn host_tracks_changes(&self, host: &str) -> bool {
        self.change_tracking
            .lock()
            .map(|t| t.get(host).copied().unwrap_or(false))
            .unwrap_or(false)
    }

    fn vault_ca(&self) -> Result<ferry_mesh::VaultCa, RegistryError> {
        let key_path = self.cfg.tls.ca_key.as_ref().ok_or_else(|| {
            RegistryError::Pki(
                "the registry needs the vault ca key (tls.ca_key) to sign host certificates".into(),
            )
        })?;
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| RegistryError::Pki(format!("reading {}: {e}", p.display())))
        };
        ferry_mesh::VaultCa::from_pem(&read(&self.cfg.tls.ca_cert)?, &read(key_path)?)
            .map_err(|e| RegistryError::Pki(e.to_string()))
    }

    async fn vm_proto(&self, name: &str) -> Result<pb::Vm, RegistryError> {
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
            vm.health = Health::Warning.to_string();
            if vm.last_error.is_empty() {
                vm.last_error = format!(
                    "no recovery point for {} s (policy: every {every} s)",
                    vm.rpo_seconds
                );
            }
        }
        vm
    }
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
        state: v.state.to_string(),
        health: v.health.to_string(),
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
        failover_state: v.failover_state.clone(),
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
    }
}

fn secret_hash(secret: &str) -> String {
    blake3::derive_key("ferry 2026 registration key", secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn fmt_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| ms.to_string())
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
        ferry_mesh::require_role(&req, Role::Admin)?;
        let req = req.into_inner();
        let ttl = if req.ttl_seconds == 0 {
            KEY_TTL_DEFAULT_SECS
        } else {
            req.ttl_seconds
        };
        let key_id = uuid::Uuid::new_v4().to_string();
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let expires_at_ms = now_ms() + (ttl as i64) * 1000;
        self.persist(vec![Event::KeyCreated(KeyRecord {
            key_id: key_id.clone(),
            secret_hash: secret_hash(&secret),
            site: req.site.clone(),
            expires_at_ms,
            used_by: None,
        })])
        .await?;
        tracing::info!(key_id = %key_id, ttl_s = ttl, "registration key created");
        let ca_pem = std::fs::read_to_string(&self.cfg.tls.ca_cert)
            .map_err(|e| RegistryError::Internal(format!("reading the vault ca: {e}")))?;
        Ok(Response::new(pb::CreateRegistrationKeyResponse {
            key_id,
            secret,
            vault_id: self.cfg.vault.id.clone(),
            expires_at_ms,
            registry_endpoint: self.cfg.endpoint(Component::Registry),
            ca_pem,
        }))
    }

    async fn register_host(
        &self,
        req: Request<pb::RegisterHostRequest>,
    ) -> R<pb::RegisterHostResponse> {
        let req = req.into_inner();
        if !valid_name(&req.host_name) {
            return Err(RegistryError::InvalidArgument(format!(
                "host name {:?} must be 1-128 characters of letters, digits, '-', '_' or '.'",
                req.host_name
            ))
            .into());
        }
        {
            let st = self.state.lock().await;
            let key = st
                .keys
                .get(&req.key_id)
                .ok_or_else(|| RegistryError::BadKey(req.key_id.clone()))?;
            if key.secret_hash != secret_hash(&req.secret) {
                return Err(RegistryError::BadKey(req.key_id.clone()).into());
            }
            if let Some(host) = &key.used_by {
                return Err(RegistryError::KeyReused {
                    key_id: req.key_id.clone(),
                    host: host.clone(),
                }
                .into());
            }
            if key.expires_at_ms < now_ms() {
                return Err(RegistryError::KeyExpired {
                    key_id: req.key_id.clone(),
                    expired_at: fmt_ms(key.expires_at_ms),
                }
                .into());
            }
        }
        let ca = self.vault_ca()?;
        let cert_pem = ca
            .sign_csr(
                &req.csr_pem,
                &ferry_mesh::Identity::Host(req.host_name.clone()),
                Duration::from_secs(365 * 24 * 3600),
            )
            .map_err(|e| {
                RegistryError::InvalidArgument(format!("certificate signing request: {e}"))
            })?;
        let site = if req.site.is_empty() {
            "default".to_string()
        } else {
            req.site.clone()
        };
        let cert_serial = ferry_mesh::cert_serial_hex_pem(&cert_pem)
            .map_err(|e| RegistryError::Internal(format!("reading the signed certificate: {e}")))?;
        self.persist(vec![
            Event::KeyUsed {
                key_id: req.key_id.clone(),
                host: req.host_name.clone(),
            },
            Event::HostRegistered(HostRecord {
                name: req.host_name.clone(),
                site,
                registered_at_ms: now_ms(),
                removed: false,
                cert_serial,
            }),
        ])
        .await?;
        tracing::info!(host = %req.host_name, key_id = %req.key_id, "host registered");
        let data_key = self
            .cfg
            .data_key()
            .map_err(|e| RegistryError::Internal(e.to_string()))?;
        Ok(Response::new(pb::RegisterHostResponse {
            host_id: req.host_name.clone(),
            cert_pem,
            ca_pem: ca.cert_pem(),
            vault_id: self.cfg.vault.id.clone(),
            vault_data_key: data_key.to_vec(),
            endpoints: Some(pb::Endpoints {
                registry: self.cfg.endpoint(Component::Registry),
                scheduler: self.cfg.endpoint(Component::Scheduler),
                ingest: self.cfg.endpoint(Component::Ingest),
                storage_writer: self.cfg.endpoint(Component::StorageWriter),
                failover: self.cfg.endpoint(Component::Failover),
                gateway: self.cfg.gateway.listen.to_string(),
            }),
            block_size: self.cfg.vault.block_size,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> R<pb::HeartbeatResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        let mut events = Vec::new();
        {
            let st = self.state.lock().await;
            match st.hosts.get(&host) {
                None => return Err(RegistryError::HostNotFound(host).into()),
                Some(h) if h.removed => return Err(RegistryError::HostRemoved(host).into()),
                Some(_) => {}
            }
            for vm in &req.vms {
                if !valid_name(&vm.name) {
                    tracing::warn!(host = %host, vm = %vm.name, "ignoring vm with an invalid name");
                    continue;
                }
                let disks: Vec<DiskRecord> = vm.disks.iter().map(DiskRecord::from).collect();
                match st.vms.get(&vm.name) {
                    Some(v) if v.host != host && v.state != VmState::Unprotected => {
                        tracing::warn!(vm = %vm.name, owner = %v.host, host = %host, "vm is protected from another host; inventory ignored");
                    }
                    Some(v) if v.host == host && v.disks == disks => {}
                    _ => events.push(Event::Inventory {
                        host: host.clone(),
                        vm: vm.name.clone(),
                        disks,
                        at_ms: now_ms(),
                    }),
                }
            }
        }
        if let Ok(mut t) = self.change_tracking.lock() {
            t.insert(host.clone(), req.change_tracking);
        }
        if let Ok(mut hb) = self.heartbeats.lock() {
            hb.insert(host.clone(), now_ms());
        }
        if let Ok(mut p) = self.pending_logs.lock() {
            for d in req.vms.iter().flat_map(|v| &v.disks) {
                p.insert(d.id.clone(), d.pending_log_bytes);
            }
        }
        if !events.is_empty() {
            tracing::info!(host = %host, changed = events.len(), "inventory changed");
            self.persist(events).await?;
        }
        Ok(Response::new(pb::HeartbeatResponse {
            heartbeat_interval_seconds: HEARTBEAT_SECS,
        }))
    }

    async fn list_hosts(&self, req: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let st = self.state.lock().await;
        let hb = self
            .heartbeats
            .lock()
            .map(|h| h.clone())
            .unwrap_or_default();
        let hosts = st
            .hosts
            .values()
            .map(|h| pb::Host {
                id: h.name.clone(),
                name: h.name.clone(),
                site: h.site.clone(),
                registered_at_ms: h.registered_at_ms,
                last_heartbeat_ms: hb.get(&h.name).copied().unwrap_or(0),
                status: if h.removed {
                    "removed".into()
                } else if self.host_connected(&h.name) {
                    "connected".into()
                } else {
                    "disconnected".into()
                },
                vms: st
                    .vms
                    .values()
                    .filter(|v| v.host == h.name)
                    .map(|v| v.name.clone())
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn remove_host(&self, req: Request<pb::RemoveHostRequest>) -> R<pb::RemoveHostResponse> {
        ferry_mesh::require_role(&req, Role::Admin)?;
        let name = req.into_inner().host;
        if !self.state.lock().await.hosts.contains_key(&name) {
            return Err(RegistryError::HostNotFound(name).into());
        }
        // Its VMs cannot replicate any more: critical at once, so nothing retries in vain.
        let mut events = vec![Event::HostRemoved { name: name.clone() }];
        {
            let st = self.state.lock().await;
            for v in st
                .vms
                .values()
                .filter(|v| v.host == name && v.state != VmState::Unprotected)
            {
                events.push(vm_event(
                    v,
                    &Transition::HostRemoved {
                        error: format!(
                            "host {name} was removed from the vault and its certificate is refused; register the host again, then run `ferry vm repair {}`",
                            v.name
                        ),
                    },
                )?);
                events.push(Event::VmRetry {
                    vm: v.name.clone(),
                    attempts: 0,
                    next_retry_ms: 0,
                });
            }
        }
        self.persist(events).await?;
        tracing::info!(host = %name, "host removed from the vault");
        Ok(Response::new(pb::RemoveHostResponse {}))
    }

    async fn list_vms(&self, req: Request<pb::ListVmsRequest>) -> R<pb::ListVmsResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let st = self.state.lock().await;
        let vms = st
            .vms
            .values()
            .map(|v| {
                self.vm_view(
                    v,
                    st.hosts
                        .get(&v.host)
                        .map(|h| h.site.clone())
                        .unwrap_or_default(),
                )
            })
            .collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    async fn get_vm(&self, req: Request<pb::GetVmRequest>) -> R<pb::Vm> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        Ok(Response::new(self.vm_proto(&req.into_inner().name).await?))
    }

    async fn protect_vm(&self, req: Request<pb::ProtectVmRequest>) -> R<Job> {
        ferry_mesh::require_role(&req, Role::Operator)?;
        let req = req.into_inner();
        let job = self
            .0
            .start_protection(&req.name, PolicyRecord::from_proto(req.policy.as_ref()))
            .await?;
        Ok(Response::new(job))
    }

    async fn unprotect_vm(&self, req: Request<pb::UnprotectVmRequest>) -> R<Job> {
        ferry_mesh::require_role(&req, Role::Operator)?;
        Err(ferry_mesh::unimplemented(
            "disabling protection (delta replication issue)",
        ))
    }

    async fn update_policy(&self, req: Request<pb::UpdatePolicyRequest>) -> R<pb::Vm> {
        ferry_mesh::require_role(&req, Role::Operator)?;
        Err(ferry_mesh::unimplemented(
            "changing a protected vm's policy (delta replication issue)",
        ))
    }

    async fn resync_vm(&self, req: Request<pb::ResyncVmRequest>) -> R<Job> {
        // Operators start one now; the scheduler starts automatic ones in the resync window.
        if !matches!(ferry_mesh::caller(&req), ferry_mesh::Caller::Service(_)) {
            ferry_mesh::require_role(&req, Role::Operator)?;
        }
        let name = req.into_inner().name;
        Ok(Response::new(self.0.start_resync(&name).await?))
    }

    async fn repair_vm(&self, req: Request<pb::RepairVmRequest>) -> R<pb::Vm> {
        ferry_mesh::require_role(&req, Role::Operator)?;
        let name = req.into_inner().name;
        self.0.repair(&name).await?;
        Ok(Response::new(self.vm_proto(&name).await?))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> R<pb::ListJobsResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let target = req.into_inner().target;
        let st = self.state.lock().await;
        let mut jobs: Vec<Job> = st
            .jobs
            .values()
            .filter(|j| target.is_empty() || j.target == target)
            .cloned()
            .collect();
        jobs.sort_by_key(|j| j.created_at_ms);
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> R<Job> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        Ok(Response::new(self.job(&req.into_inner().id).await?))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> R<Job> {
        ferry_mesh::require_role(&req, Role::Operator)?;
        Err(ferry_mesh::unimplemented("cancelling jobs"))
    }

    async fn report_committed(
        &self,
        req: Request<pb::ReportCommittedRequest>,
    ) -> R<pb::ReportCommittedResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        let point = req.point.unwrap_or_default();
        if let Ok(mut c) = self.last_cycle.lock() {
            c.insert(req.vm.clone(), (req.cycle_duration_ms, req.cycle_bytes));
        }
        let mut events = vec![Event::VmPoint {
            vm: req.vm.clone(),
            point_id: point.id.clone(),
            time_ms: point.time_ms,
        }];
        {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(&req.vm)
                .ok_or_else(|| RegistryError::VmNotFound(req.vm.clone()))?;
            // A point after failed attempts: the retries are over and the warning with them.
            if v.retry_attempts > 0 {
                events.push(Event::VmRetry {
                    vm: v.name.clone(),
                    attempts: 0,
                    next_retry_ms: 0,
                });
            }
            let resync_job = st.jobs.get(&req.job_id).filter(|j| {
                j.kind == crate::jobs::KIND_RESYNC && j.status == StepStatus::Running as i32
            });
            if let Some(job) = resync_job {
                let mut job = job.clone();
                let summary = format!(
                    "{} bytes sent, {} bytes equal or already stored",
                    job.bytes_done, job.bytes_skipped
                );
                for s in &mut job.steps {
                    s.status = StepStatus::Succeeded as i32;
                    s.progress_percent = 100;
                    s.ended_at_ms = now_ms();
                    s.message = summary.clone();
                }
                job.status = StepStatus::Succeeded as i32;
                job.updated_at_ms = now_ms();
                events.push(Event::Job(JobRecord::encode(&job)));
                events.push(vm_event(v, &Transition::ResyncCommitted)?);
            } else {
                let next = vm_event(v, &Transition::PointCommitted)?;
                if !matches!(&next, Event::VmState { state, health, last_error, .. }
                    if *state == v.state && *health == v.health && *last_error == v.last_error)
                {
                    events.push(next);
                }
            }
        }
        self.persist(events).await?;
        tracing::info!(vm = %req.vm, point = %point.id, job = %req.job_id, "recovery point committed");
        Ok(Response::new(pb::ReportCommittedResponse {}))
    }

    async fn report_progress(
        &self,
        req: Request<pb::ReportProgressRequest>,
    ) -> R<pb::ReportProgressResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        let mut job = self.job(&req.job_id).await?;
        job.bytes_total = job.bytes_total.max(req.bytes_total);
        job.bytes_done = req.bytes_done;
        job.bytes_skipped = req.bytes_skipped;
        job.updated_at_ms = now_ms();
        if let Some(step) = job
            .steps
            .iter_mut()
            .find(|s| s.status == StepStatus::Running as i32)
        {
            if job.bytes_total > 0 {
                let done = (job.bytes_done + job.bytes_skipped).min(job.bytes_total);
                step.progress_percent = (done * 100 / job.bytes_total) as u32;
            }
            if !req.message.is_empty() {
                step.message = req.message.clone();
            }
        }
        // Progress is advisory: keep it in memory and persist at most every two seconds.
        let flush = {
            let mut f = self
                .progress_flushed
                .lock()
                .map_err(|_| Status::internal("progress lock poisoned"))?;
            let last = f.get(&job.id).copied().unwrap_or(0);
            if now_ms() - last > 2000 {
                f.insert(job.id.clone(), now_ms());
                true
            } else {
                false
            }
        };
        if flush {
            self.save_job(&job).await?;
        } else {
            self.state.lock().await.jobs.insert(job.id.clone(), job);
        }
        Ok(Response::new(pb::ReportProgressResponse {}))
    }

    async fn report_replication_error(
        &self,
        req: Request<pb::ReportReplicationErrorRequest>,
    ) -> R<pb::ReportReplicationErrorResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        // Resync required: never replicated from an inconsistent log; deltas stop until a
        // resync (the scheduler starts it in the policy's window; `ferry vm resync` now).
        let error = req.error.clone();
        let t = if req.resync_required {
            Transition::ResyncRequired { error }
        } else if req.recoverable {
            Transition::RecoverableError { error }
        } else {
            Transition::PermanentError { error }
        };
        let state_event = transition_event(&*self.state.lock().await, &req.vm, &t)?;
        tracing::warn!(vm = %req.vm, recoverable = req.recoverable, resync_required = req.resync_required, attempts = req.attempts, error = %req.error, "replication error");
        let (attempts, next_retry_ms) = if req.recoverable {
            (req.attempts.max(1), req.next_retry_ms)
        } else {
            (0, 0)
        };
        self.persist(vec![
            state_event,
            Event::VmRetry {
                vm: req.vm,
                attempts,
                next_retry_ms,
            },
        ])
        .await?;
        Ok(Response::new(pb::ReportReplicationErrorResponse {}))
    }

    async fn upsert_job(&self, req: Request<Job>) -> R<Job> {
        ferry_mesh::require_service(&req)?;
        let mut job = req.into_inner();
        if job.id.is_empty() {
            job.id = uuid::Uuid::new_v4().to_string();
            job.created_at_ms = now_ms();
        }
        job.updated_at_ms = now_ms();
        self.save_job(&job).await?;
        Ok(Response::new(job))
    }

    async fn list_revoked_certificates(
        &self,
        req: Request<pb::ListRevokedCertificatesRequest>,
    ) -> R<pb::ListRevokedCertificatesResponse> {
        ferry_mesh::require_service(&req)?;
        let st = self.state.lock().await;
        Ok(Response::new(pb::ListRevokedCertificatesResponse {
            serials: st.revoked_serials.iter().cloned().collect(),
            removed_hosts: removed_hosts(&st),
        }))
    }

    async fn set_failover_state(&self, req: Request<pb::SetFailoverStateRequest>) -> R<pb::Vm> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        if !self.state.lock().await.vms.contains_key(&req.vm) {
            return Err(RegistryError::VmNotFound(req.vm).into());
        }
        self.persist(vec![Event::VmFailover {
            vm: req.vm.clone(),
            failover_state: req.failover_state,
        }])
        .await?;
        Ok(Response::new(self.vm_proto(&req.vm).await?))
    }
}
