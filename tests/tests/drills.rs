//! DR drills (issue #13): a drill of a healthy VM reads every block of its point back, starts
//! it at the recovery site, runs the boot check there, removes the copy and records success;
//! a bit flipped in one stored chunk makes the next drill fail naming the disk and the
//! block, recorded as such; the chunk is quarantined, the resync ships the block again and
//! the drill after it passes. Drills of a plan and on a schedule: a scheduled drill runs by
//! itself when due, and a VM whose scheduled drill failed or is overdue shows warning health.

use std::path::PathBuf;

use ferry_tests::*;

/// The stored chunk file of a block holding `plaintext` (named with the vault's key, read
/// from the mesh's data dir as the mesh reads it).
fn chunk_file(t: &TestMesh, plaintext: &[u8]) -> anyhow::Result<PathBuf> {
    let bytes = std::fs::read(t.path("mesh/vault/data.key"))?;
    let mut key = [0u8; 32];
    match <[u8; 32]>::try_from(bytes.as_slice()) {
        Ok(raw) => key = raw,
        Err(_) => hex::decode_to_slice(String::from_utf8(bytes)?.trim(), &mut key)?,
    }
    let id = ferry_store::chunk_id(&ferry_store::VaultKey::from_bytes(key), plaintext);
    Ok(t.path("mesh/store").join(ferry_store::chunk_key(&id)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_proves_a_point_and_a_flipped_bit_is_quarantined_then_shipped_again()
-> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disk = t.path("disks/web01.raw");
    std::fs::create_dir_all(t.path("disks"))?;
    qemu_create(&disk, "raw", "", "8M")?;
    qemu_io(
        &disk,
        "raw",
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x5b 1M 1M",
            "write -P 0x5c 2M 1M",
        ],
    )?;
    let _primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![disk.clone()])],
            "[tracker]\n",
        )
        .await?;
    let dr_dir = t.path("hv-dr01");
    let _dr = t.recovery_agent(&command_driver(&dr_dir)?).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "5m")?;
    let point = t.vm("web01").await?.last_point_id;

    // A healthy point: read back, started on the test network, checked, cleaned up.
    std::fs::write(
        dr_dir.join("probe.sh"),
        "grep -q \"call=start vm=$FERRY_VMS network=test\" calls.log && echo up\n",
    )?;
    let job = t.cli_json(&[
        "drill",
        "run",
        "web01",
        "--boot-check",
        "sh ./probe.sh",
        "-o",
        "json",
    ])?;
    ok_job(&job)?;
    let steps = job["steps"].as_array().cloned().unwrap_or_default();
    assert!(text(&steps[0]["message"]).contains("3 blocks"), "{job:#}");
    assert!(text(&steps[2]["message"]).contains("passed: up"), "{job:#}");
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["last_verified"]["result"], "succeeded", "{v:#}");
    assert_eq!(v["last_verified"]["point"], point.as_str(), "{v:#}");
    assert!(
        !dr_dir.join("recovered/web01").exists(),
        "the drill's copy was removed"
    );
    let failovers = t.cli_json(&["failover", "list", "-o", "json"])?;
    assert!(
        !failovers
            .as_array()
            .is_some_and(|a| a.iter().any(|f| f["state"] == "active")),
        "{failovers:#}"
    );

    // A failing boot check fails the drill, and the copy is still removed.
    let (ok, out, _) = t.cli(&[
        "drill",
        "run",
        "web01",
        "--boot-check",
        "echo no answer >&2; exit 1",
        "-o",
        "json",
    ])?;
    let job: serde_json::Value = serde_json::from_str(&out)?;
    assert!(!ok && text(&job["error"]).contains("no answer"), "{job:#}");
    assert_eq!(job["steps"][3]["status"], "succeeded", "{job:#}");
    assert_eq!(
        t.cli_json(&["vm", "show", "web01", "-o", "json"])?["last_verified"]["result"],
        "failed"
    );

    // One bit flipped in one stored chunk (block 1's): the read-back names the disk and
    // the block.
    let victim = chunk_file(&t, &vec![0x5b; 1 << 20])?;
    let mut bytes = std::fs::read(&victim)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&victim, &bytes)?;
    let (ok, out, _) = t.cli(&["drill", "run", "web01", "-o", "json"])?;
    let job: serde_json::Value = serde_json::from_str(&out)?;
    assert!(!ok, "{job:#}");
    let err = text(&job["error"]);
    assert!(
        err.contains(&format!("disk {} block 1:", disk.display())) && err.contains("1 of 3 blocks"),
        "{job:#}"
    );
    assert_eq!(
        job["steps"][1]["status"], "skipped",
        "no test failover of a bad point: {job:#}"
    );
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["last_verified"]["result"], "failed", "{v:#}");
    assert!(
        text(&v["last_verified"]["message"]).contains("block "),
        "{v:#}"
    );

    // The chunk is quarantined and the vm waits for a resync, which ships the block again;
    // then the drill passes.
    assert!(err.contains("1 chunk(s) quarantined"), "{job:#}");
    assert!(!victim.exists(), "the corrupt chunk is still in chunks/");
    let quarantined = t
        .path("mesh/store/quarantine")
        .join(
            victim
                .parent()
                .and_then(|p| p.file_name())
                .unwrap_or_default(),
        )
        .join(victim.file_name().unwrap_or_default());
    assert!(quarantined.exists(), "{} not kept", quarantined.display());
    assert_eq!(v["state"], "resync-pending", "{v:#}");
    let (ok, out, err) = t.cli(&["vm", "resync", "web01", "--wait"])?;
    assert!(ok, "{out}{err}");
    assert!(victim.exists(), "the resync did not ship the block again");
    let job = t.cli_json(&["drill", "run", "web01", "-o", "json"])?;
    ok_job(&job)?;
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["last_verified"]["result"], "succeeded", "{v:#}");
    assert_eq!(v["state"], "protected", "{v:#}");

    // Unknown vm, a vm without a recovery host: refused naming it.
    let (ok, _, err) = t.cli(&["drill", "run", "nope"])?;
    assert!(!ok && err.contains("nope"), "{err}");
    Ok(())
}

