//! Failover records in the catalog namespace `failover`. Every change appends the record's
//! full new state; the current state is the last entry per job, found by replaying the log.
//!
//! A record is also the durable state of the job working on it: `running` while a test
//! failover is being made, `cleaning` while it is being removed. Each entry carries the
//! fencing token of the job lease its writer held; replay ignores an entry whose token is below
//! one already applied for the same record, so a replica that lost its lease cannot overwrite
//! what the replica that took the job over committed.
use ferry_proto::failover::v1::FailoverRecord;
use ferry_store::{Catalog, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use ferry_coord::{Coord, Lease};

use crate::error::{FailoverError, Result};

/// The catalog namespace of failover records.
pub const NAMESPACE: &str = "failover";

pub const STATE_ACTIVE: &str = "active";
pub const STATE_CLEANED_UP: &str = "cleaned-up";
/// A test failover job is making the copy (any replica resumes it when its lease is free).
pub const STATE_RUNNING: &str = "running";
/// A cleanup job is removing the copy (resumed like `running`).
pub const STATE_CLEANING: &str = "cleaning";
/// The test failover job failed; nothing of it was left behind.
pub const STATE_FAILED: &str = "failed";
/// A planned or unplanned failover was committed.
pub const STATE_COMMITTED: &str = "committed";
/// A failback's phase 1 is done: the target's disks hold its point; waiting for
/// `ferry failback complete`.
pub const STATE_SYNCED: &str = "synced";
/// A failback's phase 2 job runs (resumed like `running`).
pub const STATE_COMPLETING: &str = "completing";

/// One failover of one VM, as stored (a superset of the API's `FailoverRecord`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub vm: String,
    /// "test", "planned", "unplanned".
    pub kind: String,
    pub point_id: String,
    pub target_dir: String,
    /// Every file the failover created, absolute.
    pub files: Vec<String>,
    /// "active", "cleaned-up", "committed".
    pub state: String,
    pub created_at_ms: i64,
    /// The job that created the failover; identifies the record.
    pub job_id: String,
    #[serde(default)]
    pub updated_at_ms: i64,
    /// The job that last changed the state (cleanup), if any.
    #[serde(default)]
    pub last_job_id: String,
    /// Fencing token of the job lease held by the writer of this entry.
    #[serde(default)]
    pub fence: u64,
    /// Which run of the job wrote this entry (replica and attempt).
    #[serde(default)]
    pub holder: String,
    /// Files the running job creates (known once its target was checked): a job resumed
    /// elsewhere removes them before making them again.
    #[serde(default)]
    pub planned: Vec<String>,
    /// The job created `target_dir` (so a failed job removes it again).
    #[serde(default)]
    pub created_dir: bool,
    /// The host the failover runs on (its recovery host); "" for an export into
    /// `target_dir` on the failover service's machine.
    #[serde(default)]
    pub host: String,
    /// The disks as the host serves them.
    #[serde(default)]
    pub disks: Vec<RecordDisk>,
    /// The host's driver kind and when it was asked to start the VM.
    #[serde(default)]
    pub driver: String,
    #[serde(default)]
    pub started_at_ms: i64,
    /// Unplanned failover: try to shut the source VM down first.
    #[serde(default)]
    pub shutdown: bool,
    /// Failback: the host the VM ran on when it started ("" for other kinds).
    #[serde(default)]
    pub source_host: String,
    /// Failback: the failover whose recovered copy on `source_host` is released at commit.
    #[serde(default)]
    pub previous_failover_id: String,
    /// Failback: "checksum" or "full".
    #[serde(default)]
    pub sync: String,
    /// Failback: the point phase 1 brought the target's disks to.
    #[serde(default)]
    pub synced_point: String,
    /// Instant recovery: the host serves the disks (and starts the VM) before they are local.
    #[serde(default)]
    pub instant: bool,
}

/// A disk of a failover on a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordDisk {
    pub disk_id: String,
    pub path: String,
    pub format: String,
    pub nbd_uri: String,
}

