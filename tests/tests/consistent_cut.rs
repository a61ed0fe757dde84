//! Consistent cuts across hosts (issue #13, scope 2): VM a on hv01 and VM b on hv02 are the
//! two VMs of a consistent plan. A writer stamps a counter into them in turn — a, then b, each
//! write acknowledged through the tracker's NBD export before the next — while both replicate
//! every second. Every `--point latest-common` the plan fails over to must satisfy
//! b ≤ a ≤ b + 1: the two points are one instant of both VMs. And a host can neither join
//! another host's cut nor label a point with a cut that did not go ahead.
//!
//! The counter is the number of leading 512-byte sectors holding the stamp: write n fills
//! sector n - 1.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferry_mesh::Component;
use ferry_proto::ingest::v1::{BeginCycleRequest, ingest_client::IngestClient};
use ferry_proto::scheduler::v1::{JoinCutRequest, scheduler_client::SchedulerClient};
use ferry_tests::*;

const STAMP: u8 = 0x5a;
const SECTOR: usize = 512;
/// 4 MiB disks: room for 8192 stamps, more than the test writes.
const SECTORS: u64 = 8192;

/// The counter a disk image holds: its leading stamped sectors.
fn counter(path: &Path) -> anyhow::Result<u64> {
    let bytes = std::fs::read(path)?;
    let n = bytes
        .chunks(SECTOR)
        .take_while(|s| s.iter().all(|b| *b == STAMP))
        .count();
    Ok(n as u64)
}

/// Stamps a, then b, in turn (each write acknowledged before the next) until `stop`.
fn writer(uris: [String; 2], stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) -> anyhow::Result<()> {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n + 1 < SECTORS {
        for uri in &uris {
            let cmd = format!("write -P {STAMP} {} {SECTOR}", n * SECTOR as u64);
            nbd_write(uri, &[&cmd])?;
        }
        n += 1;
        rounds.store(n, Ordering::Relaxed);
    }
    Ok(())
}

/// The cut ids every one of `vms` has a point of.
fn common_cuts(t: &TestMesh, vms: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut sets = Vec::new();
    for vm in vms {
        let points = t.cli_json(&["points", "list", vm, "-o", "json"])?;
        let cuts: std::collections::BTreeSet<String> = points
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["cut_id"].as_str().filter(|c| !c.is_empty()))
            .map(str::to_owned)
            .collect();
        sets.push(cuts);
    }
    let first = sets.first().cloned().unwrap_or_default();
    Ok(first
        .into_iter()
        .filter(|c| sets.iter().all(|s| s.contains(c)))
        .collect())
}