/// `vm show VM -o json` once `cond` holds for it (up to 90 s).
async fn vm_when(
    t: &TestMesh,
    vm: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let v = t.cli_json(&["vm", "show", vm, "-o", "json"])?;
        if cond(&v) {
            return Ok(v);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "vm {vm}: {what} never happened: {v:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_drills_run_when_due_and_a_failed_or_overdue_one_warns() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    std::fs::create_dir_all(t.path("disks"))?;
    let mut vms = Vec::new();
    for vm in ["db01", "web01"] {
        let d = t.path(&format!("disks/{vm}.raw"));
        qemu_create(&d, "raw", "", "1M")?;
        qemu_io(&d, "raw", &["write -P 0x33 0 64k"])?;
        vms.push((vm, vec![d]));
    }
    let _primary = t.site_agent("hv01", "site-a", &vms, "[tracker]\n").await?;
    let dr = t
        .recovery_agent(&command_driver(&t.path("hv-dr01"))?)
        .await?;
    for vm in ["db01", "web01"] {
        t.wait_vm(vm).await?;
        t.protect_to_recovery(vm, "5m")?;
    }

    // Refused, saying what is allowed.
    let (ok, _, err) = t.cli(&["drill", "schedule", "web01", "--every", "1s"])?;
    assert!(!ok && err.contains("allowed 5 s to"), "{err}");
    let (ok, _, err) = t.cli(&["drill", "schedule", "nope", "--every", "1h"])?;
    assert!(
        !ok && err.contains("neither a vm nor a recovery plan"),
        "{err}"
    );

    // A plan's drill: each vm in turn, one drill-plan job with a step per vm.
    assert!(
        t.cli(&[
            "plan", "create", "app", "--group", "db01", "--group", "web01"
        ])?
        .0
    );
    let job = t.cli_json(&["drill", "run", "app", "-o", "json"])?;
    ok_job(&job)?;
    assert_eq!(job["kind"], "drill-plan", "{job:#}");
    assert_eq!(job["steps"][1]["name"], "drill web01", "{job:#}");
    let first = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(first["last_verified"]["result"], "succeeded", "{first:#}");

    // Scheduled every 5 s: the service drills it again by itself.
    let d = t.cli_json(&["drill", "schedule", "web01", "--every", "5s", "-o", "json"])?;
    assert_eq!(d["every_seconds"], 5, "{d}");
    assert_eq!(d["vms"][0], "web01", "{d}");
    let (ok, _, err) = t.cli(&["drill", "schedule", "app", "--every", "1h"])?;
    assert!(
        !ok && err.contains("vm web01 is drilled by the schedule of web01"),
        "{err}"
    );
    let before = first["last_verified"]["job"].clone();
    let v = vm_when(&t, "web01", "a scheduled drill", |v| {
        v["last_verified"]["job"] != before && v["last_verified"]["result"] == "succeeded"
    })
    .await?;
    assert_eq!(v["health"], "normal", "{v:#}");
    assert_eq!(v["drill_schedule"]["target"], "web01", "{v:#}");
    let list = t.cli_json(&["drill", "list", "-o", "json"])?;
    let entry = list
        .as_array()
        .and_then(|a| a.iter().find(|d| d["target"] == "web01"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(entry["last_ok"], true, "{list:#}");
    assert_eq!(entry["overdue"], false, "{list:#}");

    // A scheduled drill that fails turns the vm's health to warning, saying why.
    let failing = [
        "drill",
        "schedule",
        "web01",
        "--every",
        "5s",
        "--boot-check",
    ];
    let (ok, _, err) = t.cli(&[&failing[..], &["echo no login prompt >&2"]].concat())?;
    assert!(ok, "{err}");
    let v = vm_when(&t, "web01", "a failed scheduled drill", |v| {
        v["health"] == "warning"
    })
    .await?;
    assert_eq!(v["last_verified"]["result"], "failed", "{v:#}");
    let why = text(&v["last_error"]);
    assert!(
        why.contains("the last scheduled drill failed") && why.contains("no login prompt"),
        "{v:#}"
    );
    let list = t.cli_json(&["drill", "list", "-o", "json"])?;
    assert!(
        text(&list[0]["last_message"]).contains("web01: "),
        "{list:#}"
    );

    // Unscheduled: a failed drill no longer warns.
    let u = t.cli_json(&["drill", "unschedule", "web01", "-o", "json"])?;
    assert_eq!(u["scheduled"], false, "{u}");
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["health"], "normal", "{v:#}");
    assert!(v["drill_schedule"].is_null(), "{v:#}");
    assert_eq!(
        t.cli_json(&["drill", "list", "-o", "json"])?,
        serde_json::json!([])
    );

    // The recovery host is gone: the scheduled drill cannot run, and once it is a whole
    // interval late the vm's health says it is overdue.
    dr.shutdown().await?;
    assert!(t.cli(&["drill", "schedule", "db01", "--every", "5s"])?.0);
    let v = vm_when(&t, "db01", "an overdue drill", |v| v["health"] == "warning").await?;
    assert!(
        text(&v["last_error"]).contains("a drill is overdue by"),
        "{v:#}"
    );
    let list = t.cli_json(&["drill", "list", "-o", "json"])?;
    assert_eq!(list[0]["overdue"], true, "{list:#}");
    Ok(())
}
