//! A child `redis-server` for tests and the single-machine `ferry up`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::CoordError;

const START_TIMEOUT: Duration = Duration::from_secs(15);
const PORT_ATTEMPTS: usize = 5;

/// True if a `redis-server` binary can be run.
pub fn redis_server_available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `redis-server` child on a free 127.0.0.1 port, without persistence (`--save ""
/// --appendonly no`), working in a given directory. The child is killed when this is dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    pub fn start(dir: &Path) -> Result<Self, CoordError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| CoordError::Spawn(format!("creating {}: {e}", dir.display())))?;
        // redis-server changes into --dir before opening --logfile: pass absolute paths.
        let dir = &std::fs::canonicalize(dir)
            .map_err(|e| CoordError::Spawn(format!("resolving {}: {e}", dir.display())))?;
        let mut last = String::new();
        // A port found free can be taken before the server binds it; try a few.
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            match spawn_and_wait(dir, port) {
                Ok(child) => {
                    info!(port, pid = child.id(), "redis-server started");
                    return Ok(RedisServer {
                        child: Some(child),
                        port,
                        dir: dir.to_path_buf(),
                    });
                }
                Err(e) => {
                    warn!(port, error = %e, "redis-server did not start, trying another port");
                    last = e;
                }
            }
        }
        Err(CoordError::Spawn(last))
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The child's pid (0 once it has been killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Kills the server (for fault tests); all its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let _ = child.kill();
            let _ = child.wait();
            debug!(pid, port = self.port, "redis-server stopped");
        }
    }

    /// Kills the server if it runs and starts an empty one on the same port (what a Redis
    /// crash without persistence looks like to clients).
    pub fn restart(&mut self) -> Result<(), CoordError> {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn_and_wait(&self.dir, self.port) {
                Ok(child) => {
                    info!(port = self.port, pid = child.id(), "redis-server restarted");
                    self.child = Some(child);
                    return Ok(());
                }
                // The old socket may linger briefly.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => return Err(CoordError::Spawn(e)),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16, CoordError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| CoordError::Spawn(format!("finding a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| CoordError::Spawn(format!("finding a free port: {e}")))
}

fn spawn_and_wait(dir: &Path, port: u16) -> Result<Child, String> {
    let log = dir.join(format!("redis-{port}.log"));
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning redis-server: {e}"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            return Err(format!("exited with {status} on port {port}: {tail}"));
        }
        // Check the pid: another server (a concurrent test) may own the port we picked.
        match server_pid(port) {
            Some(pid) if pid == child.id() => return Ok(child),
            Some(pid) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "port {port} is taken by another redis-server (pid {pid})"
                ));
            }
            None => {}
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "no PING answer on port {port} within {START_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of the redis-server answering on `port` (`INFO server`), if any answers.
fn server_pid(port: u16) -> Option<u32> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n").ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(line) = text.lines().find_map(|l| l.strip_prefix("process_id:")) {
            return line.trim().parse().ok();
        }
        if buf.len() > 64 * 1024 || text.starts_with('-') {
            return None;
        }
    }
}
