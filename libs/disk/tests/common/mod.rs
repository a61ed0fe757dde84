//! Test helpers: qemu-img / qemu-io as the outside oracle, in temp dirs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn status(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// qemu's format name for a file we made or qemu made.
pub fn qfmt(format: &str) -> &str {
    match format {
        "vhd" => "vpc",
        f => f,
    }
}

pub fn qemu_create(path: &Path, fmt: &str, opts: &str, size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(path), size.as_str()]);
    run("qemu-img", &args);
}

/// Runs qemu-io commands (`write -P 0xab 0 4096`, `write -z ...`) on an image.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[String]) {
    let mut args: Vec<&str> = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(path));
    run("qemu-io", &args);
}

pub fn qemu_size(path: &Path, fmt: &str) -> u64 {
    let out = run("qemu-img", &["info", "-f", fmt, "--output=json", p(path)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img info json");
    v["virtual-size"].as_u64().expect("virtual-size")
}

pub fn qemu_to_raw(path: &Path, fmt: &str, out: &Path) {
    run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", p(path), p(out)],
    );
}

/// `qemu-img compare` exit code: 0 same, 1 differ, >1 error.
pub fn qemu_compare(a: &Path, afmt: &str, b: &Path, bfmt: &str) -> (i32, String) {
    status("qemu-img", &["compare", "-f", afmt, "-F", bfmt, p(a), p(b)])
}

/// Reads a whole device in odd-sized pieces so block boundaries are crossed mid-read.
pub fn read_all(d: &dyn ferry_disk::BlockDevice) -> Vec<u8> {
    let size = d.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let mut off = 0usize;
    let mut step = 3 * 1024 * 1024 + 512;
    while off < size {
        let n = step.min(size - off);
        d.read_at(off as u64, &mut out[off..off + n])
            .expect("read_at");
        off += n;
        step = if step > 4096 {
            step / 2 + 1536
        } else {
            5 << 20
        };
    }
    out
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn file(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}
