//! Running a driver's command (a hook or `virsh`) within a deadline and a cancellation.
//!
//! Each command runs in a process group of its own so that a timeout or a cancellation kills
//! everything it started (`sh -c` runs scripts that run other programs); a command that
//! finishes by itself may leave processes behind (a start hook may leave the VM running), so
//! those are left alone.
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::DriverError;

/// How much of a command's error output an error quotes.
const TAIL_BYTES: usize = 1024;
/// How much of a command's output is kept (and logged) at most.
const KEEP_BYTES: usize = 64 * 1024;
/// How long the output pipes may stay open after the command exited (a process it left
/// behind may hold them); its output after that is not waited for.
const PIPE_GRACE: Duration = Duration::from_secs(1);

/// One run of a command for a VM.
pub(super) struct Job<'a> {
    pub vm: &'a str,
    pub action: &'static str,
    /// The command as errors name it.
    pub command: String,
    pub deadline: Instant,
    /// The configured timeout, as errors name it.
    pub timeout: Duration,
    pub cancel: &'a CancellationToken,
}

/// A command that exited by itself.
pub(super) struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    /// The last ~1 KiB of its error output.
    pub stderr: String,
}

enum Ended {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
}

/// Kills the command's process group when dropped before the command finished: on a
/// timeout, a cancellation, or when the caller drops the future.
struct Group(Option<i32>);

impl Group {
    fn kill(&mut self) {
        // Never 0 or 1: kill(-0) is our own group and kill(-1) every process we may signal.
        if let Some(pgid) = self.0.take().filter(|p| *p > 1) {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Job<'_> {
    /// Runs `cmd` with its stdout and stderr appended to `log` (a file, not a pipe: a process
    /// the command leaves behind, such as a VM, must not die of SIGPIPE when the agent
    /// restarts). The output of this run is logged at debug and its tail kept for errors.
    pub async fn run_logged(
        &self,
        mut cmd: tokio::process::Command,
        log: &Path,
    ) -> Result<Finished, DriverError> {
        let io = |what: &str, source| DriverError::Io {
            vm: self.vm.to_string(),
            what: format!("{what} {}", log.display()),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| io("opening", e))?;
        writeln!(file, "--- {} `{}`", self.action, self.command).map_err(|e| io("writing", e))?;
        let from = file.metadata().map_err(|e| io("reading", e))?.len();
        let err_file = file.try_clone().map_err(|e| io("opening", e))?;
        cmd.stdout(Stdio::from(file)).stderr(Stdio::from(err_file));
        let (mut child, mut group) = self.spawn(cmd)?;
        let ended = self.wait(&mut child, &mut group).await?;
        let output = read_from(log, from).map_err(|e| io("reading", e))?;
        self.log_output("output", &output);
        self.finish(ended, String::new(), tail(&output))
    }

    /// Runs `cmd` with its output piped back (for programs that leave nothing behind, such
    /// as `virsh`).
    pub async fn run_piped(
        &self,
        mut cmd: tokio::process::Command,
    ) -> Result<Finished, DriverError> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let (mut child, mut group) = self.spawn(cmd)?;
        let out = child.stdout.take().map(|r| tokio::spawn(read_capped(r)));
        let err = child.stderr.take().map(|r| tokio::spawn(read_capped(r)));
        let ended = self.wait(&mut child, &mut group).await?;
        let collect = |h: Option<tokio::task::JoinHandle<Vec<u8>>>| async move {
            match h {
                Some(h) => tokio::time::timeout(PIPE_GRACE, h)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default(),
                None => Vec::new(),
            }
        };
        let stdout = String::from_utf8_lossy(&collect(out).await).into_owned();
        let stderr = String::from_utf8_lossy(&collect(err).await).into_owned();
        self.log_output("stdout", &stdout);
        self.log_output("stderr", &stderr);
        self.finish(ended, stdout, tail(&stderr))
    }

    /// An exit other than success as an error naming the status and the error output.
    pub fn check(&self, out: Finished) -> Result<Finished, DriverError> {
        if out.status.success() {
            Ok(out)
        } else {
            Err(self.failed(&out))
        }
    }

    pub fn failed(&self, out: &Finished) -> DriverError {
        DriverError::Failed {
            vm: self.vm.to_string(),
            action: self.action,
            command: self.command.clone(),
            status: out.status.to_string(),
            output: out.stderr.clone(),
        }
    }

    fn spawn(
        &self,
        mut cmd: tokio::process::Command,
    ) -> Result<(tokio::process::Child, Group), DriverError> {
        cmd.stdin(Stdio::null()).kill_on_drop(true).process_group(0);
        let child = cmd.spawn().map_err(|source| DriverError::Spawn {
            vm: self.vm.to_string(),
            action: self.action,
            command: self.command.clone(),
            source,
        })?;
        let group = Group(child.id().and_then(|p| i32::try_from(p).ok()));
        Ok((child, group))
    }

    async fn wait(
        &self,
        child: &mut tokio::process::Child,
        group: &mut Group,
    ) -> Result<Ended, DriverError> {
        enum W {
            Done(std::io::Result<ExitStatus>),
            Deadline,
            Cancel,
        }
        let w = tokio::select! {
            r = child.wait() => W::Done(r),
            _ = tokio::time::sleep_until(self.deadline) => W::Deadline,
            _ = self.cancel.cancelled() => W::Cancel,
        };
        match w {
            W::Done(r) => {
                // Finished by itself: what it left running is meant to run (see the module).
                group.0 = None;
                r.map(Ended::Exited).map_err(|source| DriverError::Io {
                    vm: self.vm.to_string(),
                    what: format!("waiting for `{}`", self.command),
                    source,
                })
            }
            W::Deadline | W::Cancel => {
                group.kill();
                // SIGKILL cannot be ignored, so this returns at once; it reaps the child.
                let _ = child.wait().await;
                Ok(match w {
                    W::Deadline => Ended::TimedOut,
                    _ => Ended::Cancelled,
                })
            }
        }
    }

    fn finish(
        &self,
        ended: Ended,
        stdout: String,
        stderr: String,
    ) -> Result<Finished, DriverError> {
        match ended {
            Ended::Exited(status) => Ok(Finished {
                status,
                stdout,
                stderr,
            }),
            Ended::TimedOut => Err(DriverError::Timeout {
                vm: self.vm.to_string(),
                action: self.action,
                command: self.command.clone(),
                timeout: self.timeout,
                output: stderr,
            }),
            Ended::Cancelled => Err(DriverError::Cancelled {
                vm: self.vm.to_string(),
                action: self.action,
                command: self.command.clone(),
            }),
        }
    }

    fn log_output(&self, stream: &'static str, text: &str) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::debug!(vm = %self.vm, action = self.action, stream, line, "driver command output");
        }
    }
}

