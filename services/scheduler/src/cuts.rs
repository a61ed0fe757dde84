//! Group cuts (docs/ARCHITECTURE.md, "Consistent cuts across hosts"): the delta cycles of a
//! replication group's VMs are queued together under one cut id, and each host's JoinCut
//! (its VM's writes paused) waits here until every member joined or the window passed.
use std::time::Duration;

use ferry_coord::{CutDecision, CutJoin};
use ferry_proto::scheduler::v1::JoinCutResponse;

use crate::SchedulerService;
use crate::error::SchedulerError;
use crate::work::QueuedWork;

/// How long a member's writes may stay paused waiting for the others: past it the cut is
/// aborted (every member cuts alone; their points carry no cut id).
pub(crate) const CUT_WINDOW: Duration = Duration::from_secs(3);

const POLL: Duration = Duration::from_millis(10);

/// A new cut id of `group`: unique, and ordered by time within the group.
pub(crate) fn new_cut_id(group: &str, now_ms: i64) -> String {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{group}-{now_ms:013}-{}", &tag[..8])
}

fn answer(go: bool, reason: impl Into<String>) -> JoinCutResponse {
    JoinCutResponse {
        go,
        reason: reason.into(),
    }
}

impl SchedulerService {
    /// `host` joins cut `cut` for `vm`, whose writes it holds paused. Only the host the cut's
    /// cycle of `vm` was sent to may join it.
    pub(crate) async fn join_cut(
        &self,
        host: &str,
        cut: &str,
        vm: &str,
    ) -> Result<JoinCutResponse, SchedulerError> {
        if cut.is_empty() || vm.is_empty() {
            return Err(SchedulerError::InvalidArgument(
                "join_cut needs a cut_id and a vm".into(),
            ));
        }
        let sent = self
            .coord
            .list_work(host)
            .await?
            .into_iter()
            .any(|(_, _, p)| {
                serde_json::from_str::<QueuedWork>(&p).is_ok_and(|w| w.vm == vm && w.cut_id == cut)
            });
        if !sent {
            return Err(SchedulerError::PermissionDenied(format!(
                "host {host} was not sent the cycle of vm {vm} in cut {cut}"
            )));
        }
        let decided = match self.coord.join_cut(cut, vm).await? {
            CutJoin::NotMember => {
                return Ok(answer(
                    false,
                    format!("vm {vm} is not a member of cut {cut} (unknown or expired)"),
                ));
            }
            CutJoin::AlreadyJoined => {
                return Ok(answer(
                    false,
                    format!("vm {vm} joined cut {cut} before: a retried cycle seals later writes"),
                ));
            }
            CutJoin::Joined(Some(d)) => d,
            CutJoin::Joined(None) => self.await_decision(cut).await?,
        };
        tracing::debug!(cut, vm, host, go = decided == CutDecision::Go, "cut joined");
        Ok(match decided {
            CutDecision::Go => answer(true, ""),
            CutDecision::Abort => answer(
                false,
                format!(
                    "not every vm of cut {cut} paused within {} s",
                    CUT_WINDOW.as_secs()
                ),
            ),
        })
    }

    /// Waits for the other members; aborts the cut when they take longer than the window.
    async fn await_decision(&self, cut: &str) -> Result<CutDecision, SchedulerError> {
        let until = tokio::time::Instant::now() + CUT_WINDOW;
        while tokio::time::Instant::now() < until {
            if let Some(d) = self.coord.cut_decision(cut).await? {
                return Ok(d);
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(self.coord.decide_cut(cut, CutDecision::Abort).await?)
    }
}
