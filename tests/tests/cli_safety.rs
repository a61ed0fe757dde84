//! The first-hour bugs of issue #9, with the real `ferry` binary: one mesh per data dir (a
//! second `ferry up` refuses, names the holder and writes nothing), a registration key's
//! validity is refused instead of changed, and a closed pipe ends the CLI quietly with 0.
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ferry_tests::*;

fn ferry(args: &[&str]) -> anyhow::Result<Command> {
    let mut c = Command::new(bin("ferry")?);
    c.args(args);
    Ok(c)
}

fn start_up(dir: &Path, log: &Path) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log)?;
    Ok(ferry(&["up", "--data-dir"])?
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// Waits until the mesh on `dir` answers `ferry status`.
async fn wait_up(dir: &Path, child: &mut Child) -> anyhow::Result<()> {
    let cfg = dir.join("ferry.toml");
    for _ in 0..300 {
        if let Some(st) = child.try_wait()? {
            anyhow::bail!("ferry up exited early: {st}");
        }
        if cfg.exists() {
            let out = ferry(&["status"])?.arg("--config").arg(&cfg).output()?;
            if out.status.success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the mesh on {} never served", dir.display())
}

fn terminate(mut child: Child) -> anyhow::Result<std::process::ExitStatus> {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    Ok(child.wait()?)
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mesh_per_data_dir_and_values_refused_not_changed() -> anyhow::Result<()> {
    init_logs();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("mesh");
    let mut first = start_up(&dir, &tmp.path().join("up1.log"))?;
    wait_up(&dir, &mut first).await?;
    let cfg = dir.join("ferry.toml");
    let before = std::fs::read(&cfg)?;

    // A second `ferry up` on the same data dir, several times: refused, nothing rewritten.
    for _ in 0..3 {
        let second = ferry(&["up", "--data-dir"])?.arg(&dir).output()?;
        assert!(!second.status.success(), "{second:?}");
        let msg = text(&second);
        assert!(
            msg.contains("in use") && msg.contains(&format!("pid {}", first.id())),
            "names the running mesh: {msg}"
        );
        assert_eq!(std::fs::read(&cfg)?, before, "ferry.toml must be untouched");
    }
    // The running mesh still answers its (unchanged) config.
    let st = ferry(&["status"])?.arg("--config").arg(&cfg).output()?;
    assert!(st.status.success(), "{}", text(&st));

    // Values the operator gave are refused with the allowed range, never rounded.
    for ttl in ["0s", "1500ms", "400d"] {
        let key = tmp.path().join(format!("key-{ttl}.json"));
        let out = ferry(&["vault", "registration-key", "--ttl", ttl, "--out"])?
            .arg(&key)
            .arg("--config")
            .arg(&cfg)
            .output()?;
        assert!(!out.status.success(), "--ttl {ttl}: {}", text(&out));
        assert!(text(&out).contains("1s to 365d"), "{}", text(&out));
        assert!(!key.exists(), "no key written for --ttl {ttl}");
    }

    // A reader that goes away: quiet, status 0, no panic.
    let cfg_s = cfg.display().to_string();
    let ferry_bin = bin("ferry")?.display().to_string();
    for reader in ["head -c 10", "true"] {
        for cmd in ["vm list -o json", "host list -o json", "status -o json"] {
            let out = Command::new("bash")
                .arg("-c")
                .arg(format!(
                    "set -o pipefail; '{ferry_bin}' --config '{cfg_s}' {cmd} | {reader} >/dev/null"
                ))
                .output()?;
            let msg = text(&out);
            assert!(out.status.success(), "{cmd} | {reader}: {out:?}");
            assert!(!msg.contains("panicked"), "{cmd} | {reader}: {msg}");
        }
    }

    // Once the first mesh stops, the data dir is free again.
    let st = terminate(first)?;
    assert!(st.success(), "ferry up stops cleanly on SIGTERM: {st}");
    let mut again = start_up(&dir, &tmp.path().join("up2.log"))?;
    wait_up(&dir, &mut again).await?;
    assert!(terminate(again)?.success());
    Ok(())
}
