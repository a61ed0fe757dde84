//! Disable protection through the CLI as an operator types it: replication stops, the host's
//! sealed change logs of the VM are removed (the tracker keeps serving the disks), the points
//! stay unless `--delete-points`, and the VM can be protected again.
use std::path::Path;
use std::time::Duration;

use ferry_tests::*;

/// The `.hrl` logs next to `disk`.
fn logs_of(disk: &Path) -> Vec<String> {
    let name = disk.file_name().unwrap().to_string_lossy().into_owned();
    let mut logs: Vec<String> = std::fs::read_dir(disk.parent().unwrap())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{name}.")) && n.ends_with(".hrl"))
                .collect()
        })
        .unwrap_or_default();
    logs.sort();
    logs
}

fn protect(t: &TestMesh, vm: &str) -> anyhow::Result<()> {
    let (ok, out, err) = t.cli(&["vm", "protect", vm, "--frequency", "2s", "--wait"])?;
    anyhow::ensure!(ok, "protect {vm}: {out} {err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprotect_stops_replication_and_keeps_or_deletes_points() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.vhdx");
    let db = disks.join("db01.raw");
    qemu_create(&web, "vhdx", "", "8M")?;
    qemu_create(&db, "raw", "", "8M")?;
    let agent = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()]), ("db01", vec![db.clone()])],
            "[tracker]\n",
        )
        .await?;
    let v = t.wait_vm("web01").await?;
    let uri = v.disks[0].nbd_uri.clone();
    t.wait_vm("db01").await?;

    // Refused: an unknown VM, and one that is not protected.
    let (ok, _, err) = t.cli(&["vm", "unprotect", "nope"])?;
    assert!(!ok && err.contains("NotFound"), "{err}");
    let (ok, _, err) = t.cli(&["vm", "unprotect", "web01"])?;
    assert!(!ok && err.contains("FailedPrecondition"), "{err}");
    assert!(err.contains("unprotected"), "{err}");

    protect(&t, "web01")?;
    nbd_write(&uri, &["write -P 0x5a 0 1M"])?;
    let before = t.wait_points("web01", 3, Duration::from_secs(120)).await?;
    assert!(before.len() >= 3, "{before:?}");
    // Writes after the last cycle leave a sealed log behind once the tracker cuts; make some.
    nbd_write(&uri, &["write -P 0x17 2M 64k"])?;

    let job = t.cli_json(&["vm", "unprotect", "web01", "--wait", "-o", "json"])?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["kind"], "disable-protection", "{job}");
    let steps = job["steps"].as_array().cloned().unwrap_or_default();
    assert_eq!(steps.len(), 4, "{job}");
    assert!(
        steps[1]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("removed on host hv01"),
        "{job}"
    );
    assert_eq!(steps[2]["status"], "skipped", "{job}");
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["state"], "unprotected", "{v}");
    assert!(v["policy"].is_null(), "{v}");
    // Only the tracker's current log is left next to the disk.
    let logs = logs_of(&web);
    assert!(logs.len() <= 1, "sealed logs left: {logs:?}");
    // The points stay, and no new one appears.
    let kept = t.points("web01").await?;
    assert!(kept.len() >= before.len(), "{kept:?}");
    let listed = t.cli_json(&["points", "list", "web01", "-o", "json"])?;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(kept.len()),
        "{listed}"
    );
    nbd_write(&uri, &["write -P 0x18 3M 64k"])?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        t.points("web01").await?.len(),
        kept.len(),
        "a point after unprotect"
    );
    // The tracker still serves the disk.
    nbd_write(&uri, &["read 0 64k"])?;
    // Unprotected again: refused, naming the state.
    let (ok, _, err) = t.cli(&["vm", "unprotect", "web01"])?;
    assert!(!ok && err.contains("FailedPrecondition"), "{err}");
    assert!(err.contains("is unprotected"), "{err}");

    // Protect again: a new initial copy, then cycles.
    protect(&t, "web01")?;
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["state"], "protected", "{v}");
    assert!(t.points("web01").await?.len() > kept.len());

    // A second VM with --delete-points, and a sealed log no cycle shipped: protected with
    // a long interval, its log is sealed when the agent stops.
    let (ok, out, err) = t.cli(&["vm", "protect", "db01", "--frequency", "1h", "--wait"])?;
    assert!(ok, "protect db01: {out} {err}");
    assert!(!t.points("db01").await?.is_empty());
    let db_uri = t.vm("db01").await?.disks[0].nbd_uri.clone();
    nbd_write(&db_uri, &["write -P 0x42 1M 64k"])?;
    agent.shutdown().await?;
    let agent = InProcessAgent::start(&t.path("hv01").join("agent.toml"))?;
    let connected = |h: &ferry_proto::registry::v1::Host| h.status == "connected";
    t.wait_host("hv01", connected, Duration::from_secs(60))
        .await?;
    let db_uri = t.vm("db01").await?.disks[0].nbd_uri.clone();
    nbd_write(&db_uri, &["write -P 0x43 2M 64k"])?;
    let logs = logs_of(&db);
    assert!(
        logs.len() >= 2,
        "a sealed log and the current one: {logs:?}"
    );
    let job = t.cli_json(&[
        "vm",
        "unprotect",
        "db01",
        "--delete-points",
        "--wait",
        "-o",
        "json",
    ])?;
    assert_eq!(job["status"], "succeeded", "{job}");
    let msg = job["steps"][1]["message"].as_str().unwrap_or_default();
    assert!(!msg.starts_with("0 "), "{job}");
    assert!(
        job["steps"][2]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("deleted"),
        "{job}"
    );
    let logs = logs_of(&db);
    assert_eq!(logs.len(), 1, "only the current log: {logs:?}");
    nbd_write(&db_uri, &["read 0 64k"])?;
    let listed = t.cli_json(&["points", "list", "db01", "-o", "json"])?;
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let v = t.cli_json(&["vm", "show", "db01", "-o", "json"])?;
    assert_eq!(v["state"], "unprotected", "{v}");

    // The host is gone: the job fails naming it and suggesting --force, which skips it.
    agent.shutdown().await?;
    let gone = |h: &ferry_proto::registry::v1::Host| h.status != "connected";
    t.wait_host("hv01", gone, Duration::from_secs(60)).await?;
    let (ok, out, err) = t.cli(&["vm", "unprotect", "web01", "--wait", "-o", "json"])?;
    assert!(!ok, "{out} {err}");
    let job: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(job["status"], "failed", "{job}");
    let e = job["error"].as_str().unwrap_or_default();
    assert!(e.contains("hv01") && e.contains("--force"), "{job}");
    let job = t.cli_json(&[
        "vm",
        "unprotect",
        "web01",
        "--force",
        "--wait",
        "-o",
        "json",
    ])?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["steps"][1]["status"], "skipped", "{job}");
    assert!(
        job["steps"][1]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--force"),
        "{job}"
    );
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["state"], "unprotected", "{v}");

    t.stop().await;
    Ok(())
}
