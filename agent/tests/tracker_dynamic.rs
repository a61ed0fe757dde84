//! VMs added to and removed from a running tracker, and fencing, against real qemu-io/qemu-img
//! over NBD: an added VM is served and logged like a configured one, a removed one is gone
//! (connections refused, logs sealed, images closed), a fenced one refuses writes on open and
//! new connections while reads and cuts work, and add/remove cycles leak nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_agent::tracker::{SealedLog, TrackedDisk, Tracker, TrackerConfig, TrackerError};
use ferry_agent::tracker::{list_logs, log_path};
use ferry_disk::hrl::{HrlLog, order_chain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const EPERM: u32 = 1;

/// Tests take it shared; the leak test takes it alone, so its fd counts see only its own.
static EXCLUSIVE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

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

/// Runs qemu-io commands on `target` in one process: whether every command succeeded (qemu-io
/// exits 1 when one failed or the target cannot be opened), and stdout + stderr.
fn qemu_io_try(fmt: &str, target: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(target).output().expect("spawn qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

/// qemu-io on an NBD URI (raw over NBD), off the runtime's threads.
async fn nbd_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let uri = uri.to_string();
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_try("raw", &uri, &cmds)
    })
    .await
    .expect("join")
}

async fn nbd_io_ok(uri: &str, cmds: &[&str]) -> String {
    let (ok, text) = nbd_io(uri, cmds).await;
    assert!(ok, "qemu-io on {uri} {cmds:?} failed: {text}");
    text
}

/// `qemu-img compare`: true when equal, false when different, panics on an error.
fn same(a: &str, fa: &str, b: &Path, fb: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb, a])
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

fn qemu_img_check_vhdx(path: &Path) {
    run(Command::new("qemu-img")
        .args(["check", "-f", "vhdx"])
        .arg(path));
}

fn config(dir: &Path) -> TrackerConfig {
    TrackerConfig {
        socket_dir: dir.join("sock"),
        tcp_listen: Some("127.0.0.1:0".parse().expect("addr")),
    }
}

fn disk(vm: &str, path: &Path, export: &str) -> TrackedDisk {
    TrackedDisk {
        vm: vm.into(),
        path: path.to_path_buf(),
        export: export.into(),
    }
}

async fn stop(tracker: &Tracker, shutdown: &CancellationToken) -> Vec<SealedLog> {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), tracker.stopped())
        .await
        .expect("tracker stops")
}

fn open_logs(disk: &Path) -> Vec<HrlLog> {
    list_logs(disk)
        .expect("list logs")
        .into_iter()
        .map(|(_, p)| HrlLog::open(&p).expect("open log"))
        .collect()
}

/// A minimal NBD client (fixed newstyle, OPT_GO, simple replies) for exact request sequences
/// on one connection that stays open.
struct Nbd {
    s: UnixStream,
    next: u64,
}

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQ_MAGIC: u32 = 0x2560_9513;

/// Sends the client flags after the server's greeting.
async fn greet(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).await.expect("connect");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.expect("hello");
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).await.expect("flags");
    s
}

/// Reads one option reply: (kind, data).
async fn opt_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.expect("option reply");
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.expect("option data");
    (kind, d)
}

/// The export names the server lists (NBD_OPT_LIST).
async fn list_exports(sock: &Path) -> Vec<String> {
    let mut s = greet(sock).await;
    let mut opt = IHAVEOPT.to_be_bytes().to_vec();
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).await.expect("opt list");
    let mut names = Vec::new();
    loop {
        match opt_reply(&mut s).await {
            (1, _) => return names,
            (2, d) => names.push(String::from_utf8_lossy(&d[4..]).to_string()),
            (k, _) => panic!("option error {k:#x}"),
        }
    }
}

