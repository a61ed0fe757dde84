//! The registry's durable state: a catalog namespace of events in object storage, replayed
//! into memory at start. Every mutation appends its event first and applies it second, so a
//! crash at any instant leaves either the old or the new state (DESIGN §3).
use std::collections::BTreeMap;

use ferry_proto::common::v1::{Disk, Job, ReplicationPolicy};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    /// BLAKE3 hex of the secret; the secret itself is never stored.
    pub secret_hash: String,
    pub site: String,
    pub expires_at_ms: i64,
    pub used_by: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub site: String,
    pub registered_at_ms: i64,
    pub removed: bool,
    /// Serial number (hex) of the certificate the registry signed for the host.
    #[serde(default)]
    pub cert_serial: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub host: String,
    pub disks: Vec<DiskRecord>,
    pub state: String,
    pub health: String,
    pub policy: Option<PolicyRecord>,
    pub protection_job_id: String,
    pub last_point_id: String,
    pub last_point_ms: i64,
    pub last_error: String,
    pub failover_state: String,
    /// Recoverable failures in a row and when the next retry runs (0: none pending).
    #[serde(default)]
    pub retry_attempts: u32,
    #[serde(default)]
    pub next_retry_ms: i64,
}

/// Serializable mirror of [`Disk`] (prost types do not derive serde).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskRecord {
    pub id: String,
    pub path: String,
    pub format: String,
    pub subformat: String,
    pub virtual_size: u64,
    pub logical_sector_size: u32,
    pub allocated_bytes: u64,
    pub error: String,
    pub nbd_uri: String,
}

impl From<&Disk> for DiskRecord {
    fn from(d: &Disk) -> Self {
        Self {
            id: d.id.clone(),
            path: d.path.clone(),
            format: d.format.clone(),
            subformat: d.subformat.clone(),
            virtual_size: d.virtual_size,
            logical_sector_size: d.logical_sector_size,
            allocated_bytes: d.allocated_bytes,
            error: d.error.clone(),
            nbd_uri: d.nbd_uri.clone(),
        }
    }
}

