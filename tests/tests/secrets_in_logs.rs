//! Issue #16, keys: the whole mesh at `RUST_LOG=trace` (services, agents, the CLI, and the
//! libraries under them: tonic, h2, quinn, rustls, redis) through protection, a test
//! failover, a planned failover, commit, re-protect and failback, with refused calls on the
//! way. Every log line, every CLI output and error, the audit trail and every object of the
//! store are then searched for the vault data key, the admin and operator tokens, the Redis
//! password, the registration secrets and the private keys: none may appear.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_tests::*;

/// Writes every event of this process into one file (unbuffered, so nothing is lost when the
/// test ends), at trace level for every crate.
fn trace_to(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the trace subscriber: {e}"))
}

/// A secret in each form it could leak in.
struct Secret {
    what: String,
    forms: Vec<Vec<u8>>,
}

impl Secret {
    fn text(what: &str, s: &str) -> Self {
        Secret {
            what: what.into(),
            forms: vec![s.as_bytes().to_vec()],
        }
    }

    fn bytes(what: &str, b: &[u8]) -> Self {
        let hex = hex::encode(b);
        Secret {
            what: what.into(),
            forms: vec![
                b.to_vec(),
                hex.clone().into_bytes(),
                hex.to_uppercase().into_bytes(),
                base64(b).trim_end_matches('=').as_bytes().to_vec(),
            ],
        }
    }
}

fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &x)| n | (x as u32) << (16 - 8 * i));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    (0..=haystack.len() - needle.len())
        .filter(|&i| haystack[i] == first)
        .find(|&i| &haystack[i..i + needle.len()] == needle)
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

/// The private keys (the base64 lines of each PEM key) and registration secrets found in the
/// test's files: what a leak would copy.
fn key_material(dir: &Path) -> Vec<Secret> {
    let mut out = Vec::new();
    for p in files(dir) {
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        if text.contains("PRIVATE KEY-----") {
            for line in text
                .lines()
                .filter(|l| l.len() >= 40 && !l.starts_with("-----"))
            {
                out.push(Secret::text(&format!("private key {}", p.display()), line));
            }
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(s) = v["secret"].as_str()
        {
            out.push(Secret::text(
                &format!("registration secret {}", p.display()),
                s,
            ));
        }
    }
    out
}

/// Runs `ferry ARGS` (JSON out) and keeps what it printed, refusals included.
struct Cli<'a> {
    t: &'a TestMesh,
    printed: Arc<Mutex<Vec<u8>>>,
}

impl Cli<'_> {
    fn keep(&self, out: &str, err: &str) {
        let mut p = self.printed.lock().unwrap();
        let _ = writeln!(p, "{out}\n{err}");
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let (ok, out, err) = self.t.cli(args)?;
        self.keep(&out, &err);
        anyhow::ensure!(ok, "ferry {args:?}: {out} {err}");
        Ok(serde_json::from_str(&out)?)
    }

    /// `ferry token create`: the one output that shows a token, once, by design; its stderr
    /// is kept, its stdout is not.
    fn new_token(&self, name: &str, role: &str) -> anyhow::Result<String> {
        let args = [
            "token", "create", "--name", name, "--role", role, "-o", "json",
        ];
        let (ok, out, err) = self.t.cli(&args)?;
        self.keep("", &err);
        anyhow::ensure!(ok, "ferry {args:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let token = v["token"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(!token.is_empty(), "no token in {args:?}");
        Ok(token)
    }

    fn job(&self, args: &[&str]) -> anyhow::Result<()> {
        ok_job(&self.json(args)?)
    }

    /// A call that must be refused; its error is kept for the scan.
    fn refused(&self, token: Option<&str>, args: &[&str]) -> anyhow::Result<()> {
        let (ok, out, err) = match token {
            Some(tok) => self.t.cli_as(tok, args)?,
            None => self.t.cli(args)?,
        };
        self.keep(&out, &err);
        anyhow::ensure!(!ok, "ferry {args:?} was let through: {out}");
        Ok(())
    }
}

