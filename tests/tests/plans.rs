//! Recovery plans (issue #13): six VMs on hv01 in three groups fail over to hv-dr01 group by
//! group (the drivers' recorded start times prove the order), a manual action holds the job
//! until `ferry jobs resume`, a failing before-script stops a planned failover at its group
//! and lets an unplanned one carry on; cleanup of a test failover and failback of the plan
//! run the groups in the same order. Bad plans are refused with a clear message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::*;

const GROUPS: [[&str; 2]; 3] = [["db1", "db2"], ["app1", "app2"], ["web1", "web2"]];

/// A command driver in `dir` that records each start with its time (ns) and network.
fn timed_driver(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("start.sh"),
        "#!/bin/sh\necho \"$(date +%s%N) $FERRY_VM $FERRY_NETWORK\" >> starts.log\n",
    )?;
    std::fs::write(dir.join("stop.sh"), "#!/bin/sh\ntrue\n")?;
    Ok("[driver]\nkind = \"command\"\nstart = \"sh ./start.sh\"\nstop = \"sh ./stop.sh\"\n".into())
}

/// The start times of each VM recorded in `dir/starts.log` for `network`, the last of each.
fn starts(dir: &Path, network: &str) -> anyhow::Result<Vec<(u128, String)>> {
    let log = std::fs::read_to_string(dir.join("starts.log")).unwrap_or_default();
    Ok(log
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (t, vm, net) = (f.next()?, f.next()?, f.next()?);
            (net == network).then(|| Some((t.parse().ok()?, vm.to_owned())))?
        })
        .collect())
}

/// Every VM of group k started before every VM of group k+1 (each VM's last start counts).
fn assert_group_order(starts: &[(u128, String)], groups: &[[&str; 2]]) -> anyhow::Result<()> {
    let last = |vm: &str| {
        starts
            .iter()
            .filter(|(_, v)| v == vm)
            .map(|(t, _)| *t)
            .max()
    };
    for pair in groups.windows(2) {
        for a in pair[0] {
            for b in pair[1] {
                let (ta, tb) = (last(a), last(b));
                anyhow::ensure!(
                    ta.is_some() && tb.is_some() && ta < tb,
                    "{a} must start before {b}: {starts:?}"
                );
            }
        }
    }
    Ok(())
}