impl Nbd {
    async fn connect(sock: &Path, export: &str) -> Nbd {
        let mut s = greet(sock).await;
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).await.expect("opt go");
        loop {
            match opt_reply(&mut s).await {
                (1, _) => break,
                (3, _) => {}
                (k, _) => panic!("option error {k:#x}"),
            }
        }
        Nbd { s, next: 1 }
    }

    /// One request and its simple reply: the error, and the data of a read. An i/o error
    /// means the server closed the connection.
    async fn call(
        &mut self,
        kind: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        let h = self.next;
        self.next += 1;
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQ_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await?;
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).await?;
        assert_eq!(r[0..4], 0x6744_6698u32.to_be_bytes());
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().expect("8")), h);
        let err = u32::from_be_bytes(r[4..8].try_into().expect("4"));
        let mut d = Vec::new();
        if kind == 0 && err == 0 {
            d.resize(len as usize, 0);
            self.s.read_exact(&mut d).await?;
        }
        Ok((err, d))
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let r = self.call(1, offset, data.len() as u32, data).await;
        r.expect("write answered").0
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        match self.call(0, offset, len, &[]).await.expect("read answered") {
            (0, d) => Ok(d),
            (e, _) => Err(e),
        }
    }

    /// TRIM (4), WRITE_ZEROES (6) or FLUSH (3).
    async fn simple(&mut self, kind: u16, offset: u64, len: u32) -> u32 {
        let r = self.call(kind, offset, len, &[]).await;
        r.expect("request answered").0
    }
}

/// Files under `dir` this process has open.
fn open_fds_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.starts_with(dir))
        .collect()
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

