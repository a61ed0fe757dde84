//! Catalog snapshots (issue #15, scope 5): with `catalog.snapshot_every = 10` the registry
//! snapshots its state as it runs, and a start loads the newest snapshot and replays only the
//! entries after it. The proof that it reads no history: the entries a snapshot covers are
//! deleted before the restart, and the hosts, VMs and jobs the registry serves afterwards
//! are the same. A torn newest snapshot falls back to the one before it.
use std::time::Duration;

use ferry_proto::common::v1::StepStatus;
use ferry_store::Store;
use ferry_store::layout::{
    catalog_prefix, parse_catalog_key, parse_snapshot_key, snapshot_key, snapshot_prefix,
};
use ferry_tests::*;
use serde_json::{Value, json};

/// What the registry serves that the catalog decides: hosts, VMs (their state, disks,
/// policy, last point) and jobs, without what live reports or the clock change.
fn view(t: &TestMesh) -> anyhow::Result<Value> {
    let pick = |v: &Value, keys: &[&str]| -> Vec<Value> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                Value::Object(
                    keys.iter()
                        .map(|k| (k.to_string(), o[*k].clone()))
                        .collect(),
                )
            })
            .collect()
    };
    let vms = t.cli_json(&["vm", "list", "-o", "json"])?;
    let vms: Vec<Value> = vms
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let disks: Vec<Value> = v["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| json!({"id": d["id"], "path": d["path"], "virtual_size": d["virtual_size"]}))
                .collect();
            json!({"name": v["name"], "host": v["host"], "state": v["state"], "disks": disks,
                   "policy": v["policy"], "last_point_id": v["last_point_id"],
                   "last_point_time": v["last_point_time"], "protection_job_id": v["protection_job_id"]})
        })
        .collect();
    Ok(json!({
        "hosts": pick(&t.cli_json(&["host", "list", "-o", "json"])?, &["name", "site"]),
        "vms": vms,
        "jobs": pick(&t.cli_json(&["jobs", "list", "-o", "json"])?, &["id", "kind", "target", "status", "steps"]),
    }))
}

async fn seqs(
    store: &Store,
    prefix: &str,
    parse: fn(&str) -> Option<(&str, u64)>,
) -> anyhow::Result<Vec<u64>> {
    let mut s: Vec<u64> = store
        .list(prefix)
        .await?
        .iter()
        .filter_map(|k| parse(k).map(|(_, seq)| seq))
        .collect();
    s.sort_unstable();
    Ok(s)
}

/// Deletes the registry's catalog entries up to and including `upto`.
async fn forget_history(store: &Store, upto: u64) -> anyhow::Result<usize> {
    let mut n = 0;
    for key in store.list(&catalog_prefix("registry")).await? {
        if parse_catalog_key(&key).is_some_and(|(_, seq)| seq <= upto) {
            store.delete(&key).await?;
            n += 1;
        }
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_reads_the_snapshot_not_the_history() -> anyhow::Result<()> {
    let t = start_mesh_with_setting("catalog", "snapshot_every", 10).await?;
    let store = Store::from_url(&t.mesh.cfg.store_url())?;
    let disk = t.path("hv01/snap01.raw");
    std::fs::create_dir_all(disk.parent().expect("a parent"))?;
    qemu_create(&disk, "raw", "", "4M")?;
    fill_random(&disk, 0, 4 << 20, 7)?;
    t.agent_config_tracked(&t.path("hv01"), "hv01", &[("snap01", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&t.path("hv01/agent.toml"))?;
    t.wait_vm("snap01").await?;
    let job = t.protect_every("snap01", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    // Cycles and reports append entries; wait for two snapshots (the fallback needs both).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seqs(&store, &snapshot_prefix("registry"), parse_snapshot_key)
        .await?
        .len()
        < 2
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no two registry snapshots in 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.shutdown().await?;
    let before = view(&t)?;
    let t = t.restart().await?;
    assert_eq!(
        view(&t)?,
        before,
        "the restart changed what the registry serves"
    );

    // Forget everything the newest snapshot covers: a start that replayed the log from the
    // first entry would lose the vault's hosts and VMs.
    let snaps = seqs(&store, &snapshot_prefix("registry"), parse_snapshot_key).await?;
    let (older, newest) = (snaps[snaps.len() - 2], snaps[snaps.len() - 1]);
    let entries = seqs(&store, &catalog_prefix("registry"), parse_catalog_key).await?;
    let forgotten = forget_history(&store, older).await?;
    println!(
        "catalog_snapshots snapshots={snaps:?} entries={} forgotten={forgotten}",
        entries.len()
    );
    assert!(
        forgotten >= 10,
        "only {forgotten} entries before snapshot {older}"
    );
    let t = t.restart().await?;
    assert_eq!(
        view(&t)?,
        before,
        "a start from the snapshot serves another state"
    );

    // A torn newest snapshot is skipped for the one before it (whose tail still exists).
    store.delete(&snapshot_key("registry", newest)).await?;
    store
        .put_if_absent(
            &snapshot_key("registry", newest),
            bytes::Bytes::from_static(b"{\"names"),
        )
        .await?;
    let t = t.restart().await?;
    assert_eq!(
        view(&t)?,
        before,
        "a start after a torn snapshot serves another state"
    );
    t.stop().await;
    Ok(())
}
