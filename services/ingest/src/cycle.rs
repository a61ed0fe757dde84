//! The cycle record in Redis (`ferry:cycle:<id>`): what BeginCycle recorded, the counters
//! the gateway reports, and the leases it holds.
use std::collections::HashMap;
use std::time::Duration;

use ferry_coord::{CoordError, Lease};
use ferry_model::{Consistency, CycleKind};
use ferry_proto::common::v1::Disk;
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::IngestService;

const CYCLE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CycleRecord {
    pub(crate) id: String,
    pub(crate) vm: String,
    pub(crate) host: String,
    pub(crate) kind: CycleKind,
    pub(crate) job_id: String,
    pub(crate) consistency: Consistency,
    pub(crate) state: String,
    pub(crate) started_at_ms: i64,
    /// disk id -> fencing token
    pub(crate) tokens: HashMap<String, u64>,
    pub(crate) disks: Vec<DiskJson>,
    #[serde(default)]
    pub(crate) stats: Stats,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Stats {
    pub(crate) chunks_written: u64,
    pub(crate) bytes_written: u64,
    pub(crate) chunks_skipped: u64,
    pub(crate) bytes_skipped: u64,
    pub(crate) plain_bytes_written: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct DiskJson {
    pub(crate) id: String,
    pub(crate) path: String,
    pub(crate) format: String,
    pub(crate) subformat: String,
    pub(crate) virtual_size: u64,
    pub(crate) logical_sector_size: u32,
}

impl From<&Disk> for DiskJson {
    fn from(d: &Disk) -> Self {
        Self {
            id: d.id.clone(),
            path: d.path.clone(),
            format: d.format.clone(),
            subformat: d.subformat.clone(),
            virtual_size: d.virtual_size,
            logical_sector_size: d.logical_sector_size,
        }
    }
}

impl DiskJson {
    pub(crate) fn to_proto(&self) -> Disk {
        Disk {
            id: self.id.clone(),
            path: self.path.clone(),
            format: self.format.clone(),
            subformat: self.subformat.clone(),
            virtual_size: self.virtual_size,
            logical_sector_size: self.logical_sector_size,
            ..Default::default()
        }
    }
}

fn cycle_key(id: &str) -> String {
    format!("ferry:cycle:{id}")
}

pub(crate) fn coord_status(e: CoordError) -> Status {
    match e {
        CoordError::LeaseHeld { resource, holder } => Status::failed_precondition(format!(
            "disk {resource} is being replicated by host {holder}; its lease is held"
        )),
        CoordError::LeaseLost { resource } => Status::aborted(format!(
            "the lease on disk {resource} was lost; begin a new cycle"
        )),
        other => Status::unavailable(format!("lease store unavailable: {other}")),
    }
}

impl CycleRecord {
    /// Only the host that began a cycle may act on it; the refusal names both hosts and the VM.
    pub(crate) fn check_host(&self, host: &str, action: &str) -> Result<(), Status> {
        if self.host == host {
            return Ok(());
        }
        tracing::warn!(cycle = %self.id, vm = %self.vm, owner = %self.host, host = %host, action, "host refused: cycle of another host");
        Err(Status::permission_denied(format!(
            "host {host} may not {action} cycle {} of vm {}: it was begun by host {}",
            self.id, self.vm, self.host
        )))
    }
}

impl IngestService {
    pub(crate) async fn load(&self, id: &str) -> Result<CycleRecord, Status> {
        let raw = self
            .coord
            .get(&cycle_key(id))
            .await
            .map_err(coord_status)?
            // Aborted, not NotFound: a cycle that expired or vanished with Redis's data is
            // recoverable (the agent begins a new one and ships the same sealed logs).
            .ok_or_else(|| {
                Status::aborted(format!(
                    "cycle {id} is not open (unknown, expired, or lost by redis); begin a new cycle"
                ))
            })?;
        serde_json::from_str(&raw)
            .map_err(|e| Status::internal(format!("cycle {id} record is unreadable: {e}")))
    }

    pub(crate) async fn save(&self, c: &CycleRecord) -> Result<(), Status> {
        let raw = serde_json::to_string(c).map_err(|e| Status::internal(e.to_string()))?;
        self.coord
            .set_ex(&cycle_key(&c.id), &raw, CYCLE_TTL)
            .await
            .map_err(coord_status)
    }

    pub(crate) fn leases(c: &CycleRecord) -> Vec<Lease> {
        c.tokens
            .iter()
            .map(|(disk, token)| Lease {
                resource: disk.clone(),
                holder: c.host.clone(),
                token: *token,
            })
            .collect()
    }
}
