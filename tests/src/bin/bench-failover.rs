//! Benchmark (not a test): failover of a 2 GiB raw image of realistic content (as
//! bench-replicate makes it) to a recovery host on this machine, through the CLI as an
//! operator types it, against `restic restore` of the same image from a local repository in
//! the same run. Ends with one `key=value` line.
//!
//! The whole mesh runs in this process (real redis-server, local-filesystem store, real QUIC)
//! with two in-process agents: `hv01` holds the VM (tracked), `hv-dr01` has a `[recovery]`
//! folder and a command driver whose start command records the time it was called. The VM is
//! protected with `--recovery-host hv-dr01 --wait` (not timed); then the failover command runs:
//!
//! * `rto_s`: from just before the command is issued to the time the driver's start command
//!   recorded (`date +%s.%N`, both clocks this machine's wall clock);
//! * `materialise_s`: from the start of the job's materialise step (the failover service
//!   dispatching the recovery work to hv-dr01) to that start call; `rto_s` when the job has no
//!   such step (`basis=` on the human line says which);
//! * `mb_per_s`: the image's virtual size in MB (10^6 bytes) / `materialise_s`;
//! * `restic_restore_s`: `restic restore latest --target DIR` of the same image (the backup
//!   into the repository is not timed); `speedup_vs_restic_restore = restic_restore_s / rto_s`.
//!
//! Page caches are dropped (best effort, needs root) before the failover and before the
//! restore. The recovered disk (and restic's restored file) must equal the image
//! (`qemu-img compare`), or the benchmark fails.
//!
//!   bench-failover [--size-mib N] [--mode test|planned] [--standby] [--dir DIR]
//!
//! `--standby` (or `STANDBY=1`): the recovery host keeps a standby copy (`[recovery]
//! standby = true`); the failover starts once it holds the latest point (waiting for it is
//! not timed), so a test failover copies it and a planned failover moves it.
//!
//! `SIZE_MIB` and `FAILOVER_MODE` (environment) set the same as the flags; the mode `test`
//! (default) runs `ferry failover test VM`, `planned` runs `ferry failover planned VM --wait`.
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ferry_tests::bench::{
    drop_caches, ferry_bin, make_image, path_str, read_unix_time, secs_between,
    stamped_recovery_agent_with, timed,
};
use ferry_tests::{TestMesh, qemu_compare};

