//! Standby copies (`[recovery] standby = true`, issue #11's failover time): the recovery host
//! keeps a copy of the VM's disks at its latest point, brought forward point by point; a
//! test failover copies it and a planned failover moves it, and each then writes only what
//! differs. A copy left with dirty blocks (an apply cut short) is repaired by the next
//! refresh: those blocks are written again.
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::*;

/// The recovery host's folder and agent.toml: standby copies, a tracker, a command driver.
async fn standby_host_config(t: &TestMesh) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dr_dir = t.path("hv-dr01");
    let extra = format!(
        "[recovery]\ndir = \"recovered\"\nstandby = true\n[tracker]\n{}",
        command_driver(&dr_dir)?
    );
    let cfg = t
        .site_agent_config("hv-dr01", "site-b", &[], &extra)
        .await?;
    Ok((dr_dir, cfg))
}

async fn wait_recovery_host(t: &TestMesh) -> anyhow::Result<()> {
    let ready = |h: &ferry_proto::registry::v1::Host| h.status == "connected" && h.recovery;
    t.wait_host("hv-dr01", ready, Duration::from_secs(60))
        .await?;
    Ok(())
}

fn standby_dir(dr: &Path) -> PathBuf {
    dr.join("recovered/.standby/web01")
}

/// The standby copy's point once no block of it is dirty (None before).
fn clean_point(dir: &Path) -> anyhow::Result<Option<String>> {
    let Ok(text) = std::fs::read(dir.join("standby.json")) else {
        return Ok(None);
    };
    let s: serde_json::Value = serde_json::from_slice(&text)?;
    let dirty = s["disks"].as_array().is_some_and(|d| {
        d.iter()
            .any(|d| d["dirty"].as_array().is_some_and(|b| !b.is_empty()))
    });
    Ok((!dirty).then(|| text_of(&s["point"]).to_owned()))
}

fn text_of(v: &serde_json::Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Waits until the standby copy holds `point` or a newer one (the VM makes a point every
/// 2 s), clean. Point ids are zero-padded sequence numbers: their order is the text's.
async fn wait_standby(dir: &Path, point: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let have = clean_point(dir)?;
        if have.as_deref().is_some_and(|h| h >= point) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the standby copy holds {have:?}, not point {point} or newer"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `vm show` says the standby copy holds `point` or a newer one (the recovery
/// host reports it with its heartbeat, every 5 s).
async fn wait_shown(t: &TestMesh, point: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
        let shown = text_of(&v["standby_point"]).to_owned();
        if !shown.is_empty() && shown.as_str() >= point {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "vm show says the standby copy holds {shown:?}, not {point} or newer"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The primary's certificate says it keeps web01's copy at a forged point: the registry
/// lists no copy for it to keep and `vm show` keeps the recovery host's point.
async fn forged_standby_report_is_ignored(t: &TestMesh) -> anyhow::Result<()> {
    use ferry_proto::registry::v1::{
        HeartbeatRequest, StandbyCopy, registry_client::RegistryClient,
    };
    let endpoint = t.ctl.cfg.endpoint(ferry_mesh::Component::Registry);
    let ch = ferry_mesh::connect(&endpoint, &host_tls(&t.path("hv01"))?).await?;
    let r = RegistryClient::new(ch)
        .heartbeat(HeartbeatRequest {
            host_name: "hv01".into(),
            // As hv01 really is: tracked, not a recovery host.
            change_tracking: true,
            standby: vec![StandbyCopy {
                vm: "web01".into(),
                point: "forged".into(),
            }],
            ..Default::default()
        })
        .await?
        .into_inner();
    anyhow::ensure!(
        r.standby_vms.is_empty() && r.standby_kept_vms.is_empty(),
        "hv01 was told to keep copies: {r:?}"
    );
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    anyhow::ensure!(
        !text_of(&v["standby_point"]).is_empty() && v["standby_point"] != "forged",
        "{v:#}"
    );
    Ok(())
}

fn latest_point(t: &TestMesh) -> anyhow::Result<String> {
    let points = t.cli_json(&["points", "list", "web01", "-o", "json"])?;
    let last = points.as_array().and_then(|a| a.last()).cloned();
    Ok(last
        .map(|p| text_of(&p["id"]).to_owned())
        .unwrap_or_default())
}

/// The message of the job step that made the disks on the recovery host.
fn made_message(job: &serde_json::Value) -> String {
    job["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| text_of(&s["message"]).to_owned())
        .find(|m| m.contains(" disks in "))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_start_from_a_standby_copy_kept_at_the_latest_point() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let web = t.sample_vhdx()?;
    let hv01 = t.path("hv01");
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()])],
            &format!("[tracker]\n{}", command_driver(&hv01)?),
        )
        .await?;
    let (dr_dir, cfg) = standby_host_config(&t).await?;
    let mut dr = InProcessAgent::start(&cfg)?;
    wait_recovery_host(&t).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "2s")?;
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    let standby = standby_dir(&dr_dir);
    let copy = standby.join("web01.vhdx");

    // The copy is built, then follows the points.
    let first = latest_point(&t)?;
    wait_standby(&standby, &first).await?;
    wait_shown(&t, &first).await?;
    forged_standby_report_is_ignored(&t).await?;
    assert!(qemu_compare(&copy, "vhdx", &web, "vhdx")?, "built copy");
    let before = latest_point(&t)?;
    nbd_write(&uri, &["write -P 0x77 2M 64k", "write -P 0x78 13M 1M"])?;
    // The second point after it was cut after the writes (the first may have been in flight).
    let second = t.points_after("web01", &before, 2).await?;
    wait_standby(&standby, &second).await?;
    assert!(
        qemu_compare(&copy, "vhdx", &web, "vhdx")?,
        "copy brought forward"
    );

    // A test failover copies it and leaves it in place.
    let job = t.cli_json(&["failover", "test", "web01", "-o", "json"])?;
    ok_job(&job)?;
    let said = made_message(&job);
    assert!(said.contains("from the standby copy at point"), "{job:#}");
    let (disk, _) = t.failover_disk("test")?;
    assert!(
        qemu_compare(&disk, "vhdx", &web, "vhdx")?,
        "test failover disk"
    );
    assert!(copy.exists(), "a test failover keeps the standby copy");
    ok_job(&t.cli_json(&["failover", "cleanup", "web01", "-o", "json"])?)?;

    // An apply cut short: a block marked dirty and overwritten behind the copy's back. The
    // next refresh writes it again.
    dr.shutdown().await?;
    let state = standby.join("standby.json");
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(&state)?)?;
    s["disks"][0]["dirty"] = serde_json::json!([5]);
    std::fs::write(&state, serde_json::to_vec(&s)?)?;
    qemu_io(&copy, "vhdx", &["write -P 0xee 5M 1M"])?;
    assert!(!qemu_compare(&copy, "vhdx", &web, "vhdx")?);
    dr = InProcessAgent::start(&cfg)?;
    let now = latest_point(&t)?;
    wait_standby(&standby, &now).await?;
    assert!(
        qemu_compare(&copy, "vhdx", &web, "vhdx")?,
        "dirty block repaired"
    );

    // A planned failover moves it into the VM's folder.
    nbd_write(&uri, &["write -P 0x79 9M 64k"])?;
    let job = t.cli_json(&["failover", "planned", "web01", "--wait", "-o", "json"])?;
    ok_job(&job)?;
    let said = made_message(&job);
    assert!(said.contains("from the standby copy at point"), "{job:#}");
    let (disk, _) = t.failover_disk("planned")?;
    assert!(
        qemu_compare(&disk, "vhdx", &web, "vhdx")?,
        "planned failover disk"
    );
    assert!(!standby.exists(), "a production failover uses the copy up");
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["standby_point"], "", "{v:#}");

    dr.shutdown().await?;
    primary.shutdown().await?;
    Ok(())
}

