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
    let current = tracker.current_log(&disk).expect("open log");
    assert_eq!(
        current.file_name(),
        ferry_agent::tracker::log_path(&disk, 2).file_name()
    );
    assert_ne!(current, cut[0].log);
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
    // Bulk reads through NBD see what the direct writes give.
    let mut all = first.clone();
    all.extend(second.clone());
    all.push("write -P 0x5a 5M 64k".to_string());
    qemu_io("raw", reference.to_str().expect("utf8"), &all);
    let (u, r) = (uri.clone(), reference.clone());
    let equal = tokio::task::spawn_blocking(move || same(Path::new(&u), "raw", &r, "raw"))
        .await
        .expect("join");
    assert!(
        equal,
        "{fmt}: the disk read through nbd differs from the reference"
    );
    let last = stop(&tracker, &shutdown).await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].previous_unique_id, cut[0].unique_id);
    assert_eq!(
        tracker.current_log(&disk),
        None,
        "no open log after shutdown"
    );

    assert!(
        same(&disk, fmt, &reference, "raw"),
        "{fmt}: disk differs from the reference"
    );

    let logs = opened_logs(&disk);
    assert!(logs.iter().all(|l| l.clean), "every log sealed cleanly");
    assert!(!same(&base, fmt, &disk, fmt), "the writes changed the disk");
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

/// A minimal NBD client (fixed newstyle, OPT_GO, simple replies) to drive exact request
/// sequences and malformed input.
struct Nbd {
    s: UnixStream,
    size: u64,
    next: u64,
}

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQ_MAGIC: u32 = 0x2560_9513;

impl Nbd {
    async fn connect(sock: &Path, export: &str) -> Nbd {
        let mut s = UnixStream::connect(sock).await.expect("connect");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).await.expect("hello");
        assert_eq!(&hello[0..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).await.expect("flags");
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt).await.expect("opt go");
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).await.expect("option reply");
            let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).await.expect("option data");
            match kind {
                1 => break,
                3 if d[0..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().expect("8")))
                }
                3 => {}
                k => panic!("option error {k:#x}"),
            }
        }
        Nbd {
            s,
            size: size.expect("export size"),
            next: 1,
        }
    }

    async fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u64 {
        let h = self.next;
        self.next += 1;
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&REQ_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.expect("request");
        h
    }

    /// Reads one simple reply: (handle, error).
    async fn reply(&mut self) -> (u64, u32) {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).await.expect("reply");
        assert_eq!(r[0..4], 0x6744_6698u32.to_be_bytes());
        (
            u64::from_be_bytes(r[8..16].try_into().expect("8")),
            u32::from_be_bytes(r[4..8].try_into().expect("4")),
        )
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        let h = self.send(1, 0, offset, data.len() as u32, data).await;
        let (got, err) = self.reply().await;
        assert_eq!(got, h);
        err
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let h = self.send(0, 0, offset, len, &[]).await;
        let (got, err) = self.reply().await;
        assert_eq!(got, h);
        if err != 0 {
            return Err(err);
        }
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).await.expect("read data");
        Ok(d)
    }
}

/// Write `i` of the sequence: 4 KiB on disk `i % 2` at slot `i / 2`, stamped with `i`.
fn stamped(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for c in b.chunks_mut(8) {
        c.copy_from_slice(&(i + 1).to_le_bytes());
    }
    b
}

