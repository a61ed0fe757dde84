//! How this host starts and stops a recovered VM: its *driver* (`[driver]` in agent.toml).
//!
//! * `none`: disks only. The recovery leaves the disks ready (served by the tracker) and the
//!   operator starts the VM; start and stop do nothing.
//! * `command`: two shell hooks (`sh -c`, run in the config file's folder) with the VM in the
//!   environment: `FERRY_VM`, `FERRY_NETWORK` (`production` or `test`), `FERRY_VM_SPEC` (a JSON
//!   [`VmSpec`] file), `FERRY_DISKS` (a JSON array of [`RunDisk`]) and `FERRY_VM_DIR` (the VM's
//!   recovery folder). Their output goes to `<FERRY_VM_DIR>/driver.log`.
//! * `libvirt`: a domain XML ([`domain_xml`]) written to `<dir>/<vm>.xml`, then `virsh define`
//!   and `virsh start`; stop is `virsh shutdown` and a wait for "shut off".
//!
//! Every start or stop is bounded by `timeout` (default 5 min) and by the caller's
//! cancellation; a command past either is killed with its whole process group.
mod libvirt;
mod process;
mod script;

pub use script::run_plan_script;

use std::path::{Path, PathBuf};
use std::time::Duration;

use humantime_serde::re::humantime;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::DriverSection;

pub use libvirt::domain_xml;

/// How long a start or stop may take when `[driver] timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The libvirt connection when `[driver] uri` is not set.
pub const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

/// `[driver] kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    #[default]
    None,
    Command,
    Libvirt,
}

impl DriverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriverKind::None => "none",
            DriverKind::Command => "command",
            DriverKind::Libvirt => "libvirt",
        }
    }
}

/// Which network a recovered VM is attached to: the real one (failover) or an isolated one
/// (test failover, drills).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    Production,
    Test,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Production => "production",
            Network::Test => "test",
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The VM's shape, as hooks read it from `FERRY_VM_SPEC`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub nics: Vec<Nic>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// `nic0`, `nic1`, … in the VM's order.
    pub name: String,
    /// The host's network (libvirt network name, bridge, switch) this NIC attaches to.
    pub network: String,
    /// `10.2.0.7/24`, or empty when the guest gets its address by itself.
    #[serde(default)]
    pub ip: String,
}

/// One disk of a recovered VM, as hooks read it from `FERRY_DISKS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDisk {
    pub path: PathBuf,
    /// `raw`, `vhd` or `vhdx`.
    pub format: String,
    /// The tracker's `nbd+unix:///EXPORT?socket=PATH` for the disk, or empty when the disk is
    /// not served (then the VM opens the file, and its writes are not tracked).
    pub nbd_uri: String,
}

/// One start or stop of a VM: what the driver needs to know about it.
#[derive(Debug, Clone)]
pub struct VmRun {
    pub vm: String,
    pub network: Network,
    /// Where the caller wrote `spec` ([`write_spec`]); handed to hooks as `FERRY_VM_SPEC`.
    pub spec_path: PathBuf,
    pub spec: VmSpec,
    pub disks: Vec<RunDisk>,
    /// The VM's recovery folder (the driver writes `driver.log` and `<vm>.xml` there).
    pub dir: PathBuf,
}

/// Writes `spec` as JSON to `path`, whole or not at all (temporary file, then rename), so a
/// hook never reads half a spec.
pub fn write_spec(path: &Path, spec: &VmSpec) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?;
    write_atomic(path, &json)
}

/// Temporary file next to `path` (same filesystem, so the rename is atomic), synced, renamed.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.{seq}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("[driver] {0}")]
    Config(String),
    /// The run cannot be handed to the driver (a name libvirt or a file path cannot hold, an
    /// unknown disk format, a disk URI that is not NBD).
    #[error("vm {vm}: {message}")]
    BadRun { vm: String, message: String },
    #[error("vm {vm}: {what}: {source}")]
    Io {
        vm: String,
        what: String,
        source: std::io::Error,
    },
    #[error("vm {vm}: {action}: cannot run `{command}`: {source}")]
    Spawn {
        vm: String,
        action: &'static str,
        command: String,
        source: std::io::Error,
    },
    #[error("vm {vm}: {action}: `{command}` failed ({status}){}", tail(output))]
    Failed {
        vm: String,
        action: &'static str,
        command: String,
        /// `exit status: 3`, `signal: 9 (SIGKILL)`.
        status: String,
        /// The last ~1 KiB of the command's stderr (a hook's: of its stdout and stderr, as
        /// they are in `driver.log`).
        output: String,
    },
    #[error(
        "vm {vm}: {action}: `{command}` did not finish within {}; it was killed{}",
        humantime::format_duration(*timeout), tail(output)
    )]
    Timeout {
        vm: String,
        action: &'static str,
        command: String,
        timeout: Duration,
        output: String,
    },
    #[error("vm {vm}: {action}: `{command}` was cancelled; it was killed")]
    Cancelled {
        vm: String,
        action: &'static str,
        command: String,
    },
    #[error(
        "vm {vm}: still {state:?} {} after `virsh shutdown`: the vm was not stopped",
        humantime::format_duration(*timeout)
    )]
    StillRunning {
        vm: String,
        state: String,
        timeout: Duration,
    },
}

