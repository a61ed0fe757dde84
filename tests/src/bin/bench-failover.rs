//! Benchmark (not a test): failover of a 2 GiB raw image of realistic content (as
//! bench-replicate makes it) to a recovery host on this machine, through the CLI as an
//! operator types it, against `restic restore` of the same image from a local repository in
//! the same run. Ends with one `key=value` line.
//!
//! The whole mesh runs in this process (real redis-server, local-filesystem store, real QUIC)
//! with two in-process agents: `hv01` holds the VM (tracked), `hv-dr01` has a `[recovery]`
//! folder and a command driver whose start command records the time it was called. The VM is
//! protected with `--recovery-host hv-dr01 --wait` (not timed); then the failover runs, up to
//! twice:
//!
//! * **cold**: the recovery host keeps no standby copy, so it materialises the whole point
//!   from the store (`cold_rto_s`, `cold_speedup_vs_restic_restore`); a test failover is
//!   cleaned up afterwards;
//! * **standby**: the recovery host is restarted with `[recovery] standby = true` and the
//!   failover starts once its standby copy holds the latest point (waiting is not timed): a
//!   test failover copies the copy, a planned one moves it (`rto_s`).
//!
//! Figures:
//! * `rto_s`: from just before the command is issued to the time the driver's start command
//!   recorded (`date +%s.%N`, both clocks this machine's wall clock);
//! * `materialise_s`: from the start of the job's materialise step (the failover service
//!   dispatching the recovery work to hv-dr01) to that start call; `rto_s` when the job has no
//!   such step (`basis=` on the human line says which);
//! * `mb_per_s`: the image's virtual size in MB (10^6 bytes) / `materialise_s`;
//! * `restic_restore_s`: `restic restore latest --target DIR` of the same image (the backup
//!   into the repository is not timed); `speedup_vs_restic_restore = restic_restore_s / rto_s`.
//!
//! Page caches are dropped (best effort, needs root) before each failover and before the
//! restore. Every recovered disk (and restic's restored file) must equal the image
//! (`qemu-img compare`), or the benchmark fails.
//!
//!   bench-failover [--size-mib N] [--mode test|planned] [--cold | --standby] [--dir DIR]
//!
//! Both runs by default for `test`; `planned` can run once, so it runs the standby run unless
//! `--cold` says otherwise. `SIZE_MIB` and `FAILOVER_MODE` (environment) set the same as the
//! flags.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use ferry_tests::bench::{
    drop_caches, ferry_bin, make_image, path_str, read_unix_time, secs_between,
    stamped_recovery_agent, timed,
};
use ferry_tests::{InProcessAgent, TestMesh, qemu_compare};

const VM: &str = "bench";
const PRIMARY: &str = "hv01";
const RECOVERY: &str = "hv-dr01";

struct Options {
    size_mib: u64,
    mode: String,
    cold: bool,
    standby: bool,
    dir: Option<PathBuf>,
}

