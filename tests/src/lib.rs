//! Harness for whole-mesh tests: the real mesh in-process (`ferry up`'s code) with a real
//! `redis-server` child on a free port and a local-filesystem store in a temp dir, real
//! agents (in-process or as `ferry-agent` processes), disks made by `qemu-img`/`qemu-io`.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use ferry::ctl::Ctl;
use ferry::up::{Mesh, UpOptions};
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::registry::v1 as reg;
use tokio_util::sync::CancellationToken;

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
        let mut opts = UpOptions {
            data_dir: dir.path().join("mesh"),
            retry_time_unit: Some(Duration::from_millis(100)),
            ..Default::default()
        };
        change(&mut opts);
        let mesh = Mesh::start(opts).await?;
        let ctl = Ctl::load(&mesh.config_path)?;
        let t = Self { mesh, dir, ctl };
        t.wait_serving().await?;
        Ok(t)
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
        let mut toml = format!(
            "registration_key = \"key.json\"\ndata_dir = \"agent-data\"\n[host]\nname = \"{host}\"\nsite = \"site-a\"\n"
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
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    run(&mut c).map(|_| ())
}

/// A workspace binary built next to the test executable (`cargo build --workspace --bins`).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable has no target dir")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not built; run `cargo build --workspace --bins` first",
            p.display()
        );
    }
    Ok(p)
}

pub fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `qemu-img create -f FMT [-o OPTS] PATH SIZE`.
pub fn qemu_create(path: &Path, fmt: &str, opts: &str, size: &str) -> anyhow::Result<()> {
    let mut c = Command::new("qemu-img");
    c.arg("create").arg("-q").arg("-f").arg(fmt);
    if !opts.is_empty() {
        c.arg("-o").arg(opts);
    }
    c.arg(path).arg(size);
    run(&mut c).map(|_| ())
}

/// Runs `qemu-io` commands (e.g. `write -P 0xab 0 1M`) on an image.
pub fn qemu_io(path: &Path, fmt: &str, cmds: &[&str]) -> anyhow::Result<()> {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(path);
    run(&mut c).map(|_| ())
}

/// `qemu-img compare`: Ok(true) when identical.
pub fn qemu_compare(a: &Path, fa: &str, b: &Path, fb: &str) -> anyhow::Result<bool> {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

pub fn qemu_virtual_size(path: &Path, fmt: &str) -> anyhow::Result<u64> {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", fmt])
        .arg(path))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["virtual-size"]
        .as_u64()
        .context("qemu-img info has no virtual-size")
}

/// Writes deterministic incompressible-ish data into a raw file region via qemu-io patterns
/// plus a random-looking file copied in with `dd`-like writes from Rust.
pub fn fill_random(path: &Path, offset: u64, len: usize, seed: u64) -> anyhow::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; len];
    for chunk in buf.chunks_mut(8) {
        // xorshift64*: cheap, deterministic, incompressible
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    f.write_all(&buf)?;
    f.sync_all()?;
    Ok(())
}

/// Helpers shared by the benchmarks in `src/bin/` (not used by tests).
pub mod bench {
    use std::path::Path;
    use std::process::Command;
    use std::time::Instant;

    use anyhow::Context;

