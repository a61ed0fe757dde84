use clap::Parser;

/// The Ferry registry: vault, hosts, VMs, protection state machine, jobs.
#[derive(Parser)]
#[command(name = "ferry-registry", version)]
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
    ferry_mesh::init_tracing("registry");
    let args = Args::parse();
    let cfg = ferry_mesh::MeshConfig::load(Some(&args.config), figment::Figment::new())?;
    let addr = args.listen.unwrap_or(cfg.registry.listen);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    ferry_registry::run(cfg, listener, ferry_mesh::shutdown_on_signal()).await
}
