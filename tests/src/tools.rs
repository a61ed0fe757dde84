//! External tools: workspace binaries, commands, `qemu-img`/`qemu-io`, test data.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A workspace binary built next to the test executable (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable has no target dir")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not built; run `cargo build --workspace --bins` first",
            p.display()
        );
    }
    Ok(p)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img create -f FMT [-o OPTS] PATH SIZE`.
pub fn qemu_create(path: &Path, fmt: &str, opts: &str, size: &str) -> anyhow::Result<()> {
    let mut c = Command::new("qemu-img");
    c.arg("create").arg("-q").arg("-f").arg(fmt);
    if !opts.is_empty() {
        c.arg("-o").arg(opts);
    }
    c.arg(path).arg(size);
    run(&mut c).map(|_| ())
}

/// Runs `qemu-io` commands (e.g. `write -P 0xab 0 1M`) on an image.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(path);
    run(&mut c).map(|_| ())
}

/// `qemu-img compare`: Ok(true) when identical.
pub fn qemu_compare(a: &Path, fa: &str, b: &Path, fb: &str) -> anyhow::Result<bool> {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => {
            // Where they differ, for the failing test's output.
            eprintln!(
                "qemu-img compare {} {}: {}",
                a.display(),
                b.display(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
            Ok(false)
        }
        _ => bail!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `qemu-img convert -O raw`: the guest-visible content of `src` (any format qemu probes,
/// or an NBD URI) into the raw file `dst`.
pub fn qemu_convert(src: &Path, dst: &Path) -> anyhow::Result<()> {
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(src)
        .arg(dst))
    .map(|_| ())
}

pub fn qemu_virtual_size(path: &Path, fmt: &str) -> anyhow::Result<u64> {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(path))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["virtual-size"]
        .as_u64()
        .context("qemu-img info has no virtual-size")
}

/// Writes deterministic incompressible-ish data into a raw file region via qemu-io patterns
/// plus a random-looking file copied in with `dd`-like writes from Rust.
pub fn fill_random(path: &Path, offset: u64, len: usize, seed: u64) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&crate::Rng::new(seed).bytes(len))?;
    f.sync_all()?;
    Ok(())
}