/// Two disks of one VM; one client writes alternately to both, each write sent only after the
/// previous one (on the other disk) was acknowledged, while the VM is cut again and again.
/// Every sealed set must hold a prefix of that sequence: a cut never keeps a write while
/// missing one acknowledged before it, on either disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_across_a_vms_disks_are_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disks: Vec<PathBuf> = ["a.vhdx", "b.raw"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    qemu_img_create(&disks[0], "vhdx", "subformat=dynamic", 32 * MIB);
    qemu_img_create(&disks[1], "raw", "", 32 * MIB);
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        config(dir.path()),
        vec![
            TrackedDisk {
                vm: "vm".into(),
                path: disks[0].clone(),
                export: "a".into(),
            },
            TrackedDisk {
                vm: "vm".into(),
                path: disks[1].clone(),
                export: "b".into(),
            },
        ],
        shutdown.clone(),
    )
    .await
    .expect("start");
    let sock = tracker.socket_path().to_path_buf();
    let total = 3000u64;
    let writer = tokio::spawn(async move {
        let mut c = [
            Nbd::connect(&sock, "a").await,
            Nbd::connect(&sock, "b").await,
        ];
        for i in 0..total {
            let err = c[(i % 2) as usize].write(i / 2 * 4096, &stamped(i)).await;
            assert_eq!(err, 0, "write {i}");
        }
    });
    let mut cuts = Vec::new();
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(15)).await;
        // Every other cut pauses between the two disks' rotations: only the barrier keeps
        // the writer from crossing the cut during the pause.
        let cut = match cuts.len() % 2 {
            0 => tracker.cut("vm").await,
            _ => tracker.cut_staggered("vm", Duration::from_millis(5)).await,
        };
        cuts.push(cut.expect("cut"));
    }
    writer.await.expect("writer");
    cuts.push(tracker.cut("vm").await.expect("last cut"));
    assert!(
        cuts.len() >= 4,
        "the cuts ran while writing ({} cuts)",
        cuts.len()
    );
    stop(&tracker, &shutdown).await;

    // Which writes each sealed log holds, read back from the log files.
    let writes_in = |s: &SealedLog| -> Vec<u64> {
        let disk = if s.disk.ends_with("a.vhdx") { 0 } else { 1 };
        let log = HrlLog::open(&s.log).expect("open sealed log");
        assert!(log.clean);
        let mut buf = vec![0u8; 4096];
        log.records
            .iter()
            .map(|r| {
                assert_eq!(r.length, 4096);
                log.read_record(r, &mut buf).expect("record");
                let i = u64::from_le_bytes(buf[0..8].try_into().expect("8")) - 1;
                assert_eq!(i, r.offset / 4096 * 2 + disk, "record at its slot");
                i
            })
            .collect()
    };
    let mut seen = Vec::new();
    let mut nonempty = 0;
    for (k, cut) in cuts.iter().enumerate() {
        assert_eq!(cut.len(), 2);
        let before = seen.len();
        for s in cut {
            seen.extend(writes_in(s));
        }
        nonempty += usize::from(seen.len() > before);
        seen.sort_unstable();
        let prefix: Vec<u64> = (0..seen.len() as u64).collect();
        assert_eq!(
            seen, prefix,
            "cut {k} is not a prefix of the write sequence"
        );
    }
    assert_eq!(seen.len() as u64, total);
    assert!(nonempty >= 3, "several cuts split the sequence");
    // The chains link up per disk.
    for d in &disks {
        let chain = order_chain(opened_logs(d)).expect("chain");
        assert_eq!(chain.len(), cuts.len() + 1);
    }
}

/// Every acknowledged write is in the current log before any cut or shutdown: replaying the
/// unsealed log (as after a crash) onto the base image gives the disk as it is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_are_in_the_open_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("d.raw");
    qemu_img_create(&disk, "raw", "", 16 * MIB);
    let base = dir.path().join("base.raw");
    std::fs::copy(&disk, &base).expect("copy");
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        config(dir.path()),
        vec![TrackedDisk {
            vm: "vm".into(),
            path: disk.clone(),
            export: "d".into(),
        }],
        shutdown.clone(),
    )
    .await
    .expect("start");
    let mut c = Nbd::connect(tracker.socket_path(), "d").await;
    let mut rng = Rng(9);
    for i in 0..200u64 {
        let len = 512 * (1 + rng.below(64)) as usize;
        let off = rng.below((16 * MIB - len as u64) / 512) * 512;
        assert_eq!(c.write(off, &vec![(i % 250 + 1) as u8; len]).await, 0);
    }
    // TRIM of a written range, and of a never-written one (skipped: it reads zero already).
    let h = c.send(4, 0, 0, 4 * MIB as u32, &[]).await;
    assert_eq!(c.reply().await, (h, 0));
    let logs = opened_logs(&disk);
    assert_eq!(logs.len(), 1);
    assert!(!logs[0].clean, "the log is still open");
    assert_eq!(
        logs[0].records.len(),
        200 + 4,
        "200 writes and 4 zero pieces"
    );
    replay(logs, &base);
    assert!(
        same(&base, "raw", &disk, "raw"),
        "open log + base differs from the disk"
    );
    stop(&tracker, &shutdown).await;
}

