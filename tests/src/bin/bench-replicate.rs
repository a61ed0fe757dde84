//! Benchmark (not a test): replicate a 2 GiB raw image of realistic content through the whole
//! mesh on this machine (in-process mesh, real redis-server, local-filesystem store, real QUIC)
//! and compare, in the same run, with `restic backup` of the same file into a local repository
//! and with `qemu-img convert` of it. Ends with one `key=value` line.
//!
//!   bench-replicate [--size-mib N] [--dir DIR]
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::common::v1::StepStatus;
use ferry_tests::bench::{drop_caches, make_image, peak_rss_mib, timed, usage, walk_size};
use ferry_tests::{InProcessAgent, TestMesh};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut size_mib = 2048u64;
    let mut dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().context("--size-mib N")?.parse()?,
            "--dir" => dir = Some(args.next().context("--dir DIR")?.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let image = tmp.path().join("bench.raw");
    let size = size_mib << 20;
    let data = make_image(&image, size)?;
    eprintln!("image: {size_mib} MiB virtual, {} MiB data", data >> 20);

    // Ferry: the whole mesh in this process; the agent too.
    let t = TestMesh::start().await?;
    let cfg = t
        .agent_config_tracked(
            &t.path("agent"),
            "bench01",
            &[("bench", vec![image.clone()])],
        )
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("bench").await?;
    drop_caches();
    let u0 = usage();
    let t0 = Instant::now();
    let job = t.protect("bench").await?;
    let job = t.wait_job(&job.id, Duration::from_secs(3600)).await?;
    let ferry_s = t0.elapsed().as_secs_f64();
    let ferry_cpu = usage().cpu - u0.cpu;
    anyhow::ensure!(
        job.status == StepStatus::Succeeded as i32,
        "replication failed: {}",
        job.error
    );
    let stored: u64 = walk_size(&t.mesh.cfg.data_dir.join("store").join("chunks"));
    let peak = peak_rss_mib();
    agent.shutdown().await?;
    t.stop().await;

    // restic backup of the same file into a local repository.
    let restic = |args: &[&str]| ferry_tests::bench::restic(tmp.path(), args);
    timed(restic(&["init", "-q"]).arg("--repository-version").arg("2"))?;
    drop_caches();
    let (restic_s, restic_cpu) = timed(restic(&["backup", "-q"]).arg(&image))?;

    // qemu-img convert of the same file (raw -> vhdx, Ferry's native target format).
    drop_caches();
    let out = tmp.path().join("convert.vhdx");
    let (qemu_s, qemu_cpu) = timed(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vhdx"])
            .arg(&image)
            .arg(&out),
    )?;

    let mb = size as f64 / 1e6;
    println!(
        "ferry:   {ferry_s:.2} s, {:.0} MB/s, cpu {ferry_cpu:.1} s, peak rss {peak:.0} MiB (mesh + agent in one process), stored {} MiB",
        mb / ferry_s,
        stored >> 20
    );
    println!(
        "restic:  {restic_s:.2} s, {:.0} MB/s, cpu {restic_cpu:.1} s",
        mb / restic_s
    );
    println!(
        "qemu-img convert: {qemu_s:.2} s, {:.0} MB/s, cpu {qemu_cpu:.1} s",
        mb / qemu_s
    );
    println!(
        "mb_per_s={:.1} cpu_s={ferry_cpu:.1} peak_rss_mib={peak:.0} stored_mib={} restic_s={restic_s:.2} qemu_convert_s={qemu_s:.2} speedup_vs_restic={:.2} speedup_vs_qemu_convert={:.2}",
        mb / ferry_s,
        stored >> 20,
        restic_s / ferry_s,
        qemu_s / ferry_s
    );
    Ok(())
}
