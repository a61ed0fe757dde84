//! What ingest tells the registry: a cycle's progress and its committed point.
use ferry_mesh::Component;
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::now_ms;
use ferry_proto::registry::v1::{
    ReportCommittedRequest, ReportProgressRequest, registry_client::RegistryClient,
};

use crate::IngestService;
use crate::cycle::CycleRecord;

impl IngestService {
    async fn registry(&self) -> anyhow::Result<RegistryClient<tonic::transport::Channel>> {
        Ok(RegistryClient::new(
            self.peers.channel(Component::Registry)?,
        ))
    }

    pub(crate) async fn report_progress(&self, c: &CycleRecord) {
        if c.job_id.is_empty() {
            return;
        }
        let total: u64 = c.disks.iter().map(|d| d.virtual_size).sum();
        let req = ReportProgressRequest {
            job_id: c.job_id.clone(),
            bytes_total: total,
            bytes_done: c.stats.plain_bytes_written,
            bytes_skipped: c.stats.bytes_skipped,
            message: format!(
                "{} chunks written, {} skipped as already stored ({} bytes)",
                c.stats.chunks_written, c.stats.chunks_skipped, c.stats.bytes_skipped
            ),
        };
        match self.registry().await {
            Ok(mut r) => {
                if let Err(e) = r.report_progress(req).await {
                    tracing::debug!(cycle = %c.id, error = %e, "progress report failed");
                }
            }
            Err(e) => {
                tracing::debug!(cycle = %c.id, error = %e, "registry unreachable for progress")
            }
        }
    }

    /// Tells the registry of the point a cycle committed (its job moves on); a failure is
    /// logged, not returned: the point is committed either way.
    pub(crate) async fn report_committed(&self, c: &CycleRecord, point: &RecoveryPoint) {
        match self.registry().await {
            Ok(mut r) => {
                let res = r
                    .report_committed(ReportCommittedRequest {
                        vm: c.vm.clone(),
                        job_id: c.job_id.clone(),
                        point: Some(point.clone()),
                        cycle_duration_ms: (now_ms() - c.started_at_ms).max(0) as u64,
                        cycle_bytes: c.stats.plain_bytes_written + c.stats.bytes_skipped,
                    })
                    .await;
                if let Err(e) = res {
                    tracing::warn!(vm = %c.vm, error = %e, "registry did not take the commit report");
                }
            }
            Err(e) => {
                tracing::warn!(vm = %c.vm, error = %e, "registry unreachable for the commit report")
            }
        }
    }
}