impl Record {
    pub fn to_proto(&self) -> FailoverRecord {
        FailoverRecord {
            vm: self.vm.clone(),
            kind: self.kind.clone(),
            point_id: self.point_id.clone(),
            target_dir: self.target_dir.clone(),
            files: self.files.clone(),
            state: self.state.clone(),
            created_at_ms: self.created_at_ms,
            job_id: self.job_id.clone(),
            host: self.host.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| ferry_proto::failover::v1::FailoverDisk {
                    disk_id: d.disk_id.clone(),
                    path: d.path.clone(),
                    format: d.format.clone(),
                    nbd_uri: d.nbd_uri.clone(),
                })
                .collect(),
            driver: self.driver.clone(),
            started_at_ms: self.started_at_ms,
            instant: self.instant,
        }
    }

    /// The failover runs on a host (not an export into a folder here).
    pub fn on_host(&self) -> bool {
        !self.host.is_empty()
    }

    pub fn is_active(&self) -> bool {
        self.state == STATE_ACTIVE
    }

    /// A job is working on the record (it is resumed if its lease is free).
    pub fn is_in_progress(&self) -> bool {
        matches!(
            self.state.as_str(),
            STATE_RUNNING | STATE_CLEANING | STATE_COMPLETING
        )
    }

    /// The job working on the record: the test failover job, or the cleanup job (a
    /// failback's phase 2 job).
    pub fn working_job(&self) -> &str {
        if self.state == STATE_CLEANING || self.state == STATE_COMPLETING {
            &self.last_job_id
        } else {
            &self.job_id
        }
    }
}

#[derive(Debug, Default)]
struct Replayed {
    /// Last catalog sequence number applied.
    seq: u64,
    /// In order of creation.
    records: Vec<Record>,
}

impl Replayed {
    fn apply(&mut self, seq: u64, rec: Record) {
        self.seq = self.seq.max(seq);
        match self.records.iter_mut().find(|r| r.job_id == rec.job_id) {
            // Written by a holder whose lease was already taken over: ignored.
            Some(slot) if rec.fence < slot.fence => {
                tracing::warn!(job = %rec.job_id, fence = rec.fence, current = slot.fence, seq, "stale failover record ignored");
            }
            Some(slot) => *slot = rec,
            None => self.records.push(rec),
        }
    }
}

/// The failover records, replayed incrementally from the catalog (other replicas' appends are
/// picked up on the next read).
#[derive(Debug)]
pub struct Ledger {
    catalog: Catalog,
    state: Mutex<Replayed>,
}

impl Ledger {
    pub fn new(store: Store) -> Self {
        Self {
            catalog: Catalog::new(store, NAMESPACE),
            state: Mutex::new(Replayed::default()),
        }
    }

    /// Every record, oldest first, in its latest state.
    pub async fn records(&self) -> Result<Vec<Record>> {
        let mut state = self.state.lock().await;
        self.refresh(&mut state).await?;
        Ok(state.records.clone())
    }

    /// The VM's active failover, if it has one.
    pub async fn active(&self, vm: &str) -> Result<Option<Record>> {
        Ok(self
            .records()
            .await?
            .into_iter()
            .rev()
            .find(|r| r.vm == vm && r.is_active()))
    }

    /// The VM's failover that is active or has a job working on it, if any.
    pub async fn current(&self, vm: &str) -> Result<Option<Record>> {
        Ok(self.records().await?.into_iter().rev().find(|r| {
            r.vm == vm && (r.is_active() || r.is_in_progress() || r.state == STATE_SYNCED)
        }))
    }

    /// The VM's last committed planned, unplanned or failback failover, if any.
    pub async fn last_committed(&self, vm: &str) -> Result<Option<Record>> {
        Ok(self
            .records()
            .await?
            .into_iter()
            .rev()
            .find(|r| r.vm == vm && r.kind != "test" && r.state == STATE_COMMITTED))
    }

    /// The record created by job `job_id`, in its latest state.
    pub async fn get(&self, job_id: &str) -> Result<Option<Record>> {
        Ok(self
            .records()
            .await?
            .into_iter()
            .find(|r| r.job_id == job_id))
    }

    /// Appends a record's new state, written under `lease` (the record's job lease): refused
    /// when the lease is no longer held with its token, and recorded with the token so replay
    /// ignores it should a newer holder have written meanwhile.
    pub async fn put_fenced(
        &self,
        record: &mut Record,
        coord: &Coord,
        lease: &Lease,
    ) -> Result<()> {
        record.fence = lease.token;
        coord
            .check_fence(&lease.resource, lease.token)
            .await
            .map_err(FailoverError::Lease)?;
        self.put(record).await
    }

    /// Appends a record's new state.
    pub async fn put(&self, record: &Record) -> Result<()> {
        self.catalog.append(record).await?;
        let mut state = self.state.lock().await;
        self.refresh(&mut state).await
    }

    async fn refresh(&self, state: &mut Replayed) -> Result<()> {
        for (seq, rec) in self.catalog.read_from::<Record>(state.seq).await? {
            state.apply(seq, rec);
        }
        Ok(())
    }
}