/// Waits for the plan job to wait for input, checks what it says, resumes it with `comment`.
async fn resume_when_waiting(t: &TestMesh, comment: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let jobs = t.cli_json(&["jobs", "list", "-o", "json"])?;
        let waiting = jobs.as_array().and_then(|a| {
            a.iter()
                .find(|j| j["status"] == "waiting-for-input")
                .cloned()
        });
        if let Some(j) = waiting {
            let id = text(&j["id"]).to_owned();
            let step = j["steps"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["status"] == "waiting-for-input"))
                .cloned()
                .unwrap_or_default();
            anyhow::ensure!(
                step["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("check the DB replica")),
                "{j:#}"
            );
            let resumed =
                t.cli_json(&["jobs", "resume", &id, "--comment", comment, "-o", "json"])?;
            anyhow::ensure!(resumed["id"] == id.as_str(), "{resumed}");
            return Ok(id);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no plan job waits for input: {jobs:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `ferry ARGS` (a plan run that meets the manual action) to its end, resuming the job
/// when it waits; the job's JSON and whether the command succeeded.
async fn run_with_resume(
    t: &TestMesh,
    args: &[&str],
    comment: &str,
) -> anyhow::Result<(bool, serde_json::Value)> {
    let child = t.ferry_spawn(args)?;
    resume_when_waiting(t, comment).await?;
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    let text = String::from_utf8_lossy(&out.stdout);
    let job: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!(
            "ferry {args:?}: {e}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.success(), job))
}

async fn state(t: &TestMesh, vm: &str) -> anyhow::Result<String> {
    let v = t.cli_json(&["vm", "show", vm, "-o", "json"])?;
    Ok(text(&v["state"]).to_owned())
}

/// Six VMs on hv01 (4 MiB raw disks), protected to hv-dr01 every 2 s (re-protect waits for
/// the first reverse point: the next cycle); both hosts' drivers record starts.
async fn six_vms(
    t: &TestMesh,
) -> anyhow::Result<(PathBuf, PathBuf, InProcessAgent, InProcessAgent)> {
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let mut vms = Vec::new();
    for vm in GROUPS.iter().flatten() {
        let d = disks.join(format!("{vm}.raw"));
        qemu_create(&d, "raw", "", "4M")?;
        vms.push((*vm, vec![d]));
    }
    let hv01 = t.path("hv01");
    let extra = format!("[tracker]\n{}", timed_driver(&hv01)?);
    let primary = t.site_agent("hv01", "site-a", &vms, &extra).await?;
    let dr_dir = t.path("hv-dr01");
    let dr = t.recovery_agent(&timed_driver(&dr_dir)?).await?;
    for vm in GROUPS.iter().flatten() {
        t.wait_vm(vm).await?;
        t.protect_to_recovery(vm, "2s")?;
    }
    Ok((hv01, dr_dir, primary, dr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_fails_over_group_by_group_waits_for_input_and_comes_home() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let (hv01, dr_dir, _primary, _dr) = six_vms(&t).await?;
    // Group 3's check fails at the recovery site for now.
    std::fs::write(
        dr_dir.join("check-web.sh"),
        "echo web backend not ready >&2; exit 1\n",
    )?;

    let created = t.cli_json(&[
        "plan",
        "create",
        "app",
        "--group",
        "db1,db2",
        "--group",
        "app1,app2",
        "--group",
        "web1,web2",
        "--after",
        "1:manual:check the DB replica",
        "--before",
        "3:script:sh ./check-web.sh",
        "-o",
        "json",
    ])?;
    assert_eq!(created["groups"][2]["vms"][1], "web2", "{created}");
    assert_eq!(
        created["groups"][0]["after"][0]["kind"], "manual",
        "{created}"
    );
    let shown = t.cli_json(&["plan", "show", "app", "-o", "json"])?;
    assert_eq!(shown["groups"], created["groups"], "{shown}");
    let list = t.cli_json(&["plan", "list", "-o", "json"])?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    // Test failover: every group in order on the test network, paused at the manual action.
    let (ok, job) = run_with_resume(
        &t,
        &[
            "plan", "failover", "app", "--mode", "test", "--wait", "-o", "json",
        ],
        "replica checked by alice",
    )
    .await?;
    // The failing script is a failure of a test failover too: group 3 never ran.
    assert!(!ok, "{job:#}");
    assert_eq!(job["kind"], "plan-test", "{job:#}");
    let manual = step(&job, "group 1 after: manual \"check the DB replica\"");
    assert_eq!(manual["status"], "succeeded", "{job:#}");
    assert!(
        text(&manual["message"]).contains("replica checked by alice"),
        "{job:#}"
    );
    let script = step(&job, "group 3 before: script \"sh ./check-web.sh\"");
    assert_eq!(script["status"], "failed", "{job:#}");
    assert!(
        text(&script["message"]).contains("web backend not ready"),
        "{job:#}"
    );
    assert_eq!(
        step(&job, "group 3: test failover web1")["status"],
        "skipped",
        "{job:#}"
    );
    assert_group_order(&starts(&dr_dir, "test")?, &GROUPS[..2])?;

    // Cleanup runs every group (web1 and web2 have no copy: skipped, said so).
    let clean = t.cli_json(&["plan", "cleanup", "app", "-o", "json"])?;
    ok_job(&clean)?;
    let web = step(&clean, "group 3: cleanup web1");
    assert_eq!(web["status"], "skipped", "{clean:#}");
    assert!(text(&web["message"]).contains("no test copy"), "{clean:#}");
    let list = t.cli_json(&["failover", "list", "-o", "json"])?;
    assert!(
        !list
            .as_array()
            .is_some_and(|a| a.iter().any(|f| f["state"] == "active")),
        "{list:#}"
    );

    // Planned: groups 1 and 2 fail over, the failing script stops it at group 3.
    let (ok, job) = run_with_resume(
        &t,
        &["plan", "failover", "app", "--mode", "planned", "-o", "json"],
        "ok",
    )
    .await?;
    assert!(!ok && job["kind"] == "plan-planned", "{job:#}");
    for vm in ["db1", "db2", "app1", "app2"] {
        assert_eq!(state(&t, vm).await?, "failed-over", "{vm}: {job:#}");
    }
    for vm in ["web1", "web2"] {
        assert_eq!(state(&t, vm).await?, "protected", "{vm}: {job:#}");
    }
    assert!(text(&job["error"]).contains("check-web.sh"), "{job:#}");
    assert_group_order(&starts(&dr_dir, "production")?, &GROUPS[..2])?;

    // Unplanned with the script still failing: groups 1 and 2 are skipped (already failed
    // over), the script fails, group 3 carries on; the job reports the failure at the end.
    let (ok, job) = run_with_resume(
        &t,
        &[
            "plan",
            "failover",
            "app",
            "--mode",
            "unplanned",
            "-o",
            "json",
        ],
        "ok",
    )
    .await?;
    assert!(!ok, "{job:#}");
    let skipped = step(&job, "group 1: unplanned failover db1");
    assert_eq!(skipped["status"], "skipped", "{job:#}");
    assert!(
        text(&skipped["message"]).contains("already failed over"),
        "{job:#}"
    );
    assert_eq!(
        step(&job, "group 3: unplanned failover web2")["status"],
        "succeeded",
        "{job:#}"
    );
    assert!(text(&job["error"]).contains("1 step(s) failed"), "{job:#}");
    for vm in GROUPS.iter().flatten() {
        assert_eq!(state(&t, vm).await?, "failed-over", "{vm}");
    }

    // Home: commit and re-protect each VM, then fail the plan back; group 3's check now
    // runs on hv01 (the recovery host after re-protect) and passes.
    for vm in GROUPS.iter().flatten() {
        ok_job(&t.cli_json(&["failover", "commit", vm, "-o", "json"])?)?;
        ok_job(&t.cli_json(&["vm", "reprotect", vm, "-o", "json"])?)?;
    }
    std::fs::write(hv01.join("check-web.sh"), "echo web ok on $FERRY_VMS\n")?;
    let (ok, job) = run_with_resume(
        &t,
        &[
            "plan", "failback", "app", "--sync", "checksum", "-o", "json",
        ],
        "db home",
    )
    .await?;
    assert!(ok, "{job:#}");
    let script = step(&job, "group 3 before: script \"sh ./check-web.sh\"");
    assert!(
        text(&script["message"]).contains("web ok on web1,web2"),
        "{job:#}"
    );
    assert_group_order(&starts(&hv01, "production")?, &GROUPS)?;
    for vm in GROUPS.iter().flatten() {
        let v = t.cli_json(&["vm", "show", vm, "-o", "json"])?;
        assert_eq!(
            (v["state"].as_str(), v["active_host"].as_str()),
            (Some("failed-over"), Some("hv01")),
            "{v}"
        );
    }
    let deleted = t.cli_json(&["plan", "delete", "app", "-o", "json"])?;
    assert_eq!(deleted["deleted"], true, "{deleted}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plans_and_runs_are_refused_with_a_clear_message() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disk = t.path("db1.raw");
    qemu_create(&disk, "raw", "", "4M")?;
    let _agent = t
        .site_agent(
            "hv01",
            "site-a",
            &[("db1", vec![disk.clone()])],
            "[tracker]\n",
        )
        .await?;
    t.wait_vm("db1").await?;
    let refused = |args: &[&str], says: &str| -> anyhow::Result<()> {
        let (ok, out, err) = t.cli(args)?;
        anyhow::ensure!(!ok, "ferry {args:?} was accepted: {out}");
        anyhow::ensure!(err.contains(says), "ferry {args:?}: {err}");
        Ok(())
    };
    refused(
        &["plan", "create", "p", "--group", "db1,nope"],
        "vm nope is not known",
    )?;
    refused(
        &["plan", "create", "p", "--group", "db1", "--group", "db1"],
        "db1 is in the plan twice",
    )?;
    refused(
        &["plan", "create", "p", "--group", "db1", "--group", ""],
        "group 2 is empty",
    )?;
    refused(&["plan", "create", "../p", "--group", "db1"], "not valid")?;
    refused(
        &[
            "plan",
            "create",
            "p",
            "--group",
            "db1",
            "--before",
            "2:script:x",
        ],
        "names group 2",
    )?;
    refused(
        &[
            "plan",
            "create",
            "p",
            "--group",
            "db1",
            "--before",
            "1:shell:x",
        ],
        "script, manual",
    )?;
    refused(&["plan", "show", "nope"], "recovery plan nope not found")?;
    refused(&["plan", "delete", "nope"], "recovery plan nope not found")?;

    t.cli_json(&[
        "plan",
        "create",
        "p",
        "--group",
        "db1",
        "--after",
        "1:manual:look",
        "-o",
        "json",
    ])?;
    refused(
        &["plan", "create", "p", "--group", "db1"],
        "plan p already exists",
    )?;
    refused(
        &["plan", "failover", "p", "--mode", "unplanned", "--no-wait"],
        "has a manual action",
    )?;
    refused(
        &[
            "plan", "failover", "p", "--mode", "planned", "--point", "latest",
        ],
        "a point is chosen",
    )?;
    refused(
        &[
            "plan",
            "failover",
            "p",
            "--mode",
            "unplanned",
            "--point",
            "latest-common",
        ],
        "no group cut is common to all its vms (db1): the plan is not consistent",
    )?;
    refused(
        &["plan", "create", "q", "--group", "db1", "--consistent"],
        "vm db1 has no replication policy",
    )?;
    // Nothing ran: the VM is not protected, so its step fails and says why.
    let (ok, out, _) = t.cli(&["plan", "failover", "p", "--mode", "planned", "-o", "json"])?;
    let job: serde_json::Value = serde_json::from_str(&out)?;
    assert!(!ok, "{job:#}");
    let s = step(&job, "group 1: planned failover db1");
    assert_eq!(s["status"], "failed", "{job:#}");
    assert!(text(&s["message"]).contains("unprotected"), "{job:#}");
    refused(
        &["jobs", "resume", text(&job["id"])],
        "only a job waiting for input",
    )?;
    Ok(())
}

/// A plan job whose failover service stops mid-way (here: waiting for input) is resumed by the
/// other replica from the step it had reached: the VM that already failed over keeps its
/// outcome, the manual action still waits, the operator's answer ends the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_run_cut_off_by_its_service_stopping_is_resumed_by_another_replica()
-> anyhow::Result<()> {
    let (t, mut replicas) =
        TestMesh::start_replicated(&[ferry_mesh::Component::Failover], 2).await?;
    let disk = t.path("db1.raw");
    qemu_create(&disk, "raw", "", "4M")?;
    let hv01 = t.path("hv01");
    let extra = format!("[tracker]\n{}", timed_driver(&hv01)?);
    let _primary = t
        .site_agent("hv01", "site-a", &[("db1", vec![disk.clone()])], &extra)
        .await?;
    let dr_dir = t.path("hv-dr01");
    let _dr = t.recovery_agent(&timed_driver(&dr_dir)?).await?;
    t.wait_vm("db1").await?;
    t.protect_to_recovery("db1", "2s")?;
    t.cli_json(&[
        "plan",
        "create",
        "p",
        "--group",
        "db1",
        "--after",
        "1:manual:check the DB replica",
        "-o",
        "json",
    ])?;

    // The first replica in the endpoint list takes the run; it stops while the job waits.
    let started = t.cli_json(&[
        "plan",
        "failover",
        "p",
        "--mode",
        "planned",
        "--no-wait",
        "-o",
        "json",
    ])?;
    let id = text(&started["id"]).to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while t.cli_json(&["jobs", "show", &id, "-o", "json"])?["status"] != "waiting-for-input" {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the plan job never waited"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(state(&t, "db1").await?, "failed-over");
    replicas[0].kill().await;
    // The other replica takes the job over where it was: still waiting for the same input.
    // The operator's answer reaches it, and it runs to its end.
    let (ok, _, err) = t.cli(&["jobs", "resume", &id, "--comment", "after the stop"])?;
    assert!(ok, "{err}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let ended = loop {
        let j = t.cli_json(&["jobs", "show", &id, "-o", "json"])?;
        if !matches!(text(&j["status"]), "running" | "waiting-for-input") {
            break j;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the cut-off job was never resumed: {j:#}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    ok_job(&ended)?;
    assert_eq!(
        step(&ended, "group 1: planned failover db1")["status"],
        "succeeded",
        "the step done before the stop keeps its outcome: {ended:#}"
    );
    assert!(
        text(&step(&ended, "group 1 after: manual \"check the DB replica\"")["message"])
            .contains("after the stop"),
        "{ended:#}"
    );
    assert_eq!(state(&t, "db1").await?, "failed-over");
    Ok(())
}
