//! Change tracking and delta cycles: a VM with two disks writes through the tracker's NBD
//! exports (qemu-io), cycles run every second, and a test failover to a chosen point equals a
//! copy of the source disks taken at that point (qemu-img compare).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_proto::common::v1::{RecoveryPoint, StepStatus};
use ferry_proto::failover::v1::CleanupTestFailoverRequest;
use ferry_proto::storage::v1::ListPointsRequest;
use ferry_tests::*;

async fn points(t: &TestMesh, vm: &str) -> anyhow::Result<Vec<RecoveryPoint>> {
    Ok(t.ctl
        .storage()
        .await?
        .list_points(ListPointsRequest { vm: vm.into() })
        .await?
        .into_inner()
        .points)
}

/// Waits until two more points than `after` exist: the second one's cut surely came after
/// every write made before this call.
async fn wait_two_more(t: &TestMesh, vm: &str, after: usize) -> anyhow::Result<RecoveryPoint> {
    for _ in 0..600 {
        let p = points(t, vm).await?;
        if p.len() >= after + 2 {
            return Ok(p[after + 1].clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no new recovery points for {vm}")
}

fn nbd_write(uri: &str, cmds: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    run(&mut c).map(|_| ())
}

/// A copy of a live disk. The tracker writes a VHDX in place through its metadata log, so a
/// copy taken while it runs may hold a log that qemu wants replayed before a read-only open:
/// `qemu-img check -r all` replays it on the copy (as Hyper-V would on open).
fn snapshot(src: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let dst = dir.join(src.file_name().unwrap_or_default());
    std::fs::copy(src, &dst)?;
    if dst.extension().is_some_and(|e| e == "vhdx") {
        run(Command::new("qemu-img")
            .args(["check", "-q", "-r", "all", "-f", "vhdx"])
            .arg(&dst))?;
    }
    Ok(dst)
}

async fn failover_to(t: &TestMesh, vm: &str, point: &str, out: &Path) -> anyhow::Result<()> {
    let job = t.test_failover(vm, point, out).await?;
    anyhow::ensure!(
        job.status == StepStatus::Succeeded as i32,
        "test failover: {job:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_tracker_replicate_as_points() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let os = host.join("db01-os.raw");
    let data = host.join("db01-data.vhdx");
    qemu_create(&os, "raw", "", "32M")?;
    qemu_create(&data, "vhdx", "subformat=dynamic", "40M")?;
    qemu_io(&os, "raw", &["write -P 0x11 0 4M"])?;
    qemu_io(&data, "vhdx", &["write -P 0x22 8M 4M"])?;
    let cfg_path = t
        .agent_config_tracked(
            &t.path("agent"),
            "hv01",
            &[("db01", vec![os.clone(), data.clone()])],
        )
        .await?;
    let agent = InProcessAgent::start(&cfg_path)?;
    let vm = t.wait_vm("db01").await?;
    let uris: Vec<String> = vm.disks.iter().map(|d| d.nbd_uri.clone()).collect();
    assert!(
        uris.iter().all(|u| u.starts_with("nbd+unix:///")),
        "nbd uris reported: {uris:?}"
    );

    // Protect with one-second cycles while the VM writes through the tracker.
    let job = t.protect_every("db01", 1).await?;
    nbd_write(&uris[0], &["write -P 0x33 1M 1M", "write -P 0x34 20M 64k"])?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");

    // Batch A, then a point whose cut follows it; copy the sources (the state of that point).
    nbd_write(
        &uris[0],
        &[
            "write -P 0x44 2M 3M",
            "write -z 12M 1M",
            "write -P 0x45 31M 1M",
        ],
    )?;
    nbd_write(
        &uris[1],
        &[
            "write -P 0x55 0 2M",
            "write -P 0x56 39M 1M",
            "write -z 9M 512k",
        ],
    )?;
    let n = points(&t, "db01").await?.len();
    let p_a = wait_two_more(&t, "db01", n).await?;
    let snap = t.path("snap");
    let (os_a, data_a) = (snapshot(&os, &snap)?, snapshot(&data, &snap)?);

    // Batch B, then the latest point.
    nbd_write(&uris[0], &["write -P 0x66 5M 2M"])?;
    nbd_write(&uris[1], &["write -P 0x77 16M 5M"])?;
    let n = points(&t, "db01").await?.len();
    let p_b = wait_two_more(&t, "db01", n).await?;
    assert_eq!(p_b.kind, "delta");

    let out_a = t.path("failover-a");
    failover_to(&t, "db01", &p_a.id, &out_a).await?;
    assert!(
        qemu_compare(&os_a, "raw", &out_a.join("db01-os.raw"), "raw")?,
        "point A: os disk differs"
    );
    assert!(
        qemu_compare(&data_a, "vhdx", &out_a.join("db01-data.vhdx"), "vhdx")?,
        "point A: data disk differs"
    );
    t.ctl
        .failover()
        .await?
        .cleanup_test_failover(CleanupTestFailoverRequest { vm: "db01".into() })
        .await?;

    // Stop writing; the latest point equals the disks as they are now.
    let now = t.path("now");
    let (os_b, data_b) = (snapshot(&os, &now)?, snapshot(&data, &now)?);
    let out_b = t.path("failover-b");
    failover_to(&t, "db01", &p_b.id, &out_b).await?;
    assert!(
        qemu_compare(&os_b, "raw", &out_b.join("db01-os.raw"), "raw")?,
        "point B: os disk differs"
    );
    assert!(
        qemu_compare(&data_b, "vhdx", &out_b.join("db01-data.vhdx"), "vhdx")?,
        "point B: data disk differs"
    );
    assert!(
        !qemu_compare(&os_a, "raw", &os, "raw")?,
        "batch B changed the disk (the test can fail)"
    );

    // Retention: a point being read (a reader marker, as a failover holds one) survives
    // pruning and keeps its chunks; older points go; an unreferenced object is collected;
    // the points left still fail over identical.
    let store = ferry_store::Store::from_url(&t.ctl.cfg.store_url())?;
    let marker = format!("readers/db01/{}/test-reader", p_a.id);
    store
        .put_if_absent(&marker, bytes::Bytes::from_static(b"0"))
        .await?;
    let orphan = ferry_store::chunk_key(&[7u8; 32]);
    store
        .put_if_absent(&orphan, bytes::Bytes::from_static(b"unreferenced"))
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cutoff_ms = ferry_proto::now_ms() - 1000;
    let retention = |_: ()| ferry_proto::storage::v1::RunRetentionRequest {
        vm: "db01".into(),
        retention_seconds: 1,
        gc_grace_seconds: 1,
    };
    let r = t
        .ctl
        .storage()
        .await?
        .run_retention(retention(()))
        .await?
        .into_inner();
    let after = points(&t, "db01").await?;
    assert!(r.points_pruned >= 1, "{r:?}");
    assert!(
        after.iter().any(|p| p.id == p_a.id),
        "the point being read is kept"
    );
    // Every other point left is newer than the window, or the newest (cycles keep running).
    let newest = after.last().map(|p| p.seq);
    assert!(
        after
            .iter()
            .all(|p| p.id == p_a.id || p.time_ms >= cutoff_ms || Some(p.seq) == newest),
        "old points pruned: {:?}",
        after.iter().map(|p| (p.seq, p.time_ms)).collect::<Vec<_>>()
    );
    assert!(!r.sweep_deferred);
    assert!(
        store.get(&orphan).await?.is_some(),
        "first seen unreferenced: condemned, not yet deleted"
    );
    let out_a2 = t.path("failover-a2");
    t.ctl
        .failover()
        .await?
        .cleanup_test_failover(CleanupTestFailoverRequest { vm: "db01".into() })
        .await?;
    failover_to(&t, "db01", &p_a.id, &out_a2).await?;
    assert!(
        qemu_compare(&data_a, "vhdx", &out_a2.join("db01-data.vhdx"), "vhdx")?,
        "point A after retention"
    );
    store.delete(&marker).await?;
    let r = t
        .ctl
        .storage()
        .await?
        .run_retention(retention(()))
        .await?
        .into_inner();
    assert!(
        points(&t, "db01").await?.iter().all(|p| p.id != p_a.id),
        "unread old point pruned: {r:?}"
    );
    assert!(r.chunks_collected >= 1, "{r:?}");
    assert!(
        store.get(&orphan).await?.is_none(),
        "still unreferenced on the next run: collected"
    );

    // Shipped logs are deleted on the host once their point is durable.
    let leftover = std::fs::read_dir(&host)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".hrl"))
        .count();
    assert!(
        leftover <= 4,
        "only current (and at most one in-flight) logs per disk remain: {leftover}"
    );
    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}

/// `kill -9` of the agent while cycles run: after a restart no point is built from a log the
/// killed agent could not seal — the VM is marked critical with "needs a resync" instead, and
/// the scheduler stops cycling it (no retry storm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_never_yields_a_point_from_an_unsealed_log() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let os = host.join("app01-os.raw");
    qemu_create(&os, "raw", "", "16M")?;
    let cfg_path = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[("app01", vec![os.clone()])])
        .await?;
    let spawn = || -> anyhow::Result<std::process::Child> {
        Ok(Command::new(bin("ferry-agent")?)
            .arg("--config")
            .arg(&cfg_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?)
    };
    let mut agent = spawn()?;
    let vm = t.wait_vm("app01").await?;
    let uri = vm.disks[0].nbd_uri.clone();
    let job = t.protect_every("app01", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    nbd_write(&uri, &["write -P 0x61 1M 1M"])?;
    let n = points(&t, "app01").await?.len();
    wait_two_more(&t, "app01", n).await?;
    // Acknowledged writes, then the kill before their cycle could seal them.
    nbd_write(&uri, &["write -P 0x62 2M 1M"])?;
    agent.kill()?;
    agent.wait()?;
    let before = points(&t, "app01").await?;
    let mut agent = spawn()?;
    let mut critical = None;
    for _ in 0..300 {
        let v = t.vm("app01").await?;
        if v.health == "critical" {
            critical = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = critical.ok_or_else(|| anyhow::anyhow!("vm never marked after the kill"))?;
    assert!(v.last_error.contains("resync"), "{}", v.last_error);
    // No point was committed from the unsealed log, and cycles stopped (no retry storm).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = points(&t, "app01").await?;
    assert_eq!(after.len(), before.len(), "no point after the kill");
    agent.kill()?;
    agent.wait()?;
    t.stop().await;
    Ok(())
}
