//! The registry's durable state: a catalog namespace of events in object storage, replayed
//! into memory at start. Every mutation appends its event first and applies it second, so a
//! crash at any instant leaves either the old or the new state (DESIGN §3).
use std::collections::BTreeMap;

use ferry_model::protection as lc;
use ferry_model::{DiskSpec, VmHardware};

pub use crate::job_record::JobRecord;
use ferry_proto::common::v1::{Job, ReplicationPolicy};
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

/// A vault key added by `ferry vault rotate-key`, wrapped (sealed) under the vault's first
/// key: the catalog never holds a key in the clear.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaultKeyRecord {
    pub key_id: u16,
    /// Hex of `VaultKey::wrap_key`.
    pub wrapped: String,
    pub created_at_ms: i64,
}

/// An operator token made with `ferry token create`; the token itself is never stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    /// reader, operator, contributor or admin.
    pub role: String,
    /// BLAKE3 hex of the token (`ferry_mesh::token_hash`).
    pub hash: String,
    pub created_at_ms: i64,
    /// 0 = never.
    pub expires_at_ms: i64,
    #[serde(default)]
    pub revoked: bool,
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
    pub disks: Vec<DiskSpec>,
    /// Stored as the state machine's kebab-case names, as before it existed.
    pub state: lc::VmState,
    pub health: lc::Health,
    pub policy: Option<PolicyRecord>,
    pub protection_job_id: String,
    pub last_point_id: String,
    pub last_point_ms: i64,
    pub last_error: String,
    /// Whether a test failover's copy exists; the catalog spells it "test" or "".
    #[serde(with = "test_failover_name")]
    pub failover_state: lc::TestFailover,
    /// Recoverable failures in a row and when the next retry runs (0: none pending).
    #[serde(default)]
    pub retry_attempts: u32,
    #[serde(default)]
    pub next_retry_ms: i64,
    /// Which host reported the VM since when, oldest first.
    #[serde(default)]
    pub host_history: Vec<HostSpan>,
    /// As the host last reported it (what a recovery host starts the replica with).
    #[serde(default)]
    pub hardware: VmHardware,
    /// Where a planned or unplanned failover has the VM (DESIGN §11).
    #[serde(default)]
    pub site: FailoverSite,
    /// The last drill's result.
    #[serde(default)]
    pub last_verified: Option<Verification>,
    /// The drill schedule the VM is in (`ferry drill schedule`).
    #[serde(default)]
    pub drill_schedule: Option<DrillSchedule>,
}

/// A VM's scheduled drill: the VM or plan the schedule drills, how often, its boot check,
/// and since when.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillSchedule {
    pub target: String,
    pub every_seconds: u64,
    pub boot_check: String,
    pub since_ms: i64,
}

/// A drill's result (`RecordVerification`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub point_id: String,
    pub time_ms: i64,
    pub ok: bool,
    pub message: String,
    pub job_id: String,
}

/// Where a VM runs after failovers, and the epoch that fences the host it left.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverSite {
    /// The host the VM runs on when that is not `host` ("" until a failover moves it).
    #[serde(default)]
    pub active_host: String,
    /// The host the running failover moves the VM to.
    #[serde(default)]
    pub failover_host: String,
    /// Raised by every failover start: cycles begun under an older epoch are refused.
    #[serde(default)]
    pub epoch: u64,
    /// The point the failed-over VM runs on.
    #[serde(default)]
    pub point: String,
    /// The failover's job.
    #[serde(default)]
    pub failover_id: String,
    /// Which way replication runs (re-protect flips it).
    #[serde(default)]
    pub direction: lc::Direction,
    /// After a re-protect, until the new source's first point: the point its changes apply
    /// to (the one the VM failed over to, which need not be the latest).
    #[serde(default)]
    pub base_point: String,
}

