//! Redis loses everything (`redis-cli FLUSHALL`) mid-initial-replication and mid-cycle, while
//! the VM writes through the tracker and cycles run every second: the protection job ends,
//! cycles carry on, no recovery point is lost, and the latest point after the writer stops
//! equals the source.
use std::time::Duration;

use ferry_proto::common::v1::CycleKind;
use ferry_proto::common::v1::StepStatus;
use ferry_proto::registry::v1::{Health, VmState};
use ferry_tests::*;

const VM: &str = "db02";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_mid_replication_and_mid_cycle_loses_nothing() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join("db02.raw");
    qemu_create(&disk, "raw", "", "256M")?;
    fill_random(&disk, 0, 128 << 20, 11)?;
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[(VM, vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    let vm = t.wait_vm(VM).await?;
    let uri = vm.disks[0].nbd_uri.clone();

    // Mid-initial-replication: once the copy has landed some bytes.
    let job = t.protect_every(VM, 1).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let j = t.job(&job.id).await?;
        anyhow::ensure!(
            j.status == StepStatus::Running as i32 || j.status == StepStatus::Pending as i32,
            "the job ended before redis was flushed: {j:?}"
        );
        if j.bytes_done + j.bytes_skipped > 0 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no progress: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nbd_write(&uri, &["write -P 0x21 200M 1M"])?;
    t.redis_flushall()?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");

    // Mid-cycle: cycles every second while the VM writes; Redis is flushed three times.
    let first = t.wait_points(VM, 2, Duration::from_secs(120)).await?;
    let mut before = first.clone();
    for i in 0..15u32 {
        nbd_write(
            &uri,
            &[&format!("write -P {} {}M 128k", 0x30 + i, 130 + i * 3)],
        )?;
        if i % 5 == 2 {
            before = t.points(VM).await?;
            t.redis_flushall()?;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // The writer stops; two more points: the second one's cut follows every write.
    let n = t.points(VM).await?.len();
    let after = t.wait_points(VM, n + 2, Duration::from_secs(300)).await?;
    let ids = |p: &[ferry_proto::common::v1::RecoveryPoint]| -> Vec<String> {
        p.iter().map(|p| p.id.clone()).collect()
    };
    for earlier in [&first, &before] {
        assert_eq!(
            ids(earlier),
            ids(&after[..earlier.len()]),
            "points before a flush are a prefix of the points after"
        );
    }
    eprintln!(
        "count: {} points before the first flush, {} at the end",
        first.len(),
        after.len()
    );
    let vm = t.vm(VM).await?;
    assert_eq!(vm.state(), VmState::Protected, "{vm:?}");
    assert_ne!(vm.health(), Health::Critical, "{vm:?}");

    let snap = t.path("snap");
    std::fs::create_dir_all(&snap)?;
    let source = snap.join("db02.raw");
    std::fs::copy(&disk, &source)?;
    let out = t.path("failover");
    let job = t.test_failover(VM, "latest", &out).await?;
    assert_eq!(job.status, StepStatus::Succeeded as i32, "{job:?}");
    assert!(
        qemu_compare(&source, "raw", &out.join("db02.raw"), "raw")?,
        "the latest point differs from the source"
    );

    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}

/// Redis loses everything while a resync runs: a protected disk is changed behind the
/// tracker (the agent stopped cleanly, the image written directly), `ResyncVm` starts the
/// checksum resync, and once bytes of it have landed Redis is flushed. The resync job still
/// succeeds (the registry re-dispatches the work of running jobs, the agent's resync resumes
/// from its durable progress), the VM is protected again, and the latest point equals the
/// source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_mid_resync_still_resynchronizes() -> anyhow::Result<()> {
    const MIB: u64 = 1 << 20;
    let vm = "app04";
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join("app04-data.raw");
    qemu_create(&disk, "raw", "", "256M")?;
    fill_random(&disk, 0, 192 << 20, 41)?;
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[(vm, vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm(vm).await?;
    let job = t.protect_every(vm, 3600).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    agent.shutdown().await?;
    wait_logs_closed(&disk).await?;

    // Behind the tracker: 96 blocks of fresh random data over the data, a few qemu-io writes
    // (one beyond the data, one zeroing a block).
    for i in 0..96u64 {
        fill_random(&disk, (i * 2 + 1) * MIB, MIB as usize, 700 + i)?;
    }
    qemu_io(
        &disk,
        "raw",
        &[
            "write -P 0xd1 200M 1M",
            "write -P 0xd2 4M 64k",
            "write -z 8M 1M",
        ],
    )?;
    let before = t.points(vm).await?;

    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm(vm).await?;
    let job = t.resync_vm(vm).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let landed = loop {
        let j = t.job(&job.id).await?;
        anyhow::ensure!(
            j.status == StepStatus::Running as i32,
            "the resync ended before redis was flushed: {j:?}"
        );
        if j.bytes_done >= 8 * MIB {
            break j.bytes_done;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no progress: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    t.redis_flushall()?;
    let j = t.job(&job.id).await?;
    anyhow::ensure!(
        j.status == StepStatus::Running as i32,
        "the resync ended before redis was flushed: {j:?}"
    );
    eprintln!("flushed after {landed} bytes of the resync landed");

    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let v = t.vm(vm).await?;
    assert_eq!(
        (v.state(), v.health()),
        (VmState::Protected, Health::Normal),
        "{v:?}"
    );
    let after = t.points(vm).await?;
    assert_eq!(
        after[..before.len()]
            .iter()
            .map(|p| &p.id)
            .collect::<Vec<_>>(),
        before.iter().map(|p| &p.id).collect::<Vec<_>>(),
        "points before the flush are kept"
    );
    assert!(
        after[before.len()..]
            .iter()
            .any(|p| p.kind() == CycleKind::Resync),
        "a resync point: {after:?}"
    );
    agent.shutdown().await?;
    wait_logs_closed(&disk).await?;
    let out = t.path("failover");
    let fo = t.test_failover(vm, "latest", &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(
        qemu_compare(&disk, "raw", &out.join("app04-data.raw"), "raw")?,
        "the resynchronized replica differs from the source"
    );
    t.stop().await;
    Ok(())
}
