//! Registry snapshots: the whole [`State`] written to the catalog's snapshots every
//! `catalog.snapshot_every` entries, so a start reads the newest snapshot and replays only
//! the entries after it: start-up follows the live state, not the length of the history.
use std::collections::BTreeMap;

use ferry_proto::common::v1::Job;
use ferry_store::{Catalog, StoreError};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::state::{Event, JobRecord, State};

/// The shape of [`State`] in a snapshot. Bump it when `State` gains anything derived from
/// events that a snapshot of the old shape would lack or misread (a new field filled by
/// replaying old events): snapshots of another format are skipped, so the next start
/// replays the whole log once and writes a snapshot of the new shape.
pub const FORMAT: u32 = 1;

/// Snapshots kept besides the newest (an older one is the fallback if the newest is torn).
pub const KEEP: usize = 2;

/// How a registry's state was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// The seq of the snapshot it started from (0: none).
    pub from_snapshot: u64,
    /// Catalog entries replayed after it.
    pub replayed: usize,
}

/// The newest snapshot's state with every later entry applied.
pub async fn load(catalog: &Catalog) -> Result<(State, Loaded), StoreError> {
    let (mut state, from) = match catalog.latest_snapshot::<State>(FORMAT).await? {
        Some((seq, state)) => (state, seq),
        None => (State::default(), 0),
    };
    let entries = catalog.read_from::<Event>(from).await?;
    let replayed = entries.len();
    for (seq, ev) in entries {
        state.apply(seq, &ev);
    }
    let loaded = Loaded {
        from_snapshot: from,
        replayed,
    };
    Ok((state, loaded))
}

/// serde of `State::jobs`: the records the catalog's job events hold.
pub(crate) mod jobs_as_records {
    use super::*;

    pub fn serialize<S: Serializer>(jobs: &BTreeMap<String, Job>, s: S) -> Result<S::Ok, S::Error> {
        let records: Vec<JobRecord> = jobs.values().map(JobRecord::encode).collect();
        records.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Job>, D::Error> {
        let records = Vec::<JobRecord>::deserialize(d)?;
        records
            .iter()
            .map(|r| {
                r.decode()
                    .map(|j| (j.id.clone(), j))
                    .ok_or_else(|| serde::de::Error::custom("a job record that does not decode"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{HostRecord, KeyRecord};
    use ferry_store::Store;

    fn events(n: u64) -> Vec<Event> {
        (0..n)
            .map(|i| match i % 3 {
                0 => Event::KeyCreated(KeyRecord {
                    key_id: format!("k{i}"),
                    secret_hash: format!("{i:064x}"),
                    site: "site-a".into(),
                    expires_at_ms: 1_000 + i as i64,
                    used_by: None,
                }),
                1 => Event::HostRegistered(HostRecord {
                    name: format!("hv{}", i % 7),
                    site: "site-a".into(),
                    registered_at_ms: i as i64,
                    removed: false,
                    cert_serial: format!("{i:x}"),
                }),
                _ => Event::Job(JobRecord::encode(&Job {
                    id: format!("job-{}", i % 5),
                    kind: "protect".into(),
                    target: format!("vm{i}"),
                    updated_at_ms: i as i64,
                    ..Default::default()
                })),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_start_from_a_snapshot_equals_a_full_replay_and_reads_only_the_tail() {
        let store = Store::from_url_without_faults("memory://").unwrap();
        let cat = Catalog::new(store, "registry");
        let evs = events(60);
        let mut live = State::default();
        for (i, ev) in evs.iter().enumerate() {
            let seq = cat.append(ev).await.unwrap();
            live.apply(seq, ev);
            if i == 39 {
                cat.write_snapshot(live.seq, FORMAT, &live).await.unwrap();
            }
        }
        let mut full = State::default();
        for (seq, ev) in cat.read_from::<Event>(0).await.unwrap() {
            full.apply(seq, &ev);
        }
        let (loaded, how) = load(&cat).await.unwrap();
        assert_eq!(
            how,
            Loaded {
                from_snapshot: 40,
                replayed: 20
            }
        );
        let json = |s: &State| serde_json::to_value(s).unwrap();
        assert_eq!(json(&loaded), json(&full));
        assert_eq!(json(&loaded), json(&live));
        assert_eq!(
            (loaded.seq, loaded.jobs.len(), loaded.hosts.len()),
            (60, 5, 7)
        );

        // A snapshot of another shape is skipped: the whole log is replayed.
        let cat2 = Catalog::new(
            Store::from_url_without_faults("memory://").unwrap(),
            "registry",
        );
        for ev in &evs {
            cat2.append(ev).await.unwrap();
        }
        cat2.write_snapshot(50, FORMAT + 1, &live).await.unwrap();
        let (again, how) = load(&cat2).await.unwrap();
        assert_eq!((how.from_snapshot, how.replayed), (0, 60));
        assert_eq!(json(&again), json(&full));
    }
}
