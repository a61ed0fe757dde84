//! A child `redis-server` for tests and the single-machine `ferry up`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::CoordError;

const START_TIMEOUT: Duration = Duration::from_secs(15);
const PORT_ATTEMPTS: usize = 5;
const CONF: &str = "redis.conf";
const SOCKET: &str = "redis.sock";
/// `sun_path` holds 108 bytes with its terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// True if a `redis-server` binary can be run.
pub fn redis_server_available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The certificate a TLS-only server presents (PEM files; the key must be readable by the
/// server) and the CA it names to clients.
#[derive(Clone, Debug)]
pub struct RedisTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// A `redis-server` child on a free 127.0.0.1 port, without persistence (`--save ""
/// --appendonly no`), working in a given directory, that refuses clients without its random
/// password (`requirepass`, in a mode-0600 config file so it never shows in `ps`). Started
/// with [`RedisServer::start_tls`], its port speaks TLS only. It also listens on a unix socket
/// in its directory (mode 0700, still behind the password), which is how this launcher knows
/// its own child answers and not another server that took the port. The child is killed when
/// this is dropped.
pub struct RedisServer {
    child: Option<Child>,
    launch: Launch,
}

struct Launch {
    dir: PathBuf,
    port: u16,
    password: String,
    tls: Option<RedisTls>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.launch.port)
            .field("tls", &self.launch.tls.is_some())
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl RedisServer {
    /// Starts a server and waits until it answers.
    pub fn start(dir: &Path) -> Result<Self, CoordError> {
        Self::start_with(dir, None)
    }

    /// Starts a server whose port speaks TLS only (`rediss://`).
    pub fn start_tls(dir: &Path, tls: RedisTls) -> Result<Self, CoordError> {
        Self::start_with(dir, Some(tls))
    }

    fn start_with(dir: &Path, tls: Option<RedisTls>) -> Result<Self, CoordError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| CoordError::Spawn(format!("creating {}: {e}", dir.display())))?;
        // redis-server changes into --dir before opening --logfile: pass absolute paths.
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| CoordError::Spawn(format!("resolving {}: {e}", dir.display())))?;
        let socket = dir.join(SOCKET);
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(CoordError::Spawn(format!(
                "{} is longer than the {MAX_SOCKET_PATH} bytes a unix socket path may have; use a \
                 shorter data dir",
                socket.display()
            )));
        }
        let password = hex::encode(rand::random::<[u8; 24]>());
        write_conf(&dir, &password)?;
        let mut launch = Launch {
            dir,
            port: 0,
            password,
            tls,
        };
        let mut last = String::new();
        // A port found free can be taken before the server binds it; try a few.
        for _ in 0..PORT_ATTEMPTS {
            launch.port = free_port()?;
            match launch.spawn_and_wait() {
                Ok(child) => {
                    info!(
                        port = launch.port,
                        tls = launch.tls.is_some(),
                        pid = child.id(),
                        "redis-server started"
                    );
                    return Ok(RedisServer {
                        child: Some(child),
                        launch,
                    });
                }
                Err(e) => {
                    warn!(port = launch.port, error = %e, "redis-server did not start, trying another port");
                    last = e;
                }
            }
        }
        Err(CoordError::Spawn(last))
    }

    /// `redis://:<password>@127.0.0.1:<port>/` (`rediss://` with TLS): it holds the password,
    /// so never log it; the address alone is [`RedisServer::address_url`].
    pub fn url(&self) -> String {
        format!(
            "{}://:{}@127.0.0.1:{}/",
            self.scheme(),
            self.launch.password,
            self.launch.port
        )
    }

    /// `redis://127.0.0.1:<port>/` (`rediss://` with TLS), without the password.
    pub fn address_url(&self) -> String {
        format!("{}://127.0.0.1:{}/", self.scheme(), self.launch.port)
    }

    fn scheme(&self) -> &'static str {
        if self.launch.tls.is_some() {
            "rediss"
        } else {
            "redis"
        }
    }

    /// The AUTH password clients must give.
    pub fn password(&self) -> &str {
        &self.launch.password
    }

    pub fn port(&self) -> u16 {
        self.launch.port
    }

    /// The unix socket in the server's directory (plain, behind the password): what
    /// `redis-cli -s` takes.
    pub fn socket(&self) -> PathBuf {
        self.launch.dir.join(SOCKET)
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
            debug!(pid, port = self.launch.port, "redis-server stopped");
        }
    }

    /// Kills the server if it runs and starts an empty one on the same port (what a Redis
    /// crash without persistence looks like to clients).
    pub fn restart(&mut self) -> Result<(), CoordError> {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.launch.spawn_and_wait() {
                Ok(child) => {
                    info!(
                        port = self.launch.port,
                        pid = child.id(),
                        "redis-server restarted"
                    );
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

/// The server's config file, mode 0600: only the password is in it.
fn write_conf(dir: &Path, password: &str) -> Result<(), CoordError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(CONF);
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| CoordError::Spawn(format!("writing {}: {e}", path.display())))?;
    f.write_all(format!("requirepass {password}\n").as_bytes())
        .map_err(|e| CoordError::Spawn(format!("writing {}: {e}", path.display())))
}

impl Launch {
    fn command(&self) -> Command {
        let dir = &self.dir;
        let mut cmd = Command::new("redis-server");
        cmd.arg(dir.join(CONF));
        let port = self.port.to_string();
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(tls) => cmd
                .args(["--port", "0", "--tls-port", &port])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                // Clients prove themselves with the password; only the server shows a cert.
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .arg("--unixsocket")
            .arg(dir.join(SOCKET))
            .args(["--unixsocketperm", "700"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(self.log())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    fn log(&self) -> PathBuf {
        self.dir.join(format!("redis-{}.log", self.port))
    }

    fn spawn_and_wait(&self) -> Result<Child, String> {
        // A socket left by a killed server would answer nothing; the new one replaces it.
        let _ = std::fs::remove_file(self.dir.join(SOCKET));
        let mut child = self
            .command()
            .spawn()
            .map_err(|e| format!("spawning redis-server: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(self.log()).unwrap_or_default();
                let tail: String = tail.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                return Err(format!(
                    "exited with {status} on port {}: {tail}",
                    self.port
                ));
            }
            match probe(&self.dir.join(SOCKET), &self.password) {
                Probe::Pid(pid) if pid == child.id() => return Ok(child),
                Probe::Pid(pid) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} is served by another redis-server (pid {pid})",
                        self.dir.display()
                    ));
                }
                Probe::Silent => {}
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no answer on port {} within {START_TIMEOUT:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

enum Probe {
    /// Nothing answers yet (or not with our password).
    Silent,
    /// A server took our password and told its pid.
    Pid(u32),
}

/// Who answers on the socket: `AUTH` with our password, then `INFO server` for the pid.
fn probe(socket: &Path, password: &str) -> Probe {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return Probe::Silent;
    };
    let auth = format!("*2\r\n$4\r\nAUTH\r\n${}\r\n{password}\r\n", password.len());
    let sent = s.set_read_timeout(Some(Duration::from_millis(500))).is_ok()
        && s.write_all(auth.as_bytes()).is_ok()
        && s.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n").is_ok();
    if !sent {
        return Probe::Silent;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match s.read(&mut chunk) {
            Ok(n) if n > 0 => n,
            _ => return Probe::Silent,
        };
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        // An error (still loading) is an answer too early: ask again.
        if text.starts_with('-') || buf.len() > 64 * 1024 {
            return Probe::Silent;
        }
        // Only a whole line: a read may end in the middle of the number.
        if let Some((_, after)) = text.split_once("process_id:")
            && let Some((pid, _)) = after.split_once("\r\n")
        {
            return pid.trim().parse().map_or(Probe::Silent, Probe::Pid);
        }
    }
}