    /// Synthetic but realistic image: text, machine code-like bytes, already-compressed data and
    /// zero regions, interleaved in 1-8 MiB extents. Deterministic for a given size.
    pub fn make_image(path: &Path, size: u64) -> anyhow::Result<u64> {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(path)?;
        f.set_len(size)?;
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        const WORDS: [&str; 24] = [
            "the",
            "replication",
            "disk",
            "error",
            "info",
            "recovery",
            "point",
            "host",
            "vm",
            "cycle",
            "commit",
            "kernel",
            "user",
            "session",
            "GET",
            "/api/v1/",
            "200",
            "404",
            "ms",
            "debug",
            "timeout",
            "retry",
            "2026-11-27",
            "\n",
        ];
        let mut off = 0u64;
        let mut data = 0u64;
        let mut buf = Vec::with_capacity(8 << 20);
        while off < size {
            let len = ((1 + next() % 8) << 20).min(size - off);
            let kind = next() % 10;
            buf.clear();
            match kind {
                0..=2 => {} // zeros: a hole
                3..=5 => {
                    while (buf.len() as u64) < len {
                        buf.extend_from_slice(
                            WORDS[(next() % WORDS.len() as u64) as usize].as_bytes(),
                        );
                        buf.push(b' ');
                    }
                }
                6..=8 => {
                    // code-like: small opcodes and offsets, many zero bytes
                    while (buf.len() as u64) < len {
                        let v = next();
                        let b = (v & 0xff) as u8;
                        buf.push(if v & 0x300 == 0 { 0 } else { b & 0x8f });
                    }
                }
                _ => {
                    while (buf.len() as u64) < len {
                        buf.extend_from_slice(&next().to_le_bytes());
                    }
                }
            }
            buf.truncate(len as usize);
            if !buf.is_empty() {
                f.seek(SeekFrom::Start(off))?;
                f.write_all(&buf)?;
                data += len;
            }
            off += len;
        }
        f.sync_all()?;
        Ok(data)
    }

    #[derive(Clone, Copy, Default)]
    pub struct Usage {
        pub cpu: f64,
        pub children_cpu: f64,
    }

    pub fn usage() -> Usage {
        fn tv(t: libc::timeval) -> f64 {
            t.tv_sec as f64 + t.tv_usec as f64 / 1e6
        }
        let mut me: libc::rusage = unsafe { std::mem::zeroed() };
        let mut ch: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the struct we own.
        unsafe {
            libc::getrusage(libc::RUSAGE_SELF, &mut me);
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut ch);
        }
        Usage {
            cpu: tv(me.ru_utime) + tv(me.ru_stime),
            children_cpu: tv(ch.ru_utime) + tv(ch.ru_stime),
        }
    }

    pub fn peak_rss_mib() -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .map(|l| l.to_string())
            })
            .and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }

    pub fn drop_caches() {
        // Best effort: a cold read for each contender (needs root; harmless otherwise).
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    }

    pub fn timed(cmd: &mut Command) -> anyhow::Result<(f64, f64)> {
        let u0 = usage();
        let t0 = Instant::now();
        let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
        if !out.status.success() {
            anyhow::bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok((
            t0.elapsed().as_secs_f64(),
            usage().children_cpu - u0.children_cpu,
        ))
    }

    /// `restic ARGS -r <dir>/restic-repo` with a throwaway password and its cache under `dir`.
    pub fn restic(dir: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("restic");
        c.args(args)
            .arg("-r")
            .arg(dir.join("restic-repo"))
            .env("RESTIC_PASSWORD", "bench-only-not-a-secret")
            .env("RESTIC_CACHE_DIR", dir.join("restic-cache"));
        c
    }

    /// Bytes of the files below `p`.
    pub fn walk_size(p: &Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => walk_size(&e.path()),
                Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => 0,
            })
            .sum()
    }
}

/// One replica of a component that a test started and may stop on its own.
pub struct Replica {
    pub component: ferry_mesh::Component,
    pub addr: std::net::SocketAddr,
    pub stop: CancellationToken,
    tasks: tokio::task::JoinSet<(ferry_mesh::Component, anyhow::Result<()>)>,
}

