use clap::Parser;

/// The Ferry host agent: registers with the vault, reports VMs and disks, replicates them.
#[derive(Parser)]
#[command(name = "ferry-agent", version)]
struct Args {
    /// agent.toml: registration key file, data dir, host and VMs.
    #[arg(long, env = "FERRY_AGENT_CONFIG")]
    config: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferry_mesh::init_tracing("agent");
    let args = Args::parse();
    let cfg = ferry_agent::AgentConfig::load(&args.config)?;
    if let Err(e) = ferry_agent::run(cfg, ferry_mesh::shutdown_on_signal()).await {
        eprintln!("Error: {e:?}");
        // At once: a disk stuck closing (or a read on a hung filesystem) must not hold up
        // the exit that reports it.
        std::process::exit(1);
    }
    Ok(())
}
