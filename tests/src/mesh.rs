//! The in-process mesh of a test ([`TestMesh`]) and what tests ask of it: agents' configs,
//! VMs, jobs, protection, points, cycles.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry::ctl::Ctl;
use ferry::up::{Mesh, UpOptions};
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::registry::v1 as reg;

use crate::run;

pub struct TestMesh {
    pub mesh: Mesh,
    pub dir: tempfile::TempDir,
    pub ctl: Ctl,
}

pub fn init_logs() {
    ferry_mesh::init_tracing("test");
}

impl TestMesh {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// [`TestMesh::start`] with its options changed by `change` first (e.g.
    /// `retention_interval`).
    pub async fn start_with(change: impl FnOnce(&mut UpOptions)) -> anyhow::Result<Self> {
        init_logs();
        let dir = tempfile::tempdir()?;
        let mut opts = test_options(dir.path());
        change(&mut opts);
        let mesh = Mesh::start(opts).await?;
        let ctl = Ctl::load(&mesh.config_path)?;
        let t = Self { mesh, dir, ctl };
        t.wait_serving().await?;
        Ok(t)
    }

    /// Runs the `ferry` binary against this mesh (`ferry --config D/ferry.toml ARGS`).
    pub fn ferry_cli(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(Command::new(crate::bin("ferry")?)
            .arg("--config")
            .arg(&self.mesh.config_path)
            .env_remove("FERRY_TOKEN")
            .args(args)
            .output()?)
    }

