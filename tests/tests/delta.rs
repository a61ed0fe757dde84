//! Change tracking and delta cycles: a VM with two disks writes through the tracker's NBD
//! exports (qemu-io), cycles run every second, and a test failover to a chosen point equals a
//! copy of the source disks taken at that point (qemu-img compare).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_proto::common::v1::CycleKind;
use ferry_proto::common::v1::{RecoveryPoint, StepStatus};
use ferry_proto::failover::v1::CleanupTestFailoverRequest;
use ferry_proto::registry::v1::{Health, VmState};
use ferry_tests::*;

/// Waits until two more points than `after` exist: the second one's cut surely came after
/// every write made before this call.
async fn wait_two_more(t: &TestMesh, vm: &str, after: usize) -> anyhow::Result<RecoveryPoint> {
    for _ in 0..600 {
        let p = t.points(vm).await?;
        if p.len() >= after + 2 {
            return Ok(p[after + 1].clone());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no new recovery points for {vm}")
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
    let n = t.points("db01").await?.len();
    let p_a = wait_two_more(&t, "db01", n).await?;
    let snap = t.path("snap");
    let (os_a, data_a) = (snapshot(&os, &snap)?, snapshot(&data, &snap)?);

    // Batch B, then the latest point.
    nbd_write(&uris[0], &["write -P 0x66 5M 2M"])?;
    nbd_write(&uris[1], &["write -P 0x77 16M 5M"])?;
    let n = t.points("db01").await?.len();
    let p_b = wait_two_more(&t, "db01", n).await?;
    assert_eq!(p_b.kind(), CycleKind::Delta);

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
    // Cycles keep running: the point retention keeps as the newest may be followed by another
    // before the list below is read, so "the newest" is any point at least as new as the
    // newest one before the run.
    let newest_before = t.points("db01").await?.last().map(|p| p.seq);
    let retention = |_: ()| ferry_proto::storage::v1::RunRetentionRequest {
        vm: "db01".into(),
        retention_seconds: 1,
        gc_grace_seconds: 1,
        ..Default::default()
    };
    let r = t
        .ctl
        .storage()
        .await?
        .run_retention(retention(()))
        .await?
        .into_inner();
    let after = t.points("db01").await?;
    assert!(r.points_pruned >= 1, "{r:?}");
    assert!(
        after.iter().any(|p| p.id == p_a.id),
        "the point being read is kept"
    );
    // Every other point left is newer than the window, or the newest (cycles keep running).
    assert!(
        after
            .iter()
            .all(|p| p.id == p_a.id || p.time_ms >= cutoff_ms || Some(p.seq) >= newest_before),
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
        t.points("db01").await?.iter().all(|p| p.id != p_a.id),
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

/// Reads `len` bytes of a file at `offset`.
fn read_at(path: &Path, offset: u64, len: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// `kill -9` of the agent between cycles, just after an acknowledged write: after a restart
/// no point is built from the log the killed agent could not seal — the VM is marked
/// resync-pending (health warning, the error says why) and deltas stop; `ResyncVm` brings it
/// back to protected, and the latest point equals the source, the acknowledged write included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_never_yields_a_point_from_an_unsealed_log() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let os = host.join("app01-os.raw");
    qemu_create(&os, "raw", "", "16M")?;
    qemu_io(&os, "raw", &["write -P 0x5a 0 4M"])?;
    let cfg_path = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[("app01", vec![os.clone()])])
        .await?;
    let log = t.path("agent.log");
    let mut agent = spawn_agent_process(&cfg_path, &log)?;
    let vm = t.wait_vm("app01").await?;
    let uri = vm.disks[0].nbd_uri.clone();
    // One-second cycles; the resync window is closed, so only `ResyncVm` starts a resync.
    let job = t
        .protect_with("app01", policy_resync_window_closed(1))
        .await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    nbd_write(&uri, &["write -P 0x61 1M 1M"])?;
    let n = t.points("app01").await?.len();
    wait_two_more(&t, "app01", n).await?;
    // An acknowledged write, then the kill before a cycle could seal it.
    nbd_write(&uri, &["write -P 0x62 2M 1M"])?;
    agent.kill()?;
    agent.wait()?;
    let unclean = unclean_logs(&os)?;
    assert!(
        !unclean.is_empty(),
        "the killed agent left its current log unsealed"
    );
    let before = t.points("app01").await?;

    let mut agent = spawn_agent_process(&cfg_path, &log)?;
    let v = t
        .wait_vm_state("app01", VmState::ResyncPending, Duration::from_secs(60))
        .await?;
    assert_eq!(v.health(), Health::Warning, "{v:?}");
    assert!(v.last_error.contains("resync"), "{}", v.last_error);

    let job = t.resync_vm("app01").await?;
    assert_eq!(job.kind, "resync", "{job:?}");
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let v = t.vm("app01").await?;
    assert_eq!(
        (v.state(), v.health()),
        (VmState::Protected, Health::Normal),
        "{v:?}"
    );
    // No point came from the unsealed log: the first point after the kill is the resync's.
    let after = t.points("app01").await?;
    assert_eq!(
        after[..before.len()]
            .iter()
            .map(|p| &p.id)
            .collect::<Vec<_>>(),
        before.iter().map(|p| &p.id).collect::<Vec<_>>(),
        "points before the kill are kept"
    );
    let kinds: Vec<CycleKind> = after[before.len()..].iter().map(|p| p.kind()).collect();
    assert_eq!(
        kinds.first(),
        Some(&CycleKind::Resync),
        "the first point after the kill: {kinds:?}"
    );

    // The latest point (the resync's, or a delta after it) equals the source, and holds the
    // write acknowledged just before the kill.
    agent.kill()?;
    agent.wait()?;
    let out = t.path("failover");
    failover_to(&t, "app01", "latest", &out).await?;
    let copy = out.join("app01-os.raw");
    assert!(
        read_at(&copy, 2 << 20, 1 << 20)?.iter().all(|&b| b == 0x62),
        "the acknowledged write before the kill is in the latest point"
    );
    assert!(
        qemu_compare(&os, "raw", &copy, "raw")?,
        "the latest point differs from the source"
    );
    t.stop().await;
    Ok(())
}

/// `Some(x)` when `out` is `new[..x]` followed by `old[x..]`: a disk written front to back
/// from `old` towards `new`, cut after its first `x` bytes.
fn written_prefix(out: &[u8], old: &[u8], new: &[u8]) -> Option<usize> {
    if out.len() != old.len() || out.len() != new.len() {
        return None;
    }
    const SECTOR: usize = 4096;
    let sector = out
        .chunks(SECTOR)
        .zip(new.chunks(SECTOR))
        .position(|(a, b)| a != b)
        .unwrap_or(out.len() / SECTOR);
    let mut x = sector * SECTOR;
    while x < out.len() && out[x] == new[x] {
        x += 1;
    }
    (out[x..] == old[x..]).then_some(x)
}

/// `kill -9` of the agent while it ships a large delta: tens of MiB written through the
/// tracker in 1 MiB writes, one after the other; the agent is killed once a delta cycle is
/// open in ingest with bytes landed (the gateway reports every batch of 2 blocks) but not
/// committed. After a restart either cycles carry on or the VM is marked resync-pending and
/// `ResyncVm` brings it back; either way every point since the writes began holds exactly a
/// prefix of those writes (a consistent cut of the disk: never a point that differs from
/// the source at its cut), later points never hold less, and the latest equals the source
/// with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_shipment_never_yields_a_wrong_point() -> anyhow::Result<()> {
    const MIB: u64 = 1 << 20;
    const FIRST: u64 = 16; // the first block the writer changes
    const BLOCKS: u64 = 64; // 64 MiB of fresh random data
    let vm = "web02";
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join("web02-data.raw");
    // 64 MiB of changes stay below half the disk (where the agent asks for a resync instead).
    qemu_create(&disk, "raw", "", "256M")?;
    fill_random(&disk, 0, (FIRST * MIB) as usize, 5)?;
    let cfg_path = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[(vm, vec![disk.clone()])])
        .await?;
    // Small upload batches: ingest counts landed bytes every 2 MiB of a shipped log.
    std::fs::write(
        &cfg_path,
        format!("batch_blocks = 2\n{}", std::fs::read_to_string(&cfg_path)?),
    )?;
    let log = t.path("agent.log");
    let mut agent = spawn_agent_process(&cfg_path, &log)?;
    let uri = t.wait_vm(vm).await?.disks[0].nbd_uri.clone();
    let job = t.protect_with(vm, policy_resync_window_closed(1)).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    // Delta cycles run (a point after the initial one).
    t.wait_points(vm, 2, Duration::from_secs(120)).await?;

    // The change: one 1 MiB write per block from its own random file, in order.
    let blocks_dir = t.path("blocks");
    std::fs::create_dir_all(&blocks_dir)?;
    let mut writer = Command::new("qemu-io");
    writer.args(["-f", "raw"]);
    for i in 0..BLOCKS {
        let f = blocks_dir.join(format!("{i}.bin"));
        std::fs::File::create(&f)?.set_len(MIB)?;
        fill_random(&f, 0, MIB as usize, 1000 + i)?;
        writer
            .arg("-c")
            .arg(format!("write -s {} {} 1M", f.display(), (FIRST + i) * MIB));
    }
    let old = std::fs::read(&disk)?;
    let base = t.points(vm).await?.len();
    let mut writer = writer
        .arg(&uri)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;

    // Mid-shipment: a delta cycle is open in ingest and has landed bytes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let shipping = loop {
        let open = t.open_cycles(vm).await?;
        if let Some(c) = open
            .into_iter()
            .find(|c| c.kind() == CycleKind::Delta && c.bytes_written + c.bytes_skipped > 0)
        {
            break c;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no delta cycle was seen shipping"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    agent.kill()?;
    agent.wait()?;
    let writer_running = writer.try_wait()?.is_none();
    let killed_at = t.points(vm).await?.len();
    let w = writer.wait_with_output()?;
    let acked = String::from_utf8_lossy(&w.stdout)
        .lines()
        .filter(|l| l.starts_with("wrote "))
        .count() as u64;
    let unclean = unclean_logs(&disk)?;
    eprintln!(
        "killed while cycle {} had landed {} bytes ({} written, {} skipped); writer still running: \
         {writer_running}; {acked} of {BLOCKS} writes acknowledged; {} points before the writes, \
         {killed_at} at the kill; unclean logs: {unclean:?}",
        shipping.id,
        shipping.bytes_written + shipping.bytes_skipped,
        shipping.bytes_written,
        shipping.bytes_skipped,
        base,
    );
    // The source holds every acknowledged write (the tracker applies before it acknowledges).
    let new = std::fs::read(&disk)?;
    for i in 0..acked {
        let want = std::fs::read(blocks_dir.join(format!("{i}.bin")))?;
        let at = ((FIRST + i) * MIB) as usize;
        assert!(
            new[at..at + MIB as usize] == want[..],
            "acknowledged write {i} is in the source"
        );
    }

    let restarted_ms = ferry_proto::now_ms();
    let mut agent = spawn_agent_process(&cfg_path, &log)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let resynced = loop {
        let v = t.vm(vm).await?;
        if v.state() == VmState::ResyncPending {
            assert_eq!(v.health(), Health::Warning, "{v:?}");
            assert!(v.last_error.contains("resync"), "{}", v.last_error);
            break true;
        }
        // Two points after the restart: the second one's cut follows every write.
        if t.points(vm).await?.len() >= killed_at + 2 {
            break false;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "after the restart the vm neither replicated nor was marked for resync: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if resynced {
        let job = t.resync_vm(vm).await?;
        let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
        assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
        let v = t.vm(vm).await?;
        assert_eq!(v.state(), VmState::Protected, "{v:?}");
    }
    agent.kill()?;
    agent.wait()?;

    // Every point since the writes began holds a prefix of them, never less than the point
    // before it; the latest holds them all.
    let all = t.points(vm).await?;
    if resynced {
        // The restarted agent built no point before the resync (one the killed agent had
        // already asked ingest to commit may still have landed after the kill).
        let first_resync = all
            .iter()
            .position(|p| p.kind() == CycleKind::Resync)
            .ok_or_else(|| anyhow::anyhow!("no resync point"))?;
        let early: Vec<_> = all[killed_at..first_resync]
            .iter()
            .filter(|p| p.time_ms >= restarted_ms)
            .map(|p| (p.seq, p.kind()))
            .collect();
        assert!(
            early.is_empty(),
            "points from the logs of the killed agent: {early:?}"
        );
    }
    let mut last = 0;
    let mut seen = Vec::new();
    for (i, p) in all[base..].iter().enumerate() {
        let out = t.path(&format!("failover-{i}"));
        failover_to(&t, vm, &p.id, &out).await?;
        let copy = out.join("web02-data.raw");
        let got = std::fs::read(&copy)?;
        t.ctl
            .failover()
            .await?
            .cleanup_test_failover(CleanupTestFailoverRequest { vm: vm.into() })
            .await?;
        let x = written_prefix(&got, &old, &new).ok_or_else(|| {
            anyhow::anyhow!(
                "point {} ({}) is not a consistent cut of the writes",
                p.seq,
                p.kind
            )
        })?;
        assert!(
            x >= last,
            "point {} holds less than the one before it",
            p.seq
        );
        last = x;
        seen.push((p.seq, p.kind(), x as u64 / MIB));
    }
    eprintln!("points since the writes began (seq, kind, MiB of the disk as written): {seen:?}");
    assert_eq!(last, new.len(), "the latest point holds every write");
    let out = t.path("failover-latest");
    failover_to(&t, vm, "latest", &out).await?;
    assert!(
        qemu_compare(&disk, "raw", &out.join("web02-data.raw"), "raw")?,
        "the latest point differs from the source"
    );
    t.stop().await;
    Ok(())
}