/// Reads a pipe to its end, keeping the last [`KEEP_BYTES`].
async fn read_capped(mut r: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > KEEP_BYTES {
                    kept.drain(..kept.len() - KEEP_BYTES);
                }
            }
        }
    }
}

/// What was appended to `path` after byte `from`, at most the last [`KEEP_BYTES`] of it.
fn read_from(path: &Path, from: u64) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = from.max(len.saturating_sub(KEEP_BYTES as u64));
    f.seek(std::io::SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(KEEP_BYTES as u64).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last ~[`TAIL_BYTES`] of `text`, cut at a character boundary, "…" in front when cut.
pub(super) fn tail(text: &str) -> String {
    let text = text.trim();
    if text.len() <= TAIL_BYTES {
        return text.to_string();
    }
    let mut start = text.len() - TAIL_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_is_cut_at_a_character_boundary() {
        assert_eq!(tail("  short\n"), "short");
        let long = format!("{}é{}", "x".repeat(2000), "y".repeat(TAIL_BYTES - 1));
        let t = tail(&long);
        assert!(t.starts_with('…') && t.ends_with('y'), "{t}");
        assert!(t.len() <= TAIL_BYTES + '…'.len_utf8());
    }

    #[test]
    fn only_this_runs_output_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("driver.log");
        std::fs::write(&log, "old run\n").unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"new run\n")
            .unwrap();
        assert_eq!(read_from(&log, from).unwrap(), "new run\n");
    }
}