fn tail(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

#[derive(Debug, Clone)]
enum Backend {
    None,
    Command {
        start: String,
        stop: String,
        dir: PathBuf,
    },
    Libvirt {
        uri: String,
    },
}

/// A host's driver, made once from `[driver]`.
#[derive(Debug, Clone)]
pub struct Driver {
    backend: Backend,
    timeout: Duration,
}

impl Driver {
    /// Checks `[driver]` (absent: kind `none`). `base_dir` is the folder commands run in: the
    /// config file's folder, which `AgentConfig::load` keeps in [`DriverSection::base_dir`].
    /// Kind `libvirt` needs `virsh` only when a VM is started, so a host without libvirt
    /// still starts.
    pub fn from_config(
        section: Option<&DriverSection>,
        base_dir: &Path,
    ) -> Result<Driver, DriverError> {
        let Some(s) = section else {
            return Ok(Driver {
                backend: Backend::None,
                timeout: DEFAULT_TIMEOUT,
            });
        };
        let kind = s.kind.as_str();
        let timeout = s.timeout.unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() {
            return Err(DriverError::Config("timeout must be more than 0 s".into()));
        }
        let not_for = |key: &str, set: bool, only: &str| {
            if set {
                Err(DriverError::Config(format!(
                    "{key} is for kind {only:?}, not {kind:?}"
                )))
            } else {
                Ok(())
            }
        };
        let required = |key: &str, v: &Option<String>| match v.as_deref().map(str::trim) {
            Some(c) if !c.is_empty() => Ok(c.to_string()),
            _ => Err(DriverError::Config(format!(
                "kind \"command\" needs {key} (a shell command)"
            ))),
        };
        let backend = match s.kind {
            DriverKind::None => {
                not_for("start", s.start.is_some(), "command")?;
                not_for("stop", s.stop.is_some(), "command")?;
                not_for("uri", s.uri.is_some(), "libvirt")?;
                Backend::None
            }
            DriverKind::Command => {
                not_for("uri", s.uri.is_some(), "libvirt")?;
                Backend::Command {
                    start: required("start", &s.start)?,
                    stop: required("stop", &s.stop)?,
                    dir: base_dir.to_path_buf(),
                }
            }
            DriverKind::Libvirt => {
                not_for("start", s.start.is_some(), "command")?;
                not_for("stop", s.stop.is_some(), "command")?;
                let uri = s.uri.as_deref().unwrap_or(DEFAULT_LIBVIRT_URI).trim();
                if uri.is_empty() {
                    return Err(DriverError::Config("uri is empty".into()));
                }
                Backend::Libvirt {
                    uri: uri.to_string(),
                }
            }
        };
        Ok(Driver { backend, timeout })
    }

    /// `none`, `command` or `libvirt`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::None => DriverKind::None.as_str(),
            Backend::Command { .. } => DriverKind::Command.as_str(),
            Backend::Libvirt { .. } => DriverKind::Libvirt.as_str(),
        }
    }

    /// Longest a start or stop may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Starts the VM on its disks; returns once the start command (or `virsh start`) has.
    pub async fn start(&self, run: &VmRun, cancel: &CancellationToken) -> Result<(), DriverError> {
        match &self.backend {
            Backend::None => {
                tracing::info!(
                    vm = %run.vm,
                    network = %run.network,
                    disks = run.disks.len(),
                    "the disks are ready; driver kind none starts no vm"
                );
                Ok(())
            }
            Backend::Command { start, dir, .. } => {
                self.hook("start", start, dir, run, cancel).await
            }
            Backend::Libvirt { uri } => {
                libvirt::start(uri, run, self.deadline(), cancel, self.timeout).await
            }
        }
    }

    /// Stops the VM; returns only once it is off, an error when it could not stop it.
    pub async fn stop(&self, run: &VmRun, cancel: &CancellationToken) -> Result<(), DriverError> {
        match &self.backend {
            Backend::None => {
                tracing::info!(vm = %run.vm, "driver kind none stops no vm");
                Ok(())
            }
            Backend::Command { stop, dir, .. } => self.hook("stop", stop, dir, run, cancel).await,
            Backend::Libvirt { uri } => {
                libvirt::stop(uri, run, self.deadline(), cancel, self.timeout).await
            }
        }
    }

    /// Forgets the VM (libvirt: `virsh undefine`; a domain already gone is fine). The other
    /// kinds keep nothing, so there is nothing to remove.
    pub async fn remove(&self, run: &VmRun, cancel: &CancellationToken) -> Result<(), DriverError> {
        match &self.backend {
            Backend::Libvirt { uri } => {
                libvirt::remove(uri, run, self.deadline(), cancel, self.timeout).await
            }
            Backend::None | Backend::Command { .. } => Ok(()),
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now() + self.timeout
    }

    /// Runs a `command` hook: `sh -c CMD` in the config's folder with the VM in the
    /// environment, its output appended to `<dir>/driver.log`.
    async fn hook(
        &self,
        action: &'static str,
        cmd: &str,
        cwd: &Path,
        run: &VmRun,
        cancel: &CancellationToken,
    ) -> Result<(), DriverError> {
        let disks = serde_json::to_string(&run.disks).map_err(|e| DriverError::BadRun {
            vm: run.vm.clone(),
            message: format!("disks cannot be written as JSON: {e}"),
        })?;
        std::fs::create_dir_all(&run.dir).map_err(|source| DriverError::Io {
            vm: run.vm.clone(),
            what: format!("creating {}", run.dir.display()),
            source,
        })?;
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .current_dir(cwd)
            .env("FERRY_VM", &run.vm)
            .env("FERRY_NETWORK", run.network.as_str())
            .env("FERRY_VM_SPEC", &run.spec_path)
            .env("FERRY_DISKS", disks)
            .env("FERRY_VM_DIR", &run.dir);
        let job = process::Job {
            vm: &run.vm,
            action,
            command: cmd.to_string(),
            deadline: self.deadline(),
            timeout: self.timeout,
            cancel,
        };
        tracing::info!(vm = %run.vm, network = %run.network, action, "running the driver's command");
        let out = job.run_logged(c, &run.dir.join("driver.log")).await?;
        job.check(out).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(kind: DriverKind) -> DriverSection {
        DriverSection {
            kind,
            start: None,
            stop: None,
            uri: None,
            timeout: None,
            base_dir: PathBuf::new(),
        }
    }

    #[test]
    fn no_section_is_kind_none() {
        let d = Driver::from_config(None, Path::new("/")).unwrap();
        assert_eq!(d.kind(), "none");
        assert_eq!(d.timeout(), DEFAULT_TIMEOUT);
    }

    #[test]
    fn command_needs_both_hooks_and_runs_them_in_the_given_folder() {
        let mut s = section(DriverKind::Command);
        s.start = Some("./start-vm.sh".into());
        let err = Driver::from_config(Some(&s), Path::new("/etc/ferry")).unwrap_err();
        assert!(err.to_string().contains("needs stop"), "{err}");
        s.stop = Some("  ".into());
        let err = Driver::from_config(Some(&s), Path::new("/etc/ferry")).unwrap_err();
        assert!(err.to_string().contains("needs stop"), "{err}");
        s.stop = Some("./stop-vm.sh".into());
        let d = Driver::from_config(Some(&s), Path::new("/etc/ferry")).unwrap();
        assert_eq!(d.kind(), "command");
        match d.backend {
            Backend::Command { dir, .. } => assert_eq!(dir, Path::new("/etc/ferry")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_of_another_kind_and_a_zero_timeout_are_refused() {
        let mut s = section(DriverKind::Libvirt);
        s.start = Some("x".into());
        let err = Driver::from_config(Some(&s), Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("start is for kind"), "{err}");
        let mut s = section(DriverKind::None);
        s.uri = Some("test:///default".into());
        assert!(Driver::from_config(Some(&s), Path::new("/")).is_err());
        let mut s = section(DriverKind::Libvirt);
        s.timeout = Some(Duration::ZERO);
        let err = Driver::from_config(Some(&s), Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
    }

    #[test]
    fn libvirt_defaults_to_the_system_uri() {
        let mut s = section(DriverKind::Libvirt);
        s.timeout = Some(Duration::from_secs(7));
        let d = Driver::from_config(Some(&s), Path::new("/")).unwrap();
        assert_eq!(d.kind(), "libvirt");
        assert_eq!(d.timeout(), Duration::from_secs(7));
        match d.backend {
            Backend::Libvirt { uri } => assert_eq!(uri, DEFAULT_LIBVIRT_URI),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_spec_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        let spec = VmSpec {
            name: "web01".into(),
            cpus: 2,
            memory_mib: 2048,
            nics: vec![Nic {
                name: "nic0".into(),
                network: "prod".into(),
                ip: String::new(),
            }],
        };
        write_spec(&path, &spec).unwrap();
        write_spec(&path, &spec).unwrap();
        let back: VmSpec = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, spec);
        // Only the spec is left: no temporary file.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A NIC without an address may leave `ip` out.
        let nic: Nic = serde_json::from_str(r#"{"name":"nic0","network":"n"}"#).unwrap();
        assert_eq!(nic.ip, "");
    }
}
