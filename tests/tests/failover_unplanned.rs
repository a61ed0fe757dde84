//! Unplanned failover (issue #11 scopes 5, 6, 7), through the CLI as an operator types it:
//! with the primary's agent killed, the VM comes up on its recovery host from an older
//! point; change-point moves it to the newest, in place (only the blocks that differ are
//! rewritten, the recovered VM's own writes and their change logs discarded); commit fixes
//! it. The primary restarted later learns it was fenced: its writes are refused and it
//! commits no point any more.
use std::path::Path;
use std::time::Duration;

use ferry_mesh::Component;
use ferry_proto::common::v1::{Consistency, CycleKind};
use ferry_proto::ingest::v1::{BeginCycleRequest, ingest_client::IngestClient};
use ferry_tests::*;
use tonic::Code;

/// `ferry ARGS` fails with FAILED_PRECONDITION saying `words`.
fn refused(t: &TestMesh, args: &[&str], words: &[&str]) -> anyhow::Result<()> {
    let (ok, out, err) = t.cli(args)?;
    anyhow::ensure!(!ok, "ferry {args:?} must fail: {out}");
    for w in words.iter().chain(&["FailedPrecondition"]) {
        anyhow::ensure!(err.contains(w), "ferry {args:?}: {w:?} not in {err}");
    }
    Ok(())
}

fn recorder(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("record.sh"),
        "#!/bin/sh\necho \"call=$1 vm=$FERRY_VM network=$FERRY_NETWORK disks=$FERRY_DISKS\" >> calls.log\n",
    )?;
    Ok("[driver]\nkind = \"command\"\nstart = \"sh ./record.sh start\"\nstop = \"sh ./record.sh stop\"\n".into())
}

/// The recovered disk of the VM's current failover, as `ferry failover list` gives it.
fn recovered_disk(t: &TestMesh) -> anyhow::Result<(serde_json::Value, std::path::PathBuf)> {
    let list = t.cli_json(&["failover", "list", "-o", "json"])?;
    let f = list
        .as_array()
        .and_then(|l| l.iter().rev().find(|f| f["kind"] == "unplanned"))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no unplanned failover in {list}"))?;
    let path = f["disks"][0]["path"].as_str().unwrap_or_default().into();
    Ok((f, path))
}

/// Write records in the change logs next to `disk` on the recovery host.
fn log_records(disk: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for (_, log) in ferry_agent::tracker::list_logs(disk)? {
        n += ferry_disk::hrl::HrlLog::open(&log)?.records.len();
    }
    Ok(n)
}

/// "… N of M bytes rewritten", the change-point step's message: (N, M).
fn rewritten(message: &str) -> anyhow::Result<(u64, u64)> {
    let tail = message.rsplit("; ").next().unwrap_or_default();
    let words: Vec<&str> = tail.split_whitespace().collect();
    match words[..] {
        [n, "of", m, "bytes", "rewritten"] => Ok((n.parse()?, m.parse()?)),
        _ => anyhow::bail!("no \"N of M bytes rewritten\" in {message:?}"),
    }
}