/// Malformed clients get errors or are dropped; the server keeps serving the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_break_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("d.vhd");
    qemu_img_create(&disk, "vpc", "subformat=dynamic", 8 * MIB);
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        config(dir.path()),
        vec![TrackedDisk {
            vm: "vm".into(),
            path: disk.clone(),
            export: "d".into(),
        }],
        shutdown.clone(),
    )
    .await
    .expect("start");
    let sock = tracker.socket_path().to_path_buf();

    // Handshake garbage: bad client flags, bad option magic, a 4 GiB option, unknown export.
    for garbage in [
        vec![0xff; 4],
        [3u32.to_be_bytes().to_vec(), vec![0xab; 16]].concat(),
        [
            3u32.to_be_bytes().to_vec(),
            IHAVEOPT.to_be_bytes().to_vec(),
            7u32.to_be_bytes().to_vec(),
            u32::MAX.to_be_bytes().to_vec(),
        ]
        .concat(),
        [
            3u32.to_be_bytes().to_vec(),
            IHAVEOPT.to_be_bytes().to_vec(),
            1u32.to_be_bytes().to_vec(),
            4u32.to_be_bytes().to_vec(),
            b"nope".to_vec(),
        ]
        .concat(),
    ] {
        let mut s = UnixStream::connect(&sock).await.expect("connect");
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).await.expect("hello");
        s.write_all(&garbage).await.expect("garbage");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
            .await
            .expect("server closes the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "no answer to garbage");
    }

    let mut c = Nbd::connect(&sock, "d").await;
    let size = c.size;
    assert_eq!(c.write(0, &[7u8; 4096]).await, 0);
    // Beyond the end, straddling the end, offset overflow: errors, connection still usable.
    assert_eq!(c.write(size, &[1u8; 512]).await, 28);
    assert_eq!(c.write(size - 512, &[1u8; 1024]).await, 28);
    assert_eq!(c.read(u64::MAX - 100, 512).await, Err(22));
    assert_eq!(c.read(0, u32::MAX).await, Err(75), "absurd read length");
    let h = c.send(6, 0, size - 4096, 8192, &[]).await;
    assert_eq!(c.reply().await, (h, 28), "zeroes beyond the end");
    let h = c.send(42, 0, 0, 0, &[]).await;
    assert_eq!(c.reply().await, (h, 22), "unknown command");
    assert_eq!(c.read(0, 4096).await, Ok(vec![7u8; 4096]));

    // A write whose payload never fully arrives, then a 4 GiB write header: dropped.
    let mut d = Nbd::connect(&sock, "d").await;
    d.send(1, 0, 0, 65536, &[9u8; 1000]).await;
    drop(d);
    let mut d = Nbd::connect(&sock, "d").await;
    d.send(1, 0, 0, u32::MAX, &[]).await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), d.s.read_to_end(&mut rest))
        .await
        .expect("server drops the client")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // A bad request magic mid-stream.
    let mut d = Nbd::connect(&sock, "d").await;
    d.s.write_all(&[0x55u8; 28]).await.expect("junk");
    let n = tokio::time::timeout(Duration::from_secs(10), d.s.read_to_end(&mut rest))
        .await
        .expect("server drops the client")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // The good client and a new one still work; the partial write changed nothing.
    assert_eq!(c.read(0, 4096).await, Ok(vec![7u8; 4096]));
    let u = tracker.nbd_uri(&disk).expect("uri");
    let out =
        tokio::task::spawn_blocking(move || qemu_io("raw", &u, &["read -P 7 0 4k".to_string()]))
            .await
            .expect("join");
    assert!(out.contains("read 4096/4096"), "{out}");
    drop(c);
    let last = stop(&tracker, &shutdown).await;
    assert_eq!(last[0].records, 1, "only the one good write was recorded");
}

