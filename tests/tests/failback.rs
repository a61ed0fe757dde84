//! Failback and re-protect (issue #12): the round trip home. A guest writes through hv01's
//! export, the VM fails over to hv-dr01 (planned), writes there, is re-protected from
//! hv-dr01 (only its writes since the failover ship), fails back to hv01 with checksum sync
//! (only the blocks that differ move), is committed and re-protected forward, writes on
//! hv01 again; a test failover of the latest point then equals hv01's disk, and every write
//! of both sites is in it.

use std::path::PathBuf;

use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// web01 (16 MiB, 4 MiB of 0x5a) on hv01 in site-a, protected every 2 s to hv-dr01.
struct Sites {
    web: PathBuf,
    hv01: PathBuf,
    primary: InProcessAgent,
    dr_dir: PathBuf,
    dr: InProcessAgent,
}

async fn protected(t: &TestMesh, format: &str) -> anyhow::Result<Sites> {
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join(format!("web01.{format}"));
    qemu_create(&web, format, "", "16M")?;
    qemu_io(&web, format, &["write -P 0x5a 0 4M"])?;
    let hv01 = t.path("hv01");
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()])],
            &format!("[tracker]\n{}", command_driver(&hv01)?),
        )
        .await?;
    let dr_dir = t.path("hv-dr01");
    let dr = t.recovery_agent(&command_driver(&dr_dir)?).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "2s")?;
    Ok(Sites {
        web,
        hv01,
        primary,
        dr_dir,
        dr,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_trip_home_sends_only_what_differs() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let Sites {
        web,
        hv01,
        primary,
        dr_dir,
        dr,
    } = protected(&t, "raw").await?;
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    nbd_write(&uri, &["write -P 0xa1 1M 64k"])?;

    // Planned failover, then the recovered VM writes at the recovery site: two vault blocks.
    ok_job(&t.cli_json(&["failover", "planned", "web01", "-o", "json"])?)?;
    let failover_point = t.vm("web01").await?.failover_point;
    let (_, dr_uri) = t.failover_disk("planned")?;
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
    t.points_after("web01", &last, 2).await?;

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
    let latest = t.points_after("web01", &last, 2).await?;

    // A test failover of the latest point equals hv01's disk and holds every write.
    ok_job(&t.cli_json(&[
        "failover", "test", "web01", "--point", &latest, "-o", "json",
    ])?)?;
    let (copy, _) = t.failover_disk("test")?;
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

/// Failback into a folder with full sync (scope 3): a vhdx VM fails over (planned), writes
/// at the recovery site and is re-protected; the failback creates it in a new folder on hv01
/// (every block written, in the source's format), equal to the recovery side's last state,
/// and leaves the original disk as it was; after the commit and a re-protect hv01 replicates
/// it from that folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_into_a_folder_with_full_sync_leaves_the_original_disk_alone() -> anyhow::Result<()>
{
    let t = TestMesh::start().await?;
    let Sites {
        web,
        hv01,
        primary,
        dr_dir,
        dr,
    } = protected(&t, "vhdx").await?;
    let disks = t.path("disks");
    ok_job(&t.cli_json(&["failover", "planned", "web01", "-o", "json"])?)?;
    let (_, dr_uri) = t.failover_disk("planned")?;
    // Served images are compared through their exports (a served vhdx has a live log). The
    // original disk holds the failover point, as the recovered one does before it writes.
    let nbd = |uri: &str| PathBuf::from(uri);
    let before = disks.join("before.raw");
    qemu_convert(&nbd(&dr_uri), &before)?;
    nbd_write(&dr_uri, &["write -P 0xb2 5M 64k"])?;
    ok_job(&t.cli_json(&["failover", "commit", "web01", "-o", "json"])?)?;
    ok_job(&t.cli_json(&["vm", "reprotect", "web01", "-o", "json"])?)?;

    // A relative folder, or one that climbs out, is refused before anything starts.
    for bad in ["relative/dir", "/srv/../etc"] {
        let (ok, _, err) = t.cli(&["failback", "web01", "--dir", bad])?;
        assert!(
            !ok && err.contains(bad) && err.contains("InvalidArgument"),
            "{bad}: {err}"
        );
    }
    // A plain absolute folder outside the agent's export_roots is refused by the agent, and
    // nothing is written there.
    let elsewhere = tempfile::tempdir()?;
    let outside = elsewhere.path().join("home");
    let (ok, out, err) = t.cli(&[
        "failback",
        "web01",
        "--sync",
        "full",
        "--dir",
        &outside.display().to_string(),
        "--wait",
        "-o",
        "json",
    ])?;
    assert!(
        !ok && format!("{out}{err}").contains("not under a folder"),
        "{out} {err}"
    );
    assert!(!outside.exists(), "the agent wrote outside its roots");
    let home = t.path("new-home");
    let home_s = home.display().to_string();
    let job = t.cli_json(&[
        "failback", "web01", "--sync", "full", "--dir", &home_s, "--wait", "-o", "json",
    ])?;
    ok_job(&job)?;
    let copy = home.join("web01").join("web01.vhdx");
    let (served, copy_uri) = t.failover_disk("failback")?;
    assert_eq!(served, copy);
    assert_eq!(
        &std::fs::read(&copy)?[..8],
        b"vhdxfile",
        "the source's format"
    );
    assert!(
        qemu_compare(&nbd(&copy_uri), "raw", &nbd(&dr_uri), "raw")?,
        "the new disk is not the recovery side's last state"
    );
    // The original, no longer served, is as it was.
    assert!(
        qemu_compare(&web, "vhdx", &before, "raw")?,
        "the original disk changed"
    );
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(
        (v["state"].as_str(), v["active_host"].as_str()),
        (Some("failed-over"), Some("hv01")),
        "{v}"
    );
    let calls = std::fs::read_to_string(hv01.join("calls.log"))?;
    assert!(calls.contains(&copy.display().to_string()), "{calls}");
    ok_job(&t.cli_json(&["failover", "commit", "web01", "-o", "json"])?)?;
    assert!(!dr_dir.join("recovered/web01").exists());

    // Forward again, from the folder: hv01's writes there reach the points.
    ok_job(&t.cli_json(&["vm", "reprotect", "web01", "-o", "json"])?)?;
    let vm = t.vm("web01").await?;
    assert_eq!(vm.disks[0].path, copy.display().to_string(), "{vm:?}");
    let last = vm.last_point_id.clone();
    nbd_write(&vm.disks[0].nbd_uri, &["write -P 0xd5 9M 64k"])?;
    let latest = t.points_after("web01", &last, 2).await?;
    ok_job(&t.cli_json(&[
        "failover", "test", "web01", "--point", &latest, "-o", "json",
    ])?)?;
    let (_, tested) = t.failover_disk("test")?;
    assert!(qemu_compare(
        &nbd(&vm.disks[0].nbd_uri),
        "raw",
        &nbd(&tested),
        "raw"
    )?);
    nbd_io(
        &tested,
        &[
            "read -P 0x5a 0 64k",
            "read -P 0xb2 5M 64k",
            "read -P 0xd5 9M 64k",
        ],
    )?;
    ok_job(&t.cli_json(&["failover", "cleanup", "web01", "-o", "json"])?)?;
    for a in [primary, dr] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}
