//! Stopping the `ferry-agent` process: after one write through NBD, SIGTERM (and SIGINT) makes
//! it seal every log and close every disk before it exits 0, so `qemu-img` opens the VHDX
//! read-only at once — every time. The agent then protects and replicates the VM as usual.
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ferry_proto::common::v1::StepStatus;
use ferry_tests::*;

const STOPS: usize = 20;

/// Times `needle` occurs in the agent's log.
fn log_count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// Waits until the agent's tracker serves for the `n`-th time.
async fn wait_serving(log: &Path, n: usize, child: &mut Child) -> anyhow::Result<()> {
    for _ in 0..300 {
        if log_count(log, "tracker serving nbd") >= n {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            anyhow::bail!("agent exited before serving ({st}): {}", tail(log));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("agent never served nbd: {}", tail(log))
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Sends `signal` and waits (at most 60 s) for the exit; its status and how long it took.
async fn stop(
    child: &mut Child,
    signal: libc::c_int,
) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
    let t0 = Instant::now();
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    anyhow::ensure!(rc == 0, "kill failed: {}", std::io::Error::last_os_error());
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok((st, t0.elapsed()));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            child.kill()?;
            anyhow::bail!("agent did not exit within 60 s of signal {signal}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `qemu-img ARGS -f vhdx DISK` (read-only) succeeds.
fn qemu_img_opens(args: &[&str], disk: &Path) -> anyhow::Result<()> {
    run(Command::new("qemu-img")
        .args(args)
        .args(["-f", "vhdx"])
        .arg(disk))
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_close_every_disk_before_exit() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    // 1 MiB blocks: every stop's write allocates a new block, so the VHDX's metadata log is
    // written each time and must be cleared by the close.
    let data = host.join("stop01-data.vhdx");
    let os = host.join("stop01-os.raw");
    qemu_create(&data, "vhdx", "subformat=dynamic,block_size=1M", "32M")?;
    qemu_create(&os, "raw", "", "8M")?;
    let cfg = t
        .agent_config_tracked(
            &t.path("agent"),
            "hv-stop",
            &[("stop01", vec![os.clone(), data.clone()])],
        )
        .await?;
    let log = t.path("agent.log");

    let mut child = spawn_agent_process(&cfg, &log)?;
    let vm = t.wait_vm("stop01").await?;
    let uri = |name: &str| {
        vm.disks
            .iter()
            .find(|d| d.path.ends_with(name))
            .map(|d| d.nbd_uri.clone())
            .filter(|u| !u.is_empty())
    };
    let data_uri = uri("stop01-data.vhdx").expect("data disk tracked");
    let os_uri = uri("stop01-os.raw").expect("os disk tracked");

    let mut times = Vec::new();
    for i in 0..=STOPS {
        if i > 0 {
            child = spawn_agent_process(&cfg, &log)?;
        }
        wait_serving(&log, i + 1, &mut child).await?;
        let closed_before = log_count(&log, "disk closed");
        nbd_write(
            &data_uri,
            &[&format!("write -P {} {}M 64k", 0x40 + i, i + 1)],
        )?;
        // The last stop is a Ctrl-C.
        let signal = if i == STOPS {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        let (status, took) = stop(&mut child, signal).await?;
        assert!(
            status.success(),
            "stop {i} (signal {signal}): agent exited with {status}: {}",
            tail(&log)
        );
        assert_eq!(
            log_count(&log, "disk closed") - closed_before,
            2,
            "stop {i}: \"disk closed\" once per disk: {}",
            tail(&log)
        );
        qemu_img_opens(&["info"], &data)
            .map_err(|e| anyhow::anyhow!("stop {i}: qemu-img info: {e}"))?;
        qemu_img_opens(&["check"], &data)
            .map_err(|e| anyhow::anyhow!("stop {i}: qemu-img check: {e}"))?;
        for d in [&data, &os] {
            let open = unclean_logs(d)?;
            assert!(open.is_empty(), "stop {i}: logs not sealed: {open:?}");
        }
        times.push(took);
    }
    let ms: Vec<u128> = times.iter().map(|d| d.as_millis()).collect();
    eprintln!(
        "{} stops clean (last one SIGINT); exit after the signal in ms: {ms:?} (max {})",
        times.len(),
        ms.iter().max().copied().unwrap_or(0)
    );
    // Every acknowledged write is in the closed image.
    let reads: Vec<String> = (0..=STOPS)
        .map(|i| format!("read -P {} {}M 64k", 0x40 + i, i + 1))
        .collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io(&data, "vhdx", &reads)?;

    // The agent resumes as before: the VM protects, a write replicates, and the point fails
    // over identical to the disks once the agent stopped (cleanly, so they compare as is).
    let mut child = spawn_agent_process(&cfg, &log)?;
    wait_serving(&log, STOPS + 2, &mut child).await?;
    let job = t.protect_every("stop01", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    nbd_write(&os_uri, &["write -P 0x77 2M 1M"])?;
    nbd_write(&data_uri, &["write -P 0x78 30M 1M"])?;
    let n = t.points("stop01").await?.len();
    t.wait_points("stop01", n + 2, Duration::from_secs(60))
        .await?;
    let (status, _) = stop(&mut child, libc::SIGTERM).await?;
    assert!(status.success(), "{status}");
    let out = t.path("out");
    let fo = t.test_failover("stop01", "latest", &out).await?;
    assert_eq!(fo.status, StepStatus::Succeeded as i32, "{fo:?}");
    assert!(qemu_compare(&os, "raw", &out.join("stop01-os.raw"), "raw")?);
    assert!(qemu_compare(
        &data,
        "vhdx",
        &out.join("stop01-data.vhdx"),
        "vhdx"
    )?);
    t.stop().await;
    Ok(())
}