/// Bytes of the `bs`-byte blocks that `len` bytes at `off` touch.
fn blocks_bytes(off: u64, len: u64, bs: u64) -> u64 {
    ((off + len).div_ceil(bs) - off / bs) * bs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplanned_failover_change_point_commit_and_the_fenced_primary() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.raw");
    qemu_create(&web, "raw", "", "8M")?;
    // Several blocks of data, so that materialising a point whole writes more than the
    // blocks a change of point finds different.
    qemu_io(&web, "raw", &["write -P 0x5a 0 4M"])?;
    // The disk at the first point, and after the write the later points hold.
    let at_first = disks.join("first.raw");
    std::fs::copy(&web, &at_first)?;
    let at_last = disks.join("last.raw");
    std::fs::copy(&web, &at_last)?;
    qemu_io(&at_last, "raw", &["write -P 0x42 2M 64k"])?;

    let primary_dir = t.path("hv01");
    let cfg = t
        .agent_config_tracked(&primary_dir, "hv01", &[("web01", vec![web.clone()])])
        .await?;
    let log = primary_dir.join("agent.log");
    let mut primary = spawn_agent_process(&cfg, &log)?;
    let dr_dir = t.path("hv-dr01");
    let dr = t.recovery_agent(&recorder(&dr_dir)?).await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "2s")?;
    let first = t.points("web01").await?[0].id.clone();
    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    nbd_write(&uri, &["write -P 0x42 2M 64k"])?;
    let n = t.points("web01").await?.len();
    t.wait_points("web01", n + 2, Duration::from_secs(60))
        .await?;
    primary.kill()?;
    primary.wait()?;
    // A planned failover needs its source.
    let gone = |h: &ferry_proto::registry::v1::Host| h.status == "disconnected";
    t.wait_host("hv01", gone, Duration::from_secs(60)).await?;
    refused(
        &t,
        &["failover", "planned", "web01"],
        &["hv01", "disconnected"],
    )?;

    // Unplanned, to the first point, with the primary gone.
    let job = t.cli_json(&[
        "failover",
        "unplanned",
        "web01",
        "--point",
        &first,
        "--wait",
        "-o",
        "json",
    ])?;
    anyhow::ensure!(job["status"] == "succeeded", "{job}");
    let (f, recovered) = recovered_disk(&t)?;
    assert_eq!(f["state"], "active", "{f}");
    assert_eq!(f["host"], "hv-dr01", "{f}");
    assert_eq!(f["point_id"], first.as_str(), "{f}");
    assert!(
        qemu_compare(&at_first, "raw", &recovered, "raw")?,
        "not the first point"
    );
    let calls = std::fs::read_to_string(dr_dir.join("calls.log"))?;
    assert!(
        calls.contains("call=start vm=web01 network=production"),
        "{calls}"
    );
    // The recovered VM writes on the first point, through the recovery host's tracker.
    let dr_uri = f["disks"][0]["nbd_uri"].as_str().unwrap_or_default();
    nbd_write(dr_uri, &["write -P 0x99 5M 4k"])?;
    anyhow::ensure!(
        log_records(&recovered)? > 0,
        "the recovered vm's write is in no log"
    );
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["state"], "failed-over", "{v}");
    assert_eq!(v["active_host"], "hv-dr01", "{v}");
    refused(
        &t,
        &["failover", "test", "web01"],
        &["failed-over", "test-failover"],
    )?;
    refused(
        &t,
        &["failover", "unplanned", "web01", "--point", "latest"],
        &["failed-over"],
    )?;

    // Change point to the newest: the disk is that point's.
    let job = t.cli_json(&[
        "failover",
        "change-point",
        "web01",
        "--point",
        "latest",
        "-o",
        "json",
    ])?;
    anyhow::ensure!(job["status"] == "succeeded", "{job}");
    let (f, recovered) = recovered_disk(&t)?;
    let latest = t.points("web01").await?.last().cloned();
    let latest = latest.ok_or_else(|| anyhow::anyhow!("no point"))?;
    assert_eq!(f["point_id"], latest.id.as_str(), "{f}");
    // Equal to the point: the block written after the first point, and the recovered VM's
    // write zeroed again.
    assert!(
        qemu_compare(&at_last, "raw", &recovered, "raw")?,
        "not the latest point"
    );
    // Only those two blocks were rewritten, of the whole disk.
    let bs = u64::from(latest.disks[0].block_size);
    let step = &job["steps"][1];
    let (bytes, size) = rewritten(step["message"].as_str().unwrap_or_default())?;
    println!("change point: {bytes} of {size} bytes rewritten (block size {bs})");
    assert_eq!(size, 8 << 20, "{step}");
    let differ = blocks_bytes(2 << 20, 64 << 10, bs) + blocks_bytes(5 << 20, 4 << 10, bs);
    assert_eq!(bytes, differ, "{step}");
    let whole = latest.disks[0].stored_blocks * bs;
    assert!(
        bytes < whole && whole < size,
        "{step}: the point holds {whole} bytes"
    );
    // The VM was stopped and started again; its writes on the first point left no log that
    // could later ship on top of the new one.
    let calls = std::fs::read_to_string(dr_dir.join("calls.log"))?;
    assert!(calls.contains("call=stop vm=web01"), "{calls}");
    assert_eq!(calls.matches("call=start vm=web01").count(), 2, "{calls}");
    assert_eq!(
        log_records(&recovered)?,
        0,
        "a log of the first point survived"
    );
    let job = t.cli_json(&["failover", "commit", "web01", "-o", "json"])?;
    anyhow::ensure!(job["status"] == "succeeded", "{job}");
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["state"], "failover-committed", "{v}");
    refused(
        &t,
        &["failover", "change-point", "web01", "--point", &first],
        &["failover-committed"],
    )?;
    refused(
        &t,
        &["failover", "commit", "web01"],
        &["failover-committed"],
    )?;

    // The primary comes back: it fences itself, and nothing it does becomes a point.
    let points = t.points("web01").await?.len();
    let mut primary = spawn_agent_process(&cfg, &log)?;
    wait_fenced(&uri).await?;
    refused_cycle(&t, &primary_dir).await?;
    assert_eq!(
        t.points("web01").await?.len(),
        points,
        "a point after the failover"
    );

    primary.kill()?;
    primary.wait()?;
    dr.shutdown().await?;
    t.stop().await;
    Ok(())
}

/// Waits until a write through the primary's export is refused (the agent learned from its
/// heartbeat that the VM failed over).
async fn wait_fenced(uri: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // qemu-io says why a write failed on stdout, and exits 1.
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x77 0 64k", uri])
            .output()?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if said.contains("Operation not permitted") {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the primary still takes writes: {said}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The primary's own certificate may not begin a cycle of the VM any more.
async fn refused_cycle(t: &TestMesh, dir: &Path) -> anyhow::Result<()> {
    let vm = t.vm("web01").await?;
    let ch = ferry_mesh::connect(&t.ctl.cfg.endpoint(Component::Ingest), &host_tls(dir)?).await?;
    let err = IngestClient::new(ch)
        .begin_cycle(BeginCycleRequest {
            vm: "web01".into(),
            host_name: "hv01".into(),
            kind: CycleKind::Delta as i32,
            disks: vm.disks.clone(),
            consistency: Consistency::Crash as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("fenced"), "{err:?}");
    Ok(())
}
