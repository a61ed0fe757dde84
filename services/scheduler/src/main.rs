//! `ferry-scheduler --config D/ferry.toml [--listen ADDR]`: runs the scheduler service alone.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferry_mesh::component_main(
        ferry_mesh::Component::Scheduler,
        "The Ferry scheduler: work queues and dispatch to agents.",
        ferry_scheduler::run,
    )
    .await
}