/// A restart chains its first log to the log sealed at shutdown; loopback TCP serves the same
/// disks; an unknown disk has no URI; a non-loopback TCP address is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_continues_the_chain_and_tcp_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("d.vhdx");
    qemu_img_create(&disk, "vhdx", "subformat=dynamic", 16 * MIB);
    let base = dir.path().join("base.vhdx");
    std::fs::copy(&disk, &base).expect("copy");
    let tracked = vec![TrackedDisk {
        vm: "vm".into(),
        path: disk.clone(),
        export: "d".into(),
    }];
    let refused = Tracker::start(
        TrackerConfig {
            socket_dir: dir.path().join("sock"),
            tcp_listen: Some("0.0.0.0:0".parse().expect("addr")),
        },
        tracked.clone(),
        CancellationToken::new(),
    )
    .await;
    assert!(refused.is_err(), "non-loopback tcp must be refused");
    assert!(
        list_logs(&disk).expect("list").is_empty(),
        "a refused start leaves no log"
    );

    let mut sealed = Vec::new();
    for (round, pattern) in [(0u64, 0x41u8), (1, 0x42)] {
        let shutdown = CancellationToken::new();
        let tracker = Tracker::start(
            TrackerConfig {
                socket_dir: dir.path().join("sock"),
                tcp_listen: Some("127.0.0.1:0".parse().expect("addr")),
            },
            tracked.clone(),
            shutdown.clone(),
        )
        .await
        .expect("start");
        assert_eq!(tracker.nbd_uri(&dir.path().join("other.raw")), None);
        let uri = tracker.nbd_tcp_uri(&disk).expect("tcp uri");
        assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
        let cmds = vec![
            format!("write -P {pattern} {} 2M", round * 3 * MIB + 512),
            format!("read -P {pattern} {} 2M", round * 3 * MIB + 512),
        ];
        tokio::task::spawn_blocking(move || qemu_io("raw", &uri, &cmds))
            .await
            .expect("join");
        sealed.extend(stop(&tracker, &shutdown).await);
    }
    assert_eq!(sealed.len(), 2);
    assert_eq!(sealed[0].seq + 1, sealed[1].seq);
    assert_eq!(sealed[1].previous_unique_id, sealed[0].unique_id);
    let logs = opened_logs(&disk);
    assert_eq!(logs.len(), 2);
    // The logs carry the DataWriteGuid the disk had while they were written.
    let guid = ferry_disk::vhdx_data_write_guid(&disk).expect("guid");
    assert_eq!(logs[1].header.vhd2_data_write_guid, guid);
    assert_ne!(
        logs[0].header.vhd2_data_write_guid, guid,
        "each session has its own"
    );
    replay(logs, &base);
    assert!(
        same(&base, "vhdx", &disk, "vhdx"),
        "base + chain across a restart"
    );
}

/// Not a test: the tracker side of `tests/bench/tracker-write.sh`. Serves the disk named by
/// FERRY_BENCH_DISK (socket folder FERRY_BENCH_SOCK_DIR), writes its NBD URI to
/// FERRY_BENCH_URI_FILE, and stops (sealing the log) when its stdin closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark server, run by tests/bench/tracker-write.sh"]
async fn bench_server() {
    let var = |k: &str| PathBuf::from(std::env::var_os(k).unwrap_or_else(|| panic!("{k} unset")));
    let disk = var("FERRY_BENCH_DISK");
    let shutdown = CancellationToken::new();
    let tracker = Tracker::start(
        TrackerConfig {
            socket_dir: var("FERRY_BENCH_SOCK_DIR"),
            tcp_listen: None,
        },
        vec![TrackedDisk {
            vm: "bench".into(),
            path: disk.clone(),
            export: "disk".into(),
        }],
        shutdown.clone(),
    )
    .await
    .expect("start");
    let uri = tracker.nbd_uri(&disk).expect("uri");
    std::fs::write(var("FERRY_BENCH_URI_FILE"), uri).expect("uri file");
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    let last = stop(&tracker, &shutdown).await;
    for s in last {
        eprintln!(
            "sealed {} records={} bytes={}",
            s.log.display(),
            s.records,
            s.bytes
        );
    }
}
