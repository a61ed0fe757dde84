//! Hosts: one-time registration keys, registration (the vault CA signs the host's
//! certificate), heartbeats with their inventory, listing and removing hosts, and the
//! certificates refused.
use std::time::Duration;

use ferry_mesh::{Component, Role};
use ferry_model::{Transition, VmState};
use ferry_proto::now_ms;
use ferry_proto::registry::v1 as pb;
use tonic::{Request, Response};

use super::{HEARTBEAT_SECS, HostCapabilities, R, RegistryService, removed_hosts};
use crate::error::RegistryError;
use crate::lifecycle::vm_event;
use crate::state::{Event, HostRecord, KeyRecord};
use ferry_model::{DiskSpec, VmHardware};

/// Five days, as ASR's vault credentials.
const KEY_TTL_DEFAULT_SECS: u64 = 5 * 24 * 3600;

impl RegistryService {
    pub(super) async fn create_registration_key(
        &self,
        req: Request<pb::CreateRegistrationKeyRequest>,
    ) -> R<pb::CreateRegistrationKeyResponse> {
        ferry_mesh::require_role(&req, Role::Contributor)?;
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

    pub(super) async fn register_host(
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
        self.check_key(&req).await?;
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
        Ok(Response::new(pb::RegisterHostResponse {
            host_id: req.host_name.clone(),
            cert_pem,
            ca_pem: ca.cert_pem(),
            vault_id: self.cfg.vault.id.clone(),
            vault_data_key: self.vault_key.to_bytes().to_vec(),
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

    /// Refuses a registration key that is unknown, whose secret does not match, that was used
    /// already or that has expired.
    async fn check_key(&self, req: &pb::RegisterHostRequest) -> Result<(), RegistryError> {
        let st = self.state.lock().await;
        let key = st
            .keys
            .get(&req.key_id)
            .ok_or_else(|| RegistryError::BadKey(req.key_id.clone()))?;
        if key.secret_hash != secret_hash(&req.secret) {
            return Err(RegistryError::BadKey(req.key_id.clone()));
        }
        if let Some(host) = &key.used_by {
            return Err(RegistryError::KeyReused {
                key_id: req.key_id.clone(),
                host: host.clone(),
            });
        }
        if key.expires_at_ms < now_ms() {
            return Err(RegistryError::KeyExpired {
                key_id: req.key_id.clone(),
                expired_at: fmt_ms(key.expires_at_ms),
            });
        }
        Ok(())
    }

    pub(super) async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> R<pb::HeartbeatResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        let mut events = Vec::new();
        let (fenced_vms, standby_vms, standby_kept_vms, vault_key_id);
        {
            let st = self.state.lock().await;
            match st.hosts.get(&host) {
                None => return Err(RegistryError::HostNotFound(host).into()),
                Some(h) if h.removed => return Err(RegistryError::HostRemoved(host).into()),
                Some(_) => {}
            }
            fenced_vms = st
                .vms
                .values()
                .filter(|v| v.fenced_for(&host))
                .map(|v| v.name.clone())
                .collect();
            (standby_vms, standby_kept_vms) =
                self.standby_lists(st.vms.values(), &host, &req.standby);
            vault_key_id = u32::from(super::vault_keys::newest(&st));
            for vm in &req.vms {
                if !valid_name(&vm.name) {
                    tracing::warn!(host = %host, vm = %vm.name, "ignoring vm with an invalid name");
                    continue;
                }
                let disks: Vec<DiskSpec> = vm.disks.iter().map(DiskSpec::from).collect();
                let hardware = vm
                    .hardware
                    .as_ref()
                    .map(VmHardware::from)
                    .unwrap_or_default();
                match st.vms.get(&vm.name) {
                    Some(v) if v.host != host && v.state != VmState::Unprotected => {
                        tracing::warn!(vm = %vm.name, owner = %v.host, host = %host, "vm is protected from another host; inventory ignored");
                    }
                    Some(v) if v.host == host && v.disks == disks && v.hardware == hardware => {}
                    _ => events.push(Event::Inventory {
                        host: host.clone(),
                        vm: vm.name.clone(),
                        disks,
                        at_ms: now_ms(),
                        hardware,
                    }),
                }
            }
        }
        self.set_host_capabilities(
            &host,
            HostCapabilities {
                change_tracking: req.change_tracking,
                recovery: req.recovery,
            },
        );
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
            fenced_vms,
            standby_vms,
            standby_kept_vms,
            vault_key_id,
        }))
    }

    /// The VMs whose standby copy `host` keeps — current, and as it is — noting the points
    /// it reported for them (only a VM's recovery host says where its copy is).
    fn standby_lists<'a>(
        &self,
        vms: impl Iterator<Item = &'a crate::state::VmRecord>,
        host: &str,
        reported: &[pb::StandbyCopy],
    ) -> (Vec<String>, Vec<String>) {
        let (mut current, mut kept) = (Vec::new(), Vec::new());
        let mut points = self
            .standby_points
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for v in vms {
            match v.standby_on(host) {
                Some(true) => current.push(v.name.clone()),
                Some(false) => kept.push(v.name.clone()),
                None => continue,
            }
            match reported
                .iter()
                .find(|c| c.vm == v.name && !c.point.is_empty())
            {
                Some(c) => points.insert(v.name.clone(), c.point.clone()),
                None => points.remove(&v.name),
            };
        }
        (current, kept)
    }

    pub(super) async fn list_hosts(
        &self,
        req: Request<pb::ListHostsRequest>,
    ) -> R<pb::ListHostsResponse> {
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
                recovery: self.host_has_recovery(&h.name),
                change_tracking: self.host_tracks_changes(&h.name),
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

    pub(super) async fn remove_host(
        &self,
        req: Request<pb::RemoveHostRequest>,
    ) -> R<pb::RemoveHostResponse> {
        ferry_mesh::require_role(&req, Role::Contributor)?;
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

    pub(super) async fn list_revoked_certificates(
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
}

impl RegistryService {
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
