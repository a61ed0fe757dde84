//! Enable-protection refuses what cannot work, at its prerequisites step, saying how to fix it:
//! a VM whose disk cannot be read (the agent warns about it at start and reports its error),
//! and a VM of a host without change tracking.
use std::path::Path;
use std::time::Duration;

use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::registry::v1::VmState;
use ferry_tests::*;

/// Waits for the job to end and checks it failed at its first step; that step's message.
async fn refused_at_prerequisites(t: &TestMesh, job: &Job) -> anyhow::Result<String> {
    let j = t.wait_job(&job.id, Duration::from_secs(60)).await?;
    assert_eq!(j.status, StepStatus::Failed as i32, "{j:?}");
    assert_eq!(j.steps[0].name, "prerequisites check");
    assert_eq!(j.steps[0].status, StepStatus::Failed as i32, "{j:?}");
    assert!(
        j.steps[1..]
            .iter()
            .all(|s| s.status == StepStatus::Pending as i32),
        "nothing ran after the prerequisites: {j:?}"
    );
    assert_eq!(j.error, j.steps[0].message);
    Ok(j.steps[0].message.clone())
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// One mesh for both cases (two meshes starting at once in one test binary can race for a
/// free port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_disk_and_untracked_host_are_refused_at_prerequisites() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    missing_disk_is_warned_at_start_and_refused(&t).await?;
    host_without_tracker_is_refused_with_how_to_add_it(&t).await?;
    t.stop().await;
    Ok(())
}

async fn missing_disk_is_warned_at_start_and_refused(t: &TestMesh) -> anyhow::Result<()> {
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let os = host.join("web02-os.vhdx");
    let missing = host.join("web02-data.raw");
    let other = host.join("db02-os.raw");
    qemu_create(&os, "vhdx", "subformat=dynamic", "8M")?;
    qemu_create(&other, "raw", "", "4M")?;
    qemu_io(&other, "raw", &["write -P 0x21 0 1M"])?;
    let cfg = t
        .agent_config_tracked(
            &t.path("agent-pre"),
            "hv-pre",
            &[
                ("web02", vec![os.clone(), missing.clone()]),
                ("db02", vec![other.clone()]),
            ],
        )
        .await?;
    let log = t.path("agent.log");
    let mut child = spawn_agent_process(&cfg, &log)?;

    // The agent says so at start, naming the VM, the path and the error.
    let m = missing.display().to_string();
    let mut warned = String::new();
    for _ in 0..300 {
        if let Some(l) = read(&log)
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&m) && l.contains("cannot be opened"))
        {
            warned = l.to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        warned.contains("web02") && warned.contains("No such file"),
        "warning names the vm, the disk and the error: {warned:?}\n{}",
        read(&log)
    );

    // It reports the disk with its error; the rest of the host works.
    let vm = t.wait_vm("web02").await?;
    let d = vm
        .disks
        .iter()
        .find(|d| d.path == m)
        .expect("the missing disk is reported, not dropped");
    assert!(d.error.contains("No such file"), "{d:?}");
    assert!(d.nbd_uri.is_empty(), "{d:?}");
    let os_disk = vm.disks.iter().find(|d| d.path.ends_with("web02-os.vhdx"));
    assert!(
        os_disk.is_some_and(|d| d.error.is_empty() && !d.nbd_uri.is_empty()),
        "the vm's other disk is tracked: {os_disk:?}"
    );
    let db = t.wait_vm("db02").await?;
    nbd_write(&db.disks[0].nbd_uri, &["write -P 0x22 1M 64k"])?;

    let job = t.protect_every("web02", 60).await?;
    let msg = refused_at_prerequisites(t, &job).await?;
    assert!(
        msg.contains(&m) && msg.contains("cannot be read") && msg.contains("No such file"),
        "names the disk and its error: {msg}"
    );
    assert!(msg.contains("agent.toml"), "says how to fix it: {msg}");
    assert!(!msg.contains("[tracker]"), "the host tracks changes: {msg}");

    // A VM of the same host whose disks are fine protects.
    let job = t.protect_every("db02", 3600).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");

    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let st = child.wait()?;
    assert!(st.success(), "{st}");
    Ok(())
}

async fn host_without_tracker_is_refused_with_how_to_add_it(t: &TestMesh) -> anyhow::Result<()> {
    let disk = t.path("plain01.raw");
    qemu_create(&disk, "raw", "", "4M")?;
    let cfg = t
        .agent_config(
            &t.path("agent-plain"),
            "hv-plain",
            &[("plain01", vec![disk.clone()])],
        )
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    let vm = t.wait_vm("plain01").await?;
    assert!(vm.disks[0].error.is_empty(), "{vm:?}");

    let job = t.protect_every("plain01", 30).await?;
    let msg = refused_at_prerequisites(t, &job).await?;
    assert!(
        msg.contains("hv-plain")
            && msg.contains("no change tracking")
            && msg
                .contains("add a [tracker] section to the host's agent.toml and restart the agent"),
        "says what is missing and how to add it: {msg}"
    );
    let vm = t.vm("plain01").await?;
    assert_eq!(vm.state(), VmState::Unprotected, "{vm:?}");
    assert!(vm.last_error.contains("[tracker]"), "{vm:?}");
    agent.shutdown().await?;
    Ok(())
}
