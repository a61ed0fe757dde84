//! Benchmark (not a test): the registry's start-up with a long catalog. Writes N registry
//! events (default 100,000: job progress of 100 VMs' cycles and their inventory reports) to
//! a local store, then measures in one run the two ways to load the state: replaying every
//! entry from the first (the registry before snapshots) against the newest snapshot plus the
//! entries after it (`catalog.snapshot_every` = 1000, the snapshot taken 500 entries before
//! the end: the average distance). Both states are checked equal. Ends with one `key=value`
//! line.
//!
//!   bench-catalog [--entries N] [--dir DIR]
use std::time::Instant;

use anyhow::Context;
use ferry_model::VmHardware;
use ferry_proto::common::v1::{Job, JobStep};
use ferry_registry::snapshot;
use ferry_registry::state::{Event, JobRecord, State};
use ferry_store::{Catalog, Store};

const VMS: u64 = 100;
const SNAPSHOT_EVERY: u64 = 1000;

fn event(i: u64) -> Event {
    let vm = format!("vm{:03}", i % VMS);
    if i.is_multiple_of(20) {
        // Every VM's inventory in turn (i % VMS would name only the multiples of 20).
        let vm = format!("vm{:03}", (i / 20) % VMS);
        return Event::Inventory {
            host: format!("hv{:02}", i % 10),
            vm,
            disks: vec![],
            at_ms: i as i64,
            hardware: VmHardware::default(),
        };
    }
    let step = |n: &str| JobStep {
        name: n.into(),
        progress_percent: (i % 100) as u32,
        ..Default::default()
    };
    Event::Job(JobRecord::encode(&Job {
        id: format!("cycle-{}", i / 10),
        kind: "delta".into(),
        target: vm,
        steps: vec![step("snapshot"), step("ship"), step("commit")],
        updated_at_ms: i as i64,
        bytes_total: 8 << 20,
        bytes_done: i % (8 << 20),
        ..Default::default()
    }))
}

fn replay(entries: Vec<(u64, Event)>) -> State {
    let mut st = State::default();
    for (seq, ev) in entries {
        st.apply(seq, &ev);
    }
    st
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut n = 100_000u64;
    let mut dir: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--entries" => n = args.next().context("--entries N")?.parse()?,
            "--dir" => dir = Some(args.next().context("--dir DIR")?.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        n > SNAPSHOT_EVERY,
        "--entries must be more than {SNAPSHOT_EVERY}"
    );
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let url = format!("file://{}?fsync=false", tmp.path().display());
    let cat = Catalog::new(Store::from_url(&url)?, "registry");
    let t = Instant::now();
    for i in 0..n {
        cat.append(&event(i)).await?;
    }
    let write_s = t.elapsed().as_secs_f64();

    // What the registry did before snapshots: every entry from the first.
    let fresh = || anyhow::Ok(Catalog::new(Store::from_url(&url)?, "registry"));
    let t = Instant::now();
    let full = replay(fresh()?.read_from::<Event>(0).await?);
    let full_s = t.elapsed().as_secs_f64();

    // The snapshot the registry would hold: taken at a multiple of snapshot_every.
    let at = n - SNAPSHOT_EVERY / 2;
    let upto: Vec<_> = fresh()?
        .read_from::<Event>(0)
        .await?
        .into_iter()
        .take_while(|(seq, _)| *seq <= at)
        .collect();
    let snap = replay(upto);
    cat.write_snapshot(snap.seq, snapshot::FORMAT, &snap)
        .await?;
    let snapshot_kib = serde_json::to_vec(&snap)?.len() / 1024;

    let t = Instant::now();
    let (loaded, how) = snapshot::load(&fresh()?).await?;
    let snap_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        serde_json::to_value(&loaded)? == serde_json::to_value(&full)?,
        "the state from the snapshot differs from the full replay"
    );
    println!(
        "entries={n} write_s={write_s:.2} full_replay_s={full_s:.3} snapshot_start_s={snap_s:.3} speedup={:.1}x replayed={} snapshot_kib={snapshot_kib} jobs={} vms={}",
        full_s / snap_s.max(1e-9),
        how.replayed,
        loaded.jobs.len(),
        loaded.vms.len()
    );
    Ok(())
}
