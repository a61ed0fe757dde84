//! The retention loop's work: one retention run per protected VM at the storage-writer.
use std::time::Duration;

use ferry_mesh::Component;

use crate::SchedulerService;

impl SchedulerService {
    /// Thins each protected VM's points, prunes those past its retention window and collects
    /// what no point references (storage-writer does the work; failures are retried next
    /// round).
    pub(crate) async fn run_retention(&self) {
        let vms: Vec<(String, Duration, u64, u64)> = self
            .cycles
            .lock()
            .await
            .iter()
            .map(|(vm, c)| {
                let (k, t) = (c.keep_all_seconds, c.thin_to_seconds);
                (vm.clone(), c.retention, k, t)
            })
            .collect();
        for (vm, retention, keep_all_seconds, thin_to_seconds) in vms {
            let res: anyhow::Result<ferry_proto::storage::v1::RunRetentionResponse> = async {
                let ch = self.peers.channel(Component::StorageWriter)?;
                let req = ferry_proto::storage::v1::RunRetentionRequest {
                    vm: vm.clone(),
                    retention_seconds: retention.as_secs(),
                    gc_grace_seconds: 0,
                    keep_all_seconds,
                    thin_to_seconds,
                };
                let client =
                    ferry_proto::storage::v1::storage_writer_client::StorageWriterClient::new(ch);
                Ok(client
                    .max_decoding_message_size(64 << 20)
                    .run_retention(req)
                    .await?
                    .into_inner())
            }
            .await;
            match res {
                Ok(r) => {
                    tracing::debug!(vm = %vm, pruned = r.points_pruned, collected = r.chunks_collected, "retention ran")
                }
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "retention failed; retrying next round")
                }
            }
        }
    }
}
