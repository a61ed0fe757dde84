//! `agent.toml`: which vault key to register with, where to keep state, the host and its VMs.
//! Relative paths are resolved against the folder of the config file.
//!
//! Loaded in layers like the mesh's config: the defaults below, then the TOML file, then
//! `FERRY_AGENT__*` environment variables (`__` separates levels:
//! `FERRY_AGENT__HOST__SITE=site-b`, `FERRY_AGENT__DATA_DIR=/var/lib/ferry`). The prefix is
//! the agent's own so the mesh's `FERRY_*` variables on the same machine never reach it.
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format as _, Toml};
use serde::Deserialize;

/// Environment variables with this prefix override the config file.
pub const ENV_PREFIX: &str = "FERRY_AGENT__";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// One-time registration key file from `ferry vault registration-key --out`.
    pub registration_key: PathBuf,
    /// Agent state: certificate, key, vault material, progress.
    pub data_dir: PathBuf,
    pub host: HostConfig,
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmConfig>,
    /// Override of the registry endpoint in the key file.
    #[serde(default)]
    pub registry: Option<String>,
    /// Change tracking: serve the disks over NBD and record every write in `.hrl` logs.
    /// Without this section the agent copies disks but cannot run delta cycles.
    #[serde(default)]
    pub tracker: Option<TrackerSection>,
    /// A recovery host: failed-over VMs get a folder each under `dir`. Without this section
    /// the host cannot be a VM's recovery host.
    #[serde(default)]
    pub recovery: Option<RecoverySection>,
    /// How this host starts and stops recovered VMs (absent: kind "none", disks only).
    #[serde(default)]
    pub driver: Option<DriverSection>,
    /// Blocks in one upload batch (one QUIC stream).
    #[serde(default = "default_batch")]
    pub batch_blocks: usize,
    /// Upload batches in flight at once.
    #[serde(default = "default_inflight")]
    pub batches_in_flight: usize,
    /// Longest a stop (SIGTERM, SIGINT) may take to seal the change logs and close the disks
    /// (default 30 s); past it the agent says what it left open and exits non-zero.
    #[serde(default, with = "humantime_serde")]
    pub shutdown_timeout: Option<std::time::Duration>,
    /// The only folders under which an operator's request may have this host write files (a
    /// failback's `--dir`), symbolic links resolved; relative to the config file's folder.
    /// Default (absent): `exports` under `data_dir`; an empty list lets no folder in.
    #[serde(default)]
    pub export_roots: Option<Vec<PathBuf>>,
    /// The config file's folder, where a recovery plan's scripts run (set by
    /// [`AgentConfig::load`]).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerSection {
    /// Folder of the NBD Unix socket (default: `<data_dir>/nbd`).
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
    /// Also serve NBD on this loopback address.
    #[serde(default)]
    pub tcp_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverySection {
    /// One folder per failed-over VM (relative to the config's folder).
    pub dir: PathBuf,
    /// Instant recovery: most MiB a second the background copy of a disk fetches, leaving
    /// the rest of the link to the reads the running VM makes (absent: no limit).
    #[serde(default)]
    pub instant_copy_mib_per_s: Option<u64>,
    /// Keep a standby copy of each VM this host is the recovery host of, brought forward to
    /// every new point, so that a failover writes only what differs (`recover/standby.rs`).
    /// Costs the disks' space here and a fetch of each point's changed blocks.
    #[serde(default)]
    pub standby: bool,
}

/// `[driver]`: see [`crate::driver`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverSection {
    /// "none" (disks only), "command" or "libvirt".
    pub kind: crate::driver::DriverKind,
    /// kind "command": `sh -c` run to start a VM, in the config file's folder.
    #[serde(default)]
    pub start: Option<String>,
    /// kind "command": stops a VM; returns once it is off, non-zero when it could not.
    #[serde(default)]
    pub stop: Option<String>,
    /// kind "libvirt": the connection (default "qemu:///system").
    #[serde(default)]
    pub uri: Option<String>,
    /// Longest a start or stop may take (default 5 min).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<std::time::Duration>,
    /// The config file's folder, where the commands run (set by [`AgentConfig::load`]).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub name: String,
    #[serde(default)]
    pub site: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    pub disks: Vec<PathBuf>,
    /// App-consistent cycles: a command run (`sh -c`) just before the cut, e.g. a guest agent
    /// freeze (`virsh domfsfreeze VM`, `qm guest cmd ID fsfreeze-freeze`); the cut waits for
    /// it. Without it, cycles the policy wants app-consistent are crash-consistent.
    #[serde(default)]
    pub quiesce_pre: Option<String>,
    /// Run right after the cut (and after a failed pre command), e.g. the thaw.
    #[serde(default)]
    pub quiesce_post: Option<String>,
    /// Longest time each quiesce command may take (default 60 s); past it the command is
    /// killed and the cycle falls back to crash consistency.
    #[serde(default, with = "humantime_serde")]
    pub quiesce_timeout: Option<std::time::Duration>,
    /// Virtual CPUs of the VM when a driver starts it at a recovery site.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Memory in MiB of the VM when a driver starts it.
    #[serde(default = "default_memory")]
    pub memory: u64,
    /// The network of each NIC (one entry per NIC, in order) when a driver starts it.
    #[serde(default)]
    pub networks: Vec<String>,
}

