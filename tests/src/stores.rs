//! Real object-storage servers for whole-mesh tests: Azurite (npm `azurite`) and moto's S3
//! server (PyPI `moto[server]`), each a child process on a free port, killed on drop.
//! `deploy/test.sh` installs both; a missing one fails the test, naming the install.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

pub struct ObjectServer {
    child: Child,
    pub port: u16,
    /// The server's stderr, for a failure message.
    log: std::path::PathBuf,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl ObjectServer {
    /// Azurite's blob service, keeping its data under `dir`.
    pub fn azurite(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut cmd = Command::new("azurite-blob");
        cmd.args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"])
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir);
        Self::spawn(cmd, port, dir, "azurite-blob (npm install -g azurite)")
    }

    /// moto's S3-compatible server (in memory).
    pub fn moto(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        Self::spawn(
            cmd,
            port,
            dir,
            "moto_server (python3 -m pip install 'moto[server]')",
        )
    }

    fn spawn(mut cmd: Command, port: u16, dir: &Path, what: &str) -> anyhow::Result<Self> {
        let log = dir.join("server.log");
        let err = std::fs::File::create(&log)?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let mut s = ObjectServer { child, port, log };
        s.wait_listening(what)?;
        Ok(s)
    }

    fn wait_listening(&mut self, what: &str) -> anyhow::Result<()> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        for _ in 0..300 {
            if let Some(st) = self.child.try_wait()? {
                bail!("{what} exited ({st}): {}", self.log_text());
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "{what} did not listen on {addr} in 30 s: {}",
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ObjectServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
