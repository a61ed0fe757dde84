//! Benchmark (not a test): delta replication of a 2 GiB disk after 1 % of it was rewritten in
//! random 64 KiB writes through the tracker. Measures, in one run, the time from the cut to the
//! committed point and the bytes stored, against `rsync --no-whole-file --inplace` and
//! `restic backup` of the same change. Ends with one `key=value` line.
//!
//!   bench-delta [--size-mib N] [--dir DIR]
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_mesh::{ClientTls, Component};
use ferry_proto::scheduler::v1::{DispatchRequest, WorkKind, scheduler_client::SchedulerClient};
use ferry_proto::storage::v1::ListPointsRequest;
use ferry_tests::bench::{drop_caches, make_image, timed, walk_size};
use ferry_tests::{InProcessAgent, TestMesh, run};

const WRITE: u64 = 64 << 10;

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
    let tmp = tempfile::tempdir_in(dir.unwrap_or_else(std::env::temp_dir))?;
    let size = size_mib << 20;
    let host = tmp.path().join("host");
    std::fs::create_dir_all(&host)?;
    let image = host.join("bench.raw");
    make_image(&image, size)?;
    // The peers' baseline: an rsync target and a restic snapshot of the unchanged image.
    let mirror = tmp.path().join("mirror.raw");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&image)
        .arg(&mirror))?;
    let repo = tmp.path().join("restic-repo");
    let restic = |args: &[&str]| ferry_tests::bench::restic(tmp.path(), args);
    run(restic(&["init", "-q"]).arg("--repository-version").arg("2"))?;
    run(restic(&["backup", "-q"]).arg(&image))?;

    // Ferry: protected with the tracker; cycles only when this benchmark asks for one.
    let t = TestMesh::start().await?;
    let cfg = t
        .agent_config_tracked(
            &t.path("agent"),
            "bench01",
            &[("bench", vec![image.clone()])],
        )
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    let vm = t.wait_vm("bench").await?;
    let uri = vm.disks[0].nbd_uri.clone();
    let job = t.protect_every("bench", 86_400).await?;
    let job = t.wait_job(&job.id, Duration::from_secs(3600)).await?;
    anyhow::ensure!(job.error.is_empty(), "protection failed: {}", job.error);

    // 1 % of the disk in random 64 KiB writes of incompressible data, through the tracker.
    let writes = (size / 100 / WRITE).max(1);
    let src = tmp.path().join("writes");
    std::fs::create_dir_all(&src)?;
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for i in 0..writes {
        let data: Vec<u8> = (0..WRITE / 8).flat_map(|_| next().to_le_bytes()).collect();
        let f = src.join(format!("{i}.bin"));
        std::fs::write(&f, data)?;
        let off = (next() % (size / WRITE)) * WRITE;
        c.arg("-c")
            .arg(format!("write -s {} {off} 64k", f.display()));
    }
    run(c.arg(&uri))?;
    let changed = writes * WRITE;

    let chunks = t.mesh.cfg.data_dir.join("store").join("chunks");
    let before = walk_size(&chunks);
    let n = t
        .ctl
        .storage()
        .await?
        .list_points(ListPointsRequest { vm: "bench".into() })
        .await?
        .into_inner()
        .points
        .len();
    let tls = ClientTls::service(&t.mesh.cfg)?;
    let ch = ferry_mesh::connect(&t.mesh.cfg.endpoint(Component::Scheduler), &tls).await?;
    let t0 = Instant::now();
    SchedulerClient::new(ch)
        .dispatch(DispatchRequest {
            host_name: "bench01".into(),
            kind: WorkKind::DeltaCycle as i32,
            vm: "bench".into(),
            job_id: String::new(),
            failover: None,
        })
        .await?;
    loop {
        let p = t
            .ctl
            .storage()
            .await?
            .list_points(ListPointsRequest { vm: "bench".into() })
            .await?
            .into_inner()
            .points;
        if p.len() > n {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "no point after the cycle"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ferry_s = t0.elapsed().as_secs_f64();
    let ferry_bytes = walk_size(&chunks) - before;
    agent.shutdown().await?;
    t.stop().await;

    drop_caches();
    let t0 = Instant::now();
    let out = run(Command::new("rsync")
        .args(["--no-whole-file", "--inplace", "--stats"])
        .arg(&image)
        .arg(&mirror))?;
    let rsync_s = t0.elapsed().as_secs_f64();
    let rsync_bytes: u64 = out
        .lines()
        .find(|l| l.starts_with("Total bytes sent:"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().replace(',', ""))
        .and_then(|v| v.parse().ok())
        .context("rsync --stats has no 'Total bytes sent'")?;
    drop_caches();
    let repo_before = walk_size(&repo);
    let (restic_s, _) = timed(restic(&["backup", "-q"]).arg(&image))?;
    let restic_bytes = walk_size(&repo).saturating_sub(repo_before);

    println!(
        "change: {writes} writes of 64 KiB = {} MiB of a {size_mib} MiB disk",
        changed >> 20
    );
    println!("ferry:  cut to committed point {ferry_s:.2} s, {ferry_bytes} bytes stored");
    println!("rsync:  {rsync_s:.2} s, {rsync_bytes} bytes sent");
    println!("restic: {restic_s:.2} s, {restic_bytes} bytes added to its repository");
    println!(
        "ferry_s={ferry_s:.3} ferry_bytes={ferry_bytes} rsync_s={rsync_s:.3} rsync_bytes={rsync_bytes} restic_s={restic_s:.3} restic_bytes={restic_bytes} bytes_vs_rsync={:.3} speedup_vs_rsync={:.2} speedup_vs_restic={:.2}",
        ferry_bytes as f64 / rsync_bytes.max(1) as f64,
        rsync_s / ferry_s,
        restic_s / ferry_s
    );
    Ok(())
}