impl From<&DiskRecord> for Disk {
    fn from(d: &DiskRecord) -> Self {
        Disk {
            id: d.id.clone(),
            path: d.path.clone(),
            format: d.format.clone(),
            subformat: d.subformat.clone(),
            virtual_size: d.virtual_size,
            logical_sector_size: d.logical_sector_size,
            allocated_bytes: d.allocated_bytes,
            error: d.error.clone(),
            nbd_uri: d.nbd_uri.clone(),
            pending_log_bytes: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PolicyRecord {
    pub frequency_seconds: u64,
    pub retention_hours: u64,
    pub app_consistent_seconds: u64,
    pub resync_window_start: String,
    pub resync_window_end: String,
}

impl PolicyRecord {
    pub fn from_proto(p: Option<&ReplicationPolicy>) -> Self {
        let d = ReplicationPolicy::default();
        let p = p.unwrap_or(&d);
        Self {
            frequency_seconds: if p.frequency_seconds == 0 {
                300
            } else {
                p.frequency_seconds
            },
            retention_hours: if p.retention_hours == 0 {
                24
            } else {
                p.retention_hours
            },
            app_consistent_seconds: p.app_consistent_seconds,
            resync_window_start: if p.resync_window_start.is_empty() {
                "18:30".into()
            } else {
                p.resync_window_start.clone()
            },
            resync_window_end: if p.resync_window_end.is_empty() {
                "06:00".into()
            } else {
                p.resync_window_end.clone()
            },
        }
    }

    pub fn to_proto(&self) -> ReplicationPolicy {
        ReplicationPolicy {
            frequency_seconds: self.frequency_seconds,
            retention_hours: self.retention_hours,
            app_consistent_seconds: self.app_consistent_seconds,
            resync_window_start: self.resync_window_start.clone(),
            resync_window_end: self.resync_window_end.clone(),
        }
    }
}

/// A job, stored as prost-encoded bytes (hex) so every field of the API type survives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_hex: String,
}

impl JobRecord {
    pub fn encode(job: &Job) -> Self {
        use prost::Message;
        Self {
            job_hex: hex::encode(job.encode_to_vec()),
        }
    }

    pub fn decode(&self) -> Option<Job> {
        use prost::Message;
        let bytes = hex::decode(&self.job_hex).ok()?;
        Job::decode(bytes.as_slice()).ok()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    KeyCreated(KeyRecord),
    KeyUsed {
        key_id: String,
        host: String,
    },
    HostRegistered(HostRecord),
    HostRemoved {
        name: String,
    },
    Inventory {
        host: String,
        vm: String,
        disks: Vec<DiskRecord>,
    },
    VmState {
        vm: String,
        state: String,
        health: String,
        last_error: String,
    },
    VmProtection {
        vm: String,
        policy: PolicyRecord,
        job_id: String,
    },
    VmPoint {
        vm: String,
        point_id: String,
        time_ms: i64,
    },
    VmFailover {
        vm: String,
        failover_state: String,
    },
    /// A recoverable failure waiting for its retry (attempts 0 clears the retry state).
    VmRetry {
        vm: String,
        attempts: u32,
        next_retry_ms: i64,
    },
    Job(JobRecord),
}

#[derive(Default)]
pub struct State {
    pub seq: u64,
    pub keys: BTreeMap<String, KeyRecord>,
    pub hosts: BTreeMap<String, HostRecord>,
    pub vms: BTreeMap<String, VmRecord>,
    pub jobs: BTreeMap<String, Job>,
    /// Host certificates no longer accepted: of removed hosts, and replaced by a registration.
    pub revoked_serials: std::collections::BTreeSet<String>,
}

impl State {
    pub fn apply(&mut self, seq: u64, ev: &Event) {
        self.seq = self.seq.max(seq);
        match ev {
            Event::KeyCreated(k) => {
                self.keys.insert(k.key_id.clone(), k.clone());
            }
            Event::KeyUsed { key_id, host } => {
                if let Some(k) = self.keys.get_mut(key_id) {
                    k.used_by = Some(host.clone());
                }
            }
            Event::HostRegistered(h) => {
                // A host registered again gets a new certificate; the old one is revoked.
                if let Some(old) = self.hosts.get(&h.name)
                    && !old.cert_serial.is_empty()
                    && old.cert_serial != h.cert_serial
                {
                    self.revoked_serials.insert(old.cert_serial.clone());
                }
                self.hosts.insert(h.name.clone(), h.clone());
            }
            Event::HostRemoved { name } => {
                if let Some(h) = self.hosts.get_mut(name) {
                    h.removed = true;
                    if !h.cert_serial.is_empty() {
                        self.revoked_serials.insert(h.cert_serial.clone());
                    }
                }
            }
            Event::Inventory { host, vm, disks } => {
                let rec = self.vms.entry(vm.clone()).or_insert_with(|| VmRecord {
                    name: vm.clone(),
                    host: host.clone(),
                    disks: Vec::new(),
                    state: "unprotected".into(),
                    health: "normal".into(),
                    policy: None,
                    protection_job_id: String::new(),
                    last_point_id: String::new(),
                    last_point_ms: 0,
                    last_error: String::new(),
                    failover_state: String::new(),
                    retry_attempts: 0,
                    next_retry_ms: 0,
                });
                rec.host = host.clone();
                rec.disks = disks.clone();
            }
            Event::VmState {
                vm,
                state,
                health,
                last_error,
            } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.state = state.clone();
                    v.health = health.clone();
                    v.last_error = last_error.clone();
                }
            }
            Event::VmProtection { vm, policy, job_id } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.policy = Some(policy.clone());
                    v.protection_job_id = job_id.clone();
                }
            }
            Event::VmPoint {
                vm,
                point_id,
                time_ms,
            } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.last_point_id = point_id.clone();
                    v.last_point_ms = *time_ms;
                }
            }
            Event::VmRetry {
                vm,
                attempts,
                next_retry_ms,
            } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.retry_attempts = *attempts;
                    v.next_retry_ms = *next_retry_ms;
                }
            }
            Event::VmFailover { vm, failover_state } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.failover_state = failover_state.clone();
                }
            }
            Event::Job(j) => {
                if let Some(job) = j.decode() {
                    self.jobs.insert(job.id.clone(), job);
                }
            }
        }
    }
}
