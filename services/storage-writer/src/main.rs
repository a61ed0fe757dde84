//! `ferry-storage-writer --config D/ferry.toml [--listen ADDR]`: runs the storage-writer service alone.
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ferry_mesh::component_main(
        ferry_mesh::Component::StorageWriter,
        "The Ferry storage-writer: recovery points, block maps, materialising disks, retention.",
        ferry_storage_writer::run,
    )
    .await
}
