//! `ferry-failover --config D/ferry.toml [--listen ADDR]`: runs the failover service alone.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use ferry_mesh::{Component, MeshConfig};

#[derive(Debug, Parser)]
#[command(name = "ferry-failover", version, about = "Ferry failover service")]
struct Args {
    /// The mesh configuration written by `ferry up` (D/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    config: PathBuf,
    /// Listen address; overrides `failover.listen` from the configuration.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ferry_mesh::init_tracing("failover");
    let mut cfg = MeshConfig::load(Some(&args.config), figment::Figment::new())
        .with_context(|| format!("loading {}", args.config.display()))?;
    if let Some(addr) = args.listen {
        cfg.set_listen(Component::Failover, addr);
    }
    let addr = cfg.failover.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let shutdown = ferry_mesh::shutdown_on_signal();
    ferry_failover::run(cfg, listener, shutdown).await
}
