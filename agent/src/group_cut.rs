//! The host's half of a group cut (docs/ARCHITECTURE.md, "Consistent cuts across hosts"):
//! pause the VM's writes, join the cut at the scheduler, seal the logs, resume. The point
//! carries the cut id only when every member joined while paused.
use std::time::Duration;

use ferry_proto::scheduler::v1::JoinCutRequest;

use crate::Agent;
use crate::replicate::ReplError;

/// The longest the VM's writes stay paused for a cut: the scheduler's window (3 s) plus
/// room for the call itself. Past it the logs are sealed all the same, without the cut.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Agent {
    /// Seals the VM's logs; in group cut `cut` when not empty. Returns the cut the logs were
    /// sealed in: `cut` when it went ahead, "" when it did not (or none was asked).
    pub(crate) async fn cut_in(&self, vm: &str, cut: &str) -> Result<String, ReplError> {
        if cut.is_empty() {
            self.cut(vm).await?;
            return Ok(String::new());
        }
        let tracker = self.tracker_for(vm)?;
        let (_, go) = tracker
            .cut_paused(vm, self.join_cut(vm, cut))
            .await
            .map_err(|e| ReplError::Recoverable(format!("vm {vm}: sealing logs: {e}")))?;
        Ok(if go { cut.to_owned() } else { String::new() })
    }

    /// Joins `cut` for `vm` (its writes paused); true when the cut goes ahead.
    async fn join_cut(&self, vm: &str, cut: &str) -> bool {
        let req = JoinCutRequest {
            cut_id: cut.to_owned(),
            vm: vm.to_owned(),
            host_name: self.creds.host.clone(),
        };
        let call = async {
            let mut s = self.scheduler().await?;
            Ok::<_, anyhow::Error>(s.join_cut(req).await?.into_inner())
        };
        match tokio::time::timeout(JOIN_TIMEOUT, call).await {
            Ok(Ok(r)) if r.go => true,
            Ok(Ok(r)) => {
                tracing::info!(vm, cut, reason = %r.reason, "group cut did not go ahead; the vm is cut alone");
                false
            }
            Ok(Err(e)) => {
                tracing::warn!(vm, cut, error = %e, "joining a group cut failed; the vm is cut alone");
                false
            }
            Err(_) => {
                tracing::warn!(
                    vm,
                    cut,
                    "no answer to a group cut in time; the vm is cut alone"
                );
                false
            }
        }
    }
}
