//! Outcomes of failover work, kept in Redis for a day after the host completed it: the
//! orchestrator that dispatched the work (or the replica that resumed its job) polls
//! `WorkResult` until the outcome is there.
use std::time::Duration;

use ferry_coord::Coord;
use ferry_proto::scheduler::v1::{CompleteWorkRequest, RecoveredVm, WorkResultResponse};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::error::SchedulerError;

/// How long an outcome is kept.
pub(crate) const RESULT_TTL: Duration = Duration::from_secs(24 * 3600);

fn key(work_id: &str) -> String {
    format!("work-result-{work_id}")
}

/// The stored outcome.
#[derive(Debug, Serialize, Deserialize)]
struct Outcome {
    ok: bool,
    error: String,
    error_class: i32,
    /// `RecoveredVm`, protobuf-encoded in hex.
    recovered: String,
}

pub(crate) async fn record(coord: &Coord, req: &CompleteWorkRequest) -> Result<(), SchedulerError> {
    let outcome = Outcome {
        ok: req.ok,
        error: req.error.clone(),
        error_class: req.error_class,
        recovered: req
            .recovered
            .as_ref()
            .map(|r| hex::encode(r.encode_to_vec()))
            .unwrap_or_default(),
    };
    let json =
        serde_json::to_string(&outcome).map_err(|e| SchedulerError::Internal(e.to_string()))?;
    coord.set_ex(&key(&req.work_id), &json, RESULT_TTL).await?;
    Ok(())
}

/// The outcome of `work_id`, if the host completed it.
pub(crate) async fn get(
    coord: &Coord,
    work_id: &str,
) -> Result<Option<WorkResultResponse>, SchedulerError> {
    let Some(json) = coord.get(&key(work_id)).await? else {
        return Ok(None);
    };
    let o: Outcome = serde_json::from_str(&json).map_err(|e| {
        SchedulerError::Internal(format!("the result of work {work_id} is unreadable: {e}"))
    })?;
    let recovered = match o.recovered.is_empty() {
        true => None,
        false => {
            let bytes = hex::decode(&o.recovered)
                .map_err(|e| SchedulerError::Internal(format!("work {work_id}: {e}")))?;
            Some(RecoveredVm::decode(bytes.as_slice()).map_err(|e| {
                SchedulerError::Internal(format!("the result of work {work_id} is unreadable: {e}"))
            })?)
        }
    };
    Ok(Some(WorkResultResponse {
        done: true,
        ok: o.ok,
        error: o.error,
        error_class: o.error_class,
        recovered,
        state: "done".into(),
    }))
}
