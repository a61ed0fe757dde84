//! Instant recovery (issue #13 scope 3): `--instant` serves each disk on the recovery host at
//! once, fetching blocks that are not local yet from the store on demand and copying the rest
//! in the background (here held to 1 MiB/s, so the copy of a few MiB is still running when
//! the checks look). Reads during the copy equal the point (`qemu-img compare` through the
//! NBD export), writes during the copy survive it and reach the next point after re-protect,
//! and a `kill -9` of the agent mid-copy resumes the copy where it was.
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_agent::tracker::fill_file;
use ferry_tests::*;

const MIB: u64 = 1 << 20;

/// A 16 MiB VHDX with data in 9 of its 16 vault blocks; and a copy of it as protected.
fn source_disk(t: &TestMesh) -> anyhow::Result<(PathBuf, PathBuf)> {
    let web = t.sample_vhdx()?;
    let original = web.with_file_name("web01.orig.vhdx");
    std::fs::copy(&web, &original)?;
    Ok((web, original))
}

/// The recovery host's config: tracked, a command driver, the copy held to 1 MiB/s.
fn recovery_extra(dir: &Path) -> anyhow::Result<String> {
    Ok(format!(
        "[recovery]\ndir = \"recovered\"\ninstant_copy_mib_per_s = 1\n[tracker]\n{}",
        command_driver(dir)?
    ))
}

/// Blocks local and in all of a disk still being filled (None once it is an ordinary file).
fn fill_progress(disk: &Path) -> anyhow::Result<Option<(usize, usize)>> {
    if !fill_file::pending(disk) {
        return Ok(None);
    }
    let plan = fill_file::read_map(disk)?;
    let bits = fill_file::read_state(disk, plan.blocks.len())?;
    let local = bits.iter().map(|w| w.count_ones() as usize).sum();
    Ok(Some((local, plan.blocks.len())))
}

async fn wait_copied(disk: &Path) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while fill_file::pending(disk) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the instant copy of {} never ended: {:?}",
            disk.display(),
            fill_progress(disk)?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A log without its colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