/// A VM added at runtime is served like a configured one (unix and tcp URIs, pending bytes,
/// current log, cuts, the stop); adding it again with the same disks only returns the URIs;
/// a clashing add (export name or image served already, the VM with other disks, a missing
/// disk) is refused and leaves nothing behind; nothing is added or removed after shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_vm_is_served_and_logged_and_clashes_are_refused() {
    let _shared = EXCLUSIVE.read().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let canon = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
    let (cfgd, a, b, c) = (
        canon.join("cfg.raw"),
        canon.join("a.vhdx"),
        canon.join("b.raw"),
        canon.join("c.raw"),
    );
    qemu_img_create(&cfgd, "raw", "", 4 * MIB);
    qemu_img_create(&a, "vhdx", "subformat=dynamic,block_size=1M", 16 * MIB);
    qemu_img_create(&b, "raw", "", 8 * MIB);
    qemu_img_create(&c, "raw", "", 8 * MIB);
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        config(dir.path()),
        vec![disk("cfg", &cfgd, "cfg0")],
        shutdown.clone(),
    )
    .await
    .expect("start");
    assert_eq!(tracker.nbd_uri(&a), None);

    let want = vec![disk("vm1", &a, "vm1-a"), disk("vm1", &b, "vm1-b")];
    let uris = tracker.add_vm("vm1", want.clone()).await.expect("add vm1");
    assert_eq!(uris.len(), 2);
    assert_eq!(Some(uris[0].clone()), tracker.nbd_uri(&a));
    assert_eq!(Some(uris[1].clone()), tracker.nbd_uri(&b));
    assert!(
        uris[0].starts_with("nbd+unix:///vm1-a?socket=/"),
        "{}",
        uris[0]
    );
    let logs_before = list_logs(&a).expect("list").len();
    assert_eq!(logs_before, 1, "the added disk has its first log");
    assert_eq!(tracker.current_log(&a), Some(log_path(&a, 1)));
    assert_eq!(tracker.open_disks().len(), 3);

    nbd_io_ok(&uris[0], &["write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k"]).await;
    let tcp = tracker.nbd_tcp_uri(&b).expect("tcp uri of an added disk");
    nbd_io_ok(&tcp, &["write -P 0x6b 2M 4k", "read -P 0x6b 2M 4k"]).await;
    assert!(tracker.pending_bytes(&a) > 8192, "the write is in a's log");
    assert!(tracker.pending_bytes(&b) > 8192, "the write is in b's log");
    let open = HrlLog::open(&log_path(&a, 1)).expect("open log of a");
    assert_eq!(open.records.len(), 1);
    assert_eq!(
        (open.records[0].offset, open.records[0].length),
        (MIB, 65536)
    );

    // Again with the same disks (given by another spelling of the path): the same URIs, no
    // new logs.
    let again = vec![
        disk("vm1", &dir.path().join("a.vhdx"), "vm1-a"),
        disk("vm1", &b, "vm1-b"),
    ];
    assert_eq!(tracker.add_vm("vm1", again).await.expect("again"), uris);
    assert_eq!(list_logs(&a).expect("list").len(), logs_before);

    // Refused: the VM with other disks, an export name or an image served already, a disk
    // given for another VM, a bad export name, a missing disk.
    let config_err = |r: Result<Vec<String>, TrackerError>| match r {
        Err(TrackerError::Config(m)) => m,
        other => panic!("expected a configuration error, got {other:?}"),
    };
    let m = config_err(tracker.add_vm("vm1", vec![disk("vm1", &a, "vm1-a")]).await);
    assert!(m.contains("vm1"), "names the vm: {m}");
    let m = config_err(tracker.add_vm("vm2", vec![disk("vm2", &c, "vm1-b")]).await);
    assert!(m.contains("vm1-b"), "{m}");
    let m = config_err(tracker.add_vm("vm2", vec![disk("vm2", &c, "cfg0")]).await);
    assert!(m.contains("cfg0"), "{m}");
    let m = config_err(tracker.add_vm("vm2", vec![disk("vm2", &b, "c")]).await);
    assert!(m.contains("b.raw"), "{m}");
    config_err(tracker.add_vm("vm2", vec![disk("vm3", &c, "c")]).await);
    config_err(
        tracker
            .add_vm("vm2", vec![disk("vm2", &c, "bad/name")])
            .await,
    );
    config_err(
        tracker
            .add_vm("vm2", vec![disk("vm2", &c, "c"), disk("vm2", &c, "c2")])
            .await,
    );
    config_err(tracker.add_vm("vm2", vec![]).await);
    let missing = tracker
        .add_vm(
            "vm2",
            vec![
                disk("vm2", &c, "c"),
                disk("vm2", &canon.join("gone.raw"), "g"),
            ],
        )
        .await;
    assert!(
        matches!(&missing, Err(TrackerError::Io { path, .. }) if path.ends_with("gone.raw")),
        "{missing:?}"
    );
    assert_eq!(tracker.nbd_uri(&c), None, "a refused vm is not served");
    assert!(list_logs(&c).expect("list").is_empty(), "and leaves no log");
    assert!(open_fds_under(&canon).iter().all(|p| p != &c), "nor c open");
    assert!(matches!(
        tracker.cut("vm2").await,
        Err(TrackerError::UnknownVm(_))
    ));
    let mut names = list_exports(tracker.socket_path()).await;
    names.sort();
    assert_eq!(names, ["cfg0", "vm1-a", "vm1-b"]);

    // Cuts see the added VM.
    let cut = tracker.cut("vm1").await.expect("cut vm1");
    assert_eq!(cut.len(), 2);
    assert!(cut.iter().all(|s| s.records == 1), "{cut:?}");
    assert_eq!(tracker.pending_bytes(&a), 8192, "a fresh log after the cut");

    // The stop closes the added disks too.
    let last = stop(&tracker, &shutdown).await;
    assert_eq!(last.len(), 3);
    assert!(tracker.open_disks().is_empty());
    for p in [&a, &b, &cfgd] {
        assert!(open_logs(p).iter().all(|l| l.clean), "{}", p.display());
    }
    qemu_img_check_vhdx(&a);
    assert!(matches!(
        tracker.add_vm("vm2", vec![disk("vm2", &c, "c")]).await,
        Err(TrackerError::Stopped)
    ));
    assert!(matches!(
        tracker.remove_vm("vm1").await,
        Err(TrackerError::Stopped)
    ));
    let chain = order_chain(open_logs(&a)).expect("a's logs form one chain");
    assert_eq!(chain.len(), 2);
}

