//! `ferry-failover --config D/ferry.toml [--listen ADDR]`: runs the failover service alone.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferry_mesh::component_main(
        ferry_mesh::Component::Failover,
        "The Ferry failover service: test failover and its cleanup.",
        ferry_failover::run,
    )
    .await
}
