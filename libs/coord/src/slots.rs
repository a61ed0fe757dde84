//! Work for numbered slots of a series (a VM's cycle periods), queued at most once per slot
//! and only by the current holder of a lease (the scheduler's leader).
//!
//! `ferry:slots:{host}` is a hash: for each series the last slot queued, and under `~fence`
//! the highest fencing token that queued work for the host. It shares the host's hash tag, so
//! the check and the push are one atomic script even on Redis Cluster.

use tracing::debug;

use crate::coord::check_name;
use crate::{Coord, CoordError, Lease};

fn slots_key(host: &str) -> String {
    format!("ferry:slots:{{{host}}}")
}

/// The host's queue and payloads, as `queue.rs` names them.
fn work_key(host: &str) -> String {
    format!("ferry:work:{{{host}}}")
}

fn items_key(host: &str) -> String {
    format!("ferry:items:{{{host}}}")
}

/// Refuses a token below the highest seen, a slot not after the last queued, and an id already
/// queued or in flight; otherwise queues the id and records the slot and token.
pub(crate) const PUSH_SLOT: &str = r"
local tok = tonumber(ARGV[1])
local seen = tonumber(redis.call('HGET', KEYS[1], '~fence') or '0')
if tok < seen then return {0, string.format('%d', seen)} end
local last = redis.call('HGET', KEYS[1], ARGV[2])
if last and tonumber(last) >= tonumber(ARGV[3]) then return {2, last} end
if redis.call('HSETNX', KEYS[2], ARGV[4], ARGV[5]) == 0 then return {3, ''} end
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
if tok > seen then redis.call('HSET', KEYS[1], '~fence', ARGV[1]) end
return {1, ''}
";

/// What [`Coord::push_slot`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotPush {
    /// The work is queued.
    Queued,
    /// This slot (or a later one) of the series was already queued: nothing to do.
    AlreadyQueued { last: u64 },
    /// The id is still queued or in flight (the previous slot's work runs): try again soon.
    Busy,
}

impl Coord {
    /// Queues work `id` for `host` as slot `slot` of `series`, fenced by `lease`: refused with
    /// [`CoordError::LeaseLost`] / [`CoordError::Fenced`] unless `lease` is still held with its
    /// token, and with [`CoordError::Fenced`] if a newer token already queued work for `host`
    /// (the live check and the push are not atomic; the recorded token closes that gap for
    /// every push after the new holder's first). A slot is queued at most once: a deposed
    /// holder and its successor cannot both run one slot.
    pub async fn push_slot(
        &self,
        lease: &Lease,
        host: &str,
        series: &str,
        slot: u64,
        id: &str,
        payload: &str,
    ) -> Result<SlotPush, CoordError> {
        check_name("host", host)?;
        check_name("series", series)?;
        if series.starts_with('~') || id.is_empty() || id.len() > 512 {
            return Err(CoordError::invalid(
                "slot push",
                format!("series {series:?} or work id {id:?}"),
            ));
        }
        self.check_fence(&lease.resource, lease.token).await?;
        let (code, v): (i64, String) = self
            .scripts
            .push_slot
            .key(slots_key(host))
            .key(items_key(host))
            .key(work_key(host))
            .arg(lease.token)
            .arg(series)
            .arg(slot)
            .arg(id)
            .arg(payload)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let number = |what: &str| {
            v.parse::<u64>().map_err(|_| CoordError::Protocol {
                what: format!("{what} of {host}"),
                reason: format!("{v:?} is not a number"),
            })
        };
        let out = match code {
            0 => {
                return Err(CoordError::Fenced {
                    resource: lease.resource.clone(),
                    presented: lease.token,
                    current: number("fencing token")?,
                });
            }
            1 => SlotPush::Queued,
            2 => SlotPush::AlreadyQueued {
                last: number("last slot")?,
            },
            3 => SlotPush::Busy,
            other => {
                return Err(CoordError::Protocol {
                    what: format!("slot push for {host}"),
                    reason: format!("unknown answer {other}"),
                });
            }
        };
        debug!(host, series, slot, id, token = lease.token, result = ?out, "slot push");
        Ok(out)
    }
}