/// A removed VM is gone: new connections are refused (qemu-io fails on both URIs), an open
/// connection is closed or refused, queries forget it, its logs are sealed, its VHDX is closed
/// cleanly (qemu-img check) and its files can be deleted; the other VM is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_vm_is_no_longer_served() {
    let _shared = EXCLUSIVE.read().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let canon = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
    let (keep, a, b) = (
        canon.join("keep.raw"),
        canon.join("a.vhdx"),
        canon.join("b.raw"),
    );
    qemu_img_create(&keep, "raw", "", 4 * MIB);
    qemu_img_create(&a, "vhdx", "subformat=dynamic", 16 * MIB);
    qemu_img_create(&b, "raw", "", 8 * MIB);
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        config(dir.path()),
        vec![disk("keep", &keep, "keep")],
        shutdown.clone(),
    )
    .await
    .expect("start");
    assert!(matches!(
        tracker.remove_vm("nope").await,
        Err(TrackerError::UnknownVm(v)) if v == "nope"
    ));
    let uris = tracker
        .add_vm("gone", vec![disk("gone", &a, "ga"), disk("gone", &b, "gb")])
        .await
        .expect("add");
    let tcp = tracker.nbd_tcp_uri(&a).expect("tcp uri");
    nbd_io_ok(&uris[0], &["write -P 0x33 3M 128k"]).await;
    nbd_io_ok(&uris[1], &["write -P 0x44 0 4k"]).await;
    let mut held = Nbd::connect(tracker.socket_path(), "ga").await;
    assert_eq!(held.write(5 * MIB, &[0x55; 4096]).await, 0);

    let sealed = tracker.remove_vm("gone").await.expect("remove");
    assert_eq!(sealed.len(), 2);
    assert_eq!(
        (sealed[0].disk.clone(), sealed[0].records),
        (a.clone(), 2),
        "qemu-io's and the held connection's writes"
    );
    assert_eq!((sealed[1].disk.clone(), sealed[1].records), (b.clone(), 1));
    for s in &sealed {
        assert!(HrlLog::open(&s.log).expect("sealed log").clean);
    }

    // New connections are refused, on the socket and on tcp.
    for uri in [&uris[0], &uris[1], &tcp] {
        let (ok, text) = nbd_io(uri, &["read 0 4k"]).await;
        assert!(!ok, "read through {uri} after the removal: {text}");
        let (ok, text) = nbd_io(uri, &["write -P 1 0 4k"]).await;
        assert!(!ok, "write through {uri} after the removal: {text}");
    }
    // The held connection is closed (or, at the least, refuses the request).
    let after = tokio::time::timeout(
        Duration::from_secs(10),
        held.call(1, 6 * MIB, 4096, &[0x66; 4096]),
    )
    .await
    .expect("the held connection answers or closes");
    assert!(
        !matches!(after, Ok((0, _))),
        "a write after the removal succeeded"
    );

    // Every query forgets the VM.
    assert_eq!(tracker.nbd_uri(&a), None);
    assert_eq!(tracker.nbd_tcp_uri(&b), None);
    assert_eq!(tracker.pending_bytes(&a), 0);
    assert_eq!(tracker.current_log(&b), None);
    assert!(matches!(
        tracker.cut("gone").await,
        Err(TrackerError::UnknownVm(_))
    ));
    assert!(matches!(
        tracker.fence_vm("gone", "x"),
        Err(TrackerError::UnknownVm(_))
    ));
    assert!(matches!(
        tracker.remove_vm("gone").await,
        Err(TrackerError::UnknownVm(_))
    ));
    let open: Vec<PathBuf> = tracker.open_disks().into_iter().map(|(p, _)| p).collect();
    assert_eq!(open, std::slice::from_ref(&keep));
    assert_eq!(list_exports(tracker.socket_path()).await, ["keep"]);

    // The files are closed: no descriptor points at them, the VHDX checks clean and holds the
    // writes, and they can be deleted.
    let held_open: Vec<PathBuf> = open_fds_under(&canon)
        .into_iter()
        .filter(|p| p != &keep && !p.ends_with("keep.raw.00000001.hrl"))
        .collect();
    assert!(held_open.is_empty(), "still open: {held_open:?}");
    qemu_img_check_vhdx(&a);
    run(Command::new("qemu-io")
        .args(["-f", "vhdx", "-r", "-c", "read -P 0x33 3M 128k"])
        .args(["-c", "read -P 0x55 5M 4k", "-c", "read -P 0 6M 4k"])
        .arg(&a));
    for p in [&a, &b] {
        for (_, l) in list_logs(p).expect("list") {
            std::fs::remove_file(l).expect("delete log");
        }
        std::fs::remove_file(p).expect("delete disk");
    }

    // The other VM is served as before.
    let keep_uri = tracker.nbd_uri(&keep).expect("keep uri");
    nbd_io_ok(&keep_uri, &["write -P 7 0 4k", "read -P 7 0 4k"]).await;
    let last = stop(&tracker, &shutdown).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].disk, keep);
}