async fn round_trip(t: &TestMesh, cli: &Cli<'_>) -> anyhow::Result<String> {
    let disks = t.path("disks");
    std::fs::create_dir_all(&disks)?;
    let web = disks.join("web01.raw");
    qemu_create(&web, "raw", "", "8M")?;
    qemu_io(&web, "raw", &["write -P 0x5a 0 2M"])?;
    let hv01 = t.path("hv01");
    let extra = format!("[tracker]\n{}", command_driver(&hv01)?);
    let primary = t
        .site_agent("hv01", "site-a", &[("web01", vec![web.clone()])], &extra)
        .await?;
    let dr = t
        .recovery_agent(&command_driver(&t.path("hv-dr01"))?)
        .await?;
    t.wait_vm("web01").await?;
    cli.json(&[
        "vm",
        "protect",
        "web01",
        "--frequency",
        "2s",
        "--recovery-host",
        "hv-dr01",
        "--wait",
        "-o",
        "json",
    ])?;

    let op = cli.new_token("scan-op", "operator")?;
    let reader = cli.new_token("scan-rd", "reader")?;
    cli.json(&["token", "list", "-o", "json"])?;
    cli.refused(Some(&reader), &["failover", "test", "web01", "-o", "json"])?;
    cli.refused(Some(&op), &["vm", "unprotect", "web01", "-o", "json"])?;
    cli.refused(
        Some("not-a-token-of-this-vault"),
        &["vm", "list", "-o", "json"],
    )?;
    cli.refused(None, &["failover", "test", "nosuchvm", "-o", "json"])?;

    let uri = t.vm("web01").await?.disks[0].nbd_uri.clone();
    nbd_write(&uri, &["write -P 0xa1 1M 64k"])?;
    let last = t.vm("web01").await?.last_point_id;
    t.points_after("web01", &last, 1).await?;
    cli.job(&["failover", "test", "web01", "-o", "json"])?;
    cli.job(&["failover", "cleanup", "web01", "-o", "json"])?;

    cli.job(&["failover", "planned", "web01", "-o", "json"])?;
    let (_, dr_uri) = t.failover_disk("planned")?;
    cli.job(&["failover", "commit", "web01", "-o", "json"])?;
    cli.job(&["vm", "reprotect", "web01", "-o", "json"])?;
    let last = t.vm("web01").await?.last_point_id;
    nbd_write(&dr_uri, &["write -P 0xb2 5M 64k"])?;
    t.points_after("web01", &last, 1).await?;
    cli.job(&["failback", "web01", "-o", "json"])?;
    cli.job(&["failback", "complete", "web01", "-o", "json"])?;
    cli.job(&["failover", "commit", "web01", "-o", "json"])?;

    cli.json(&["status", "-o", "json"])?;
    cli.json(&["audit", "--verify", "-o", "json"])?;
    cli.json(&["audit", "-o", "json"])?;
    primary.shutdown().await?;
    dr.shutdown().await?;
    Ok(op + "\n" + &reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_an_output_or_the_store() -> anyhow::Result<()> {
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("trace.log");
    trace_to(&log)?;
    // The CLI runs as child processes: they inherit the level. Nothing else in this process
    // reads the environment yet (the mesh starts below).
    unsafe { std::env::set_var("RUST_LOG", "trace") };
    let t = TestMesh::start().await?;
    let printed = Arc::new(Mutex::new(Vec::new()));
    let cli = Cli {
        t: &t,
        printed: printed.clone(),
    };
    let tokens = round_trip(&t, &cli).await?;

    let mut secrets = vec![
        Secret::bytes("vault data key", &t.ctl.cfg.data_key()?),
        Secret::text("admin token", &t.ctl.cfg.admin_token()?),
        Secret::text(
            "redis password",
            t.mesh.redis().expect("the mesh's redis").password(),
        ),
    ];
    for tok in tokens.lines() {
        secrets.push(Secret::text("token", tok));
    }
    secrets.extend(key_material(t.dir.path()));
    let store = PathBuf::from(t.ctl.cfg.store_url().trim_start_matches("file://"));
    let config = t.mesh.config_path.clone();
    let redis_log = files(&t.mesh.cfg.data_dir.join("redis"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect::<Vec<_>>();
    drop(cli);
    // Stop the mesh (its last lines logged) but keep its folder until the scan is done.
    let TestMesh { mesh, dir, ctl: _ } = t;
    mesh.stop().await;

    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("the trace log".into(), std::fs::read(&log)?),
        ("cli output".into(), printed.lock().unwrap().clone()),
        (config.display().to_string(), std::fs::read(&config)?),
    ];
    for p in files(&store).into_iter().chain(redis_log) {
        places.push((p.display().to_string(), std::fs::read(&p)?));
    }
    let log_len = places[0].1.len();
    let lines = places[0].1.iter().filter(|&&b| b == b'\n').count();
    let trace_lines = std::str::from_utf8(&places[0].1)
        .map(|s| s.lines().filter(|l| l.contains(" TRACE ")).count())
        .unwrap_or(0);
    eprintln!(
        "scanned {} places for {} secrets: trace log {log_len} bytes, {lines} lines \
         ({trace_lines} at trace)",
        places.len(),
        secrets.len()
    );
    assert!(trace_lines > 1000, "the mesh did not log at trace level");
    let mut leaks = Vec::new();
    for s in &secrets {
        for (place, bytes) in &places {
            for form in &s.forms {
                if let Some(at) = find(bytes, form) {
                    let from = at.saturating_sub(120);
                    let context = String::from_utf8_lossy(&bytes[from..(at + 40).min(bytes.len())])
                        .replace(&*String::from_utf8_lossy(form), "<SECRET>");
                    leaks.push(format!("{} in {place} at {at}: …{context}…", s.what));
                }
            }
        }
    }
    drop(dir);
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    Ok(())
}
