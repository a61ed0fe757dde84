//! Benchmark (not a test): instant recovery against copy-first recovery of the same point, on
//! a 10 GiB raw disk with 2 GiB of realistic data (as bench-replicate makes it, in 8 extents
//! spread over the disk), through the CLI as an operator types it. Ends with one
//! `key=value` line.
//!
//! The whole mesh runs in this process (real redis-server, local-filesystem store, real QUIC)
//! with two in-process agents: `hv01` holds the VM, `hv-dr01` has a `[recovery]` folder, a
//! tracker and a command driver whose start command records the time it was called. After
//! the VM is protected (not timed):
//!
//! * `ready_s`: `ferry failover test VM --instant`, from just before the command to the
//!   driver's start call (every disk exported by then);
//! * `instant_read_s`: then a full read of the disk through its NBD export (`qemu-img
//!   compare` of the export with the source image, so every byte is checked too) while the
//!   background copy runs; `instant_total_s = ready_s + instant_read_s`;
//! * `copy_first_s`: after a cleanup, `ferry failover test VM` (materialise, then start) of
//!   the same point, to the start call; `copy_first_read_s`: the same full read;
//! * `speedup_vs_copy_first = (copy_first_s + copy_first_read_s) / instant_total_s`, and
//!   `ready_speedup = copy_first_s / ready_s`.
//!
//! Page caches are dropped (best effort, needs root) before each failover.
//!
//!   bench-instant [--size-gib N] [--data-gib N] [--dir DIR]
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::Context;
use ferry_tests::bench::{
    drop_caches, ferry_bin, make_image, read_unix_time, secs_between, stamped_recovery_agent,
};
use ferry_tests::{TestMesh, qemu_compare};

const VM: &str = "bench";
const RECOVERY: &str = "hv-dr01";
const GIB: u64 = 1 << 30;
const EXTENTS: u64 = 8;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let (mut size_gib, mut data_gib, mut dir): (u64, u64, Option<PathBuf>) = (10, 2, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-gib" => size_gib = args.next().context("--size-gib N")?.parse()?,
            "--data-gib" => data_gib = args.next().context("--data-gib N")?.parse()?,
            "--dir" => dir = Some(args.next().context("--dir DIR")?.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        data_gib > 0 && data_gib <= size_gib,
        "--data-gib must be 1 to --size-gib"
    );
    let ferry = ferry_bin()?;
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let image = std::path::absolute(tmp.path().join(format!("{VM}.raw")))?;
    spread_image(tmp.path(), &image, size_gib * GIB, data_gib * GIB)?;
    eprintln!("image: {size_gib} GiB virtual, {data_gib} GiB data in {EXTENTS} extents");

    let t = TestMesh::start().await?;
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::new(&ferry);
        c.arg("--config").arg(&t.mesh.config_path).args(args);
        c
    };
    let run = |args: &'static [&'static str]| {
        let mut c = cli(args);
        async move {
            let out = c.output().await?;
            anyhow::ensure!(
                out.status.success(),
                "ferry {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok::<_, anyhow::Error>(String::from_utf8_lossy(&out.stdout).to_string())
        }
    };
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[(VM, vec![image.clone()])],
            "[tracker]\n",
        )
        .await?;
    let started = t.path(RECOVERY).join("started");
    let dr = stamped_recovery_agent(&t, RECOVERY, &started).await?;
    t.wait_vm(VM).await?;
    let protect: &[&str] = &[
        "vm",
        "protect",
        VM,
        "--frequency",
        "1h",
        "--recovery-host",
        RECOVERY,
        "--wait",
    ];
    run(protect).await?;

    // Instant: ready, then a full read while the copy runs.
    let (ready_s, instant_read_s) = measure(
        &t,
        run(&["failover", "test", VM, "--instant", "-o", "json"]),
        &started,
        &image,
    )
    .await?;
    run(&["failover", "cleanup", VM, "-o", "json"]).await?;
    // Copy first: materialise, start, then the same read.
    let (copy_first_s, copy_first_read_s) = measure(
        &t,
        run(&["failover", "test", VM, "-o", "json"]),
        &started,
        &image,
    )
    .await?;
    run(&["failover", "cleanup", VM, "-o", "json"]).await?;
    for a in [primary, dr] {
        a.shutdown().await?;
    }
    t.stop().await;

    let instant_total_s = ready_s + instant_read_s;
    let copy_first_total = copy_first_s + copy_first_read_s;
    println!(
        "instant: ready {ready_s:.2} s, full read during the copy {instant_read_s:.2} s; \
         copy first: ready {copy_first_s:.2} s, full read {copy_first_read_s:.2} s"
    );
    println!(
        "size_gib={size_gib} data_gib={data_gib} ready_s={ready_s:.2} instant_read_s={instant_read_s:.2} \
         instant_total_s={instant_total_s:.2} copy_first_s={copy_first_s:.2} copy_first_read_s={copy_first_read_s:.2} \
         ready_speedup={:.1} speedup_vs_copy_first={:.2}",
        copy_first_s / ready_s,
        copy_first_total / instant_total_s
    );
    Ok(())
}

/// Runs one failover (`failover` is the CLI call), then reads its disk in full through the
/// export: seconds from the command to the driver's start call, and of the read.
async fn measure(
    t: &TestMesh,
    failover: impl std::future::Future<Output = anyhow::Result<String>>,
    started: &Path,
    image: &Path,
) -> anyhow::Result<(f64, f64)> {
    let _ = std::fs::remove_file(started);
    drop_caches();
    let t0 = SystemTime::now();
    failover.await?;
    let ready = secs_between(t0, read_unix_time(started).context("no driver start call")?);
    let uri = test_disk_uri(t).await?;
    let image = image.to_path_buf();
    let r0 = Instant::now();
    let same =
        tokio::task::spawn_blocking(move || qemu_compare(&uri, "raw", &image, "raw")).await??;
    let read = r0.elapsed().as_secs_f64();
    anyhow::ensure!(same, "the recovered disk read differs from the image");
    Ok((ready, read))
}

/// The NBD URI of the active test failover's disk (`ferry failover list`).
async fn test_disk_uri(t: &TestMesh) -> anyhow::Result<PathBuf> {
    let out = tokio::process::Command::new(ferry_bin()?)
        .arg("--config")
        .arg(&t.mesh.config_path)
        .args(["failover", "list", "-o", "json"])
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "ferry failover list failed");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let uri = list
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|f| f["kind"] == "test" && f["state"] == "active")
        })
        .and_then(|f| f["disks"][0]["nbd_uri"].as_str())
        .filter(|u| !u.is_empty())
        .with_context(|| format!("no active test failover with a served disk: {list}"))?;
    Ok(PathBuf::from(uri))
}

/// A sparse raw image of `size` bytes holding `data` bytes of realistic content in
/// [`EXTENTS`] extents spread evenly over it.
fn spread_image(dir: &Path, path: &Path, size: u64, data: u64) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let piece = data / EXTENTS;
    let src = dir.join("content.raw");
    make_image(&src, piece)?;
    let mut content = Vec::new();
    std::fs::File::open(&src)?.read_to_end(&mut content)?;
    std::fs::remove_file(&src)?;
    // Not a zero byte in any extent: the data is what is allocated.
    for b in content.iter_mut().filter(|b| **b == 0) {
        *b = 1;
    }
    let mut f = std::fs::File::create(path)?;
    f.set_len(size)?;
    for k in 0..EXTENTS {
        f.seek(SeekFrom::Start(k * (size / EXTENTS) / GIB * GIB))?;
        f.write_all(&content)?;
    }
    f.sync_all()?;
    Ok(())
}