/// A fenced VM refuses writes, write-zeroes and trims with EPERM on a connection opened
/// before the fence and on new ones; reads and flushes work; neither the image nor the log
/// changes; a cut still seals the writes made before; another VM writes on; unfencing lets
/// writes through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_vm_refuses_writes_until_unfenced() {
    let _shared = EXCLUSIVE.read().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let canon = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
    let (a, other) = (canon.join("a.vhdx"), canon.join("other.raw"));
    qemu_img_create(&a, "vhdx", "subformat=dynamic,block_size=1M", 16 * MIB);
    qemu_img_create(&other, "raw", "", 4 * MIB);
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        config(dir.path()),
        vec![disk("other", &other, "other")],
        shutdown.clone(),
    )
    .await
    .expect("start");
    let uri = tracker
        .add_vm("vm", vec![disk("vm", &a, "a")])
        .await
        .expect("add")
        .remove(0);
    assert!(!tracker.is_fenced("vm"));
    assert!(!tracker.is_fenced("nope"));
    assert!(matches!(
        tracker.fence_vm("nope", "x"),
        Err(TrackerError::UnknownVm(_))
    ));
    assert!(matches!(
        tracker.unfence_vm("nope"),
        Err(TrackerError::UnknownVm(_))
    ));
    nbd_io_ok(&uri, &["write -P 0x21 1M 1M"]).await;
    let mut held = Nbd::connect(tracker.socket_path(), "a").await;
    assert_eq!(held.write(4 * MIB, &[0x22; 8192]).await, 0);

    tracker
        .fence_vm("vm", "failed over to host-b")
        .expect("fence");
    assert!(tracker.is_fenced("vm"));
    assert!(!tracker.is_fenced("other"));
    // What the disk and its log hold as the fence goes up.
    let before = canon.join("before.raw");
    let (u, bp) = (uri.clone(), before.clone());
    tokio::task::spawn_blocking(move || {
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &u])
            .arg(&bp))
    })
    .await
    .expect("join");
    let log = tracker.current_log(&a).expect("open log");
    let pending = tracker.pending_bytes(&a);
    let records = HrlLog::open(&log).expect("log").records.len();
    assert_eq!(records, 2);

    // The connection opened before the fence: writes refused, reads and flushes work.
    assert_eq!(held.write(4 * MIB, &[0x99; 4096]).await, EPERM);
    assert_eq!(held.write(0, &[0x99; 512]).await, EPERM);
    assert_eq!(held.simple(6, MIB, 65536).await, EPERM, "write-zeroes");
    assert_eq!(held.simple(4, MIB, 65536).await, EPERM, "trim");
    assert_eq!(held.simple(3, 0, 0).await, 0, "flush");
    assert_eq!(held.read(4 * MIB, 8192).await, Ok(vec![0x22; 8192]));
    // New connections: qemu-io's writes fail, its reads work.
    for cmd in ["write -P 0x77 1M 64k", "write -z 1M 64k", "discard 1M 64k"] {
        let (ok, text) = nbd_io(&uri, &[cmd]).await;
        assert!(!ok, "{cmd} on a fenced vm: {text}");
        assert!(text.contains("Operation not permitted"), "{cmd}: {text}");
    }
    nbd_io_ok(&uri, &["read -P 0x21 1M 1M"]).await;
    // Nothing reached the image or the log.
    let (u, bp) = (uri.clone(), before.clone());
    let unchanged = tokio::task::spawn_blocking(move || same(&u, "raw", &bp, "raw"))
        .await
        .expect("join");
    assert!(unchanged, "a refused write changed the disk");
    assert_eq!(tracker.current_log(&a), Some(log.clone()));
    assert_eq!(tracker.pending_bytes(&a), pending);
    assert_eq!(HrlLog::open(&log).expect("log").records.len(), records);
    // Another VM is not fenced.
    let other_uri = tracker.nbd_uri(&other).expect("other");
    nbd_io_ok(&other_uri, &["write -P 3 0 4k"]).await;

    // A cut of the fenced VM seals the writes acknowledged before the fence.
    let cut = tracker.cut("vm").await.expect("cut of a fenced vm");
    assert_eq!(cut.len(), 1);
    assert_eq!((cut[0].log.clone(), cut[0].records), (log, 2));
    assert!(tracker.is_fenced("vm"), "a cut keeps the fence");

    tracker.unfence_vm("vm").expect("unfence");
    assert!(!tracker.is_fenced("vm"));
    tracker.unfence_vm("vm").expect("unfence twice");
    assert_eq!(held.write(4 * MIB, &[0x23; 4096]).await, 0);
    nbd_io_ok(&uri, &["write -P 0x24 8M 64k", "read -P 0x24 8M 64k"]).await;
    assert_eq!(held.read(4 * MIB, 4096).await, Ok(vec![0x23; 4096]));
    drop(held);

    let last = stop(&tracker, &shutdown).await;
    let sealed = last.iter().find(|s| s.disk == a).expect("a sealed at stop");
    assert_eq!(sealed.records, 2, "the two writes after the unfence");
    qemu_img_check_vhdx(&a);
    run(Command::new("qemu-io")
        .args(["-f", "vhdx", "-r", "-c", "read -P 0x21 1M 1M"])
        .args(["-c", "read -P 0x23 4M 4k", "-c", "read -P 0x22 4100k 4k"])
        .args(["-c", "read -P 0x24 8M 64k", "-c", "read -P 0 0 512"])
        .arg(&a));
}