/// When cut `id` (`<group>-<ms>-<tag>`) was queued, in ms since the epoch (0 if unreadable).
fn queued_ms(id: &str) -> i64 {
    id.rsplit('-')
        .nth(1)
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

/// The test copy of `vm` a test failover made: its disk and the point it came from.
fn test_copy(t: &TestMesh, vm: &str) -> anyhow::Result<(std::path::PathBuf, String)> {
    let list = t.cli_json(&["failover", "list", "-o", "json"])?;
    let f = list
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|f| f["vm"] == vm && f["kind"] == "test" && f["state"] == "active")
        })
        .ok_or_else(|| anyhow::anyhow!("no active test failover of {vm}: {list:#}"))?;
    Ok((
        f["disks"][0]["path"].as_str().unwrap_or_default().into(),
        f["point_id"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// The cut id of `vm`'s point `id`.
fn cut_of(t: &TestMesh, vm: &str, id: &str) -> anyhow::Result<String> {
    let points = t.cli_json(&["points", "list", vm, "-o", "json"])?;
    Ok(points
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == id)
        .and_then(|p| p["cut_id"].as_str())
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_common_points_are_one_instant_of_both_vms() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let (da, db) = (disks.join("a.raw"), disks.join("b.raw"));
    qemu_create(&da, "raw", "", "4M")?;
    qemu_create(&db, "raw", "", "4M")?;
    let _hv01 = t
        .site_agent("hv01", "site-a", &[("a", vec![da])], "[tracker]\n")
        .await?;
    let _hv02 = t
        .site_agent("hv02", "site-a", &[("b", vec![db])], "[tracker]\n")
        .await?;
    let dr_dir = t.path("hv-dr01");
    let _dr = t.recovery_agent(&command_driver(&dr_dir)?).await?;
    for vm in ["a", "b"] {
        t.wait_vm(vm).await?;
        t.protect_to_recovery(vm, "1s")?;
    }

    // Without a group no cut is common: latest-common is refused, saying why.
    let plain = t.cli(&["plan", "create", "loose", "--group", "a,b"])?;
    assert!(plain.0, "{plain:?}");
    let (ok, _, err) = t.cli(&[
        "plan",
        "failover",
        "loose",
        "--mode",
        "test",
        "--point",
        "latest-common",
        "--wait",
    ])?;
    assert!(!ok && err.contains("not consistent"), "{err}");
    assert!(t.cli(&["plan", "delete", "loose"])?.0);

    let created = t.cli_json(&[
        "plan",
        "create",
        "app",
        "--group",
        "a",
        "--group",
        "b",
        "--consistent",
        "-o",
        "json",
    ])?;
    assert_eq!(created["consistent"], true, "{created}");
    for vm in ["a", "b"] {
        let v = t.cli_json(&["vm", "show", vm, "-o", "json"])?;
        assert_eq!(v["policy"]["replication_group"], "app", "{v}");
    }

    let uris = [
        t.vm("a").await?.disks[0].nbd_uri.clone(),
        t.vm("b").await?.disks[0].nbd_uri.clone(),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let w = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        tokio::task::spawn_blocking(move || writer(uris, stop, rounds))
    };

    let mut seen = Vec::new();
    for round in 0..3 {
        // Wait for a common cut queued after this round's first write was acknowledged. A
        // cut queued before the writer's first write (its points may commit later) would
        // hold a = 0, and the last round's would repeat; the id carries its queue time.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let before = rounds.load(Ordering::Relaxed);
        while rounds.load(Ordering::Relaxed) <= before {
            anyhow::ensure!(!w.is_finished(), "the writer stopped: {:?}", w.await);
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the writer is stuck"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let written_ms = ferry_proto::now_ms();
        loop {
            let cuts = common_cuts(&t, &["a", "b"])?;
            if rounds.load(Ordering::Relaxed) > before + 5
                && cuts.iter().any(|c| queued_ms(c) > written_ms)
            {
                break;
            }
            anyhow::ensure!(!w.is_finished(), "the writer stopped: {:?}", w.await);
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no new common cut of a and b: {cuts:?}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let job = t.cli_json(&[
            "plan",
            "failover",
            "app",
            "--mode",
            "test",
            "--point",
            "latest-common",
            "--wait",
            "-o",
            "json",
        ])?;
        ok_job(&job)?;
        let (pa, ida) = test_copy(&t, "a")?;
        let (pb, idb) = test_copy(&t, "b")?;
        let (cut_a, cut_b) = (cut_of(&t, "a", &ida)?, cut_of(&t, "b", &idb)?);
        assert!(
            !cut_a.is_empty() && cut_a == cut_b,
            "round {round}: {cut_a} vs {cut_b}"
        );
        let (a, b) = (counter(&pa)?, counter(&pb)?);
        assert!(
            b <= a && a <= b + 1,
            "round {round}: cut {cut_a} holds a={a} b={b}: not one instant of both vms"
        );
        assert!(a > 0, "round {round}: cut {cut_a} holds no write yet");
        assert!(!seen.contains(&cut_a), "round {round}: cut {cut_a} again");
        seen.push(cut_a);
        eprintln!("round {round}: a={a} b={b}");
        ok_job(&t.cli_json(&["plan", "cleanup", "app", "--wait", "-o", "json"])?)?;
    }
    stop.store(true, Ordering::Relaxed);
    w.await??;
    assert!(rounds.load(Ordering::Relaxed) > 0);

    // Adversaries: hv02 joins a's cut; hv01 labels a cycle with a cut that never went ahead.
    let cfg = &t.ctl.cfg;
    let hv02 = host_tls(&t.path("hv02"))?;
    let mut sched = SchedulerClient::new(
        ferry_mesh::connect(&cfg.endpoint(Component::Scheduler), &hv02).await?,
    );
    let err = sched
        .join_cut(JoinCutRequest {
            cut_id: seen[0].clone(),
            vm: "a".into(),
            host_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("hv02") && err.message().contains("vm a"),
        "{err:?}"
    );
    let hv01 = host_tls(&t.path("hv01"))?;
    let mut ingest =
        IngestClient::new(ferry_mesh::connect(&cfg.endpoint(Component::Ingest), &hv01).await?);
    let a = t.vm("a").await?;
    let err = ingest
        .begin_cycle(BeginCycleRequest {
            vm: "a".into(),
            host_name: "hv01".into(),
            kind: ferry_proto::common::v1::CycleKind::Delta as i32,
            disks: a.disks.clone(),
            job_id: String::new(),
            consistency: ferry_proto::common::v1::Consistency::Crash as i32,
            cut_id: "app-forged".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("app-forged"), "{err:?}");

    // Deleting the plan takes its vms out of the group.
    assert!(t.cli(&["plan", "delete", "app"])?.0);
    let v = t.cli_json(&["vm", "show", "a", "-o", "json"])?;
    assert_eq!(v["policy"]["replication_group"], "", "{v}");
    Ok(())
}