/// The catalog's spelling of a VM's test failover, unchanged since before the state machine:
/// "test" while a test copy exists, "" otherwise.
mod test_failover_name {
    use ferry_model::TestFailover;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &TestFailover, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match v {
            TestFailover::Active => "test",
            TestFailover::None => "",
        })
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TestFailover, D::Error> {
        match String::deserialize(d)?.as_str() {
            "" => Ok(TestFailover::None),
            "test" => Ok(TestFailover::Active),
            other => Err(serde::de::Error::custom(format!(
                "unknown failover state {other:?} (expected \"\" or \"test\")"
            ))),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostSpan {
    pub host: String,
    /// 0 for spans from catalogs written before the time was recorded.
    pub since_ms: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PolicyRecord {
    pub frequency_seconds: u64,
    pub retention_hours: u64,
    pub app_consistent_seconds: u64,
    pub resync_window_start: String,
    pub resync_window_end: String,
    /// Every point younger than this is kept (catalogs from before it was recorded: 1 h).
    #[serde(default = "default_keep_all")]
    pub keep_all_seconds: u64,
    /// Older points are thinned to one per this interval (older catalogs: 5 min).
    #[serde(default = "default_thin_to")]
    pub thin_to_seconds: u64,
    /// The host the VM fails over to ("" = none chosen; catalogs from before it existed).
    #[serde(default)]
    pub recovery_host: String,
    /// Recovery side: the VM's networks mapped to the recovery site's, the test network, and
    /// an address per NIC for the production run there.
    #[serde(default)]
    pub network_map: BTreeMap<String, String>,
    #[serde(default)]
    pub test_network: String,
    #[serde(default)]
    pub nic_addresses: BTreeMap<String, String>,
    /// The VM's replication group ("" = none): its VMs are cut at one instant.
    #[serde(default)]
    pub replication_group: String,
}

/// Policy defaults and limits (a 0 in the request means the default).
pub use ferry_model::policy::{
    DEFAULT_FREQUENCY_SECONDS, DEFAULT_KEEP_ALL_SECONDS, DEFAULT_RETENTION_HOURS,
    DEFAULT_THIN_TO_SECONDS, MAX_FREQUENCY_SECONDS, MAX_RETENTION_HOURS,
};

fn default_keep_all() -> u64 {
    DEFAULT_KEEP_ALL_SECONDS
}

fn default_thin_to() -> u64 {
    DEFAULT_THIN_TO_SECONDS
}

fn or_default(v: u64, default: u64) -> u64 {
    if v == 0 { default } else { v }
}

impl PolicyRecord {
    pub fn from_proto(p: Option<&ReplicationPolicy>) -> Self {
        let d = ReplicationPolicy::default();
        let p = p.unwrap_or(&d);
        Self {
            frequency_seconds: or_default(p.frequency_seconds, DEFAULT_FREQUENCY_SECONDS),
            retention_hours: or_default(p.retention_hours, DEFAULT_RETENTION_HOURS),
            keep_all_seconds: or_default(p.keep_all_seconds, DEFAULT_KEEP_ALL_SECONDS),
            thin_to_seconds: or_default(p.thin_to_seconds, DEFAULT_THIN_TO_SECONDS),
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
            recovery_host: p.recovery_host.clone(),
            network_map: p.network_map.clone().into_iter().collect(),
            test_network: p.test_network.clone(),
            nic_addresses: p.nic_addresses.clone().into_iter().collect(),
            replication_group: p.replication_group.clone(),
        }
    }

    /// Refuses values out of range (after the defaults for 0 are applied), naming the field
    /// and what is allowed: the registry never changes what the operator asked for.
    pub fn check(&self) -> Result<(), crate::error::RegistryError> {
        let refuse = |msg: String| Err(crate::error::RegistryError::InvalidArgument(msg));
        let f = self.frequency_seconds;
        if !(1..=MAX_FREQUENCY_SECONDS).contains(&f) {
            return refuse(format!(
                "policy frequency_seconds is {f}: allowed 1 s to {MAX_FREQUENCY_SECONDS} s (24 h)"
            ));
        }
        let r = self.retention_hours;
        if !(1..=MAX_RETENTION_HOURS).contains(&r) {
            return refuse(format!(
                "policy retention_hours is {r}: retention is kept in whole hours, 1 to {MAX_RETENTION_HOURS} (1 h to 8760 h)"
            ));
        }
        let retention_s = r * 3600;
        if self.keep_all_seconds > retention_s {
            return refuse(format!(
                "policy keep_all_seconds is {}: allowed 1 s up to the retention ({retention_s} s)",
                self.keep_all_seconds
            ));
        }
        if !(1..=retention_s).contains(&self.thin_to_seconds) {
            return refuse(format!(
                "policy thin_to_seconds is {}: allowed 1 s up to the retention ({retention_s} s)",
                self.thin_to_seconds
            ));
        }
        let a = self.app_consistent_seconds;
        if a != 0 && a < f {
            return refuse(format!(
                "policy app_consistent_seconds is {a}: allowed 0 (never) or at least the frequency ({f} s)"
            ));
        }
        self.check_recovery_side()
            .map_err(crate::error::RegistryError::InvalidArgument)
    }

    fn check_recovery_side(&self) -> Result<(), String> {
        use ferry_model::policy::{check_network_name, check_nic_address};
        for (from, to) in &self.network_map {
            check_network_name("--network-map", from)?;
            check_network_name("--network-map", to)?;
        }
        if !self.test_network.is_empty() {
            check_network_name("--test-network", &self.test_network)?;
        }
        for (nic, addr) in &self.nic_addresses {
            check_nic_address(nic, addr)?;
        }
        if !self.replication_group.is_empty()
            && let Some(p) = ferry_model::plan::group_name_problem(&self.replication_group)
        {
            return Err(p);
        }
        Ok(())
    }

    pub fn to_proto(&self) -> ReplicationPolicy {
        ReplicationPolicy {
            frequency_seconds: self.frequency_seconds,
            retention_hours: self.retention_hours,
            app_consistent_seconds: self.app_consistent_seconds,
            resync_window_start: self.resync_window_start.clone(),
            resync_window_end: self.resync_window_end.clone(),
            keep_all_seconds: self.keep_all_seconds,
            thin_to_seconds: self.thin_to_seconds,
            recovery_host: self.recovery_host.clone(),
            network_map: self.network_map.clone().into_iter().collect(),
            test_network: self.test_network.clone(),
            nic_addresses: self.nic_addresses.clone().into_iter().collect(),
            replication_group: self.replication_group.clone(),
        }
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
        disks: Vec<DiskSpec>,
        /// When the registry took the report (0 in catalogs from before it was recorded).
        #[serde(default)]
        at_ms: i64,
        #[serde(default)]
        hardware: VmHardware,
    },
    /// Written only with what [`lc::Lifecycle::apply`] decided (see `lifecycle.rs`).
    VmState {
        vm: String,
        state: lc::VmState,
        health: lc::Health,
        last_error: String,
    },
    VmProtection {
        vm: String,
        policy: PolicyRecord,
        job_id: String,
    },
    /// An operator changed a protected VM's policy (`ferry vm set`).
    VmPolicy {
        vm: String,
        policy: PolicyRecord,
    },
    VmPoint {
        vm: String,
        point_id: String,
        time_ms: i64,
    },
    VmFailover {
        vm: String,
        #[serde(with = "test_failover_name")]
        failover_state: lc::TestFailover,
    },
    /// A planned or unplanned failover moved the VM (written with the state it goes to).
    VmSite {
        vm: String,
        site: FailoverSite,
    },
    /// Re-protect: the host the VM runs on (with its disks there) replicates it now, the
    /// host it left is its recovery host; `site` holds the flipped direction.
    VmReprotected {
        vm: String,
        host: String,
        disks: Vec<DiskSpec>,
        recovery_host: String,
        site: FailoverSite,
        at_ms: i64,
    },
    /// Protection was disabled: the VM has no policy any more.
    VmPolicyCleared {
        vm: String,
    },
    /// A recoverable failure waiting for its retry (attempts 0 clears the retry state).
    VmRetry {
        vm: String,
        attempts: u32,
        next_retry_ms: i64,
    },
    /// A drill of the VM ended.
    VmVerified {
        vm: String,
        verification: Verification,
    },
    /// The VM's drill schedule was set (None: removed).
    VmDrillScheduled {
        vm: String,
        schedule: Option<DrillSchedule>,
    },
    Job(JobRecord),
    TokenCreated(TokenRecord),
    TokenRevoked {
        name: String,
    },
    VaultKeyAdded(VaultKeyRecord),
}

/// Everything the registry knows, built by replaying the catalog (and saved whole in its
/// snapshots, `crate::snapshot`).
#[derive(Default, Serialize, Deserialize)]
pub struct State {
    pub seq: u64,
    pub keys: BTreeMap<String, KeyRecord>,
    /// Operator tokens by name (revoked ones stay, marked).
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Keys rotations added, by id (key 0 is the vault's data key file).
    pub vault_keys: BTreeMap<u16, VaultKeyRecord>,
    pub hosts: BTreeMap<String, HostRecord>,
    pub vms: BTreeMap<String, VmRecord>,
    #[serde(with = "crate::snapshot::jobs_as_records")]
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
            Event::TokenCreated(t) => {
                self.tokens.insert(t.name.clone(), t.clone());
            }
            Event::VaultKeyAdded(k) => {
                self.vault_keys.insert(k.key_id, k.clone());
            }
            Event::TokenRevoked { name } => {
                if let Some(t) = self.tokens.get_mut(name) {
                    t.revoked = true;
                }
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
            Event::Inventory {
                host,
                vm,
                disks,
                at_ms,
                hardware,
            } => {
                let rec = self.vms.entry(vm.clone()).or_insert_with(|| VmRecord {
                    name: vm.clone(),
                    host: host.clone(),
                    disks: Vec::new(),
                    state: lc::VmState::Unprotected,
                    health: lc::Health::Normal,
                    policy: None,
                    protection_job_id: String::new(),
                    last_point_id: String::new(),
                    last_point_ms: 0,
                    last_error: String::new(),
                    failover_state: lc::TestFailover::None,
                    retry_attempts: 0,
                    next_retry_ms: 0,
                    host_history: Vec::new(),
                    hardware: VmHardware::default(),
                    site: FailoverSite::default(),
                    last_verified: None,
                    drill_schedule: None,
                });
                if rec.host_history.last().is_none_or(|s| s.host != *host) {
                    rec.host_history.push(HostSpan {
                        host: host.clone(),
                        since_ms: *at_ms,
                    });
                }
                rec.host = host.clone();
                rec.disks = disks.clone();
                rec.hardware = hardware.clone();
            }
            Event::VmState {
                vm,
                state,
                health,
                last_error,
            } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.state = *state;
                    v.health = *health;
                    v.last_error = last_error.clone();
                }
            }
            Event::VmProtection { vm, policy, job_id } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.policy = Some(policy.clone());
                    v.protection_job_id = job_id.clone();
                }
            }
            Event::VmSite { vm, site } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.site = site.clone();
                }
            }
            Event::VmReprotected {
                vm,
                host,
                disks,
                recovery_host,
                site,
                at_ms,
            } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    if v.host_history.last().is_none_or(|s| s.host != *host) {
                        v.host_history.push(HostSpan {
                            host: host.clone(),
                            since_ms: *at_ms,
                        });
                    }
                    v.host = host.clone();
                    v.disks = disks.clone();
                    if let Some(p) = v.policy.as_mut() {
                        p.recovery_host = recovery_host.clone();
                    }
                    v.site = site.clone();
                }
            }
            Event::VmPolicyCleared { vm } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.policy = None;
                }
            }
            Event::VmPolicy { vm, policy } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.policy = Some(policy.clone());
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
                    // The new source's first point is on its base: later ones follow it.
                    v.site.base_point.clear();
                }
            }
            Event::VmVerified { vm, verification } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.last_verified = Some(verification.clone());
                }
            }
            Event::VmDrillScheduled { vm, schedule } => {
                if let Some(v) = self.vms.get_mut(vm) {
                    v.drill_schedule = schedule.clone();
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
                    v.failover_state = *failover_state;
                }
            }
            Event::Job(j) => {
                if let Some(mut job) = j.decode() {
                    // A cancel request is sticky: a runner saving its own (older) copy of the
                    // job does not take it back.
                    let old = self.jobs.get(&job.id);
                    job.cancel_requested |= old.is_some_and(|o| o.cancel_requested);
                    // So is an operator's resume of a step waiting for input.
                    if let Some(o) = old.filter(|o| o.resumed_step > job.resumed_step) {
                        job.resumed_step = o.resumed_step;
                        job.resume_comment = o.resume_comment.clone();
                    }
                    self.jobs.insert(job.id.clone(), job);
                }
            }
        }
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    fn policy(f: u64, r: u64, k: u64, t: u64, a: u64) -> PolicyRecord {
        PolicyRecord::from_proto(Some(&ReplicationPolicy {
            frequency_seconds: f,
            retention_hours: r,
            keep_all_seconds: k,
            thin_to_seconds: t,
            app_consistent_seconds: a,
            ..Default::default()
        }))
    }

    #[test]
    fn old_catalogs_load_with_the_default_thinning() {
        let old = r#"{"frequency_seconds":300,"retention_hours":24,"app_consistent_seconds":0,
            "resync_window_start":"18:30","resync_window_end":"06:00"}"#;
        let p: PolicyRecord = serde_json::from_str(old).unwrap();
        assert_eq!((p.keep_all_seconds, p.thin_to_seconds), (3600, 300));
        assert!(p.check().is_ok());
    }

    #[test]
    fn zero_is_the_default_and_out_of_range_is_refused() {
        let p = policy(0, 0, 0, 0, 0);
        assert_eq!(
            (
                p.frequency_seconds,
                p.retention_hours,
                p.keep_all_seconds,
                p.thin_to_seconds
            ),
            (300, 24, 3600, 300)
        );
        assert!(p.check().is_ok());
        assert!(policy(1, 1, 3600, 1, 1).check().is_ok());
        assert!(policy(86_400, 8760, 10, 5, 0).check().is_ok());
        for (p, field, range) in [
            (
                policy(86_401, 0, 0, 0, 0),
                "frequency_seconds",
                "1 s to 86400 s",
            ),
            (policy(0, 8761, 0, 0, 0), "retention_hours", "1 h to 8760 h"),
            (
                policy(0, 1, 3601, 0, 0),
                "keep_all_seconds",
                "up to the retention (3600 s)",
            ),
            (
                policy(0, 1, 0, 3601, 0),
                "thin_to_seconds",
                "up to the retention (3600 s)",
            ),
            (
                policy(60, 0, 0, 0, 59),
                "app_consistent_seconds",
                "at least the frequency (60 s)",
            ),
        ] {
            let e = p.check().unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(field) && msg.contains(range), "{msg}");
            assert_eq!(
                ferry_mesh::to_status(&e).code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
