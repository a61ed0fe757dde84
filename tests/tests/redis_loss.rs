//! Redis loses everything (`redis-cli FLUSHALL`) mid-initial-replication and mid-cycle, while
//! the VM writes through the tracker and cycles run every second: the protection job ends,
//! cycles carry on, no recovery point is lost, and the latest point after the writer stops
//! equals the source.
use std::process::Command;
use std::time::Duration;

use ferry_proto::common::v1::StepStatus;
use ferry_tests::*;

const VM: &str = "db02";

fn nbd_write(uri: &str, cmds: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    run(&mut c).map(|_| ())
}

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
    assert_eq!(vm.state, "protected", "{vm:?}");
    assert_ne!(vm.health, "critical", "{vm:?}");

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
