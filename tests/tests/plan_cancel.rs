//! Cancelling a plan job (issue #13): `ferry jobs cancel` stops a plan run at once — while it
//! waits for a manual action, and while a group's VMs fail over (their own jobs are cancelled
//! as far as each allows) — leaving the groups after it
//! skipped; what already failed over stays, and the plan's cleanup removes it. In a loop:
//! every round must leave nothing half done.

use std::time::Duration;

use ferry_tests::*;

/// The plan job's JSON once `cond` holds for it (up to 120 s).
async fn job_when(
    t: &TestMesh,
    id: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let j = t.cli_json(&["jobs", "show", id, "-o", "json"])?;
        if cond(&j) {
            return Ok(j);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "job {id}: {j:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_plan_stops_where_it_is_and_its_cleanup_removes_what_ran() -> anyhow::Result<()>
{
    let t = TestMesh::start().await?;
    std::fs::create_dir_all(t.path("disks"))?;
    let mut vms = Vec::new();
    for vm in ["db1", "web1"] {
        let d = t.path(&format!("disks/{vm}.raw"));
        qemu_create(&d, "raw", "", "1M")?;
        vms.push((vm, vec![d]));
    }
    let _primary = t.site_agent("hv01", "site-a", &vms, "[tracker]\n").await?;
    let dr_dir = t.path("hv-dr01");
    // Starting a VM takes a while here: a plan cancelled at once meets db1's job mid-start.
    let driver = command_driver(&dr_dir)?;
    std::fs::write(
        dr_dir.join("start.sh"),
        "#!/bin/sh\nsleep 2\necho \"call=start vm=$FERRY_VM network=$FERRY_NETWORK\" >> calls.log\n",
    )?;
    let _dr = t.recovery_agent(&driver).await?;
    for vm in ["db1", "web1"] {
        t.wait_vm(vm).await?;
        t.protect_to_recovery(vm, "5m")?;
    }
    let created = t.cli(&[
        "plan",
        "create",
        "app",
        "--group",
        "db1",
        "--group",
        "web1",
        "--after",
        "1:manual:check the DB replica",
    ])?;
    assert!(created.0, "{created:?}");

    for round in 0..4 {
        let started = t.cli_json(&[
            "plan",
            "failover",
            "app",
            "--mode",
            "test",
            "--no-wait",
            "-o",
            "json",
        ])?;
        let id = text(&started["id"]).to_owned();
        // Even rounds cancel at the manual action; odd ones as soon as db1's step runs, while
        // db1 fails over (its own job may not exist yet: the cancel must still reach it).
        if round % 2 == 0 {
            job_when(&t, &id, |j| j["status"] == "waiting-for-input").await?;
        } else {
            job_when(&t, &id, |j| {
                step(j, "group 1: test failover db1")["status"] == "running"
            })
            .await?;
        }
        let (ok, out, err) = t.cli(&["jobs", "cancel", &id, "--wait", "-o", "json"])?;
        assert!(ok, "round {round}: {out}{err}");
        let job = job_when(&t, &id, |j| j["status"] == "cancelled").await?;
        assert_eq!(
            step(&job, "group 2: test failover web1")["status"],
            "skipped",
            "round {round}: {job:#}"
        );
        let db1 = step(&job, "group 1: test failover db1");
        if round % 2 == 1 {
            // The plan's cancel reached db1's own job while it was starting the VM.
            assert_eq!(db1["status"], "failed", "round {round}: {job:#}");
            assert!(
                text(&db1["message"]).contains("cancelled"),
                "round {round}: {job:#}"
            );
        } else {
            assert_eq!(db1["status"], "succeeded", "round {round}: {job:#}");
            assert_eq!(
                step(&job, "group 1 after: manual \"check the DB replica\"")["status"],
                "cancelled",
                "round {round}: {job:#}"
            );
        }
        // No second test copy of web1 appeared; nothing of the plan still runs.
        let failovers = t.cli_json(&["failover", "list", "-o", "json"])?;
        let active = |vm: &str| {
            failovers
                .as_array()
                .is_some_and(|a| a.iter().any(|f| f["vm"] == vm && f["state"] == "active"))
        };
        assert!(!active("web1"), "round {round}: {failovers:#}");
        let jobs = t.cli_json(&["jobs", "list", "-o", "json"])?;
        let running = jobs.as_array().into_iter().flatten().find(|j| {
            matches!(
                text(&j["status"]),
                "running" | "waiting-for-input" | "pending"
            )
        });
        assert!(running.is_none(), "round {round}: {running:?}");
        // The cleanup removes whatever the cancelled run left.
        let cleaned = t.cli_json(&["plan", "cleanup", "app", "--wait", "-o", "json"])?;
        ok_job(&cleaned)?;
        assert!(
            !dr_dir.join("recovered/db1").exists(),
            "round {round}: db1's test copy is left"
        );
    }

    // A plan job that ended cannot be cancelled again: said so.
    let jobs = t.cli_json(&["jobs", "list", "-o", "json"])?;
    let ended = jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["kind"] == "plan-test"))
        .map(|j| text(&j["id"]).to_owned())
        .unwrap_or_default();
    let (ok, _, err) = t.cli(&["jobs", "cancel", &ended])?;
    assert!(!ok && err.contains("nothing to cancel"), "{err}");
    Ok(())
}
