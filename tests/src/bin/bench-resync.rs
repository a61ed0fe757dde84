//! Benchmark (not a test): checksum resync of a 2 GiB disk of random content after 1 % of its
//! 64 KiB blocks were rewritten behind the tracker's back (direct file writes at random
//! positions, random data, the agent stopped). Measures, in one run, `ResyncVm` → job done and
//! the bytes it sent, against `rsync --no-whole-file --inplace --ignore-times` of the same
//! change onto a copy of the image as it was before. Ends with one `key=value` line.
//!
//!   bench-resync [--size-mib N] [--block-kib N] [--dir DIR]
use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::common::v1::StepStatus;
use ferry_proto::registry::v1::ResyncVmRequest;
use ferry_tests::bench::{drop_caches, rsync_inplace, walk_size};
use ferry_tests::{InProcessAgent, fill_random, run, start_mesh_with_block_size};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut size_mib = 2048u64;
    let mut block_kib = 64u64;
    let mut dir: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size-mib" => size_mib = args.next().context("--size-mib N")?.parse()?,
            "--block-kib" => block_kib = args.next().context("--block-kib N")?.parse()?,
            "--dir" => dir = Some(args.next().context("--dir DIR")?.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let size = size_mib << 20;
    let block = block_kib << 10;
    let host = tmp.path().join("host");
    std::fs::create_dir_all(&host)?;
    let image = host.join("bench.raw");
    std::fs::File::create(&image)?.set_len(size)?;
    let piece = 64u64 << 20;
    for (i, off) in (0..size).step_by(piece as usize).enumerate() {
        fill_random(
            &image,
            off,
            piece.min(size - off) as usize,
            0x5eed + i as u64,
        )?;
    }

    // Ferry: protected with the tracker (not timed); no delta cycles during the run.
    let t = start_mesh_with_block_size(u32::try_from(block)?).await?;
    let cfg = t
        .agent_config_tracked(
            &t.path("agent"),
            "bench01",
            &[("bench", vec![image.clone()])],
        )
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("bench").await?;
    let job = t.protect_every("bench", 86_400).await?;
    let job = t.wait_job(&job.id, Duration::from_secs(3600)).await?;
    anyhow::ensure!(job.error.is_empty(), "protection failed: {}", job.error);
    agent.shutdown().await?;
    // The tracker seals its log on its own threads after the agent returned.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // rsync's destination: the image as replicated.
    let mirror = tmp.path().join("mirror.raw");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&mirror))?;

    // 1 % of the blocks, distinct random positions, random data, written directly.
    let blocks = size / block;
    let want = (blocks / 100).max(1) as usize;
    let mut x = 0x9abc_def1_2345_6789u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut chosen = BTreeSet::new();
    while chosen.len() < want {
        chosen.insert(next() % blocks);
    }
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&image)?;
        for b in &chosen {
            let data: Vec<u8> = (0..block / 8).flat_map(|_| next().to_le_bytes()).collect();
            f.seek(SeekFrom::Start(b * block))?;
            f.write_all(&data)?;
        }
        f.sync_all()?;
    }
    let changed = chosen.len() as u64;

    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("bench").await?;
    let chunks = t.mesh.cfg.data_dir.join("store").join("chunks");
    let before = walk_size(&chunks);
    drop_caches();
    let t0 = Instant::now();
    let job = t
        .ctl
        .registry()
        .await?
        .resync_vm(ResyncVmRequest {
            name: "bench".into(),
        })
        .await?
        .into_inner();
    let job = loop {
        let j = t.job(&job.id).await?;
        if j.status != StepStatus::Running as i32 && j.status != StepStatus::Pending as i32 {
            break j;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(1800),
            "resync did not end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let resync_s = t0.elapsed().as_secs_f64();
    anyhow::ensure!(
        job.status == StepStatus::Succeeded as i32,
        "resync failed: {}",
        job.error
    );
    // What went to the gateway as chunk payloads: the sealed (compressed, encrypted) blocks.
    let bytes_sent = walk_size(&chunks) - before;
    agent.shutdown().await?;
    t.stop().await;

    let r = rsync_inplace(&image, &mirror)?;
    let (rsync_s, rsync_bytes, rsync_received) = (r.secs, r.sent, r.received);

    println!(
        "change: {changed} of {blocks} blocks of {block_kib} KiB rewritten ({} KiB) in a {size_mib} MiB disk",
        changed * block_kib
    );
    println!(
        "ferry:  resync {resync_s:.2} s, {bytes_sent} bytes of chunks sent (job: {} plain bytes stored, {} skipped)",
        job.bytes_done, job.bytes_skipped
    );
    println!("rsync:  {rsync_s:.2} s, {rsync_bytes} bytes sent, {rsync_received} received");
    println!(
        "block_size={block} changed_blocks={changed} resync_s={resync_s:.3} bytes_sent={bytes_sent} rsync_s={rsync_s:.3} rsync_bytes={rsync_bytes} bytes_vs_rsync={:.3} speedup_vs_rsync={:.2}",
        bytes_sent as f64 / rsync_bytes.max(1) as f64,
        rsync_s / resync_s
    );
    Ok(())
}