/// One timed failover.
struct Run {
    rto_s: f64,
    cmd_s: f64,
    materialise_s: f64,
    basis: String,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        size_mib: match std::env::var("SIZE_MIB") {
            Ok(s) if !s.is_empty() => s.parse().context("SIZE_MIB")?,
            _ => 2048,
        },
        mode: std::env::var("FAILOVER_MODE")
            .ok()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "test".into()),
        cold: false,
        standby: false,
        dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => o.size_mib = args.next().context("--size-mib N")?.parse()?,
            "--mode" => o.mode = args.next().context("--mode test|planned")?,
            "--dir" => o.dir = Some(args.next().context("--dir DIR")?.into()),
            "--cold" => o.cold = true,
            "--standby" => o.standby = true,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        ["test", "planned"].contains(&o.mode.as_str()),
        "mode {:?} is neither test nor planned",
        o.mode
    );
    anyhow::ensure!(!(o.cold && o.standby), "--cold or --standby, not both");
    if !o.cold && !o.standby {
        (o.cold, o.standby) = (o.mode == "test", true);
    }
    Ok(o)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let tmp = tempfile::tempdir_in(o.dir.clone().unwrap_or_else(std::env::temp_dir))?;
    let image = std::path::absolute(tmp.path().join(format!("{VM}.raw")))?;
    let size = o.size_mib << 20;
    let data = make_image(&image, size)?;
    eprintln!("image: {} MiB virtual, {} MiB data", o.size_mib, data >> 20);

    // Ferry: the whole mesh in this process, a primary and a recovery host.
    let t = TestMesh::start().await?;
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
    let mut dr = stamped_recovery_agent(&t, RECOVERY, &started).await?;
    t.wait_vm(VM).await?;
    // Initial replication, not timed.
    cli(
        &t,
        &[
            "vm",
            "protect",
            VM,
            "--frequency",
            "1h",
            "--recovery-host",
            RECOVERY,
            "--wait",
        ],
    )
    .await?;

    let mut cold = None;
    if o.cold {
        let run = failover(&t, &o.mode, &started, &image).await?;
        if o.standby {
            cli(&t, &["failover", "cleanup", VM, "-o", "json"]).await?;
        }
        cold = Some(run);
    }
    let mut warm = None;
    if o.standby {
        dr = with_standby(&t, dr).await?;
        wait_standby(&t).await?;
        warm = Some(failover(&t, &o.mode, &started, &image).await?);
    }
    for a in [primary, dr] {
        a.shutdown().await?;
    }
    t.stop().await;

    let restic_s = restic_restore(tmp.path(), &image)?;
    let mb = size as f64 / 1e6;
    let main = warm.as_ref().or(cold.as_ref()).context("no run")?;
    for (name, run) in [("cold", &cold), ("standby", &warm)] {
        if let Some(r) = run {
            println!(
                "ferry failover {} ({name}): rto {:.2} s (command returned after {:.2} s), \
                 materialise {:.2} s = {:.0} MB/s (MB = 10^6 bytes of virtual size; basis: {})",
                o.mode,
                r.rto_s,
                r.cmd_s,
                r.materialise_s,
                mb / r.materialise_s,
                r.basis
            );
        }
    }
    println!("restic restore: {restic_s:.2} s, {:.0} MB/s", mb / restic_s);
    let cold_figures = cold.as_ref().map_or(String::new(), |c| {
        format!(
            " cold_rto_s={:.2} cold_speedup_vs_restic_restore={:.2}",
            c.rto_s,
            restic_s / c.rto_s
        )
    });
    println!(
        "mode={} standby={} size_mib={} rto_s={:.2} mb_per_s={:.1} materialise_s={:.2} restic_restore_s={restic_s:.2} speedup_vs_restic_restore={:.2}{cold_figures}",
        o.mode,
        warm.is_some(),
        o.size_mib,
        main.rto_s,
        mb / main.materialise_s,
        main.materialise_s,
        restic_s / main.rto_s
    );
    Ok(())
}

/// `ferry ARGS` against the mesh; its stdout, or an error with what it said.
async fn cli(t: &TestMesh, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(ferry_bin()?)
        .arg("--config")
        .arg(&t.mesh.config_path)
        .args(args)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "ferry {}: {stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Times one failover of `mode` (caches dropped first) and checks its disk equals `image`.
async fn failover(t: &TestMesh, mode: &str, started: &Path, image: &Path) -> anyhow::Result<Run> {
    let _ = std::fs::remove_file(started);
    let args: &[&str] = match mode {
        "test" => &["failover", "test", VM, "-o", "json"],
        _ => &["failover", "planned", VM, "--wait", "-o", "json"],
    };
    drop_caches();
    let t0 = SystemTime::now();
    let stdout = cli(t, args).await?;
    let cmd_s = t0.elapsed()?.as_secs_f64();
    let start_call = read_unix_time(started)
        .with_context(|| format!("the driver's start command left no time in {started:?}"))?;
    let rto_s = secs_between(t0, start_call);
    let job: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| format!("job JSON: {stdout}"))?;
    let job = t
        .job(job["id"].as_str().context("the job has no id")?)
        .await?;
    let step = job
        .steps
        .iter()
        .find(|s| s.name.starts_with("materialise") && s.started_at_ms > 0);
    let (materialise_s, basis) = match step {
        Some(s) => {
            eprintln!("{}: {}", s.name, s.message);
            let from = UNIX_EPOCH + Duration::from_millis(s.started_at_ms as u64);
            (
                secs_between(from, start_call),
                format!("job step {:?} start → driver start call", s.name),
            )
        }
        None => (rto_s, "rto_s (the job has no materialise step)".into()),
    };
    check_recovered(t, mode, image).await?;
    Ok(Run {
        rto_s,
        cmd_s,
        materialise_s,
        basis,
    })
}

