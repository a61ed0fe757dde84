//! Agents of a test: in this process or as `ferry-agent` processes, guests writing
//! through the tracker, and the state of their change logs.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::bail;
use tokio_util::sync::CancellationToken;

use crate::{bin, run};

/// An agent running in this process.
pub struct InProcessAgent {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessAgent {
    pub fn start(config: &Path) -> anyhow::Result<Self> {
        let cfg = ferry_agent::AgentConfig::load(config)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(ferry_agent::run(cfg, stop.clone()));
        Ok(Self { stop, task })
    }

    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// Runs qemu-io commands (`write -P 0x5a 1M 64k`, ...) against an NBD URI: a guest writing
/// through the tracker.
pub fn nbd_write(uri: &str, cmds: &[&str]) -> anyhow::Result<()> {
    nbd_io(uri, cmds)
}

/// Runs qemu-io commands (`read -P 0x5a 0 64k`, ...) against an NBD URI: a guest checking
/// what its disk holds.
pub fn nbd_io(uri: &str, cmds: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    run(&mut c).map(|_| ())
}

/// `ferry-agent --config CONFIG` as a child process (killable with SIGKILL), its log
/// (`RUST_LOG=info`) appended to `log`.
pub fn spawn_agent_process(config: &Path, log: &Path) -> anyhow::Result<std::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(Command::new(bin("ferry-agent")?)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()?)
}

/// Waits until every change log of `disk` is closed cleanly (a stopped agent's tracker seals
/// them on its own threads after `run` returned).
pub async fn wait_logs_closed(disk: &Path) -> anyhow::Result<()> {
    for _ in 0..300 {
        let logs = ferry_agent::tracker::list_logs(disk)?;
        if logs
            .iter()
            .all(|(_, p)| ferry_disk::hrl::HrlLog::open(p).is_ok_and(|l| l.clean))
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("logs of {} never sealed", disk.display())
}

/// The change logs of `disk` that are not closed cleanly (what a killed tracker leaves).
pub fn unclean_logs(disk: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(ferry_agent::tracker::list_logs(disk)?
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| !ferry_disk::hrl::HrlLog::open(p).is_ok_and(|l| l.clean))
        .collect())
}

/// The credentials an agent registered with (its `agent-data/identity.json` and `host.key`
/// under `agent_dir`): (ca, cert, key) PEM.
pub fn host_identity(agent_dir: &Path) -> anyhow::Result<(String, String, String)> {
    let data = agent_dir.join("agent-data");
    let id: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("identity.json"))?)?;
    let pem = |k: &str| -> anyhow::Result<String> {
        Ok(id[k]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("identity.json has no {k}"))?
            .to_string())
    };
    Ok((
        pem("ca_pem")?,
        pem("cert_pem")?,
        std::fs::read_to_string(data.join("host.key"))?,
    ))
}

/// The host certificate an agent registered with, to call the mesh as that host.
pub fn host_tls(agent_dir: &Path) -> anyhow::Result<ferry_mesh::ClientTls> {
    let (ca, cert, key) = host_identity(agent_dir)?;
    Ok(ferry_mesh::ClientTls::host(ca, cert, key))
}