/// Twenty add / write / remove cycles of one VM: each cycle's log chains to the last, no file
/// of the VM stays open after a removal, the process's descriptors stay bounded, no export is
/// left behind, and base + the chain of sealed logs gives the final disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_write_remove_cycles_leak_nothing() {
    let _alone = EXCLUSIVE.write().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let canon = std::fs::canonicalize(dir.path()).expect("canonical tempdir");
    let vmdir = canon.join("vm");
    std::fs::create_dir(&vmdir).expect("vm dir");
    let a = vmdir.join("a.vhdx");
    qemu_img_create(&a, "vhdx", "subformat=dynamic,block_size=1M", 32 * MIB);
    let base = canon.join("base.vhdx");
    std::fs::copy(&a, &base).expect("base copy");
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(config(dir.path()), vec![], shutdown.clone())
        .await
        .expect("start with no disks");
    let mut baseline = None;
    let mut previous: Option<SealedLog> = None;
    for i in 0..20u64 {
        let uri = tracker
            .add_vm("cyc", vec![disk("cyc", &a, "cyc-a")])
            .await
            .expect("add")
            .remove(0);
        let w = format!("write -P {} {}k 64k", i + 1, i * 512);
        let r = format!("read -P {} {}k 64k", i + 1, i * 512);
        nbd_io_ok(&uri, &[&w, &r]).await;
        let sealed = tracker.remove_vm("cyc").await.expect("remove");
        assert_eq!(sealed.len(), 1);
        let s = sealed.into_iter().next().expect("one");
        assert_eq!(s.records, 1, "cycle {i}");
        assert_eq!(s.seq, i + 1);
        if let Some(p) = &previous {
            assert_eq!(s.previous_unique_id, p.unique_id, "cycle {i} chains on");
        }
        previous = Some(s);
        let still = open_fds_under(&vmdir);
        assert!(still.is_empty(), "cycle {i}: still open {still:?}");
        assert_eq!(tracker.nbd_uri(&a), None);
        assert!(tracker.open_disks().is_empty());
        // Connection tasks end a little after qemu-io leaves; allow them a moment.
        let mut n = fd_count();
        for _ in 0..50 {
            if baseline.is_none_or(|b| n <= b) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            n = fd_count();
        }
        match baseline {
            None => baseline = Some(n),
            Some(b) => assert!(
                n <= b + 2,
                "cycle {i}: {n} descriptors, {b} after the first"
            ),
        }
    }
    assert!(list_exports(tracker.socket_path()).await.is_empty());
    assert!(stop(&tracker, &shutdown).await.is_empty());
    qemu_img_check_vhdx(&a);
    let logs = open_logs(&a);
    assert_eq!(logs.len(), 20);
    assert!(logs.iter().all(|l| l.clean));
    let chain = order_chain(logs).expect("one chain");
    let mut w = ferry_disk::open_rw(&base).expect("open base");
    for l in &chain {
        l.replay_onto(&mut *w).expect("replay");
    }
    w.finish().expect("finish base");
    assert!(
        same(base.to_str().expect("utf8"), "vhdx", &a, "vhdx"),
        "base + the cycles' logs differs from the disk"
    );
}
