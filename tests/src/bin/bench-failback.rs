//! Benchmark (not a test): failback with checksum sync of a 2 GiB disk of random content
//! after 1 % of its 64 KiB blocks were rewritten at the recovery site, against `rsync
//! --no-whole-file --inplace --ignore-times` of the recovered disk onto the original, in the
//! same run. Ends with one `key=value` line.
//!
//! The whole mesh runs in this process (real redis-server, local-filesystem store with 64 KiB
//! vault blocks, real QUIC) with two in-process agents, through the CLI as an operator types
//! it: protect (hv01 → hv-dr01), planned failover, commit, re-protect (hv-dr01 replicates),
//! then the guest at the recovery site rewrites 1 % of the blocks (random positions, through
//! hv-dr01's NBD export) and its writes replicate. Not timed so far. Then, timed:
//!
//! * `failback_s`: `ferry failback VM` (phase 1: hv01 reads its stale disk, names every block
//!   with the vault's keyed hash, fetches the blocks that differ) + `ferry failback complete
//!   VM` (phase 2: stop at hv-dr01, final delta, the blocks that differ between the two
//!   points written on hv01, start there);
//! * `bytes`: what moved for it — the blocks written on hv01 (plain bytes, both phases) plus
//!   the point's block list it compared against (40 bytes an entry);
//! * `downtime_s`: from hv-dr01's driver stop call to hv01's driver start call;
//! * rsync of the recovered disk (as phase 2 left it) onto a copy of hv01's disk as it was
//!   before the failback: its time and `Total bytes sent` + `received`.
//!
//! Both results must equal the recovered disk (`qemu-img compare`), or the benchmark fails.
//!
//!   bench-failback [--size-mib N] [--dir DIR]
use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_tests::bench::{drop_caches, ferry_bin, read_unix_time, rsync_inplace, secs_between};
use ferry_tests::{fill_random, qemu_compare, run, start_mesh_with_block_size};

