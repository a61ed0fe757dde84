//! The write tracker against real qemu-io/qemu-img: writes through NBD reach the image in its
//! own format and the `.hrl` chain; cuts across a VM's disks are consistent; broken clients
//! do not take the server down.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_agent::tracker::{SealedLog, TrackedDisk, Tracker, TrackerConfig, list_logs};
use ferry_disk::hrl::{HrlLog, order_chain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_img_create(path: &Path, fmt: &str, opts: &str, size: u64) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", fmt]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    run(c.arg(path).arg(size.to_string()));
}

/// Runs qemu-io commands on `target` (a file or an NBD URI) in one process.
fn qemu_io(fmt: &str, target: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = run(c.arg(target));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io reported a failure: {text}"
    );
    text
}

/// `qemu-img compare`: true when equal, false when different, panics on an error.
fn same(a: &Path, fa: &str, b: &Path, fb: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img compare");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {a:?} {b:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Deterministic pseudo-random numbers (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes, zero-writes, discards, FUA writes and flushes, sector-aligned, some across
/// block boundaries, some unaligned to 4 KiB.
fn random_cmds(rng: &mut Rng, n: usize, size: u64) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let len = match rng.below(4) {
            0 => 512 * (1 + rng.below(8)),
            1 => 4096 * (1 + rng.below(16)),
            2 => 64 * 1024 * (1 + rng.below(8)),
            _ => MIB + 512 * rng.below(4096),
        };
        let off = rng.below((size - len) / 512) * 512;
        let pat = 1 + rng.below(255);
        out.push(match rng.below(10) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            2 => format!("write -f -P {pat} {off} {len}"),
            3 => "flush".to_string(),
            _ => format!("write -P {pat} {off} {len}"),
        });
    }
    out
}

fn opened_logs(disk: &Path) -> Vec<HrlLog> {
    list_logs(disk)
        .expect("list logs")
        .into_iter()
        .map(|(_, p)| HrlLog::open(&p).expect("open log"))
        .collect()
}

/// Applies the logs of `disk` (chain order) onto `target`.
fn replay(logs: Vec<HrlLog>, target: &Path) -> usize {
    let chain = order_chain(logs).expect("logs form one chain");
    let mut w = ferry_disk::open_rw(target).expect("open target");
    for l in &chain {
        l.replay_onto(&mut *w).expect("replay");
    }
    w.finish().expect("finish");
    chain.len()
}

fn config(dir: &Path) -> TrackerConfig {
    TrackerConfig {
        socket_dir: dir.join("sock"),
        tcp_listen: None,
    }
}

async fn stop(tracker: &Tracker, shutdown: &CancellationToken) -> Vec<SealedLog> {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), tracker.stopped())
        .await
        .expect("tracker stops")
}

/// One format: random writes through NBD equal the same writes made directly, and the sealed
/// chain replayed onto the base image gives the final disk.
async fn writes_through_nbd(fmt: &str, opts: &str, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let size = 64 * MIB;
    let ext = if fmt == "vpc" { "vhd" } else { fmt };
    let disk = dir.path().join(format!("d.{ext}"));
    qemu_img_create(&disk, fmt, opts, size);
    let base_cmds = vec![
        "write -P 0x11 0 3M".to_string(),
        "write -P 0x22 40M 1M".to_string(),
    ];
    qemu_io(fmt, disk.to_str().expect("utf8"), &base_cmds);
    let base = dir.path().join(format!("base.{ext}"));
    std::fs::copy(&disk, &base).expect("copy base");
    let reference = dir.path().join("ref.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(&disk)
        .arg(&reference));
    // qemu-img's vpc size is CHS-rounded: use the real virtual size.
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(&disk));
    let vsize: u64 =
        serde_json::from_slice::<serde_json::Value>(&info.stdout).expect("json")["virtual-size"]
            .as_u64()
            .expect("virtual-size");

    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        config(dir.path()),
        vec![TrackedDisk {
            vm: "vm1".into(),
            path: disk.clone(),
            export: "disk0".into(),
        }],
        shutdown.clone(),
    )
    .await
    .expect("start");
    let uri = tracker.nbd_uri(&disk).expect("uri");
    assert!(uri.starts_with("nbd+unix:///disk0?socket=/"), "{uri}");

    let mut rng = Rng(seed);
    let first = random_cmds(&mut rng, 60, vsize);
    let second = random_cmds(&mut rng, 60, vsize);
    let (u, f2) = (uri.clone(), first.clone());
    tokio::task::spawn_blocking(move || qemu_io("raw", &u, &f2))
        .await
        .expect("join");
    assert!(tracker.pending_bytes(&disk) > 8192);
    let cut = tracker.cut("vm1").await.expect("cut");
    assert_eq!(cut.len(), 1);
    assert!(cut[0].records > 0);
    assert_eq!(
        tracker.pending_bytes(&disk),
        8192,
        "a fresh log after the cut"
    );
    let (u, s2) = (uri.clone(), second.clone());
    tokio::task::spawn_blocking(move || qemu_io("raw", &u, &s2))
        .await
        .expect("join");
    // Reading back through NBD sees the last write.
    let probe = vec![
        "write -P 0x5a 5M 64k".to_string(),
        "read -P 0x5a 5M 64k".to_string(),
    ];
    let u = uri.clone();
    let text = tokio::task::spawn_blocking(move || qemu_io("raw", &u, &probe))
        .await
        .expect("join");
    assert!(text.contains("read 65536/65536"), "{text}");
    let last = stop(&tracker, &shutdown).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].previous_unique_id, cut[0].unique_id);

    let mut all = first;
    all.extend(second);
    all.push("write -P 0x5a 5M 64k".to_string());
    qemu_io("raw", reference.to_str().expect("utf8"), &all);
    assert!(
        same(&disk, fmt, &reference, "raw"),
        "{fmt}: disk differs from the reference"
    );

    let logs = opened_logs(&disk);
    assert!(logs.iter().all(|l| l.clean), "every log sealed cleanly");
    assert!(
        same(&base, fmt, &disk, fmt) == false,
        "the writes changed the disk"
    );
    assert_eq!(replay(logs, &base), 2);
    assert!(
        same(&base, fmt, &disk, fmt),
        "{fmt}: base + log chain differs from the disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_writes_land_in_disk_and_log() {
    writes_through_nbd("raw", "", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhdx_dynamic_writes_land_in_disk_and_log() {
    writes_through_nbd("vhdx", "subformat=dynamic,block_size=1M", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhd_dynamic_writes_land_in_disk_and_log() {
    writes_through_nbd("vpc", "subformat=dynamic", 3).await;
}
