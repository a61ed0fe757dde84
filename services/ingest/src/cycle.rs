//! The cycle record in Redis (`ferry:cycle:<id>`): what BeginCycle recorded, the counters
//! the gateway reports, and the leases it holds.
use std::collections::HashMap;
use std::time::Duration;

use ferry_coord::Lease;
use ferry_model::{Consistency, CycleKind, DiskSpec};
use serde::{Deserialize, Serialize};

use crate::IngestService;
use crate::error::IngestError;

const CYCLE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct CycleRecord {
    pub(crate) id: String,
    pub(crate) vm: String,
    pub(crate) host: String,
    pub(crate) kind: CycleKind,
    pub(crate) job_id: String,
    pub(crate) consistency: Consistency,
    pub(crate) state: CycleState,
    pub(crate) started_at_ms: i64,
    /// disk id -> fencing token
    pub(crate) tokens: HashMap<String, u64>,
    pub(crate) disks: Vec<DiskSpec>,
    #[serde(default)]
    pub(crate) stats: Stats,
    /// The VM's epoch when the cycle began (a failover since raises it: commit refused).
    #[serde(default)]
    pub(crate) epoch: u64,
    /// The point the cycle's changes apply to when not the latest (after a re-protect).
    #[serde(default)]
    pub(crate) base_point: String,
    /// The group cut the cycle's logs were sealed in ("" = none).
    #[serde(default)]
    pub(crate) cut_id: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Stats {
    pub(crate) chunks_written: u64,
    pub(crate) bytes_written: u64,
    pub(crate) chunks_skipped: u64,
    pub(crate) bytes_skipped: u64,
    pub(crate) plain_bytes_written: u64,
}

fn cycle_key(id: &str) -> String {
    format!("ferry:cycle:{id}")
}

/// Where a cycle is: open until committed or aborted (`Cycle.state` on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum CycleState {
    Open,
    Committed,
    Aborted,
}

impl std::fmt::Display for CycleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Open => "open",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        })
    }
}

impl CycleRecord {
    /// Only the host that began a cycle may act on it; the refusal names both hosts and the VM.
    pub(crate) fn check_host(&self, host: &str, action: &str) -> Result<(), IngestError> {
        if self.host == host {
            return Ok(());
        }
        tracing::warn!(cycle = %self.id, vm = %self.vm, owner = %self.host, host = %host, action, "host refused: cycle of another host");
        Err(IngestError::PermissionDenied(format!(
            "host {host} may not {action} cycle {} of vm {}: it was begun by host {}",
            self.id, self.vm, self.host
        )))
    }
}

impl IngestService {
    pub(crate) async fn load(&self, id: &str) -> Result<CycleRecord, IngestError> {
        let raw = self
            .coord
            .get(&cycle_key(id))
            .await
            .map_err(IngestError::from)?
            // Aborted, not NotFound: a cycle that expired or vanished with Redis's data is
            // recoverable (the agent begins a new one and ships the same sealed logs).
            .ok_or_else(|| {
                IngestError::Aborted(format!(
                    "cycle {id} is not open (unknown, expired, or lost by redis); begin a new cycle"
                ))
            })?;
        serde_json::from_str(&raw)
            .map_err(|e| IngestError::Internal(format!("cycle {id} record is unreadable: {e}")))
    }

    pub(crate) async fn save(&self, c: &CycleRecord) -> Result<(), IngestError> {
        let raw = serde_json::to_string(c).map_err(|e| IngestError::Internal(e.to_string()))?;
        self.coord
            .set_ex(&cycle_key(&c.id), &raw, CYCLE_TTL)
            .await
            .map_err(IngestError::from)
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
