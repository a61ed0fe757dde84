//! `ferry-registry --config D/ferry.toml [--listen ADDR]`: runs the registry service alone.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferry_mesh::component_main(
        ferry_mesh::Component::Registry,
        "The Ferry registry: vault, hosts, VMs, protection state machine, jobs.",
        ferry_registry::run,
    )
    .await
}
