//! Failover records in the catalog namespace `failover`. Every change appends the record's
//! full new state; the current state is the last entry per job, found by replaying the log.
use ferry_proto::failover::v1::FailoverRecord;
use ferry_store::{Catalog, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::error::Result;

/// The catalog namespace of failover records.
pub const NAMESPACE: &str = "failover";

pub const STATE_ACTIVE: &str = "active";
pub const STATE_CLEANED_UP: &str = "cleaned-up";

/// One failover of one VM, as stored (a superset of the API's `FailoverRecord`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
        }
    }

    pub fn is_active(&self) -> bool {
        self.state == STATE_ACTIVE
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
