//! `ferry up`: every component in one process on one machine (the embedded default), a vault
//! made on first start in the data dir, a `redis-server` child unless `--redis` is given, and
//! `file://D/store` unless `--store` is given. `D/ferry.toml` is what the CLI and each
//! component's own binary read to join the same mesh.
use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpListener as StdTcp, UdpSocket};
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_coord::{RedisServer, RedisTls};
use ferry_mesh::{Component, Listen, MeshConfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Where `ferry up` keeps the password of the Redis it starts, relative to the data dir.
const REDIS_PASSWORD_FILE: &str = "redis/password";

pub const GRPC_COMPONENTS: [Component; 5] = [
    Component::Registry,
    Component::Scheduler,
    Component::Ingest,
    Component::StorageWriter,
    Component::Failover,
];

#[derive(Clone, Debug, Default)]
pub struct UpOptions {
    pub data_dir: PathBuf,
    /// Use this Redis instead of starting one.
    pub redis: Option<String>,
    /// Use this object store URL instead of `file://D/store`.
    pub store: Option<String>,
    /// Components not to start here (they run as their own processes).
    pub without: Vec<Component>,
    /// Retry schedule unit (tests use milliseconds).
    pub retry_time_unit: Option<std::time::Duration>,
    /// How often the scheduler runs retention (`[retention] interval`, default 10 min; tests
    /// use seconds).
    pub retention_interval: Option<std::time::Duration>,
    /// Folders operators may name for exports (`export_roots`, default `D/exports`).
    pub export_roots: Option<Vec<PathBuf>>,
}

/// A running mesh. Dropping it without [`Mesh::stop`] still stops the Redis child.
pub struct Mesh {
    pub cfg: MeshConfig,
    pub config_path: PathBuf,
    pub shutdown: CancellationToken,
    tasks: JoinSet<(Component, anyhow::Result<()>)>,
    redis: Option<RedisServer>,
    /// Held for the mesh's life: one mesh per data dir.
    _lock: DataDirLock,
}

/// An exclusive lock on `D/ferry.lock` (released when the process ends, however it ends).
/// A second `ferry up` on the same data dir must not start a second Redis and rewrite
/// `D/ferry.toml` under the running mesh's CLI.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    pub const FILE: &str = "ferry.lock";

    /// Takes the lock or fails naming the process that holds it; writes nothing then.
    pub fn acquire(dir: &Path) -> anyhow::Result<Self> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(Self::FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                anyhow::bail!(
                    "data dir {} is in use by another ferry up ({}); stop it first, or use another --data-dir",
                    dir.display(),
                    if holder.is_empty() {
                        "holder unknown"
                    } else {
                        holder
                    }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(
            file,
            "pid {}, started {}",
            std::process::id(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )?;
        file.flush()?;
        Ok(Self { _file: file })
    }
}

/// The sockets a new config's ports were picked with, kept bound until their component
/// takes them: a port picked and then released could be taken by anything else in between
/// (another mesh, any outgoing connection's ephemeral port) and the component fail to bind.
#[derive(Default)]
struct Bound {
    tcp: HashMap<Component, StdTcp>,
    udp: Option<UdpSocket>,
}

/// The ports an existing config names for the components started here, bound now (each
/// component takes its own; those left out may be running elsewhere on this machine).
fn claim(cfg: &MeshConfig, without: &[Component]) -> anyhow::Result<Bound> {
    let mut bound = Bound::default();
    for c in GRPC_COMPONENTS.into_iter().filter(|c| !without.contains(c)) {
        let addr = cfg.listen(c);
        let l = StdTcp::bind(addr).with_context(|| format!("binding {c} on {addr}"))?;
        bound.tcp.insert(c, l);
    }
    if !without.contains(&Component::Gateway) {
        let addr = cfg.gateway.listen;
        let udp = UdpSocket::bind(addr).with_context(|| format!("binding gateway udp {addr}"))?;
        bound.udp = Some(udp);
    }
    Ok(bound)
}

/// A config with free ports and a new vault (CA, certificates, data key, admin token).
fn init(dir: &Path) -> anyhow::Result<(MeshConfig, Bound)> {
    let mut cfg = MeshConfig {
        data_dir: dir.to_path_buf(),
        ..MeshConfig::default()
    };
    cfg.vault.id = uuid::Uuid::new_v4().to_string();
    let mut bound = Bound::default();
    for c in GRPC_COMPONENTS {
        let l = StdTcp::bind((Ipv4Addr::LOCALHOST, 0))?;
        cfg.set_listen(c, l.local_addr()?);
        bound.tcp.insert(c, l);
    }
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    cfg.gateway = Listen {
        listen: udp.local_addr()?,
    };
    bound.udp = Some(udp);
    let cfg = cfg.finish()?;
    ferry_mesh::bootstrap_vault(&cfg, &[])?;
    tracing::info!(dir = %dir.display(), vault = %cfg.vault.id, "vault created");
    Ok((cfg, bound))
}

impl Mesh {
    pub async fn start(opts: UpOptions) -> anyhow::Result<Mesh> {
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("creating data dir {}", opts.data_dir.display()))?;
        let dir = std::path::absolute(&opts.data_dir)?;
        let lock = DataDirLock::acquire(&dir)?;
        let config_path = dir.join("ferry.toml");
        let (mut cfg, mut bound) = if config_path.exists() {
            let cfg = MeshConfig::load(Some(&config_path), figment::Figment::new())?;
            // Held from here: the Redis child below picks a free port, which could otherwise
            // be a component's, released by the previous run a moment ago.
            let bound = claim(&cfg, &opts.without)?;
            (cfg, bound)
        } else {
            init(&dir)?
        };
        let mut redis = None;
        match &opts.redis {
            Some(url) => {
                // The operator's Redis: its URL carries what it needs (a password, rediss://);
                // a password file left by an earlier run with our own Redis would be wrong.
                cfg.redis_url = url.clone();
                cfg.redis_password_file = None;
                cfg.redis_ca_cert = None;
            }
            None => {
                // TLS only, with the mesh's own server certificate (it names 127.0.0.1).
                let tls = RedisTls {
                    cert: cfg.path(&cfg.tls.server_cert),
                    key: cfg.path(&cfg.tls.server_key),
                    ca: cfg.path(&cfg.tls.ca_cert),
                };
                let r = RedisServer::start_tls(&dir.join("redis"), tls)
                    .context("starting redis-server (install it: apt-get install redis-server)")?;
                // A new random password each start (the server keeps nothing on disk), in a
                // mode-0600 file beside it, never in ferry.toml.
                let file = dir.join(REDIS_PASSWORD_FILE);
                ferry_mesh::write_secret(&file, r.password().as_bytes())
                    .with_context(|| format!("writing {}", file.display()))?;
                cfg.redis_url = r.address_url();
                cfg.redis_password_file = Some(REDIS_PASSWORD_FILE.into());
                cfg.redis_ca_cert = Some(cfg.tls.ca_cert.clone());
                redis = Some(r);
            }
        }
        if let Some(s) = &opts.store {
            cfg.store_url = s.clone();
        } else if cfg.store_url.is_empty() {
            cfg.store_url = format!("file://{}", dir.join("store").display());
        }
        if let Some(u) = opts.retry_time_unit {
            cfg.retry.time_unit = u;
        }
        if let Some(i) = opts.retention_interval {
            cfg.retention.interval = i;
        }
        if let Some(r) = &opts.export_roots {
            cfg.export_roots = r.clone();
        }
        let cfg = cfg.finish()?;
        for r in &cfg.export_roots {
            std::fs::create_dir_all(r)
                .with_context(|| format!("creating the export root {}", r.display()))?;
        }
        // Before anything runs on it: the container exists and put-if-absent holds.
        let store_url = cfg.store_url();
        ferry_store::Store::from_url(&store_url)
            .with_context(|| format!("opening the store {store_url}"))?
            .prepare()
            .await
            .with_context(|| format!("preparing the store {store_url}"))?;
        cfg.write_toml(&config_path)?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for c in GRPC_COMPONENTS.into_iter().chain([Component::Gateway]) {
            // A component left out is the caller's to start: its port is released.
            let (tcp, udp) = match c {
                Component::Gateway => (None, bound.udp.take()),
                _ => (bound.tcp.remove(&c), None),
            };
            if opts.without.contains(&c) {
                continue;
            }
            spawn_bound(&mut tasks, c, cfg.clone(), shutdown.clone(), tcp, udp).await?;
        }
        tracing::info!(config = %config_path.display(), redis = %ferry_coord::redact_url(&cfg.redis_url), store = %cfg.store_url, "ferry mesh up");
        Ok(Mesh {
            cfg,
            config_path,
            shutdown,
            tasks,
            redis,
            _lock: lock,
        })
    }

    /// Waits until shutdown is requested or a component stops on its own (an error).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.shutdown.cancelled() => Ok(()),
            Some(done) = self.tasks.join_next() => {
                let (c, res) = done.context("component task panicked")?;
                self.shutdown.cancel();
                match res {
                    Ok(()) => anyhow::bail!("component {c} stopped"),
                    Err(e) => Err(e.context(format!("component {c} failed"))),
                }
            }
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let deadline = tokio::time::sleep(std::time::Duration::from_secs(10));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => { self.tasks.abort_all(); break; }
                n = self.tasks.join_next() => if n.is_none() { break },
            }
        }
        drop(self.redis.take());
    }

    pub fn redis(&self) -> Option<&RedisServer> {
        self.redis.as_ref()
    }
}

