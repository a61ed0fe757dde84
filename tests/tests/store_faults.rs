//! Store faults (issue #15, scope 2): every store the mesh opens fails a fifth of its writes
//! (half before writing, half after: a lost response) and delays the others
//! (`FERRY_STORE_FAULTS`). Protection and delta cycles still complete, every point taken
//! after a batch of writes fails over identical to the disk as it was then, and a scrub of
//! the store finds every object each point and merged map references, sound.
use std::path::PathBuf;
use std::time::Duration;

use ferry_proto::common::v1::StepStatus;
use ferry_store::{FaultPlan, Store, VaultKey, injected_faults};
use ferry_tests::*;

/// The plan unless `FERRY_STORE_FAULTS` already names one (a campaign over seeds:
/// `for s in $(seq 1 20); do FERRY_STORE_FAULTS=write_fail=20,delay_ms=20,seed=$s cargo test
/// -p ferry-tests --test store_faults; done`).
const PLAN: &str = "write_fail=20,delay_ms=20,seed=15";

fn plan() -> String {
    std::env::var(FaultPlan::ENV).unwrap_or_else(|_| PLAN.to_string())
}

/// Batches of writes through the tracker's export; a point is taken after each.
const BATCHES: [&[&str]; 3] = [
    &["write -P 0x5a 1M 256k", "write -P 0x3c 6M 64k"],
    &["write -P 0x11 0 64k", "write -P 0x77 3M 1M"],
    &["write -z 1M 128k", "write -P 0x42 7M 512k"],
];

/// The point ids whose cycles all began after the last write: the newest point once two
/// more than `after` exist (cycles of one VM run one at a time, so the second began after
/// the first was committed, which is after this call began).
async fn point_after_writes(t: &TestMesh, vm: &str) -> anyhow::Result<String> {
    let last = t.latest_point_id(vm)?.unwrap_or_default();
    t.points_after(vm, &last, 2).await
}

async fn run() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disk = t.path("hv01/faults01.raw");
    std::fs::create_dir_all(disk.parent().expect("a parent"))?;
    qemu_create(&disk, "raw", "", "8M")?;
    fill_random(&disk, 0, 8 << 20, 15)?;
    t.agent_config_tracked(&t.path("hv01"), "hv01", &[("faults01", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&t.path("hv01/agent.toml"))?;
    let vm = t.wait_vm("faults01").await?;
    let job = t.protect_every("faults01", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");

    // Each point with the disk as it was when the point's cycle began.
    let snapshot = |i: usize| -> anyhow::Result<PathBuf> {
        let to = t.path(&format!("expected/{i}.raw"));
        std::fs::create_dir_all(to.parent().expect("a parent"))?;
        std::fs::copy(&disk, &to)?;
        Ok(to)
    };
    let mut expected = vec![(point_after_writes(&t, "faults01").await?, snapshot(0)?)];
    let uri = &vm.disks[0].nbd_uri;
    for (i, batch) in BATCHES.iter().enumerate() {
        nbd_write(uri, batch)?;
        expected.push((point_after_writes(&t, "faults01").await?, snapshot(i + 1)?));
    }
    agent.shutdown().await?;

    for (id, want) in &expected {
        let out = t.path(&format!("exports/{id}"));
        let job = t.test_failover("faults01", id, &out).await?;
        assert_eq!(
            job.status,
            StepStatus::Succeeded as i32,
            "point {id}: {job:?}"
        );
        assert!(
            qemu_compare(&out.join("faults01.raw"), "raw", want, "raw")?,
            "point {id} differs from the disk as it was"
        );
        ok_job(&t.cli_json(&["failover", "cleanup", "faults01", "-o", "json"])?)?;
    }

    // The store as it is, without the faults: every reference resolves and authenticates.
    let url = format!("file://{}", t.path("mesh/store").display());
    let store = Store::from_url_without_faults(&url)?;
    let key = VaultKey::from_bytes(t.mesh.cfg.data_key()?);
    let report = store.scrub(Some(&key)).await?;
    let faults = injected_faults();
    println!(
        "store_faults plan={} injected={faults} points={} merged={} pages={} logs={} chunks={} problems={}",
        plan(),
        report.points,
        report.merged_maps,
        report.pages,
        report.logs,
        report.chunks,
        report.problems.len()
    );
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert!(
        report.points >= expected.len() && report.chunks > 0,
        "{report:?}"
    );
    // The plan really failed writes all along the run.
    assert!(faults >= 20, "only {faults} faults were injected");
    t.stop().await;
    Ok(())
}

#[test]
fn cycles_complete_and_points_stay_whole_when_a_fifth_of_store_writes_fail() -> anyhow::Result<()> {
    init_logs();
    // Every store the mesh opens reads the plan. Set before the runtime and its threads
    // exist; this file holds this one test.
    unsafe { std::env::set_var(FaultPlan::ENV, plan()) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}
