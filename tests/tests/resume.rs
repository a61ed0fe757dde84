//! `kill -9` of the agent in the middle of an initial copy: after a restart the copy resumes,
//! skips what storage already holds, and the recovered disk is identical.
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_proto::common::v1::StepStatus;
use ferry_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_copy_resumes_without_resending() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disk = t.path("big.raw");
    qemu_create(&disk, "raw", "", "320M")?;
    fill_random(&disk, 0, 300 << 20, 42)?;
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[("big01", vec![disk.clone()])])
        .await?;
    let log = t.path("agent.log");
    let mut child = spawn_agent_process(&cfg, &log)?;
    t.wait_vm("big01").await?;
    let job = t.protect("big01").await?;
    // Kill as soon as part of the disk has landed, well before the end.
    let mut killed_at = 0;
    for _ in 0..6000 {
        let j = t.job(&job.id).await?;
        if j.status != StepStatus::Running as i32 {
            anyhow::bail!("job ended before the agent could be killed mid-copy: {j:?}");
        }
        if j.bytes_done >= 24 << 20 {
            killed_at = j.bytes_done;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(killed_at > 0, "copy never made progress");
    child.kill()?; // SIGKILL
    child.wait()?;
    let before = t.job(&job.id).await?;
    assert_eq!(
        before.status,
        StepStatus::Running as i32,
        "job still running after the kill"
    );
    assert!(
        before.bytes_done < 300 << 20,
        "killed mid-copy, not after it"
    );

    let mut child = spawn_agent_process(&cfg, &log)?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    child.kill()?;
    child.wait()?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    assert!(
        j.bytes_skipped >= killed_at / 2,
        "resumed copy skipped stored blocks: skipped {} after {killed_at} had landed",
        j.bytes_skipped
    );
    let step = &j.steps[2];
    assert!(
        step.message.contains("skipped as already stored"),
        "job says what it skipped: {}",
        step.message
    );

    let out = t.path("out");
    let fo = t.test_failover("big01", "latest", &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(
        qemu_compare(&disk, "raw", &out.join("big.raw"), "raw")?,
        "recovered disk differs"
    );
    t.stop().await;
    Ok(())
}

/// `kill -9` of the gateway (running as its own process) in the middle of an initial copy:
/// the agent rides it out, the copy completes after the gateway restarts, identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_mid_copy_resumes() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mesh = ferry::up::Mesh::start(ferry::up::UpOptions {
        data_dir: dir.path().join("mesh"),
        export_roots: Some(vec![dir.path().to_path_buf()]),
        without: vec![ferry_mesh::Component::Gateway],
        retry_time_unit: Some(Duration::from_millis(100)),
        ..Default::default()
    })
    .await?;
    let config_path = mesh.config_path.clone();
    let gateway = |log: &std::path::Path| -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Ok(Command::new(bin("ferry-gateway")?)
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?)
    };
    let glog = dir.path().join("gateway.log");
    let mut gw = gateway(&glog)?;
    let ctl = ferry::ctl::Ctl::load(&mesh.config_path)?;
    let t = TestMesh { mesh, dir, ctl };
    t.wait_serving().await?;

    let disk = t.path("big.raw");
    qemu_create(&disk, "raw", "", "320M")?;
    fill_random(&disk, 0, 300 << 20, 7)?;
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[("big02", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("big02").await?;
    let job = t.protect("big02").await?;
    let mut landed = 0;
    for _ in 0..6000 {
        let j = t.job(&job.id).await?;
        anyhow::ensure!(
            j.status == StepStatus::Running as i32,
            "job ended before the gateway was killed: {j:?}"
        );
        if j.bytes_done >= 24 << 20 {
            landed = j.bytes_done;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(landed > 0, "copy never made progress");
    gw.kill()?; // SIGKILL
    gw.wait()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut gw = gateway(&glog)?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let out = t.path("out");
    let fo = t.test_failover("big02", "latest", &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(
        qemu_compare(&disk, "raw", &out.join("big.raw"), "raw")?,
        "recovered disk differs"
    );
    agent.shutdown().await?;
    gw.kill()?;
    gw.wait()?;
    t.stop().await;
    Ok(())
}
