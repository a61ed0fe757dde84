//! `ferry-gateway --config D/ferry.toml [--listen ADDR]`: the QUIC ingest gateway.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use ferry_mesh::{Component, MeshConfig};

#[derive(Parser, Debug)]
#[command(name = "ferry-gateway", version, about = "Ferry's QUIC ingest gateway")]
struct Args {
    /// The mesh configuration file (as written by `ferry up`).
    #[arg(long, env = "FERRY_CONFIG")]
    config: PathBuf,
    /// UDP address to listen on; overrides `gateway.listen` from the config.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ferry_mesh::init_tracing("gateway");
    let mut cfg = MeshConfig::load(Some(&args.config), figment::Figment::new())
        .with_context(|| format!("loading {}", args.config.display()))?;
    if let Some(addr) = args.listen {
        cfg.set_listen(Component::Gateway, addr);
    }
    let addr = cfg.listen(Component::Gateway);
    let socket = UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}"))?;
    let shutdown = ferry_mesh::shutdown_on_signal();
    ferry_gateway::run(cfg, socket, shutdown).await
}
