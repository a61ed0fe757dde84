//! `ferry-ingest --config D/ferry.toml [--listen ADDR]`: runs the ingest service alone.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferry_mesh::component_main(
        ferry_mesh::Component::Ingest,
        "The Ferry ingest: replication cycles, leases and commits.",
        ferry_ingest::run,
    )
    .await
}