/// The recovered disk of the active failover of `kind` equals `image`.
async fn check_recovered(t: &TestMesh, kind: &str, image: &Path) -> anyhow::Result<()> {
    let list: serde_json::Value =
        serde_json::from_str(&cli(t, &["failover", "list", "-o", "json"]).await?)?;
    let rec = list
        .as_array()
        .and_then(|l| {
            l.iter()
                .rev()
                .find(|f| f["vm"] == VM && f["kind"] == kind && f["state"] == "active")
        })
        .with_context(|| format!("no active {kind} failover of {VM} listed: {list}"))?;
    anyhow::ensure!(
        rec["host"] == RECOVERY,
        "the failover ran on {}, not {RECOVERY}",
        rec["host"]
    );
    let disk = &rec["disks"][0];
    let recovered = PathBuf::from(disk["path"].as_str().context("no recovered disk path")?);
    let format = disk["format"].as_str().filter(|f| !f.is_empty());
    let format = format.unwrap_or("raw").to_owned();
    let (a, b) = (image.to_path_buf(), recovered.clone());
    let same = tokio::task::spawn_blocking(move || qemu_compare(&a, "raw", &b, &format)).await??;
    anyhow::ensure!(
        same,
        "recovered disk {} differs from the image",
        recovered.display()
    );
    Ok(())
}

/// The recovery host restarted with `[recovery] standby = true`.
async fn with_standby(t: &TestMesh, dr: InProcessAgent) -> anyhow::Result<InProcessAgent> {
    dr.shutdown().await?;
    let cfg = t.path(RECOVERY).join("agent.toml");
    let toml = std::fs::read_to_string(&cfg)?;
    let with = toml.replacen(
        "dir = \"recovered\"\n",
        "dir = \"recovered\"\nstandby = true\n",
        1,
    );
    anyhow::ensure!(with != toml, "no [recovery] dir line in {}", cfg.display());
    std::fs::write(&cfg, with)?;
    let dr = InProcessAgent::start(&cfg)?;
    let ready = |h: &ferry_proto::registry::v1::Host| h.status == "connected" && h.recovery;
    t.wait_host(RECOVERY, ready, Duration::from_secs(60))
        .await?;
    Ok(dr)
}

/// Waits (not timed) until `vm show` says the standby copy holds the latest point, as it
/// does between cycles in a deployment that keeps one.
async fn wait_standby(t: &TestMesh) -> anyhow::Result<()> {
    let began = std::time::Instant::now();
    loop {
        let latest = t.points(VM).await?.last().map(|p| p.id.clone());
        let vm: serde_json::Value =
            serde_json::from_str(&cli(t, &["vm", "show", VM, "-o", "json"]).await?)?;
        let have = vm["standby_point"].as_str().map(str::to_owned);
        if have.as_deref().is_some_and(|h| !h.is_empty()) && have == latest {
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
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `restic restore` of `image` from a local repository in `dir` (the backup is not timed);
/// its seconds.
fn restic_restore(dir: &Path, image: &Path) -> anyhow::Result<f64> {
    let restic = |args: &[&str]| ferry_tests::bench::restic(dir, args);
    timed(restic(&["init", "-q"]).arg("--repository-version").arg("2"))?;
    timed(restic(&["backup", "-q"]).arg(image))?;
    let target = dir.join("restic-restore");
    drop_caches();
    let (restic_s, _) = timed(&mut restic(&[
        "restore",
        "-q",
        "latest",
        "--target",
        path_str(&target)?,
    ]))?;
    let restored = target.join(image.strip_prefix("/").unwrap_or(image));
    anyhow::ensure!(
        qemu_compare(image, "raw", &restored, "raw")?,
        "restic's restored file {} differs from the image",
        restored.display()
    );
    Ok(restic_s)
}
