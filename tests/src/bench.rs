//! Helpers shared by the benchmarks in `src/bin/` (not used by tests).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// Synthetic but realistic image: text, machine code-like bytes, already-compressed data and
/// zero regions, interleaved in 1-8 MiB extents. Deterministic for a given size.
pub fn make_image(path: &Path, size: u64) -> anyhow::Result<u64> {
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
    let mut off = 0u64;
    let mut data = 0u64;
    let mut buf = Vec::with_capacity(8 << 20);
    while off < size {
        let len = ((1 + next() % 8) << 20).min(size - off);
        let kind = next() % 10;
        buf.clear();
        fill_extent(&mut buf, kind, len, &mut next);
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

/// The words of the text extents of [`make_image`].
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

/// Fills `buf` (empty) with an extent of `len` bytes of `kind` (0-9, see [`make_image`]),
/// drawing from `next`; a hole leaves it empty. May overshoot `len`: the caller truncates.
fn fill_extent(buf: &mut Vec<u8>, kind: u64, len: u64, next: &mut impl FnMut() -> u64) {
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
}

#[derive(Clone, Copy, Default)]
pub struct Usage {
    pub cpu: f64,
    pub children_cpu: f64,
}

pub fn usage() -> Usage {
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

pub fn peak_rss_mib() -> f64 {
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

pub fn drop_caches() {
    // Best effort: a cold read for each contender (needs root; harmless otherwise).
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

pub fn timed(cmd: &mut Command) -> anyhow::Result<(f64, f64)> {
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

/// `restic ARGS -r <dir>/restic-repo` with a throwaway password and its cache under `dir`.
pub fn restic(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("restic");
    c.args(args)
        .arg("-r")
        .arg(dir.join("restic-repo"))
        .env("RESTIC_PASSWORD", "bench-only-not-a-secret")
        .env("RESTIC_CACHE_DIR", dir.join("restic-cache"));
    c
}

/// Bytes of the files below `p`.
pub fn walk_size(p: &Path) -> u64 {
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

/// The recovery host of the failover benchmarks, `host` in site-b: a `[recovery]` folder, a
/// tracker and a command driver whose start writes `date +%s.%N` into `started`; connected
/// and ready to receive VMs.
pub async fn stamped_recovery_agent(
    t: &crate::TestMesh,
    host: &str,
    started: &Path,
) -> anyhow::Result<crate::InProcessAgent> {
    let extra = format!(
        "[recovery]\ndir = \"recovered\"\n[tracker]\n[driver]\nkind = \"command\"\n\
         start = {:?}\nstop = \"true\"\n",
        format!("date +%s.%N > '{}'", started.display())
    );
    let dr = t.site_agent(host, "site-b", &[], &extra).await?;
    let recovery = |h: &ferry_proto::registry::v1::Host| h.status == "connected" && h.recovery;
    t.wait_host(host, recovery, Duration::from_secs(60)).await?;
    Ok(dr)
}

/// The `ferry` CLI built next to this benchmark (`target/release/ferry`).
pub fn ferry_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe
        .parent()
        .context("the benchmark has no folder")?
        .join("ferry");
    anyhow::ensure!(
        p.exists(),
        "{} not built; run `cargo build --release -p ferry --bin ferry`",
        p.display()
    );
    Ok(p)
}

pub fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// A time `date +%s.%N` wrote into `path`.
pub fn read_unix_time(path: &Path) -> anyhow::Result<SystemTime> {
    let s = std::fs::read_to_string(path)?;
    let (secs, nanos) = s.trim().split_once('.').context("no '.' in the time")?;
    let nanos = format!("{nanos:0<9}");
    Ok(UNIX_EPOCH
        + Duration::new(
            secs.parse().context("seconds")?,
            nanos[..9].parse().context("nanoseconds")?,
        ))
}

/// Seconds from `from` to `to` (negative when `to` is earlier).
pub fn secs_between(from: SystemTime, to: SystemTime) -> f64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// What `rsync --no-whole-file --inplace` of one file onto another took.
pub struct Rsynced {
    pub secs: f64,
    pub sent: u64,
    pub received: u64,
}

/// `rsync --no-whole-file --inplace --ignore-times --stats SRC DST`, caches dropped first,
/// timed; fails unless DST then equals SRC (`qemu-img compare`, raw).
pub fn rsync_inplace(src: &Path, dst: &Path) -> anyhow::Result<Rsynced> {
    drop_caches();
    let t0 = Instant::now();
    let out = crate::run(
        Command::new("rsync")
            // --ignore-times: the copy may share the image's size and modification second,
            // which rsync's quick check would take for "unchanged".
            .args(["--no-whole-file", "--inplace", "--ignore-times", "--stats"])
            .arg(src)
            .arg(dst),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    let stat = |name: &str| -> anyhow::Result<u64> {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().replace(',', ""))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("rsync --stats has no {name:?}"))
    };
    let r = Rsynced {
        secs,
        sent: stat("Total bytes sent:")?,
        received: stat("Total bytes received:")?,
    };
    anyhow::ensure!(
        crate::qemu_compare(src, "raw", dst, "raw")?,
        "rsync left {} different from {}",
        dst.display(),
        src.display()
    );
    Ok(r)
}
