//! Checksum resync: a protected disk changed behind the tracker's back (the agent stopped,
//! the image written directly) is brought back by `ResyncVm`: the agent compares its blocks
//! with the latest point's block hashes and ships only the ones that differ; a test failover
//! to the resync point equals the source (qemu-img compare). An interrupted resync resumes.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_proto::common::v1::CycleKind;
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::registry::v1::ResyncVmRequest;
use ferry_proto::registry::v1::VmState;
use ferry_tests::*;

const MIB: u64 = 1 << 20;

async fn resync(t: &TestMesh, vm: &str) -> anyhow::Result<Job> {
    Ok(t.ctl
        .registry()
        .await?
        .resync_vm(ResyncVmRequest { name: vm.into() })
        .await?
        .into_inner())
}

/// The agent's resync progress file of a VM (removed once the resync point commits).
fn progress_file(agent_dir: &Path, vm: &str) -> PathBuf {
    agent_dir
        .join("agent-data")
        .join("resync")
        .join(format!("{vm}.json"))
}

/// Rewrites `blocks` whole 1 MiB blocks of a raw image with fresh random data, directly in
/// the file (no tracker sees it).
fn change_blocks(disk: &Path, blocks: &[u64], seed: u64) -> anyhow::Result<()> {
    for (i, b) in blocks.iter().enumerate() {
        fill_random(disk, b * MIB, MIB as usize, seed + i as u64)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_ships_only_changed_blocks() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join("web01-os.raw");
    qemu_create(&disk, "raw", "", "64M")?;
    fill_random(&disk, 0, 48 << 20, 11)?;
    let agent_dir = t.path("agent");
    let cfg = t
        .agent_config_tracked(&agent_dir, "hv01", &[("web01", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("web01").await?;
    let job = t.protect_every("web01", 2).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    agent.shutdown().await?;
    wait_logs_closed(&disk).await?;

    // Behind the tracker's back, in 1 MiB blocks (the vault block size): four data blocks
    // rewritten (one only in part), one block of the zero tail written, one block zeroed.
    qemu_io(
        &disk,
        "raw",
        &[
            "write -P 0xa1 2M 1M",
            "write -P 0xa2 9M 1M",
            "write -P 0xa3 31461376 8k",
            "write -P 0xa4 47M 1M",
            "write -P 0xa5 56M 1M",
            "write -z 20M 1M",
        ],
    )?;
    let shipped_blocks = 5u64; // the zeroed block leaves the map; nothing to ship for it

    let agent = InProcessAgent::start(&cfg)?;
    let job = resync(&t, "web01").await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let changed = shipped_blocks * MIB;
    assert!(
        j.bytes_done >= changed && j.bytes_done * 4 <= changed * 5,
        "shipped {} bytes for {changed} bytes of changed blocks",
        j.bytes_done
    );
    let latest = t.points("web01").await?;
    assert!(
        latest.iter().any(|p| p.kind() == CycleKind::Resync),
        "a resync point: {:?}",
        latest.iter().map(|p| p.kind()).collect::<Vec<_>>()
    );
    assert!(
        !progress_file(&agent_dir, "web01").exists(),
        "progress removed once the point committed"
    );
    let v = t.vm("web01").await?;
    assert_eq!(v.state(), VmState::Protected, "{v:?}");

    let out = t.path("out");
    let fo = t.test_failover("web01", "latest", &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(
        qemu_compare(&disk, "raw", &out.join("web01-os.raw"), "raw")?,
        "resynchronized replica differs from the source"
    );
    t.ctl
        .failover()
        .await?
        .cleanup_test_failover(ferry_proto::failover::v1::CleanupTestFailoverRequest {
            vm: "web01".into(),
        })
        .await?;

    // Delta replication resumes by itself: a write through the tracker reaches a new point.
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    let n = t.points("web01").await?.len();
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xb7 5M 64k"])
        .arg(&uri))?;
    let mut after = Vec::new();
    for _ in 0..600 {
        after = t.points("web01").await?;
        if after.len() >= n + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        after.len() >= n + 2,
        "delta cycles resumed after the resync"
    );
    let p = after[n + 1].clone();
    assert_eq!(p.kind(), CycleKind::Delta);
    let out = t.path("out-delta");
    let fo = t.test_failover("web01", &p.id, &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(
        qemu_compare(&disk, "raw", &out.join("web01-os.raw"), "raw")?,
        "delta point after the resync differs from the source"
    );
    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}

/// Waits until the running job has landed at least `bytes`.
async fn wait_landed(t: &TestMesh, job: &str, bytes: u64) -> anyhow::Result<u64> {
    for _ in 0..6000 {
        let j = t.job(job).await?;
        anyhow::ensure!(
            j.status == StepStatus::Running as i32,
            "job ended before the interruption: {j:?}"
        );
        if j.bytes_done >= bytes {
            return Ok(j.bytes_done);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("job {job} never landed {bytes} bytes")
}

/// `kill -9` of the agent in the middle of a resync: after a restart the resync runs again
/// from block 0 (the unsealed log cannot be trusted) without re-sending what landed, and the
/// resync point equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_resumes_after_agent_kill() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join("db02-data.raw");
    qemu_create(&disk, "raw", "", "256M")?;
    fill_random(&disk, 0, 192 << 20, 21)?;
    let agent_dir = t.path("agent");
    let cfg = t
        .agent_config_tracked(&agent_dir, "hv01", &[("db02", vec![disk.clone()])])
        .await?;
    let log = t.path("agent.log");
    let mut agent = spawn_agent_process(&cfg, &log)?;
    t.wait_vm("db02").await?;
    let job = t.protect_every("db02", 3600).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    // SIGTERM: a clean stop; the disk is then rewritten behind its back.
    run(Command::new("kill").arg(agent.id().to_string()))?;
    agent.wait()?;
    let blocks: Vec<u64> = (0..96).map(|i| i * 2 + 1).collect(); // 96 MiB over the data
    change_blocks(&disk, &blocks, 500)?;

    let mut agent = spawn_agent_process(&cfg, &log)?;
    let job = resync(&t, "db02").await?;
    let landed = wait_landed(&t, &job.id, 16 * MIB).await?;
    agent.kill()?; // SIGKILL mid-resync
    agent.wait()?;
    assert!(
        progress_file(&agent_dir, "db02").exists(),
        "progress is on disk when the agent dies"
    );
    let mut agent = spawn_agent_process(&cfg, &log)?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    agent.kill()?;
    agent.wait()?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    assert!(
        j.bytes_skipped >= landed / 2,
        "the resumed resync skipped what had landed: skipped {} after {landed}",
        j.bytes_skipped
    );
    assert!(
        j.bytes_done + j.bytes_skipped <= blocks.len() as u64 * MIB * 5 / 4,
        "only changed blocks offered: done {} skipped {}",
        j.bytes_done,
        j.bytes_skipped
    );
    let out = t.path("out");
    let fo = t.test_failover("db02", "latest", &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(
        qemu_compare(&disk, "raw", &out.join("db02-data.raw"), "raw")?,
        "resynchronized replica differs from the source"
    );
    t.stop().await;
    Ok(())
}

/// The block index the saved progress of a VM's first disk has reached (0 when none).
fn recorded_index(agent_dir: &Path, vm: &str) -> u64 {
    std::fs::read(progress_file(agent_dir, vm))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["disks"][0]["next_index"].as_u64())
        .unwrap_or(0)
}

/// A clean agent restart in the middle of a resync, with writes made through the tracker
/// during it: the chain of logs since the resync began is intact, so the resync resumes from
/// the recorded block (what landed is not even offered again), keeps those logs, and the
/// point holds the writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_resumes_from_its_block_after_clean_restart() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join("app03-os.raw");
    qemu_create(&disk, "raw", "", "256M")?;
    fill_random(&disk, 0, 192 << 20, 31)?;
    let agent_dir = t.path("agent");
    let cfg = t
        .agent_config_tracked(&agent_dir, "hv01", &[("app03", vec![disk.clone()])])
        .await?;
    // Small batches one at a time: the recorded block moves with every 2 MiB stored, so a
    // stop after 16 MiB landed finds a block to record (with 4 large batches in flight none
    // may have finished yet, and the pass would rightly record block 0).
    let text = std::fs::read_to_string(&cfg)?;
    std::fs::write(
        &cfg,
        format!("batch_blocks = 2\nbatches_in_flight = 1\n{text}"),
    )?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("app03").await?;
    let job = t.protect_every("app03", 3600).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    agent.shutdown().await?;
    wait_logs_closed(&disk).await?;
    let blocks: Vec<u64> = (0..96).map(|i| i * 2).collect();
    change_blocks(&disk, &blocks, 900)?;

    let agent = InProcessAgent::start(&cfg)?;
    let uri = t.wait_vm("app03").await?.disks[0].nbd_uri.clone();
    let job = resync(&t, "app03").await?;
    let landed = wait_landed(&t, &job.id, 16 * MIB).await?;
    // Writes during the resync, through the tracker: one to a block the pass has read, one
    // beyond the data.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xc1 1M 64k",
            "-c",
            "write -P 0xc2 250M 1M",
        ])
        .arg(&uri))?;
    agent.shutdown().await?;
    wait_logs_closed(&disk).await?;
    // The stopped pass records what was stored (its task ends just after the agent's).
    let mut next_index = 0;
    for _ in 0..100 {
        next_index = recorded_index(&agent_dir, "app03");
        if next_index > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        next_index > 0 && next_index < 192,
        "progress recorded at the stop: block {next_index}"
    );

    let agent = InProcessAgent::start(&cfg)?;
    let j = t.wait_job(&job.id, Duration::from_secs(600)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    // Blocks below the recorded one were neither shipped nor offered again: the resumed
    // cycle offered at most the changed blocks above it, the block written beyond the data
    // and the log of the writes (2.1 MiB together, 3 MiB allowed).
    let below = next_index.div_ceil(2);
    let offered = j.bytes_done + j.bytes_skipped;
    assert!(
        below >= 8 && offered <= (blocks.len() as u64 - below + 3) * MIB,
        "resumed from block {next_index} after {landed} bytes landed: offered {offered} bytes"
    );
    agent.shutdown().await?;
    wait_logs_closed(&disk).await?;
    let out = t.path("out");
    let fo = t.test_failover("app03", "latest", &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(
        qemu_compare(&disk, "raw", &out.join("app03-os.raw"), "raw")?,
        "resynchronized replica differs from the source"
    );
    t.stop().await;
    Ok(())
}
