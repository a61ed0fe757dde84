//! Benchmark (not a test): recovery point objective under load. 8 VMs each write 2 MB/s of
//! incompressible data through the tracker (NBD, qemu-io) with a 5 s policy; the RPO of each
//! VM (age of its newest point) is sampled twice a second, and the points committed during
//! the run give the cycles per second sustained. Ends with one `key=value` line.
//!
//!   bench-rpo [--vms N] [--seconds S] [--disk-mib N] [--write-kib N] [--write-every-ms N]
//!             [--dir DIR]
//!
//! `tests/bench/run scale` runs it with 100 small VMs.
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::registry::v1::ListVmsRequest;
use ferry_tests::{InProcessAgent, TestMesh, qemu_create};

/// What each VM's writer does, and the size of its disk.
#[derive(Clone, Copy)]
struct Load {
    write: usize,
    every: Duration,
    disk_mib: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Points committed so far, all VMs together (each cycle commits one).
async fn committed(t: &TestMesh, names: &[String]) -> anyhow::Result<usize> {
    let mut n = 0usize;
    for name in names {
        n += t.points(name).await?.len();
    }
    Ok(n)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let (mut vms, mut seconds) = (8usize, 60u64);
    let mut load = Load {
        write: 512 << 10,
        every: Duration::from_millis(250),
        disk_mib: 256,
    };
    let mut dir: Option<std::path::PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--vms" => vms = args.next().context("--vms N")?.parse()?,
            "--seconds" => seconds = args.next().context("--seconds S")?.parse()?,
            "--disk-mib" => load.disk_mib = args.next().context("--disk-mib N")?.parse()?,
            "--write-kib" => {
                load.write = args.next().context("--write-kib N")?.parse::<usize>()? << 10
            }
            "--write-every-ms" => {
                let ms = args.next().context("--write-every-ms N")?.parse()?;
                load.every = Duration::from_millis(ms);
            }
            "--dir" => dir = Some(args.next().context("--dir DIR")?.into()),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let mut list = Vec::new();
    for i in 0..vms {
        let disk = host.join(format!("vm{i:02}.raw"));
        qemu_create(&disk, "raw", "", &format!("{}M", load.disk_mib))?;
        list.push((format!("vm{i:02}"), vec![disk]));
    }
    let refs: Vec<(&str, Vec<std::path::PathBuf>)> =
        list.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "bench01", &refs)
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    let mut uris = Vec::new();
    for (name, _) in &list {
        let vm = t.wait_vm(name).await?;
        uris.push(vm.disks[0].nbd_uri.clone());
        let job = t.protect_every(name, 5).await?;
        let job = t.wait_job(&job.id, Duration::from_secs(600)).await?;
        anyhow::ensure!(job.error.is_empty(), "protecting {name}: {}", job.error);
    }
    anyhow::ensure!(
        load.write > 0 && (load.write as u64) < load.disk_mib << 20,
        "--write-kib must be more than 0 and less than the disk"
    );
    let slots = (load.disk_mib << 20) / load.write as u64;
    let names: Vec<String> = list.iter().map(|(n, _)| n.clone()).collect();
    let points_before = committed(&t, &names).await?;
    // Writers: 512 KiB every 250 ms per VM by default (2 MB/s), at random offsets.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = Vec::new();
    for (i, uri) in uris.iter().enumerate() {
        let (uri, stop, dir) = (uri.clone(), stop.clone(), tmp.path().to_path_buf());
        writers.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let next = tokio::time::Instant::now() + load.every;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let data: Vec<u8> = (0..load.write / 8)
                    .flat_map(|k| (x.wrapping_add(k as u64)).to_le_bytes())
                    .collect();
                let src = dir.join(format!("w{i}.bin"));
                if std::fs::write(&src, data).is_err() {
                    break;
                }
                let off = (x % slots) * load.write as u64;
                let cmd = format!("write -s {} {off} {}", src.display(), load.write);
                let ok = tokio::process::Command::new("qemu-io")
                    .args(["-f", "raw", "-c", &cmd, &uri])
                    .output()
                    .await
                    .is_ok_and(|o| o.status.success());
                if !ok {
                    break;
                }
                n += 1;
                tokio::time::sleep_until(next).await;
            }
            n
        }));
    }
    // Sample the RPO of every VM twice a second.
    let mut samples = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = ferry_proto::now_ms();
        for v in t
            .ctl
            .registry()
            .await?
            .list_vms(ListVmsRequest {})
            .await?
            .into_inner()
            .vms
        {
            if v.last_point_ms > 0 {
                samples.push((now - v.last_point_ms).max(0) as f64 / 1000.0);
            }
        }
    }
    let cycles = committed(&t, &names).await? - points_before;
    stop.cancel();
    let mut writes = 0u64;
    for w in writers {
        writes += w.await.unwrap_or(0);
    }
    let written_mb = writes as f64 * load.write as f64 / 1e6;
    samples.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99, max) = (
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples.last().copied().unwrap_or(0.0),
    );
    agent.shutdown().await?;
    t.stop().await;
    println!(
        "{vms} vms, policy 5 s, {seconds} s: {written_mb:.0} MB written through the tracker ({:.2} MB/s per vm), {} rpo samples",
        written_mb / seconds as f64 / vms as f64,
        samples.len()
    );
    println!(
        "vms={vms} write_mb_per_s_per_vm={:.3} cycles_per_s={:.2} rpo_p50_s={p50:.2} rpo_p99_s={p99:.2} rpo_max_s={max:.2}",
        written_mb / seconds as f64 / vms as f64,
        cycles as f64 / seconds as f64
    );
    Ok(())
}
