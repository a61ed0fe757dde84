//! Work queues per host and the retry queue.
//!
//! A host's work is a list of ids (`ferry:work:{host}`), a list of ids handed out but not acked
//! (`ferry:inflight:{host}`), and a hash id -> payload (`ferry:items:{host}`). Pushing an id
//! that is queued or in flight does nothing, so pushes are idempotent. `next_work` moves an id
//! atomically from the queue to in-flight (BLMOVE on a dedicated connection); `ack_work`
//! forgets it; `requeue_inflight` puts everything in flight back at the head of the queue
//! (after a worker reconnects, or a caller was cancelled mid-wait).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::coord::check_name;
use crate::{Coord, CoordError};

/// Extra time allowed for a blocking call's answer beyond its own timeout.
const BLOCKING_GRACE: Duration = Duration::from_secs(5);
/// Longest single wait in `next_work`; longer requests are cut to this (callers loop anyway).
const MAX_WAIT: Duration = Duration::from_secs(3600);

pub(crate) const PUSH: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
";

pub(crate) const ACK: &str = r"
local n = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('LREM', KEYS[3], 0, ARGV[1])
return n
";

/// Moves in-flight ids back to the head of the queue, keeping their order.
pub(crate) const REQUEUE: &str = r"
local n = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') do
  n = n + 1
end
return n
";

pub(crate) const SCHEDULE: &str = r"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
";

/// ACK and SCHEDULE in one step: at every instant failed work is either in the host's queue
/// or in the retry set, so the cycle scheduler never sees neither and queues a fresh cycle
/// that would reset the retry's attempts (and a crash between the two loses no retry).
pub(crate) const ACK_AND_RETRY: &str = r"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('LREM', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
return 1
";

pub(crate) const TAKE_DUE: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local p = redis.call('HGET', KEYS[2], id)
  redis.call('HDEL', KEYS[2], id)
  table.insert(out, id)
  table.insert(out, p or '')
end
return out
";

fn work_key(host: &str) -> String {
    format!("ferry:work:{{{host}}}")
}

fn inflight_key(host: &str) -> String {
    format!("ferry:inflight:{{{host}}}")
}

fn items_key(host: &str) -> String {
    format!("ferry:items:{{{host}}}")
}

const RETRY_DUE: &str = "ferry:{retry}:due";
const RETRY_PAYLOAD: &str = "ferry:{retry}:payload";

fn check_id(id: &str) -> Result<(), CoordError> {
    if id.is_empty() || id.len() > 512 {
        return Err(CoordError::invalid(
            "work id",
            format!("{id:?} (1-512 bytes)"),
        ));
    }
    Ok(())
}

impl Coord {
    /// Queues work `id` for `host`. Idempotent: an id already queued or in flight is left as
    /// it is (payload included).
    pub async fn push_work(&self, host: &str, id: &str, payload: &str) -> Result<(), CoordError> {
        check_name("host", host)?;
        check_id(id)?;
        let added: i64 = self
            .scripts
            .push
            .key(items_key(host))
            .key(work_key(host))
            .arg(id)
            .arg(payload)
            .invoke_async(&mut self.conn.clone())
            .await?;
        debug!(host, id, added = added == 1, "work pushed");
        Ok(())
    }

    /// The next work item `(id, payload)` of `host`, waiting up to `wait` (zero: don't wait;
    /// at most an hour).
    /// The item moves to in-flight until [`Coord::ack_work`]. Waiting happens on a dedicated
    /// connection, never on the shared one. If the returned future is dropped while waiting, an
    /// item may still have moved to in-flight: [`Coord::requeue_inflight`] recovers it.
    pub async fn next_work(
        &self,
        host: &str,
        wait: Duration,
    ) -> Result<Option<(String, String)>, CoordError> {
        check_name("host", host)?;
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Some(id) = self.move_next(host, remaining).await? else {
                return Ok(None);
            };
            let payload: Option<String> = redis::cmd("HGET")
                .arg(items_key(host))
                .arg(&id)
                .query_async(&mut self.conn.clone())
                .await?;
            match payload {
                Some(p) => return Ok(Some((id, p))),
                None => {
                    // Acked while queued: drop the stray id and look again.
                    let _: i64 = redis::cmd("LREM")
                        .arg(inflight_key(host))
                        .arg(0)
                        .arg(&id)
                        .query_async(&mut self.conn.clone())
                        .await?;
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
            }
        }
    }