const VM: &str = "bench";
const PRIMARY: &str = "hv01";
const RECOVERY: &str = "hv-dr01";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut size_mib: u64 = match std::env::var("SIZE_MIB") {
        Ok(s) if !s.is_empty() => s.parse().context("SIZE_MIB")?,
        _ => 2048,
    };
    let mut mode = std::env::var("FAILOVER_MODE")
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "test".into());
    let mut dir: Option<PathBuf> = None;
    let mut standby = std::env::var("STANDBY").is_ok_and(|s| s == "1");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().context("--size-mib N")?.parse()?,
            "--mode" => mode = args.next().context("--mode test|planned")?,
            "--dir" => dir = Some(args.next().context("--dir DIR")?.into()),
            "--standby" => standby = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let failover_args: Vec<&str> = match mode.as_str() {
        "test" => vec!["failover", "test", VM, "-o", "json"],
        "planned" => vec!["failover", "planned", VM, "--wait", "-o", "json"],
        other => anyhow::bail!("FAILOVER_MODE {other:?} is neither test nor planned"),
    };
    let ferry = ferry_bin()?;

    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let image = std::path::absolute(tmp.path().join(format!("{VM}.raw")))?;
    let size = size_mib << 20;
    let data = make_image(&image, size)?;
    eprintln!("image: {size_mib} MiB virtual, {} MiB data", data >> 20);

    // Ferry: the whole mesh in this process, a primary and a recovery host.
    let t = TestMesh::start().await?;
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::new(&ferry);
        c.arg("--config").arg(&t.mesh.config_path).args(args);
        c
    };
    // The primary's driver has nothing to stop (a planned failover stops the VM through it).
    let primary_extra =
        "[tracker]\n[driver]\nkind = \"command\"\nstart = \"true\"\nstop = \"true\"\n";
    let primary = t
        .site_agent(
            PRIMARY,
            "site-a",
            &[(VM, vec![image.clone()])],
            primary_extra,
        )
        .await?;
    let started = t.path(RECOVERY).join("started");
    let recovery = if standby { "standby = true\n" } else { "" };
    let dr = stamped_recovery_agent_with(&t, RECOVERY, &started, recovery).await?;
    t.wait_vm(VM).await?;

    // Initial replication, not timed.
    let protect = [
        "vm",
        "protect",
        VM,
        "--frequency",
        "1h",
        "--recovery-host",
        RECOVERY,
        "--wait",
    ];
    let out = cli(&protect).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "ferry vm protect: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    if standby {
        wait_standby(&t).await?;
    }

    // The failover, from the command to the driver's start call.
    drop_caches();
    let t0 = SystemTime::now();
    let out = cli(&failover_args).output().await?;
    let cmd_s = t0.elapsed()?.as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "ferry {}: {stdout}{}",
        failover_args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let start_call = read_unix_time(&started)
        .with_context(|| format!("the driver's start command left no time in {started:?}"))?;
    let rto_s = secs_between(t0, start_call);
    let job: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| format!("job JSON: {stdout}"))?;
    let job_id = job["id"].as_str().context("the job has no id")?;
    let job = t.job(job_id).await?;
    let (materialise_s, basis) = match job
        .steps
        .iter()
        .find(|s| s.name.starts_with("materialise") && s.started_at_ms > 0)
    {
        Some(s) => {
            let from = UNIX_EPOCH + Duration::from_millis(s.started_at_ms as u64);
            (
                secs_between(from, start_call),
                format!("job step {:?} start → driver start call", s.name),
            )
        }
        None => (rto_s, "rto_s (the job has no materialise step)".into()),
    };

    // Where the disk landed.
    let out = cli(&["failover", "list", "-o", "json"]).output().await?;
    anyhow::ensure!(
        out.status.success(),
        "ferry failover list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rec = list
        .as_array()
        .and_then(|l| l.iter().find(|f| f["vm"] == VM))
        .with_context(|| format!("no failover of {VM} listed: {list}"))?;
    let disk = &rec["disks"][0];
    let recovered = PathBuf::from(disk["path"].as_str().context("no recovered disk path")?);
    let format = disk["format"]
        .as_str()
        .filter(|f| !f.is_empty())
        .unwrap_or("raw")
        .to_owned();
    anyhow::ensure!(
        rec["host"] == RECOVERY,
        "the failover ran on {}, not {RECOVERY}",
        rec["host"]
    );
    for a in [primary, dr] {
        a.shutdown().await?;
    }
    // Before the mesh stops: its temporary folder holds the recovery host's.
    let same = {
        let (image, recovered) = (image.clone(), recovered.clone());
        tokio::task::spawn_blocking(move || qemu_compare(&image, "raw", &recovered, &format))
            .await??
    };
    t.stop().await;
    anyhow::ensure!(
        same,
        "recovered disk {} differs from the image",
        recovered.display()
    );

    // restic restore of the same image from a local repository (backup not timed).
    let restic = |args: &[&str]| ferry_tests::bench::restic(tmp.path(), args);
    timed(restic(&["init", "-q"]).arg("--repository-version").arg("2"))?;
    timed(restic(&["backup", "-q"]).arg(&image))?;
    let target = tmp.path().join("restic-restore");
    drop_caches();
    let (restic_s, restic_cpu) = timed(&mut restic(&[
        "restore",
        "-q",
        "latest",
        "--target",
        path_str(&target)?,
    ]))?;
    let restored = target.join(image.strip_prefix("/").unwrap_or(&image));
    anyhow::ensure!(
        qemu_compare(&image, "raw", &restored, "raw")?,
        "restic's restored file {} differs from the image",
        restored.display()
    );

    let mb = size as f64 / 1e6;
    println!(
        "ferry failover {mode}: rto {rto_s:.2} s (command returned after {cmd_s:.2} s), \
         materialise {materialise_s:.2} s = {:.0} MB/s (MB = 10^6 bytes of virtual size; basis: {basis})",
        mb / materialise_s
    );
    println!(
        "restic restore: {restic_s:.2} s, {:.0} MB/s, cpu {restic_cpu:.1} s",
        mb / restic_s
    );
    println!(
        "mode={mode} standby={standby} size_mib={size_mib} rto_s={rto_s:.2} mb_per_s={:.1} materialise_s={materialise_s:.2} restic_restore_s={restic_s:.2} speedup_vs_restic_restore={:.2}",
        mb / materialise_s,
        restic_s / rto_s
    );
    Ok(())
}

/// Waits (not timed) until the recovery host's standby copy holds the latest point, as it
/// does between cycles in a deployment that keeps one.
async fn wait_standby(t: &TestMesh) -> anyhow::Result<()> {
    let state = t
        .path(RECOVERY)
        .join("recovered/.standby")
        .join(VM)
        .join("standby.json");
    let began = std::time::Instant::now();
    loop {
        let latest = t.points(VM).await?.last().map(|p| p.id.clone());
        let have = std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|s| s["point"].as_str().map(str::to_owned));
        if have.is_some() && have == latest {
            eprintln!(
                "standby copy at the latest point after {:.1} s",
                began.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        anyhow::ensure!(
            began.elapsed() < Duration::from_secs(600),
            "the standby copy never reached the latest point ({have:?}, latest {latest:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