impl Replica {
    /// Stops the replica (cancels its token) and waits for it to end.
    pub async fn kill(&mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// `https://<addr>`.
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// A free loopback TCP address.
fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl TestMesh {
    /// The mesh with `replicas` replicas of each of `components` (started by the test, each
    /// with its own token: [`Replica::kill`] stops one). The config lists every replica's
    /// address as the component's endpoint, so agents, components and the CLI reach whichever
    /// answers.
    pub async fn start_replicated(
        components: &[ferry_mesh::Component],
        replicas: usize,
    ) -> anyhow::Result<(Self, Vec<Replica>)> {
        init_logs();
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("mesh");
        let opts = |without: Vec<ferry_mesh::Component>| UpOptions {
            data_dir: data_dir.clone(),
            retry_time_unit: Some(Duration::from_millis(100)),
            without,
            ..Default::default()
        };
        // A first start makes the vault and the config; nothing runs.
        let all: Vec<_> = ferry::up::GRPC_COMPONENTS
            .into_iter()
            .chain([ferry_mesh::Component::Gateway])
            .collect();
        let config_path = Mesh::start(opts(all)).await?.config_path.clone();
        let mut cfg: ferry_mesh::MeshConfig =
            toml::from_str(&std::fs::read_to_string(&config_path)?)?;
        let mut addrs = Vec::new();
        for &c in components {
            let list: Vec<std::net::SocketAddr> = (0..replicas)
                .map(|_| free_addr())
                .collect::<Result<_, _>>()?;
            cfg.set_listen(c, list[0]);
            let endpoint: Vec<String> = list.iter().map(|a| format!("https://{a}")).collect();
            cfg.endpoints
                .insert(c.as_str().to_owned(), endpoint.join(","));
            addrs.extend(list.into_iter().map(|a| (c, a)));
        }
        cfg.finish()?.write_toml(&config_path)?;
        let mesh = Mesh::start(opts(components.to_vec())).await?;
        let mut out = Vec::new();
        for (c, addr) in addrs {
            let mut cfg = mesh.cfg.clone();
            cfg.set_listen(c, addr);
            let stop = CancellationToken::new();
            let mut tasks = tokio::task::JoinSet::new();
            ferry::up::spawn_component(&mut tasks, c, cfg, stop.clone()).await?;
            out.push(Replica {
                component: c,
                addr,
                stop,
                tasks,
            });
        }
        let ctl = Ctl::load(&mesh.config_path)?;
        let t = Self { mesh, dir, ctl };
        t.wait_serving().await?;
        Ok((t, out))
    }

    /// `redis-cli -p <port> FLUSHALL` on the mesh's Redis.
    pub fn redis_flushall(&self) -> anyhow::Result<()> {
        let port = self
            .mesh
            .redis()
            .context("the mesh runs no redis of its own")?
            .port();
        let out = run(Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .arg("FLUSHALL"))?;
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
    init_logs();
    let dir = tempfile::tempdir()?;
    let opts = UpOptions {
        data_dir: dir.path().join("mesh"),
        retry_time_unit: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let first = Mesh::start(opts.clone()).await?;
    let path = first.config_path.clone();
    first.stop().await;
    let mut doc: toml::Table = std::fs::read_to_string(&path)?.parse()?;
    let vault = doc
        .entry("vault")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(vault) = vault.as_table_mut() else {
        bail!("{}: [vault] is not a table", path.display());
    };
    vault.insert(
        "block_size".into(),
        toml::Value::Integer(i64::from(block_size)),
    );
    std::fs::write(&path, toml::to_string(&doc)?)?;
    let mesh = Mesh::start(opts).await?;
    anyhow::ensure!(
        mesh.cfg.vault.block_size == block_size,
        "the restarted mesh uses blocks of {} bytes",
        mesh.cfg.vault.block_size
    );
    let ctl = Ctl::load(&mesh.config_path)?;
    let t = TestMesh { mesh, dir, ctl };
    t.wait_serving().await?;
    Ok(t)
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

    /// Waits until `vm` is in `state`, up to `timeout`; the VM as it was then.
    pub async fn wait_vm_state(
        &self,
        vm: &str,
        state: &str,
        timeout: Duration,
    ) -> anyhow::Result<reg::Vm> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.vm(vm).await?;
            if v.state == state {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{vm} is not {state} after {timeout:?}: {v:?}");
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
        let port = self
            .mesh
            .redis()
            .context("the mesh runs no redis of its own")?
            .port();
        let keys = run(Command::new("redis-cli")
            .args(["-p", &port.to_string()])
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