const VM: &str = "bench";
const BLOCK: u64 = 64 << 10;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut size_mib = 2048u64;
    let mut dir: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().context("--size-mib N")?.parse()?,
            "--dir" => dir = Some(args.next().context("--dir DIR")?.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let ferry = ferry_bin()?;
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let size = size_mib << 20;
    let image = std::path::absolute(tmp.path().join(format!("{VM}.raw")))?;
    std::fs::File::create(&image)?.set_len(size)?;
    let piece = 64u64 << 20;
    for (i, off) in (0..size).step_by(piece as usize).enumerate() {
        fill_random(&image, off, piece.min(size - off) as usize, 0xfb + i as u64)?;
    }

    let t = start_mesh_with_block_size(u32::try_from(BLOCK)?).await?;
    let cli = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&ferry)
            .arg("--config")
            .arg(&t.mesh.config_path)
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "ferry {}: {stdout}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let job: serde_json::Value = serde_json::from_str(&stdout)?;
        anyhow::ensure!(
            job.get("status").is_none_or(|s| s == "succeeded"),
            "ferry {}: {job:#}",
            args.join(" ")
        );
        Ok(job)
    };
    let (hv01, dr) = (t.path("hv01"), t.path("hv-dr01"));
    let (started, stopped) = (hv01.join("started"), dr.join("stopped"));
    let record =
        |file: &std::path::Path| format!("{:?}", format!("date +%s.%N > '{}'", file.display()));
    let primary = t
        .site_agent(
            "hv01",
            "site-a",
            &[(VM, vec![image.clone()])],
            &format!(
                "[tracker]\n[driver]\nkind = \"command\"\nstart = {}\nstop = \"true\"\n",
                record(&started)
            ),
        )
        .await?;
    let recovery = t
        .recovery_agent(&format!(
            "[driver]\nkind = \"command\"\nstart = \"true\"\nstop = {}\n",
            record(&stopped)
        ))
        .await?;
    t.wait_vm(VM).await?;

    // Not timed: protect, fail over, re-protect from the recovery site.
    let protect = [
        "vm",
        "protect",
        VM,
        "--frequency",
        "10s",
        "--recovery-host",
        "hv-dr01",
        "--wait",
        "-o",
        "json",
    ];
    cli(&protect)?;
    cli(&["failover", "planned", VM, "--wait", "-o", "json"])?;
    let list = cli(&["failover", "list", "-o", "json"])?;
    let f = list
        .as_array()
        .and_then(|l| l.iter().rev().find(|f| f["kind"] == "planned"))
        .context("no planned failover listed")?;
    let recovered = std::path::PathBuf::from(f["disks"][0]["path"].as_str().unwrap_or_default());
    let dr_uri = f["disks"][0]["nbd_uri"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    cli(&["failover", "commit", VM, "-o", "json"])?;
    cli(&["vm", "reprotect", VM, "-o", "json"])?;

    // The guest at the recovery site rewrites 1 % of the 64 KiB blocks; they replicate.
    let blocks = size / BLOCK;
    let chosen = random_blocks(blocks, (blocks / 100).max(1) as usize);
    let cmds: Vec<String> = chosen
        .iter()
        .enumerate()
        .map(|(i, b)| format!("write -P {} {} 64k", 1 + i % 250, b * BLOCK))
        .collect();
    for batch in cmds.chunks(64) {
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        ferry_tests::nbd_write(&dr_uri, &refs)?;
    }
    let before = t.vm(VM).await?.last_point_id;
    wait_new_points(&t, &before, 2).await?;
    // rsync's destination: hv01's disk as it is before the failback.
    let mirror = tmp.path().join("mirror.raw");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&mirror))?;

    // Timed: the failback, both phases.
    drop_caches();
    let t0 = Instant::now();
    let phase1 = cli(&["failback", VM, "-o", "json"])?;
    let phase1_s = t0.elapsed().as_secs_f64();
    let phase2 = cli(&["failback", "complete", VM, "-o", "json"])?;
    let failback_s = t0.elapsed().as_secs_f64();
    for j in [&phase1, &phase2] {
        let job = t.job(j["id"].as_str().unwrap_or_default()).await?;
        let steps: Vec<String> = (job.steps.iter())
            .map(|s| format!("{} {} ms", s.name, s.ended_at_ms - s.started_at_ms))
            .collect();
        println!("{}: {}", job.kind, steps.join(", "));
    }
    let done = |j: &serde_json::Value| j["bytes_done"].as_u64().unwrap_or(0);
    let written = done(&phase1) + done(&phase2);
    let compared = blocks_in(&phase1);
    let bytes = written + 40 * compared;
    let downtime_s = secs_between(read_unix_time(&stopped)?, read_unix_time(&started)?);
    anyhow::ensure!(
        qemu_compare(&image, "raw", &recovered, "raw")?,
        "after the failback hv01's disk differs from the recovered one"
    );
    for a in [primary, recovery] {
        a.shutdown().await?;
    }

    let r = rsync_inplace(&recovered, &mirror)?;
    let (rsync_s, rsync_bytes) = (r.secs, r.sent + r.received);
    t.stop().await;

    let changed = chosen.len();
    println!(
        "change: {changed} of {blocks} blocks of 64 KiB rewritten at the recovery site, {size_mib} MiB disk"
    );
    println!(
        "ferry:  failback {failback_s:.2} s (phase 1 {phase1_s:.2} s), {written} bytes of blocks written + {compared} block-list entries; downtime {downtime_s:.2} s"
    );
    println!("rsync:  {rsync_s:.2} s, {rsync_bytes} bytes sent and received");
    println!(
        "size_mib={size_mib} changed_blocks={changed} failback_s={failback_s:.3} phase1_s={phase1_s:.3} downtime_s={downtime_s:.3} bytes={bytes} rsync_s={rsync_s:.3} rsync_bytes={rsync_bytes} bytes_vs_rsync={:.3} speedup_vs_rsync={:.2}",
        bytes as f64 / rsync_bytes.max(1) as f64,
        rsync_s / failback_s
    );
    Ok(())
}

/// `want` distinct block indexes below `blocks`, from a fixed xorshift sequence.
fn random_blocks(blocks: u64, want: usize) -> BTreeSet<u64> {
    let mut x = 0x9abc_def1_2345_6789u64;
    let mut chosen = BTreeSet::new();
    while chosen.len() < want {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chosen.insert(x % blocks);
    }
    chosen
}

/// The blocks phase 1 compared, from its step message ("N of M blocks differed …").
fn blocks_in(job: &serde_json::Value) -> u64 {
    job["steps"][2]["message"]
        .as_str()
        .and_then(|m| m.split(" of ").nth(1))
        .and_then(|m| m.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits until `n` points newer than `after` exist.
async fn wait_new_points(t: &ferry_tests::TestMesh, after: &str, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let points = t.points(VM).await?;
        let newer = points.iter().rev().take_while(|p| p.id != after).count();
        if newer >= n {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "no new points after {after}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