    async fn move_next(&self, host: &str, wait: Duration) -> Result<Option<String>, CoordError> {
        let mut cmd = if wait < Duration::from_millis(1) {
            redis::cmd("LMOVE")
        } else {
            redis::cmd("BLMOVE")
        };
        cmd.arg(work_key(host))
            .arg(inflight_key(host))
            .arg("LEFT")
            .arg("RIGHT");
        if wait < Duration::from_millis(1) {
            return Ok(cmd.query_async(&mut self.conn.clone()).await?);
        }
        cmd.arg(format!("{:.3}", wait.as_secs_f64()));
        let mut fresh = false;
        loop {
            let (mut conn, pooled) = self.blocking_conn(fresh).await?;
            match tokio::time::timeout(wait + BLOCKING_GRACE, cmd.query_async(&mut conn)).await {
                Ok(Ok(id)) => {
                    self.return_blocking_conn(conn);
                    return Ok(id);
                }
                // An idle pooled connection may have died with a Redis restart: one more try on
                // a new connection. A failed or timed-out connection is dropped, not pooled.
                Ok(Err(e)) if pooled && (e.is_io_error() || e.is_connection_dropped()) => {
                    debug!(host, error = %e, "pooled blocking connection broken, reconnecting");
                    fresh = true;
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(CoordError::Timeout {
                        what: format!("next work of {host}"),
                    });
                }
            }
        }
    }

    /// Forgets work `id` of `host` (done). Acking an unknown id is not an error.
    pub async fn ack_work(&self, host: &str, id: &str) -> Result<(), CoordError> {
        check_name("host", host)?;
        check_id(id)?;
        let n: i64 = self
            .scripts
            .ack
            .key(items_key(host))
            .key(inflight_key(host))
            .key(work_key(host))
            .arg(id)
            .invoke_async(&mut self.conn.clone())
            .await?;
        debug!(host, id, known = n == 1, "work acked");
        Ok(())
    }

    /// Moves all in-flight work of `host` back to the head of its queue (oldest first).
    /// Returns how many items moved.
    pub async fn requeue_inflight(&self, host: &str) -> Result<usize, CoordError> {
        check_name("host", host)?;
        let n: usize = self
            .scripts
            .requeue
            .key(inflight_key(host))
            .key(work_key(host))
            .invoke_async(&mut self.conn.clone())
            .await?;
        if n > 0 {
            info!(host, count = n, "in-flight work requeued");
        }
        Ok(n)
    }

    /// All work of `host`: `(id, "in-flight" | "queued", payload)`, in-flight first, each in
    /// hand-out order.
    pub async fn list_work(&self, host: &str) -> Result<Vec<(String, String, String)>, CoordError> {
        check_name("host", host)?;
        let (inflight, queued, mut items): (Vec<String>, Vec<String>, HashMap<String, String>) =
            redis::pipe()
                .atomic()
                .cmd("LRANGE")
                .arg(inflight_key(host))
                .arg(0)
                .arg(-1)
                .cmd("LRANGE")
                .arg(work_key(host))
                .arg(0)
                .arg(-1)
                .cmd("HGETALL")
                .arg(items_key(host))
                .query_async(&mut self.conn.clone())
                .await?;
        let mut out = Vec::with_capacity(inflight.len() + queued.len());
        for (ids, state) in [(inflight, "in-flight"), (queued, "queued")] {
            for id in ids {
                let payload = items.remove(&id).unwrap_or_default();
                out.push((id, state.to_string(), payload));
            }
        }
        Ok(out)
    }

