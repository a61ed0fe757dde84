//! Replication over a lossy link (issue #16): one VM's agent reaches the gateway through a
//! relay that drops 5% of the datagrams each way, another's directly. Both initial copies
//! complete, the lossy one's test failover is identical to its source disk, and the test
//! prints both replication times (figures, not a pass mark: CI machines vary).
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_proto::common::v1::StepStatus;
use ferry_tests::*;

const DISK: &str = "16M";
/// Datagrams dropped per thousand, each direction.
const LOSS_PER_MILLE: u64 = 50;

/// Registers `host` with one VM on a 16 MiB random disk; returns the agent's config path.
async fn host_with_vm(t: &TestMesh, host: &str, vm: &str, seed: u64) -> anyhow::Result<()> {
    let disk = t.path(&format!("{host}/{vm}.raw"));
    std::fs::create_dir_all(disk.parent().expect("a parent"))?;
    qemu_create(&disk, "raw", "", DISK)?;
    fill_random(&disk, 0, 16 << 20, seed)?;
    t.agent_config_tracked(&t.path(host), host, &[(vm, vec![disk])])
        .await?;
    Ok(())
}

/// Points the saved gateway endpoint of the agent in `dir` at `addr`.
fn redirect_gateway(dir: &Path, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let path = dir.join("agent-data/identity.json");
    let mut id: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    id["endpoints"]["gateway"] = addr.to_string().into();
    std::fs::write(&path, serde_json::to_vec_pretty(&id)?)?;
    Ok(())
}

/// Protects `vm` and returns how long its initial replication took.
async fn replicate(t: &TestMesh, vm: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let job = t.protect(vm).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{vm}: {j:?}");
    Ok(started.elapsed().as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_over_a_lossy_link_completes_intact() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    host_with_vm(&t, "hv-clean", "clean01", 21).await?;
    host_with_vm(&t, "hv-lossy", "lossy01", 22).await?;

    let clean = InProcessAgent::start(&t.path("hv-clean/agent.toml"))?;
    t.wait_vm("clean01").await?;
    let clean_s = replicate(&t, "clean01").await?;

    // Register through the real gateway address, then restart behind the relay.
    let relay = LossyRelay::start(t.ctl.cfg.gateway.listen, LOSS_PER_MILLE).await?;
    let lossy = InProcessAgent::start(&t.path("hv-lossy/agent.toml"))?;
    t.wait_vm("lossy01").await?;
    lossy.shutdown().await?;
    redirect_gateway(&t.path("hv-lossy"), relay.addr)?;
    let lossy = InProcessAgent::start(&t.path("hv-lossy/agent.toml"))?;
    let lossy_s = replicate(&t, "lossy01").await?;
    let counts = &relay.counts;
    let dropped = counts.dropped.load(std::sync::atomic::Ordering::Relaxed);
    let forwarded = counts.forwarded.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "lossy_link loss_per_mille={LOSS_PER_MILLE} disk={DISK} clean_s={clean_s:.2} lossy_s={lossy_s:.2} ratio={:.2} datagrams_forwarded={forwarded} dropped={dropped}",
        lossy_s / clean_s
    );
    assert!(
        dropped > 0,
        "the relay dropped nothing: {forwarded} forwarded"
    );

    let out = t.path("exports/lossy01");
    let job = t.test_failover("lossy01", "latest", &out).await?;
    assert_eq!(job.status, StepStatus::Succeeded as i32, "{job:?}");
    let src = t.path("hv-lossy/lossy01.raw");
    assert!(
        qemu_compare(&src, "raw", &out.join("lossy01.raw"), "raw")?,
        "the copy made over the lossy link differs from its source"
    );
    clean.shutdown().await?;
    lossy.shutdown().await?;
    t.stop().await;
    Ok(())
}
