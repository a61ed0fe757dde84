//! Resync windows: VMs marked for resync get their resync started when their policy's
//! window opens.
use ferry_mesh::Component;
use ferry_model::VmState;
use ferry_proto::registry::v1::registry_client::RegistryClient;

use crate::{SchedulerService, lifecycle_of};

impl SchedulerService {
    /// VMs marked for resync whose policy window is open now get their resync started (the
    /// registry answers with the running job when one already runs).
    pub(crate) async fn start_due_resyncs(&self, vms: &[ferry_proto::registry::v1::Vm]) {
        let now = chrono::Local::now().time();
        for v in vms
            .iter()
            .filter(|v| lifecycle_of(v).is_some_and(|(s, _)| s == VmState::ResyncPending))
        {
            let (start, end) = v.policy.as_ref().map_or(("18:30", "06:00"), |p| {
                (p.resync_window_start.as_str(), p.resync_window_end.as_str())
            });
            match in_window(now, start, end) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(vm = %v.name, error = %e, "the resync window is invalid; resync waits for an operator");
                    continue;
                }
            }
            let res: anyhow::Result<String> = async {
                let ch = self.peers.channel(Component::Registry)?;
                let job = RegistryClient::new(ch)
                    .resync_vm(ferry_proto::registry::v1::ResyncVmRequest {
                        name: v.name.clone(),
                    })
                    .await?
                    .into_inner();
                Ok(job.id)
            }
            .await;
            match res {
                Ok(job) => {
                    tracing::info!(vm = %v.name, job = %job, "resync window open; resync started")
                }
                Err(e) => {
                    tracing::warn!(vm = %v.name, error = %e, "starting a resync failed; trying again")
                }
            }
        }
    }
}

/// Whether `now` falls in the window `[start, end)` ("HH:MM", local time). A window that
/// ends before it starts runs over midnight; equal ends mean always.
pub fn in_window(now: chrono::NaiveTime, start: &str, end: &str) -> Result<bool, String> {
    let parse = |s: &str| {
        chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M")
            .map_err(|_| format!("{s:?} is not a time of day (HH:MM)"))
    };
    let (s, e) = (parse(start)?, parse(end)?);
    Ok(if s == e {
        true
    } else if s < e {
        s <= now && now < e
    } else {
        now >= s || now < e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_window_runs_over_midnight() {
        let t = |h, m| chrono::NaiveTime::from_hms_opt(h, m, 0).unwrap();
        assert!(in_window(t(23, 0), "18:30", "06:00").unwrap());
        assert!(in_window(t(5, 59), "18:30", "06:00").unwrap());
        assert!(!in_window(t(12, 0), "18:30", "06:00").unwrap());
        assert!(in_window(t(12, 0), "09:00", "17:00").unwrap());
        assert!(!in_window(t(17, 0), "09:00", "17:00").unwrap());
        assert!(in_window(t(3, 0), "00:00", "00:00").unwrap());
        assert!(in_window(t(3, 0), "25:00", "00:00").is_err());
    }
}