    /// Schedules `id` for retry at `due_ms` (Unix ms). Scheduling an id again replaces its due
    /// time and payload.
    pub async fn schedule_retry(
        &self,
        id: &str,
        due_ms: i64,
        payload: &str,
    ) -> Result<(), CoordError> {
        check_id(id)?;
        let _: i64 = self
            .scripts
            .schedule
            .key(RETRY_DUE)
            .key(RETRY_PAYLOAD)
            .arg(id)
            .arg(due_ms)
            .arg(payload)
            .invoke_async(&mut self.conn.clone())
            .await?;
        debug!(id, due_ms, "retry scheduled");
        Ok(())
    }

    /// Forgets work `id` of `host` and schedules its retry at `due_ms` with `payload`, in one
    /// atomic step (see [`ACK_AND_RETRY`]).
    pub async fn ack_and_retry(
        &self,
        host: &str,
        id: &str,
        due_ms: i64,
        payload: &str,
    ) -> Result<(), CoordError> {
        check_name("host", host)?;
        check_id(id)?;
        let _: i64 = self
            .scripts
            .ack_and_retry
            .key(items_key(host))
            .key(inflight_key(host))
            .key(work_key(host))
            .key(RETRY_DUE)
            .key(RETRY_PAYLOAD)
            .arg(id)
            .arg(due_ms)
            .arg(payload)
            .invoke_async(&mut self.conn.clone())
            .await?;
        debug!(host, id, due_ms, "work failed; retry scheduled");
        Ok(())
    }

    /// The retry scheduled for `id`, if any: `(due_ms, payload)`.
    pub async fn pending_retry(&self, id: &str) -> Result<Option<(i64, String)>, CoordError> {
        check_id(id)?;
        let mut conn = self.conn.clone();
        let due: Option<f64> = redis::cmd("ZSCORE")
            .arg(RETRY_DUE)
            .arg(id)
            .query_async(&mut conn)
            .await?;
        let Some(due) = due else { return Ok(None) };
        let payload: Option<String> = redis::cmd("HGET")
            .arg(RETRY_PAYLOAD)
            .arg(id)
            .query_async(&mut conn)
            .await?;
        Ok(payload.map(|p| (due as i64, p)))
    }

    /// Drops the retry scheduled for `id` (work whose job was cancelled); true when there
    /// was one.
    pub async fn drop_retry(&self, id: &str) -> Result<bool, CoordError> {
        check_id(id)?;
        let (removed, _): (i64, i64) = redis::pipe()
            .atomic()
            .cmd("ZREM")
            .arg(RETRY_DUE)
            .arg(id)
            .cmd("HDEL")
            .arg(RETRY_PAYLOAD)
            .arg(id)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(removed == 1)
    }

    /// Up to `max` retries waiting, earliest first: `(id, due_ms, payload)` (for listing; the
    /// retry loop takes them with [`Coord::take_due`]).
    pub async fn pending_retries(
        &self,
        max: usize,
    ) -> Result<Vec<(String, i64, String)>, CoordError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let due: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(RETRY_DUE)
            .arg(0)
            .arg(max as i64 - 1)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let payloads: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(RETRY_PAYLOAD)
            .arg(due.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>())
            .query_async(&mut conn)
            .await?;
        // A retry taken between the two reads has no payload any more: it is not waiting.
        Ok(due
            .into_iter()
            .zip(payloads)
            .filter_map(|((id, at), p)| Some((id, at as i64, p?)))
            .collect())
    }

    /// Removes and returns up to `max` retries due at `now_ms`, earliest first.
    pub async fn take_due(
        &self,
        now_ms: i64,
        max: usize,
    ) -> Result<Vec<(String, String)>, CoordError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let flat: Vec<String> = self
            .scripts
            .take_due
            .key(RETRY_DUE)
            .key(RETRY_PAYLOAD)
            .arg(now_ms)
            .arg(max)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if !flat.len().is_multiple_of(2) {
            return Err(CoordError::Protocol {
                what: "retry queue".into(),
                reason: "odd reply length".into(),
            });
        }
        Ok(flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect())
    }
}
