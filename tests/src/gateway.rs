//! A gateway in the test's process that can be stopped and started again on the same
//! address while the rest of the mesh runs (a mesh started `without` it).
use ferry_mesh::{Component, MeshConfig};
use tokio_util::sync::CancellationToken;

pub struct InProcessGateway {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessGateway {
    pub fn start(cfg: &MeshConfig) -> anyhow::Result<Self> {
        let sock = std::net::UdpSocket::bind(cfg.listen(Component::Gateway))?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(ferry_gateway::run(cfg.clone(), sock, stop.clone()));
        Ok(Self { stop, task })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}