fn nbd(uri: &str) -> PathBuf {
    PathBuf::from(uri)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_test_failover_reads_the_point_during_the_copy_and_resumes_after_kill_9()
-> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let (web, original) = source_disk(&t)?;
    let primary = t
        .site_agent("hv01", "site-a", &[("web01", vec![web])], "[tracker]\n")
        .await?;
    let dr_dir = t.path("hv-dr01");
    let cfg = t
        .site_agent_config("hv-dr01", "site-b", &[], &recovery_extra(&dr_dir)?)
        .await?;
    let log = dr_dir.join("agent.log");
    let mut dr = spawn_agent_process(&cfg, &log)?;
    let ready = |h: &ferry_proto::registry::v1::Host| h.status == "connected" && h.recovery;
    t.wait_host("hv-dr01", ready, Duration::from_secs(60))
        .await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "1h")?;

    // Refused where it cannot work: into a folder of the failover service's machine.
    let out = t.path("tf");
    let target = out.to_string_lossy();
    let (ok, _, err) = t.cli(&[
        "failover",
        "test",
        "web01",
        "--instant",
        "--target",
        &target,
    ])?;
    assert!(
        !ok && err.contains("instant") && err.contains("--target"),
        "{err}"
    );

    let job = t.cli_json(&["failover", "test", "web01", "--instant", "-o", "json"])?;
    ok_job(&job)?;
    let list = t.cli_json(&["failover", "list", "-o", "json"])?;
    assert_eq!(list[0]["instant"], true, "{list}");
    let (disk, uri) = t.failover_disk("test")?;
    let calls = std::fs::read_to_string(dr_dir.join("calls.log"))?;
    assert!(
        calls.contains("call=start vm=web01 network=test"),
        "{calls}"
    );
    let (local, all) = fill_progress(&disk)?.expect("the copy runs after the job");
    assert!(all == 9 && local < all, "{local} of {all} blocks local");

    // Read through the export while the copy runs: the point, every byte.
    assert!(
        qemu_compare(&nbd(&uri), "raw", &original, "vhdx")?,
        "the instant disk read differs from the point"
    );
    wait_copied(&disk).await?;
    assert!(qemu_compare(&nbd(&uri), "raw", &original, "vhdx")?);
    ok_job(&t.cli_json(&["failover", "cleanup", "web01", "-o", "json"])?)?;
    assert!(!dr_dir.join("recovered/web01").exists());

    // Again, and the agent is killed mid-copy: started again, it goes on from where it was.
    ok_job(&t.cli_json(&["failover", "test", "web01", "--instant", "-o", "json"])?)?;
    let (disk, uri) = t.failover_disk("test")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let before = loop {
        match fill_progress(&disk)? {
            Some((local, all)) if local >= 2 && local < all => break local,
            Some(_) if tokio::time::Instant::now() < deadline => {}
            p => anyhow::bail!("the copy was not seen mid-way: {p:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    dr.kill()?;
    dr.wait()?;
    let (left, all) = fill_progress(&disk)?.expect("killed mid-copy");
    assert!(left >= before && left < all, "{left} of {all}");
    let mark = std::fs::read_to_string(&log)?.len();
    let mut dr = spawn_agent_process(&cfg, &log)?;
    wait_copied(&disk).await?;
    let after = plain(&std::fs::read_to_string(&log)?.split_off(mark));
    let resumed = after
        .lines()
        .find(|l| l.contains("instant copy running"))
        .unwrap_or_default();
    assert!(
        resumed.contains(&format!("blocks_local={left}")),
        "the copy did not resume where it was ({left} local): {after}"
    );
    let done = after
        .lines()
        .find(|l| l.contains("instant copy done"))
        .unwrap_or_default();
    assert!(
        done.contains(&format!("fetched={}", all - left)),
        "only the {} missing blocks are fetched after the restart: {after}",
        all - left
    );
    // Served again after the restart, an ordinary file now, and still the point.
    assert!(qemu_compare(&nbd(&uri), "raw", &original, "vhdx")?);
    ok_job(&t.cli_json(&["failover", "cleanup", "web01", "-o", "json"])?)?;

    dr.kill()?;
    dr.wait()?;
    primary.shutdown().await?;
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_an_instant_copy_survive_it_and_reach_the_point_after_reprotect()
-> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let (web, original) = source_disk(&t)?;
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[("web01", vec![web])],
            &format!("[tracker]\n{}", command_driver(&t.path("hv01"))?),
        )
        .await?;
    let dr_dir = t.path("hv-dr01");
    let dr = t
        .site_agent("hv-dr01", "site-b", &[], &recovery_extra(&dr_dir)?)
        .await?;
    let ready = |h: &ferry_proto::registry::v1::Host| h.status == "connected" && h.recovery;
    t.wait_host("hv-dr01", ready, Duration::from_secs(60))
        .await?;
    t.wait_vm("web01").await?;
    t.protect_to_recovery("web01", "2s")?;

    let job = t.cli_json(&[
        "failover",
        "unplanned",
        "web01",
        "--point",
        "latest",
        "--instant",
        "-o",
        "json",
    ])?;
    ok_job(&job)?;
    let (disk, uri) = t.failover_disk("unplanned")?;
    assert!(
        fill_progress(&disk)?.is_some(),
        "the copy runs after the job"
    );
    // A change of point waits for the copy: refused, saying so, and the vm runs on.
    let (ok, out, err) = t.cli(&[
        "failover",
        "change-point",
        "web01",
        "--point",
        "latest",
        "-o",
        "json",
    ])?;
    assert!(
        !ok && out.contains("still being copied") && out.contains("blocks local"),
        "{out}{err}"
    );
    // Into a block of the point not copied yet (part of it), one of zeros, and a trim.
    let writes = [
        "write -P 0x77 9M 64k",
        "write -P 0x78 14M 64k",
        "write -z 2M 128k",
    ];
    nbd_write(&uri, &writes)?;
    let expected = t.path("disks/expected.vhdx");
    std::fs::copy(&original, &expected)?;
    qemu_io(&expected, "vhdx", &writes)?;
    assert!(fill_progress(&disk)?.is_some(), "the copy ended too soon");
    assert!(
        qemu_compare(&nbd(&uri), "raw", &expected, "vhdx")?,
        "the point plus the writes, read during the copy"
    );
    wait_copied(&disk).await?;
    assert!(
        qemu_compare(&nbd(&uri), "raw", &expected, "vhdx")?,
        "the copy overwrote a write"
    );

    // Commit and re-protect: the first reverse point carries the writes, and only them.
    ok_job(&t.cli_json(&["failover", "commit", "web01", "-o", "json"])?)?;
    ok_job(&t.cli_json(&["vm", "reprotect", "web01", "-o", "json"])?)?;
    let v = t.cli_json(&["vm", "show", "web01", "-o", "json"])?;
    assert_eq!(v["host"], "hv-dr01", "{v}");
    let shipped = v["last_cycle_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        shipped > 0 && shipped < 4 * MIB,
        "the first reverse point shipped {shipped} bytes: {v}"
    );
    let out = t.path("point");
    let target = out.to_string_lossy().to_string();
    ok_job(&t.cli_json(&[
        "failover", "test", "web01", "--target", &target, "-o", "json",
    ])?)?;
    let exported = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "vhdx"))
        .expect("the exported disk");
    assert!(
        qemu_compare(&exported, "vhdx", &expected, "vhdx")?,
        "the point after re-protect lacks the writes made during the copy"
    );

    for a in [primary, dr] {
        a.shutdown().await?;
    }
    t.stop().await;
    Ok(())
}