/// Starts one component as a task (the in-process form of its own binary).
pub async fn spawn_component(
    tasks: &mut JoinSet<(Component, anyhow::Result<()>)>,
    c: Component,
    cfg: MeshConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    spawn_bound(tasks, c, cfg, shutdown, None, None).await
}

/// [`spawn_component`] on the socket its port was picked with, when there is one.
async fn spawn_bound(
    tasks: &mut JoinSet<(Component, anyhow::Result<()>)>,
    c: Component,
    cfg: MeshConfig,
    shutdown: CancellationToken,
    tcp: Option<StdTcp>,
    udp: Option<UdpSocket>,
) -> anyhow::Result<()> {
    let addr = cfg.listen(c);
    if c == Component::Gateway {
        let sock = match udp {
            Some(s) => s,
            None => UdpSocket::bind(addr).with_context(|| format!("binding gateway udp {addr}"))?,
        };
        tasks.spawn(async move { (c, ferry_gateway::run(cfg, sock, shutdown).await) });
        return Ok(());
    }
    let l = match tcp {
        Some(l) => {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)?
        }
        None => tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {c} on {addr}"))?,
    };
    tasks.spawn(async move {
        let res = match c {
            Component::Registry => ferry_registry::run(cfg, l, shutdown).await,
            Component::Scheduler => ferry_scheduler::run(cfg, l, shutdown).await,
            Component::Ingest => ferry_ingest::run(cfg, l, shutdown).await,
            Component::StorageWriter => ferry_storage_writer::run(cfg, l, shutdown).await,
            Component::Failover => ferry_failover::run(cfg, l, shutdown).await,
            Component::Gateway => Err(anyhow::anyhow!("the gateway is not a grpc component")),
        };
        (c, res)
    });
    Ok(())
}
