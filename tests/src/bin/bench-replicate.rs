//! Benchmark (not a test): replicate a 2 GiB raw image of realistic content through the whole
//! mesh on this machine (in-process mesh, real redis-server, local-filesystem store, real QUIC)
//! and compare, in the same run, with `restic backup` of the same file into a local repository
//! and with `qemu-img convert` of it. Ends with one `key=value` line.
//!
//!   bench-replicate [--size-mib N] [--dir DIR]
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::common::v1::StepStatus;
use ferry_tests::{InProcessAgent, TestMesh};

/// Synthetic but realistic image: text, machine code-like bytes, already-compressed data and
/// zero regions, interleaved in 1-8 MiB extents. Deterministic for a given size.
fn make_image(path: &Path, size: u64) -> anyhow::Result<u64> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    const WORDS: [&str; 24] = [
        "the",
        "replication",
        "disk",
        "error",
        "info",
        "recovery",
        "point",
        "host",
        "vm",
        "cycle",
        "commit",
        "kernel",
        "user",
        "session",
        "GET",
        "/api/v1/",
        "200",
        "404",
        "ms",
        "debug",
        "timeout",
        "retry",
        "2026-11-27",
        "\n",
    ];
    let mut off = 0u64;
    let mut data = 0u64;
    let mut buf = Vec::with_capacity(8 << 20);
    while off < size {
        let len = ((1 + next() % 8) << 20).min(size - off);
        let kind = next() % 10;
        buf.clear();
        match kind {
            0..=2 => {} // zeros: a hole
            3..=5 => {
                while (buf.len() as u64) < len {
                    buf.extend_from_slice(WORDS[(next() % WORDS.len() as u64) as usize].as_bytes());
                    buf.push(b' ');
                }
            }
            6..=8 => {
                // code-like: small opcodes and offsets, many zero bytes
                while (buf.len() as u64) < len {
                    let v = next();
                    let b = (v & 0xff) as u8;
                    buf.push(if v & 0x300 == 0 { 0 } else { b & 0x8f });
                }
            }
            _ => {
                while (buf.len() as u64) < len {
                    buf.extend_from_slice(&next().to_le_bytes());
                }
            }
        }
        buf.truncate(len as usize);
        if !buf.is_empty() {
            f.seek(SeekFrom::Start(off))?;
            f.write_all(&buf)?;
            data += len;
        }
        off += len;
    }
    f.sync_all()?;
    Ok(data)
}

#[derive(Clone, Copy, Default)]
struct Usage {
    cpu: f64,
    children_cpu: f64,
}

fn usage() -> Usage {
    fn tv(t: libc::timeval) -> f64 {
        t.tv_sec as f64 + t.tv_usec as f64 / 1e6
    }
    let mut me: libc::rusage = unsafe { std::mem::zeroed() };
    let mut ch: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut me);
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ch);
    }
    Usage {
        cpu: tv(me.ru_utime) + tv(me.ru_stime),
        children_cpu: tv(ch.ru_utime) + tv(ch.ru_stime),
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn drop_caches() {
    // Best effort: a cold read for each contender (needs root; harmless otherwise).
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn timed(cmd: &mut Command) -> anyhow::Result<(f64, f64)> {
    let u0 = usage();
    let t0 = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        anyhow::bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((
        t0.elapsed().as_secs_f64(),
        usage().children_cpu - u0.children_cpu,
    ))
}

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
        .agent_config(
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
    let repo = tmp.path().join("restic-repo");
    let restic = |args: &[&str]| {
        let mut c = Command::new("restic");
        c.args(args)
            .arg("-r")
            .arg(&repo)
            .env("RESTIC_PASSWORD", "bench-only-not-a-secret")
            .env("RESTIC_CACHE_DIR", tmp.path().join("restic-cache"));
        c
    };
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

fn walk_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
