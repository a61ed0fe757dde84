//! Cancel items from the scheduler: a cancelled job's work is stopped here. The running item
//! of that id has its own token (a child of the agent's shutdown token), cancelled; an item
//! waiting behind the VM's running work is completed at once as cancelled. Either way the
//! cancel item itself is completed, so it does not stay in flight.
use ferry_proto::scheduler::v1::{CompleteWorkRequest, WorkItem};
use tokio_util::sync::CancellationToken;

use crate::Agent;

impl Agent {
    /// The token of running item `id`: cancelled by a cancel item, or with `parent`.
    pub(crate) fn register_running(
        &self,
        id: &str,
        parent: &CancellationToken,
    ) -> CancellationToken {
        let token = parent.child_token();
        if let Ok(mut m) = self.running.lock() {
            m.insert(id.to_owned(), token.clone());
        }
        token
    }

    pub(crate) fn unregister_running(&self, id: &str) {
        if let Ok(mut m) = self.running.lock() {
            m.remove(id);
        }
    }

    /// Handles cancel item `item` (its `cancels` names the work to stop).
    pub(crate) fn cancel_work(&self, item: WorkItem) {
        let target = item.cancels.clone();
        let running = self
            .running
            .lock()
            .ok()
            .and_then(|m| m.get(&target).cloned());
        let waiting = self.busy.lock().ok().and_then(|mut b| {
            let slot = b.get_mut(&item.vm)?;
            match slot {
                Some(w) if w.id == target => slot.take(),
                _ => None,
            }
        });
        match (&running, &waiting) {
            (Some(token), _) => {
                tracing::info!(vm = %item.vm, work = %target, "stopping work: its job was cancelled");
                token.cancel();
            }
            (None, Some(_)) => {
                tracing::info!(vm = %item.vm, work = %target, "dropping work that waited: its job was cancelled")
            }
            (None, None) => {
                tracing::info!(vm = %item.vm, work = %target, "work to cancel is not running here")
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(w) = waiting {
                me.complete(
                    &w.id,
                    false,
                    "cancelled before it started: its job was cancelled",
                )
                .await;
            }
            me.complete(&item.id, true, "").await;
        });
    }

    /// Completes `work_id` (it stays in flight, re-sent on reconnect, if that fails).
    async fn complete(&self, work_id: &str, ok: bool, error: &str) {
        let req = CompleteWorkRequest {
            work_id: work_id.to_owned(),
            host_name: self.creds.host.clone(),
            ok,
            error: error.to_owned(),
            ..Default::default()
        };
        self.send_completion(req).await;
    }
}