/// How often the host's log says it built its copy or brought it forward.
fn refreshes(log: &Path) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Ok(text.matches("standby copy brought forward").count()
        + text.matches("standby copy built").count())
}

/// `kill -9` of the recovery host at random moments while the guest writes and the copy
/// follows: after each restart the copy carries on, and once the writes stop it reaches the
/// latest point and equals the primary's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_copy_survives_kill_9_of_its_host_mid_refresh() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let web = t.sample_vhdx()?;
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web.clone()])],
            "[tracker]\n",
        )
        .await?;
    let (dr_dir, cfg) = standby_host_config(&t).await?;
    let log = dr_dir.join("agent.log");
    let mut dr = spawn_agent_process(&cfg, &log)?;
    wait_recovery_host(&t).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "1s")?;
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    let standby = standby_dir(&dr_dir);
    wait_standby(&standby, &latest_point(&t)?).await?;

    // The guest rewrites whole blocks with new patterns while the host is killed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (uri, stop) = (uri.clone(), stop.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let cmd = format!("write -P {} {}k 512k", i % 200 + 1, (i * 2560) % 15872);
                nbd_write(&uri, &[&cmd])?;
                std::thread::sleep(Duration::from_millis(200));
                i += 1;
            }
            Ok(())
        })
    };
    // Each kill comes a varying time after the restarted host brought its copy forward
    // once more, so that some land while the next refresh runs.
    for round in 0..5u64 {
        let seen = refreshes(&log)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while refreshes(&log)? <= seen {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no refresh after a restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(round * 450 % 2000)).await;
        dr.kill()?;
        dr.wait()?;
        dr = spawn_agent_process(&cfg, &log)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await??;
    let before = latest_point(&t)?;
    let last = t.points_after("web01", &before, 2).await?;
    wait_standby(&standby, &last).await?;
    let copy = standby.join("web01.vhdx");
    assert!(
        qemu_compare(&copy, "vhdx", &web, "vhdx")?,
        "the copy differs from the primary's disk after the kills"
    );
    dr.kill()?;
    dr.wait()?;
    eprintln!("standby refreshes: {}", refreshes(&log)?);
    primary.shutdown().await?;
    Ok(())
}
