//! `ferry-storage-writer --config D/ferry.toml [--listen ADDR]`: runs the storage-writer service alone.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use ferry_mesh::{Component, MeshConfig};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-storage-writer",
    version,
    about = "Ferry storage-writer service"
)]
struct Args {
    /// The mesh configuration written by `ferry up` (D/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    config: PathBuf,
    /// Listen address; overrides `storage_writer.listen` from the configuration.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ferry_mesh::init_tracing("storage-writer");
    let mut cfg = MeshConfig::load(Some(&args.config), figment::Figment::new())
        .with_context(|| format!("loading {}", args.config.display()))?;
    if let Some(addr) = args.listen {
        cfg.set_listen(Component::StorageWriter, addr);
    }
    let addr = cfg.storage_writer.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let shutdown = ferry_mesh::shutdown_on_signal();
    ferry_storage_writer::run(cfg, listener, shutdown).await
}
