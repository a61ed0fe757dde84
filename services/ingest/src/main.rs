use clap::Parser;

/// The Ferry ingest: replication cycles, leases and commits.
#[derive(Parser)]
#[command(name = "ferry-ingest", version)]
struct Args {
    /// Mesh config written by `ferry up` (D/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    config: std::path::PathBuf,
    /// Listen address (overrides the config).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferry_mesh::init_tracing("ingest");
    let args = Args::parse();
    let cfg = ferry_mesh::MeshConfig::load(Some(&args.config), figment::Figment::new())?;
    let addr = args.listen.unwrap_or(cfg.ingest.listen);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    ferry_ingest::run(cfg, listener, ferry_mesh::shutdown_on_signal()).await
}
