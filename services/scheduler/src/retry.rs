//! Retries: the backoff schedule, the loop that moves due retries back into their host's
//! queue, and the report of a failure to the registry.
use std::sync::Arc;
use std::time::Duration;

use ferry_mesh::Component;
use ferry_proto::now_ms;
use ferry_proto::registry::v1::{ReportReplicationErrorRequest, registry_client::RegistryClient};

use crate::SchedulerService;
use crate::leader;
use crate::work::QueuedWork;

/// Backoff steps in retry time units (DESIGN §2.6: 1, 2, 4, 8, 10 minutes, then every 30).
pub const BACKOFF_UNITS: [u32; 5] = [1, 2, 4, 8, 10];
pub const BACKOFF_TAIL_UNITS: u32 = 30;

/// Delay before retry `attempt` (1-based) in the configured time unit.
pub fn backoff(attempt: u32, unit: Duration) -> Duration {
    let steps = BACKOFF_UNITS
        .get(attempt.saturating_sub(1) as usize)
        .copied()
        .unwrap_or(BACKOFF_TAIL_UNITS);
    unit * steps
}

impl SchedulerService {
    /// Moves due retries back into their host's queue.
    pub(crate) async fn retry_loop(self: Arc<Self>, term: leader::Term) {
        let tick = (self.cfg.retry.time_unit / 10)
            .clamp(Duration::from_millis(20), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = term.ended() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            match self.coord.take_due(now_ms(), 100).await {
                Ok(due) => {
                    for (id, payload) in due {
                        let Ok(w) = serde_json::from_str::<QueuedWork>(&payload) else {
                            tracing::warn!(work = %id, "dropping unreadable retry entry");
                            continue;
                        };
                        if let Err(e) = self.coord.push_work(&w.host, &w.id, &payload).await {
                            tracing::warn!(work = %id, error = %e, "requeue of retry failed");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the retry set failed"),
            }
        }
    }

    /// Tells the registry how a VM's work failed: it shows the error, the retry attempts and
    /// the next retry time in the VM's health, marks it for resync, or makes it critical.
    pub(crate) async fn report_error(&self, w: &QueuedWork, req: ReportReplicationErrorRequest) {
        let res: anyhow::Result<()> = async {
            let ch = self.peers.channel(Component::Registry)?;
            RegistryClient::new(ch)
                .report_replication_error(req)
                .await?;
            Ok(())
        }
        .await;
        if let Err(e) = res {
            tracing::warn!(vm = %w.vm, error = %e, "could not report a replication error to the registry");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_design_schedule() {
        let unit = Duration::from_millis(100);
        let got: Vec<u128> = (1..=8).map(|a| backoff(a, unit).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 3000, 3000, 3000]);
    }
}