/// How long a stop may take when `shutdown_timeout` is not set.
pub const DEFAULT_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn default_batch() -> usize {
    16
}

fn default_inflight() -> usize {
    4
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> u64 {
    1024
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading agent config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: AgentConfig = Figment::from(Toml::string(&text))
            .merge(Env::prefixed(ENV_PREFIX).split("__"))
            .extract()
            .map_err(|e| ConfigError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        let abs = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        cfg.registration_key = abs(&cfg.registration_key);
        cfg.data_dir = abs(&cfg.data_dir);
        cfg.export_roots = Some(match cfg.export_roots.take() {
            None => vec![cfg.data_dir.join("exports")],
            Some(roots) => roots.iter().map(|r| abs(r)).collect(),
        });
        if let Some(t) = &mut cfg.tracker {
            t.socket_dir = Some(match &t.socket_dir {
                Some(d) => abs(d),
                None => cfg.data_dir.join("nbd"),
            });
        }
        for vm in &mut cfg.vms {
            vm.disks = vm.disks.iter().map(|d| abs(d)).collect();
        }
        if let Some(r) = &mut cfg.recovery {
            r.dir = abs(&r.dir);
        }
        if let Some(d) = &mut cfg.driver {
            d.base_dir = base.clone();
        }
        cfg.base_dir = base.clone();
        cfg.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.host.name.is_empty() {
            return Err("[host] name is empty".into());
        }
        if self
            .recovery
            .as_ref()
            .is_some_and(|r| r.dir.as_os_str().is_empty())
        {
            return Err("[recovery] dir is empty".into());
        }
        if let Some(r) = self
            .recovery
            .as_ref()
            .and_then(|r| r.instant_copy_mib_per_s)
            && !(1..=100_000).contains(&r)
        {
            return Err(format!(
                "[recovery] instant_copy_mib_per_s = {r}: it must be 1 to 100000 (leave it out for no limit)"
            ));
        }
        let mut names = std::collections::HashSet::new();
        for vm in &self.vms {
            if !names.insert(&vm.name) {
                return Err(format!("vm {} is listed twice", vm.name));
            }
            if vm.disks.is_empty() {
                return Err(format!("vm {} lists no disks", vm.name));
            }
            if vm.cpus == 0 || vm.memory == 0 {
                return Err(format!(
                    "vm {} needs at least 1 cpu and 1 MiB of memory",
                    vm.name
                ));
            }
            let mut files = std::collections::HashSet::new();
            for d in &vm.disks {
                if !files.insert(d.file_name()) {
                    return Err(format!(
                        "vm {} has two disks named {:?}",
                        vm.name,
                        d.file_name()
                    ));
                }
            }
        }
        if self.batch_blocks == 0 || self.batch_blocks > 1024 {
            return Err("batch_blocks must be 1..=1024".into());
        }
        if self.batches_in_flight == 0 || self.batches_in_flight > 64 {
            return Err("batches_in_flight must be 1..=64".into());
        }
        if self.shutdown_timeout.is_some_and(|t| t.is_zero()) {
            return Err("shutdown_timeout must be more than 0 s".into());
        }
        if let Some(d) = &self.driver {
            crate::driver::Driver::from_config(Some(d), &d.base_dir).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
// figment's `Jail` fixes its closures' error type (`figment::Error`, a large one).
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    const TOML: &str = r#"
registration_key = "key.json"
data_dir = "data"
batch_blocks = 8
[host]
name = "hv01"
site = "site-a"
[[vm]]
name = "web01"
disks = ["web01.vhdx"]
"#;

    #[test]
    fn environment_overrides_the_file_and_defaults_fill_the_rest() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("agent.toml", TOML)?;
            jail.set_env("FERRY_AGENT__HOST__SITE", "site-b");
            jail.set_env("FERRY_AGENT__BATCHES_IN_FLIGHT", "2");
            // The mesh's own variables on the same machine are not the agent's.
            jail.set_env("FERRY_RETRY_TIME_UNIT", "1s");
            let cfg = AgentConfig::load(&jail.directory().join("agent.toml")).unwrap();
            assert_eq!(cfg.host.name, "hv01");
            assert_eq!(cfg.host.site, "site-b");
            assert_eq!(cfg.batch_blocks, 8);
            assert_eq!(cfg.batches_in_flight, 2);
            assert_eq!(cfg.data_dir, jail.directory().join("data"));
            assert_eq!(cfg.vms[0].disks[0], jail.directory().join("web01.vhdx"));
            Ok(())
        });
    }

    #[test]
    fn a_bad_value_from_the_environment_is_named() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("agent.toml", TOML)?;
            jail.set_env("FERRY_AGENT__BATCH_BLOCKS", "lots");
            let err = AgentConfig::load(&jail.directory().join("agent.toml")).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("BATCH_BLOCKS") && text.contains("FERRY_AGENT__"),
                "{text}"
            );
            Ok(())
        });
    }
}
