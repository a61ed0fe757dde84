//! Failback and re-protect (issue #12): the round trip home. A guest writes through hv01's
//! export, the VM fails over to hv-dr01 (planned), writes there, is re-protected from
//! hv-dr01 (only its writes since the failover ship), fails back to hv01 with checksum sync
//! (only the blocks that differ move), is committed and re-protected forward, writes on
//! hv01 again; a test failover of the latest point then equals hv01's disk, and every write
//! of both sites is in it.
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// A command driver in `dir` that records its calls.
fn driver(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("start.sh"),
        "#!/bin/sh\necho \"call=start vm=$FERRY_VM network=$FERRY_NETWORK disks=$FERRY_DISKS\" >> calls.log\n",
    )?;
    std::fs::write(
        dir.join("stop.sh"),
        "#!/bin/sh\necho \"call=stop vm=$FERRY_VM\" >> calls.log\n",
    )?;
    Ok("[driver]\nkind = \"command\"\nstart = \"sh ./start.sh\"\nstop = \"sh ./stop.sh\"\n".into())
}

fn ok_job(job: &serde_json::Value) -> anyhow::Result<()> {
    anyhow::ensure!(job["status"] == "succeeded", "{job:#}");
    Ok(())
}

/// Waits until `n` points newer than `after` exist (the next cycle after a write then holds it).
async fn points_after(t: &TestMesh, vm: &str, after: &str, n: usize) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let points = t.cli_json(&["points", "list", vm, "-o", "json"])?;
        let ids: Vec<String> = points
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let newer = match ids.iter().position(|id| id == after) {
            Some(i) => ids.len() - i - 1,
            None => ids.len(),
        };
        if newer >= n {
            return Ok(ids.last().cloned().unwrap_or_default());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "vm {vm}: only {newer} points after {after}: {points}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn failover_disk(t: &TestMesh, kind: &str) -> anyhow::Result<(PathBuf, String)> {
    let list = t.cli_json(&["failover", "list", "-o", "json"])?;
    let f = list
        .as_array()
        .and_then(|a| {
            a.iter()
                .rev()
                .find(|f| f["kind"] == kind && f["state"] == "active")
        })
        .ok_or_else(|| anyhow::anyhow!("no active {kind} failover: {list}"))?;
    let d = &f["disks"][0];
    Ok((
        PathBuf::from(d["path"].as_str().unwrap_or_default()),
        d["nbd_uri"].as_str().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_trip_home_sends_only_what_differs() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.raw");
    qemu_create(&web, "raw", "", "16M")?;
    qemu_io(&web, "raw", &["write -P 0x5a 0 4M"])?;
    let hv01 = t.path("hv01");
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()])],
            &format!("[tracker]\n{}", driver(&hv01)?),
        )
        .await?;
    let dr_dir = t.path("hv-dr01");
    let dr = t.recovery_agent(&driver(&dr_dir)?).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "2s")?;
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    nbd_write(&uri, &["write -P 0xa1 1M 64k"])?;

    // Planned failover, then the recovered VM writes at the recovery site: two vault blocks.
    ok_job(&t.cli_json(&["failover", "planned", "web01", "-o", "json"])?)?;
    let failover_point = t.vm("web01").await?.failover_point;
    let (_, dr_uri) = failover_disk(&t, "planned")?;
    nbd_write(
        &dr_uri,
        &["write -P 0xb2 5M 64k", "write -P 0xb3 5632k 64k"],
    )?;
    ok_job(&t.cli_json(&["failover", "commit", "web01", "-o", "json"])?)?;

    // Re-protect: hv-dr01 is the source now; its first point carries only what it wrote.
    let job = t.cli_json(&["vm", "reprotect", "web01", "-o", "json"])?;
    ok_job(&job)?;
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["host"], "hv-dr01", "{v}");
    assert_eq!(v["recovery_host"], "hv01", "{v}");
    assert_eq!(v["direction"], "reverse", "{v}");
    assert_eq!(v["state"], "protected", "{v}");
    let shipped = v["last_cycle_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        shipped > 0 && shipped < 2 * MIB,
        "the first reverse point shipped {shipped} bytes: {v}"
    );
    let allowed: Vec<&str> = v["allowed_operations"]
        .as_array()
        .map(|a| a.iter().filter_map(|o| o.as_str()).collect())
        .unwrap_or_default();
    assert!(
        allowed.contains(&"failback") && !allowed.contains(&"planned-failover"),
        "{v}"
    );
    // The old primary is fenced while the vm runs at the recovery site.
    assert!(
        nbd_write(&uri, &["write -P 0x99 0 64k"]).is_err(),
        "hv01 took a write"
    );

    // More writes at the recovery site, replicated (one more vault block).
    let last = t.vm("web01").await?.last_point_id;
    nbd_write(&dr_uri, &["write -P 0xc4 9M 64k"])?;
    points_after(&t, "web01", &last, 2).await?;

    // Failback, checksum sync: phase 1 while the vm runs, then phase 2.
    let phase1 = t.cli_json(&["failback", "web01", "-o", "json"])?;
    ok_job(&phase1)?;
    assert_eq!(
        t.cli_json(&["vm", "show", "web01", "-o", "json"])?["state"],
        "failing-back"
    );
    let phase2 = t.cli_json(&["failback", "complete", "web01", "-o", "json"])?;
    ok_job(&phase2)?;
    let moved =
        phase1["bytes_done"].as_u64().unwrap_or(0) + phase2["bytes_done"].as_u64().unwrap_or(0);
    // Two vault blocks (1 MiB each: 5 and 9) were written at the recovery site.
    assert!(
        moved > 0 && moved * 4 <= 5 * 2 * MIB,
        "failback moved {moved} bytes: {phase1:#} {phase2:#}"
    );
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["state"], "failed-over", "{v}");
    assert_eq!(v["active_host"], "hv01", "{v}");
    let starts = std::fs::read_to_string(hv01.join("calls.log"))?;
    assert!(
        starts.contains("call=start vm=web01 network=production"),
        "{starts}"
    );
    ok_job(&t.cli_json(&["failover", "commit", "web01", "-o", "json"])?)?;
    assert!(
        !dr_dir.join("recovered/web01").exists(),
        "the recovery site's copy is released after the failback's commit"
    );

    // Re-protect forward: hv01 replicates again from the failback point, no full copy.
    ok_job(&t.cli_json(&["vm", "reprotect", "web01", "-o", "json"])?)?;
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(
        (v["host"].as_str(), v["direction"].as_str()),
        (Some("hv01"), Some("forward")),
        "{v}"
    );
    let shipped = v["last_cycle_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        shipped < 2 * MIB,
        "the first forward point after failback shipped {shipped} bytes"
    );
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    let last = t.vm("web01").await?.last_point_id;
    nbd_write(&uri, &["write -P 0xd5 13M 64k"])?;
    let latest = points_after(&t, "web01", &last, 2).await?;

    // A test failover of the latest point equals hv01's disk and holds every write.
    ok_job(&t.cli_json(&[
        "failover", "test", "web01", "--point", &latest, "-o", "json",
    ])?)?;
    let (copy, _) = failover_disk(&t, "test")?;
    assert!(
        qemu_compare(&web, "raw", &copy, "raw")?,
        "the latest point is not hv01's disk"
    );
    qemu_io(
        &copy,
        "raw",
        &[
            "read -P 0x5a 0 64k",
            "read -P 0xa1 1M 64k",
            "read -P 0xb2 5M 64k",
            "read -P 0xb3 5632k 64k",
            "read -P 0xc4 9M 64k",
            "read -P 0xd5 13M 64k",
        ],
    )?;
    assert_ne!(latest, failover_point);
    ok_job(&t.cli_json(&["failover", "cleanup", "web01", "-o", "json"])?)?;

    for a in [primary, dr] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}
