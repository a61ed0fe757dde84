//! The tracker without the mesh: a configured disk that cannot be opened is left out (the
//! others are served and the reason is kept), a stop closes a VHDX so qemu opens it read-only,
//! and a stop that cannot finish in time names what it left open.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry_agent::tracker::{TrackedDisk, Tracker, TrackerConfig, list_logs};
use ferry_disk::hrl::HrlLog;
use tokio_util::sync::CancellationToken;

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

fn qemu_img_create(path: &Path, fmt: &str, opts: &str, size: &str) {
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", fmt]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    run(c.arg(path).arg(size));
}

fn qemu_io(target: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(c.arg(target));
}

fn disk(vm: &str, path: &Path, export: &str) -> TrackedDisk {
    TrackedDisk {
        vm: vm.into(),
        path: path.to_path_buf(),
        export: export.into(),
    }
}

/// A missing disk does not stop the tracker: the other disk of the VM and the other VM are
/// served, the missing one has no URI and [`Tracker::failure`] names the error; a stop closes
/// the VHDX so that `qemu-img info`/`check` open it read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_disk_is_left_out_and_the_rest_is_tracked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let os = dir.path().join("web-os.vhdx");
    let gone = dir.path().join("web-data.raw");
    let other = dir.path().join("db-os.raw");
    qemu_img_create(&os, "vhdx", "subformat=dynamic,block_size=1M", "8M");
    qemu_img_create(&other, "raw", "", "4M");
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        TrackerConfig {
            socket_dir: dir.path().join("sock"),
            tcp_listen: None,
        },
        vec![
            disk("web", &os, "web-os"),
            disk("web", &gone, "web-data"),
            disk("db", &other, "db-os"),
        ],
        shutdown.clone(),
    )
    .await
    .expect("a missing disk must not stop the tracker");
    assert_eq!(tracker.nbd_uri(&gone), None);
    let why = tracker
        .failure(&gone)
        .expect("the missing disk's error is kept");
    assert!(
        why.contains("web-data.raw") && why.contains("No such file"),
        "{why}"
    );
    assert_eq!(tracker.failure(&os), None);
    assert!(list_logs(&gone).expect("list").is_empty());
    for (path, pattern) in [(&os, "0x5a"), (&other, "0x6b")] {
        let uri = tracker.nbd_uri(path).expect("tracked");
        let w = format!("write -P {pattern} 1M 64k");
        let r = format!("read -P {pattern} 1M 64k");
        tokio::task::spawn_blocking(move || qemu_io(&uri, &[&w, &r]))
            .await
            .expect("join");
    }
    // The cut seals the VM's tracked disk; the missing one is no obstacle.
    let sealed = tracker.cut("web").await.expect("cut");
    assert_eq!(sealed.len(), 1);

    shutdown.cancel();
    ferry_agent::wait_tracker_stopped(&tracker, Duration::from_secs(30))
        .await
        .expect("stop");
    assert!(tracker.open_disks().is_empty());
    for p in [&os, &other] {
        for (_, l) in list_logs(p).expect("list") {
            assert!(HrlLog::open(&l).expect("log").clean, "{}", l.display());
        }
    }
    run(Command::new("qemu-img")
        .args(["info", "-f", "vhdx"])
        .arg(&os));
    run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(&os));
    run(Command::new("qemu-io")
        .args(["-f", "vhdx", "-r", "-c", "read -P 0x5a 1M 64k"])
        .arg(&os));
}

/// A stop that cannot close its disks in time gives up with an error naming each disk still
/// open and its unsealed log; the disks close once the stall is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_past_its_timeout_names_what_it_left_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.vhdx");
    qemu_img_create(&a, "raw", "", "4M");
    qemu_img_create(&b, "vhdx", "subformat=dynamic", "8M");
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        TrackerConfig {
            socket_dir: dir.path().join("sock"),
            tcp_listen: None,
        },
        vec![disk("vm", &a, "a"), disk("vm", &b, "b")],
        shutdown.clone(),
    )
    .await
    .expect("start");
    tracker.stall_close(Duration::from_secs(2));
    shutdown.cancel();
    let err = ferry_agent::wait_tracker_stopped(&tracker, Duration::from_millis(300))
        .await
        .expect_err("a stalled stop times out")
        .to_string();
    for p in [&a, &b] {
        let name = std::fs::canonicalize(p).expect("canonical");
        assert!(err.contains(&name.display().to_string()), "{err}");
    }
    assert!(err.contains(".hrl"), "names the unsealed logs: {err}");
    assert_eq!(tracker.open_disks().len(), 2);
    ferry_agent::wait_tracker_stopped(&tracker, Duration::from_secs(30))
        .await
        .expect("the disks close after the stall");
    assert!(tracker.open_disks().is_empty());
}
