//! A mesh whose components run as several replicas, each of which a test may stop.
use std::time::Duration;

use ferry::ctl::Ctl;
use ferry::up::{Mesh, UpOptions};
use tokio_util::sync::CancellationToken;

use crate::{TestMesh, init_logs};

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
            export_roots: Some(vec![dir.path().to_path_buf()]),
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
}
