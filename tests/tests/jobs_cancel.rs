//! Cancelling jobs (issue #11 scope 8), through the CLI: a cancellable job stops cleanly and
//! undoes what it made; a job past its point of no return, a finished job and an unknown
//! job are refused with the reason.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_mesh::Component;
use ferry_proto::common::v1::StepStatus;
use ferry_tests::*;

/// A command driver in `dir` whose start and stop calls are logged and wait while the file
/// `hold-start` / `hold-stop` exists.
fn holding_driver(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    for call in ["start", "stop"] {
        std::fs::write(
            dir.join(format!("{call}.sh")),
            format!(
                "#!/bin/sh\necho \"call={call} vm=$FERRY_VM\" >> calls.log\n\
                 while [ -e hold-{call} ]; do sleep 0.05; done\n"
            ),
        )?;
    }
    Ok("[driver]\nkind = \"command\"\nstart = \"sh ./start.sh\"\nstop = \"sh ./stop.sh\"\n".into())
}

fn calls(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default()
}

/// `ferry ARGS` started in the background (the failover commands return when their job ends).
fn spawn_cli(t: &TestMesh, args: &[&str]) -> anyhow::Result<Child> {
    Ok(Command::new(bin("ferry")?)
        .arg("--config")
        .arg(&t.mesh.config_path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Waits until `done` holds, polling every 50 ms for up to `secs`.
async fn until(secs: u64, what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..secs * 20 {
        if done() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{what} did not happen within {secs} s")
}

/// The running job of `kind` on `vm`, as `jobs list -o json` shows it.
fn running_job(t: &TestMesh, vm: &str, kind: &str) -> Option<serde_json::Value> {
    let jobs = t
        .cli_json(&["jobs", "list", "--vm", vm, "-o", "json"])
        .ok()?;
    jobs.as_array()?
        .iter()
        .find(|j| j["kind"] == kind && j["status"] == "running")
        .cloned()
}

struct Site {
    primary: InProcessAgent,
    dr: InProcessAgent,
    hv01: PathBuf,
    dr_dir: PathBuf,
}

async fn two_sites(t: &TestMesh) -> anyhow::Result<Site> {
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.raw");
    qemu_create(&web, "raw", "", "8M")?;
    qemu_io(&web, "raw", &["write -P 0x5a 0 1M"])?;
    let hv01 = t.path("hv01");
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web])],
            &format!("[tracker]\n{}", holding_driver(&hv01)?),
        )
        .await?;
    let dr_dir = t.path("hv-dr01");
    let dr = t.recovery_agent(&holding_driver(&dr_dir)?).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "1h")?;
    Ok(Site {
        primary,
        dr,
        hv01,
        dr_dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_test_failover_mid_start_leaves_nothing_behind() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let s = two_sites(&t).await?;
    let folder = s.dr_dir.join("recovered/web01");

    // The vm's start call hangs: the job waits on its recovery host.
    std::fs::write(s.dr_dir.join("hold-start"), "")?;
    let child = spawn_cli(&t, &["failover", "test", "web01", "-o", "json"])?;
    until(60, "the start call", || {
        calls(&s.dr_dir).contains("call=start")
    })
    .await?;
    let job = running_job(&t, "web01", "test-failover").expect("a running test failover");
    assert_eq!(job["cancellable"], true, "{job}");
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    let cancelled = t.cli_json(&["jobs", "cancel", &id, "--wait", "-o", "json"])?;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["cancel_requested"], true, "{cancelled}");
    let steps = cancelled["steps"].as_array().cloned().unwrap_or_default();
    assert_eq!(steps[1]["status"], "cancelled", "{cancelled}");
    assert_eq!(steps[2]["status"], "skipped", "{cancelled}");
    assert!(
        cancelled["error"]
            .as_str()
            .is_some_and(|e| e.contains("cancelled by an operator")),
        "{cancelled}"
    );
    let out = child.wait_with_output()?;
    assert!(
        !out.status.success(),
        "the failover command reports the cancel"
    );
    assert!(!folder.exists(), "the recovery folder is removed");
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["failover_state"], "", "{v}");
    assert_eq!(v["state"], "protected", "{v}");

    // Cancelling it again, or any finished job, says why not.
    let (ok, _, err) = t.cli(&["jobs", "cancel", &id])?;
    assert!(
        !ok && err.contains("is cancelled") && err.contains("FailedPrecondition"),
        "{err}"
    );
    let (ok, _, err) = t.cli(&["jobs", "cancel", "no-such-job"])?;
    assert!(
        !ok && err.contains("no-such-job") && err.contains("NotFound"),
        "{err}"
    );

    // Nothing stale is left: the next test failover runs and cleans up as usual.
    std::fs::remove_file(s.dr_dir.join("hold-start"))?;
    let job = t.cli_json(&["failover", "test", "web01", "-o", "json"])?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(folder.exists());
    let (ok, _, err) = t.cli(&["jobs", "cancel", job["id"].as_str().unwrap_or_default()])?;
    assert!(!ok && err.contains("is succeeded"), "{err}");
    let job = t.cli_json(&["failover", "cleanup", "web01", "-o", "json"])?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(!folder.exists());

    for a in [s.primary, s.dr] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_past_its_point_of_no_return_is_not_cancelled() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let s = two_sites(&t).await?;

    // The source's stop call hangs: the job is shutting the source down.
    std::fs::write(s.hv01.join("hold-stop"), "")?;
    let child = spawn_cli(&t, &["failover", "planned", "web01", "-o", "json"])?;
    until(60, "the stop call", || calls(&s.hv01).contains("call=stop")).await?;
    let job = running_job(&t, "web01", "planned-failover").expect("a running planned failover");
    assert_eq!(job["cancellable"], false, "{job}");
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    let (ok, _, err) = t.cli(&["jobs", "cancel", &id])?;
    assert!(!ok && err.contains("FailedPrecondition"), "{err}");
    assert!(
        err.contains("point of no return") && err.contains("shut down the source vm"),
        "{err}"
    );

    // The failover carries on to the end once the source stops.
    std::fs::remove_file(s.hv01.join("hold-stop"))?;
    let out = child.wait_with_output()?;
    let job: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["cancel_requested"], false, "{job}");
    assert!(
        calls(&s.dr_dir).contains("call=start"),
        "{}",
        calls(&s.dr_dir)
    );
    // A commit is never cancellable; it is short and cannot be undone.
    let job = t.cli_json(&["failover", "commit", "web01", "-o", "json"])?;
    assert_eq!(job["status"], "succeeded", "{job}");

    for a in [s.primary, s.dr] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_enable_protection_stops_its_initial_copy() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    // No gateway yet: the initial copy cannot ship and retries with backoff.
    let mesh = ferry::up::Mesh::start(ferry::up::UpOptions {
        data_dir: dir.path().join("mesh"),
        export_roots: Some(vec![dir.path().to_path_buf()]),
        without: vec![Component::Gateway],
        retry_time_unit: Some(Duration::from_millis(100)),
        ..Default::default()
    })
    .await?;
    let cfg = mesh.cfg.clone();
    let ctl = ferry::ctl::Ctl::load(&mesh.config_path)?;
    let t = TestMesh { mesh, dir, ctl };
    // Up for the health check, then down until after the cancel.
    let gw = InProcessGateway::start(&cfg)?;
    t.wait_serving().await?;
    gw.stop().await?;
    let disk = t.path("web.raw");
    qemu_create(&disk, "raw", "", "8M")?;
    fill_random(&disk, 0, 4 << 20, 5)?;
    let acfg = t
        .agent_config_tracked(&t.path("agent"), "hv-c", &[("web", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&acfg)?;
    t.wait_vm("web").await?;

    let job = t.protect_every("web", 60).await?;
    let mut failed = false;
    for _ in 0..1200 {
        if t.vm("web").await?.retry_attempts > 0 {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failed, "the initial copy never failed without a gateway");
    let cancelled = t.cli_json(&["jobs", "cancel", &job.id, "--wait", "-o", "json"])?;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let steps = cancelled["steps"].as_array().cloned().unwrap_or_default();
    assert_eq!(steps[2]["status"], "cancelled", "{cancelled}");
    assert_eq!(steps[3]["status"], "skipped", "{cancelled}");
    let v = t.cli_json(&["vm", "show", "web", "-o", "json"])?;
    assert_eq!(v["state"], "unprotected", "{v}");
    assert_eq!(v["health"], "normal", "{v}");

    // The copy is gone from the scheduler: nothing queued, in flight or waiting for a retry,
    // even after the registry's periodic re-dispatch (every 10 s) had its chance.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let queue = t
        .ctl
        .scheduler()
        .await?
        .list_queue(ferry_proto::scheduler::v1::ListQueueRequest {
            host_name: "hv-c".into(),
        })
        .await?
        .into_inner();
    assert!(queue.entries.is_empty(), "{:?}", queue.entries);
    assert!(t.points("web").await?.is_empty(), "no point was made");

    // With the gateway up, protecting again works from the start.
    let gw = InProcessGateway::start(&cfg)?;
    let job = t.protect_every("web", 60).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");

    agent.shutdown().await?;
    gw.stop().await?;
    t.stop().await;
    Ok(())
}