    /// `ferry ARGS` with an operator token (`FERRY_TOKEN`) instead of the admin token.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = Command::new(crate::bin("ferry")?)
            .arg("--config")
            .arg(&self.mesh.config_path)
            .env("FERRY_TOKEN", token)
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `ferry ARGS` started in the background, its stdout and stderr piped (a command that
    /// blocks until its job ends, while the test kills something under it).
    pub fn ferry_spawn(&self, args: &[&str]) -> anyhow::Result<std::process::Child> {
        Ok(Command::new(crate::bin("ferry")?)
            .arg("--config")
            .arg(&self.mesh.config_path)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    }

    /// `ferry ARGS` as [`ferry_cli`](Self::ferry_cli) runs it: whether it succeeded, its
    /// stdout and its stderr.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
        let out = self.ferry_cli(args)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// The JSON `ferry ARGS` prints; an error naming the command when it fails.
    pub fn cli_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let (ok, out, err) = self.cli(args)?;
        anyhow::ensure!(ok, "ferry {args:?}: {out} {err}");
        Ok(serde_json::from_str(&out)?)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Waits until every component answers its health check.
    pub async fn wait_serving(&self) -> anyhow::Result<()> {
        let mut last = Vec::new();
        for _ in 0..100 {
            let st = ferry::status::collect(&self.ctl.cfg).await;
            if st.iter().all(|s| s.ok()) {
                return Ok(());
            }
            last = st
                .into_iter()
                .filter(|s| !s.ok())
                .map(|s| format!("{}: {}", s.component, s.status))
                .collect();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("mesh not serving: {}", last.join("; "))
    }

    /// A one-time registration key file, as `ferry vault registration-key --out` writes it.
    pub async fn registration_key(&self, out: &Path, ttl_seconds: u64) -> anyhow::Result<()> {
        let r = self
            .ctl
            .registry()
            .await?
            .create_registration_key(reg::CreateRegistrationKeyRequest {
                ttl_seconds,
                site: String::new(),
            })
            .await?
            .into_inner();
        let file = ferry_agent::RegistrationKeyFile {
            vault_id: r.vault_id,
            key_id: r.key_id,
            secret: r.secret,
            registry_endpoint: r.registry_endpoint,
            ca_pem: r.ca_pem,
            expires_at_ms: r.expires_at_ms,
        };
        std::fs::write(out, serde_json::to_vec_pretty(&file)?)?;
        Ok(())
    }

    /// `agent.toml` as [`agent_config`](Self::agent_config) writes it, with change tracking on.
    pub async fn agent_config_tracked(
        &self,
        dir: &Path,
        host: &str,
        vms: &[(&str, Vec<PathBuf>)],
    ) -> anyhow::Result<PathBuf> {
        let path = self.agent_config(dir, host, vms).await?;
        std::fs::write(&path, std::fs::read_to_string(&path)? + "[tracker]\n")?;
        Ok(path)
    }

    /// Writes `agent.toml` in `dir` (with a fresh registration key) and returns its path.
    pub async fn agent_config(
        &self,
        dir: &Path,
        host: &str,
        vms: &[(&str, Vec<PathBuf>)],
    ) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        self.registration_key(&dir.join("key.json"), 3600).await?;
        // Failbacks into a folder of the test's own (`--dir`) are let in.
        let mut toml = format!(
            "registration_key = \"key.json\"\ndata_dir = \"agent-data\"\nexport_roots = [{:?}]\n[host]\nname = \"{host}\"\nsite = \"site-a\"\n",
            self.dir.path().display().to_string()
        );
        for (name, disks) in vms {
            let list: Vec<String> = disks
                .iter()
                .map(|d| format!("{:?}", d.display().to_string()))
                .collect();
            toml.push_str(&format!(
                "[[vm]]\nname = \"{name}\"\ndisks = [{}]\n",
                list.join(", ")
            ));
        }
        let path = dir.join("agent.toml");
        std::fs::write(&path, toml)?;
        Ok(path)
    }

    pub async fn vm(&self, name: &str) -> anyhow::Result<reg::Vm> {
        Ok(self
            .ctl
            .registry()
            .await?
            .get_vm(reg::GetVmRequest { name: name.into() })
            .await?
            .into_inner())
    }

    /// Waits until a host has reported the VM.
    pub async fn wait_vm(&self, name: &str) -> anyhow::Result<reg::Vm> {
        for _ in 0..300 {
            if let Ok(v) = self.vm(name).await
                && !v.disks.is_empty()
            {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("vm {name} was never reported by its host")
    }

    pub async fn protect(&self, name: &str) -> anyhow::Result<Job> {
        self.protect_every(name, 300).await
    }

    /// Starts enable-protection with delta cycles every `frequency_seconds`.
    pub async fn protect_every(&self, name: &str, frequency_seconds: u64) -> anyhow::Result<Job> {
        let policy = ferry_proto::common::v1::ReplicationPolicy {
            frequency_seconds,
            ..Default::default()
        };
        self.protect_with(name, policy).await
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<Job> {
        Ok(self
            .ctl
            .registry()
            .await?
            .get_job(reg::GetJobRequest { id: id.into() })
            .await?
            .into_inner())
    }

    /// Waits until the job ends, up to `timeout`.
    pub async fn wait_job(&self, id: &str, timeout: Duration) -> anyhow::Result<Job> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let j = self.job(id).await?;
            if j.status != StepStatus::Running as i32 && j.status != StepStatus::Pending as i32 {
                return Ok(j);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("job {id} did not end in {timeout:?}: {j:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A test failover of `vm` to `point` ("latest" or an id) into `out`; the finished job.
    pub async fn test_failover(&self, vm: &str, point: &str, out: &Path) -> anyhow::Result<Job> {
        let req = ferry_proto::failover::v1::TestFailoverRequest {
            vm: vm.into(),
            point: point.into(),
            target_dir: out.display().to_string(),
            instant: false,
        };
        Ok(self
            .ctl
            .failover()
            .await?
            .test_failover(req)
            .await?
            .into_inner())
    }

    pub async fn stop(self) {
        self.mesh.stop().await;
    }
}

impl TestMesh {
    /// `redis-cli -s <socket>` on the mesh's own Redis (its port speaks TLS only), with its
    /// password in the environment (`REDISCLI_AUTH`), not on the command line.
    pub fn redis_cli(&self) -> anyhow::Result<Command> {
        let redis = self
            .mesh
            .redis()
            .context("the mesh runs no redis of its own")?;
        let mut cmd = Command::new("redis-cli");
        cmd.arg("-s")
            .arg(redis.socket())
            .env("REDISCLI_AUTH", redis.password());
        Ok(cmd)
    }

    /// `redis-cli FLUSHALL` on the mesh's Redis.
    pub fn redis_flushall(&self) -> anyhow::Result<()> {
        let out = run(self.redis_cli()?.arg("FLUSHALL"))?;
        anyhow::ensure!(out.trim() == "OK", "FLUSHALL answered {out:?}");
        Ok(())
    }

    /// Every recovery point of `vm`, oldest first.
    pub async fn points(
        &self,
        vm: &str,
    ) -> anyhow::Result<Vec<ferry_proto::common::v1::RecoveryPoint>> {
        Ok(self
            .ctl
            .storage()
            .await?
            .list_points(ferry_proto::storage::v1::ListPointsRequest { vm: vm.into() })
            .await?
            .into_inner()
            .points)
    }

    /// Waits until `vm` has at least `n` points; returns them.
    pub async fn wait_points(
        &self,
        vm: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ferry_proto::common::v1::RecoveryPoint>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let p = self.points(vm).await?;
            if p.len() >= n {
                return Ok(p);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{vm} has {} points, not {n}, after {timeout:?}", p.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A mesh like [`TestMesh::start`] whose vault names blocks of `block_size` bytes: the vault
/// is created, the mesh stopped, `vault.block_size` set in its `ferry.toml`, and the mesh
/// started again from that file (before any data exists).
pub async fn start_mesh_with_block_size(block_size: u32) -> anyhow::Result<TestMesh> {
    let t = start_mesh_with_setting("vault", "block_size", i64::from(block_size)).await?;
    anyhow::ensure!(
        t.mesh.cfg.vault.block_size == block_size,
        "the restarted mesh uses blocks of {} bytes",
        t.mesh.cfg.vault.block_size
    );
    Ok(t)
}

/// The options of every test mesh in `dir` (which it exports into, too).
fn test_options(dir: &Path) -> UpOptions {
    UpOptions {
        data_dir: dir.join("mesh"),
        retry_time_unit: Some(Duration::from_millis(100)),
        export_roots: Some(vec![dir.to_path_buf()]),
        ..Default::default()
    }
}

/// A mesh like [`TestMesh::start`] with `[section] key = value` in its `ferry.toml`: the
/// vault is created, the mesh stopped, the setting written, and the mesh started again
/// from that file (before any data exists).
pub async fn start_mesh_with_setting(
    section: &str,
    key: &str,
    value: i64,
) -> anyhow::Result<TestMesh> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let opts = test_options(dir.path());
    let first = Mesh::start(opts.clone()).await?;
    let path = first.config_path.clone();
    first.stop().await;
    let mut doc: toml::Table = std::fs::read_to_string(&path)?.parse()?;
    let table = doc
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(table) = table.as_table_mut() else {
        bail!("{}: [{section}] is not a table", path.display());
    };
    table.insert(key.into(), toml::Value::Integer(value));
    std::fs::write(&path, toml::to_string(&doc)?)?;
    let mesh = Mesh::start(opts).await?;
    let ctl = Ctl::load(&mesh.config_path)?;
    let t = TestMesh { mesh, dir, ctl };
    t.wait_serving().await?;
    Ok(t)
}

impl TestMesh {
    /// Stops the mesh and starts it again on the same data dir (vault, config, store, Redis
    /// data dir), with the options of [`TestMesh::start`].
    pub async fn restart(self) -> anyhow::Result<TestMesh> {
        let TestMesh { mesh, dir, .. } = self;
        mesh.stop().await;
        let mesh = Mesh::start(test_options(dir.path())).await?;
        let ctl = Ctl::load(&mesh.config_path)?;
        let t = TestMesh { mesh, dir, ctl };
        t.wait_serving().await?;
        Ok(t)
    }
}

impl TestMesh {
    /// Starts enable-protection with `policy` as given (frequency, resync window).
    pub async fn protect_with(
        &self,
        name: &str,
        policy: ferry_proto::common::v1::ReplicationPolicy,
    ) -> anyhow::Result<Job> {
        let req = reg::ProtectVmRequest {
            name: name.into(),
            policy: Some(policy),
        };
        Ok(self
            .ctl
            .registry()
            .await?
            .protect_vm(req)
            .await?
            .into_inner())
    }

    /// `Registry.ResyncVm`: the resync job started now (or the one already running).
    pub async fn resync_vm(&self, name: &str) -> anyhow::Result<Job> {
        Ok(self
            .ctl
            .registry()
            .await?
            .resync_vm(reg::ResyncVmRequest { name: name.into() })
            .await?
            .into_inner())
    }

    /// Starts an in-process agent of `host` in `site` with `vms`, its agent.toml ending in
    /// `extra` (sections such as `[tracker]`, `[recovery]`, `[driver]`).
    pub async fn site_agent(
        &self,
        host: &str,
        site: &str,
        vms: &[(&str, Vec<PathBuf>)],
        extra: &str,
    ) -> anyhow::Result<crate::InProcessAgent> {
        let cfg = self.site_agent_config(host, site, vms, extra).await?;
        crate::InProcessAgent::start(&cfg)
    }

    /// The agent.toml [`site_agent`](Self::site_agent) starts an agent with, in
    /// `<test dir>/<host>/` (for an agent process: `spawn_agent_process`).
    pub async fn site_agent_config(
        &self,
        host: &str,
        site: &str,
        vms: &[(&str, Vec<PathBuf>)],
        extra: &str,
    ) -> anyhow::Result<PathBuf> {
        let cfg = self.agent_config(&self.path(host), host, vms).await?;
        let toml = std::fs::read_to_string(&cfg)?
            .replace("site = \"site-a\"", &format!("site = \"{site}\""));
        std::fs::write(&cfg, toml + extra)?;
        Ok(cfg)
    }

    /// The recovery host of the failover tests: `hv-dr01` in site-b with `[recovery] dir =
    /// "recovered"`, a tracker and `extra` (its driver), connected and ready to receive VMs.
    pub async fn recovery_agent(&self, extra: &str) -> anyhow::Result<crate::InProcessAgent> {
        let extra = format!("[recovery]\ndir = \"recovered\"\n[tracker]\n{extra}");
        let dr = self.site_agent("hv-dr01", "site-b", &[], &extra).await?;
        let recovery = |h: &reg::Host| h.status == "connected" && h.recovery;
        self.wait_host("hv-dr01", recovery, Duration::from_secs(60))
            .await?;
        Ok(dr)
    }

    /// `ferry vm protect VM --frequency FREQUENCY --recovery-host hv-dr01 --wait`.
    pub fn protect_to_recovery(&self, vm: &str, frequency: &str) -> anyhow::Result<()> {
        self.protect_to_recovery_with(vm, frequency, &[])
    }

    /// [`protect_to_recovery`](Self::protect_to_recovery) with more `ferry vm protect` flags.
    pub fn protect_to_recovery_with(
        &self,
        vm: &str,
        frequency: &str,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let mut args = vec![
            "vm",
            "protect",
            vm,
            "--frequency",
            frequency,
            "--recovery-host",
            "hv-dr01",
            "--wait",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = self.cli(&args)?;
        anyhow::ensure!(ok, "ferry {}: {out}{err}", args.join(" "));
        Ok(())
    }

    /// Waits until the registry lists `host` and `cond` holds for it, up to `timeout`.
    pub async fn wait_host(
        &self,
        host: &str,
        cond: impl Fn(&reg::Host) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<reg::Host> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let hosts = self
                .ctl
                .registry()
                .await?
                .list_hosts(reg::ListHostsRequest {})
                .await?
                .into_inner()
                .hosts;
            if let Some(h) = hosts.iter().find(|h| h.name == host && cond(h)) {
                return Ok(h.clone());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("host {host} not as expected after {timeout:?}: {hosts:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `vm` is in `state`, up to `timeout`; the VM as it was then.
    pub async fn wait_vm_state(
        &self,
        vm: &str,
        state: reg::VmState,
        timeout: Duration,
    ) -> anyhow::Result<reg::Vm> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.vm(vm).await?;
            if v.state() == state {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{vm} is not {state:?} after {timeout:?}: {v:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The replication cycles of `vm` open in ingest now (their ids from the Redis keys
    /// `ferry:kv:{ferry:cycle:<id>}`, their state and landed counters from `Ingest.GetCycle`).
    pub async fn open_cycles(
        &self,
        vm: &str,
    ) -> anyhow::Result<Vec<ferry_proto::ingest::v1::Cycle>> {
        let keys =
            run(self
                .redis_cli()?
                .args(["--scan", "--pattern", "ferry:kv:{ferry:cycle:*}"]))?;
        let mut ingest = ferry_proto::ingest::v1::ingest_client::IngestClient::new(
            self.ctl.channel(ferry_mesh::Component::Ingest).await?,
        );
        let mut out = Vec::new();
        for id in keys.lines().filter_map(|k| {
            k.trim()
                .strip_prefix("ferry:kv:{ferry:cycle:")
                .and_then(|k| k.strip_suffix('}'))
        }) {
            // A cycle may end (and its key go) between the scan and the read.
            let Ok(c) = ingest
                .get_cycle(ferry_proto::ingest::v1::GetCycleRequest {
                    cycle_id: id.into(),
                })
                .await
            else {
                continue;
            };
            let c = c.into_inner();
            if c.vm == vm && c.state == "open" {
                out.push(c);
            }
        }
        Ok(out)
    }
}

/// A policy of cycles every `frequency_seconds` whose resync window is closed now and for
/// the next six hours (it opens six hours from now, local time), so a VM marked for resync
/// waits for `ResyncVm` instead of the scheduler's automatic resync.
pub fn policy_resync_window_closed(
    frequency_seconds: u64,
) -> ferry_proto::common::v1::ReplicationPolicy {
    let now = chrono::Local::now();
    let at = |h: i64| {
        (now + chrono::Duration::hours(h))
            .format("%H:%M")
            .to_string()
    };
    ferry_proto::common::v1::ReplicationPolicy {
        frequency_seconds,
        resync_window_start: at(6),
        resync_window_end: at(7),
        ..Default::default()
    }
}
