//! `Coord`: the shared Redis handle, leases with fencing tokens, and a small TTL cache.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Script};
use tracing::{debug, info};

use crate::{CoordError, RedisTarget};

const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle dedicated connections kept for blocking calls.
const BLOCKING_POOL: usize = 32;

/// Acquire: fails with the current value if another holder has the lease; otherwise bumps the
/// fencing counter and (re)writes the lease. A counter that does not exist yet starts at the
/// server's clock in microseconds, so tokens keep growing even after Redis lost all its data
/// (tokens are checked against committed points, which outlive Redis). Numbers are formatted
/// with %d: Lua's default number formatting would round 16-digit tokens.
const ACQUIRE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local h = string.match(cur, '^(.*)\n%d+$')
  if h ~= ARGV[1] then return {0, cur} end
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
end
local tok = string.format('%d', redis.call('INCR', KEYS[2]))
redis.call('SET', KEYS[1], ARGV[1] .. '\n' .. tok, 'PX', ARGV[2])
return {1, tok}
";

/// Renew: only if the lease still carries exactly this holder and token.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
";

/// Release: only our own lease.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

pub(crate) struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    pub(crate) push: Script,
    pub(crate) ack: Script,
    pub(crate) requeue: Script,
    pub(crate) schedule: Script,
    pub(crate) ack_and_retry: Script,
    pub(crate) take_due: Script,
    pub(crate) push_slot: Script,
}

/// A handle on Redis (cheap to clone). Ordinary commands share one multiplexed connection
/// that reconnects by itself; blocking commands use dedicated connections.
#[derive(Clone)]
pub struct Coord {
    pub(crate) client: Client,
    pub(crate) conn: ConnectionManager,
    pub(crate) blocking: Arc<Mutex<Vec<MultiplexedConnection>>>,
    pub(crate) scripts: Arc<Scripts>,
}

impl std::fmt::Debug for Coord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = self.client.get_connection_info();
        f.debug_struct("Coord")
            .field("addr", &info.addr().to_string())
            .finish()
    }
}

/// A lease on a resource. `token` is the fencing token: present it with every write that
/// must be rejected once the lease is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub resource: String,
    pub holder: String,
    pub token: u64,
}

impl Lease {
    fn value(&self) -> String {
        format!("{}\n{}", self.holder, self.token)
    }
}

pub(crate) fn check_name(what: &str, name: &str) -> Result<(), CoordError> {
    let ok = !name.is_empty()
        && name.len() <= 512
        && !name.chars().any(|c| c == '{' || c == '}' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CoordError::invalid(
            what,
            format!("{name:?} (1-512 chars, no braces or control characters)"),
        ))
    }
}

pub(crate) fn ttl_ms(ttl: Duration) -> Result<u64, CoordError> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 || ms > i64::MAX as u64 {
        return Err(CoordError::invalid(
            "ttl",
            format!("{ttl:?} (at least 1 ms)"),
        ));
    }
    Ok(ms)
}

fn lease_key(resource: &str) -> String {
    format!("ferry:lease:{{{resource}}}")
}

fn fence_key(resource: &str) -> String {
    format!("ferry:fence:{{{resource}}}")
}

fn kv_key(key: &str) -> String {
    format!("ferry:kv:{{{key}}}")
}

/// Splits a lease value `holder\ntoken`.
fn parse_lease(resource: &str, v: &str) -> Result<(String, u64), CoordError> {
    v.rsplit_once('\n')
        .and_then(|(h, t)| Some((h.to_string(), t.parse().ok()?)))
        .ok_or_else(|| CoordError::Protocol {
            what: format!("lease on {resource}"),
            reason: "not holder and token".into(),
        })
}

impl Coord {
    /// Connects to `redis://[:password@]host:port/[db]`.
    pub async fn connect(url: &str) -> Result<Self, CoordError> {
        Self::open(&RedisTarget::new(url)).await
    }

    /// Connects to the Redis a mesh config names, with its password and CA.
    pub async fn connect_config(cfg: &ferry_mesh::MeshConfig) -> Result<Self, CoordError> {
        Self::open(&RedisTarget::from_config(cfg)?).await
    }

    /// Connects to a Redis with its password and, for `rediss://`, its CA.
    pub async fn open(target: &RedisTarget) -> Result<Self, CoordError> {
        let client = target.client()?;
        let cfg = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client.clone(), cfg).await?;
        let scripts = Scripts {
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            push: Script::new(crate::queue::PUSH),
            ack: Script::new(crate::queue::ACK),
            requeue: Script::new(crate::queue::REQUEUE),
            schedule: Script::new(crate::queue::SCHEDULE),
            ack_and_retry: Script::new(crate::queue::ACK_AND_RETRY),
            take_due: Script::new(crate::queue::TAKE_DUE),
            push_slot: Script::new(crate::slots::PUSH_SLOT),
        };
        debug!(addr = %client.get_connection_info().addr(), "connected to redis");
        Ok(Coord {
            client,
            conn,
            blocking: Arc::new(Mutex::new(Vec::new())),
            scripts: Arc::new(scripts),
        })
    }

    pub async fn ping(&self) -> Result<(), CoordError> {
        let pong: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        if pong != "PONG" {
            return Err(CoordError::Protocol {
                what: "ping".into(),
                reason: format!("answered {pong:?}"),
            });
        }
        Ok(())
    }

    /// A dedicated connection for a blocking command, from the idle pool or new. Responses
    /// are not timed out by the connection; the caller bounds the wait itself.
    /// Returns the connection and whether it came from the pool (and so may be stale).
    pub(crate) async fn blocking_conn(
        &self,
        fresh: bool,
    ) -> Result<(MultiplexedConnection, bool), CoordError> {
        if !fresh {
            let idle = self
                .blocking
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop();
            if let Some(c) = idle {
                return Ok((c, true));
            }
        }
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        Ok((conn, false))
    }

    pub(crate) fn return_blocking_conn(&self, c: MultiplexedConnection) {
        let mut pool = self.blocking.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < BLOCKING_POOL {
            pool.push(c);
        }
    }

    /// Takes the lease on `resource` for `holder` with a new fencing token. Fails with
    /// [`CoordError::LeaseHeld`] if another holder has it. The same holder acquiring again gets
    /// a new token, which makes its previous token stale.
    pub async fn acquire_lease(
        &self,
        resource: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, CoordError> {
        check_name("resource", resource)?;
        check_holder(holder)?;
        let ms = ttl_ms(ttl)?;
        let (ok, v): (i64, String) = self
            .scripts
            .acquire
            .key(lease_key(resource))
            .key(fence_key(resource))
            .arg(holder)
            .arg(ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if ok != 1 {
            let (other, _) = parse_lease(resource, &v)?;
            debug!(resource, holder, other = %other, "lease held by another");
            return Err(CoordError::LeaseHeld {
                resource: resource.to_string(),
                holder: other,
            });
        }
        let token = v.parse().map_err(|_| CoordError::Protocol {
            what: format!("fencing token of {resource}"),
            reason: "not a number".into(),
        })?;
        info!(resource, holder, token, ttl_ms = ms, "lease acquired");
        Ok(Lease {
            resource: resource.to_string(),
            holder: holder.to_string(),
            token,
        })
    }

    /// Extends the lease to `ttl` from now; [`CoordError::LeaseLost`] if it expired or carries
    /// another token.
    pub async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<(), CoordError> {
        check_name("resource", &lease.resource)?;
        let ms = ttl_ms(ttl)?;
        let ok: i64 = self
            .scripts
            .renew
            .key(lease_key(&lease.resource))
            .arg(lease.value())
            .arg(ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if ok != 1 {
            info!(resource = %lease.resource, holder = %lease.holder, token = lease.token, "lease lost on renew");
            return Err(CoordError::LeaseLost {
                resource: lease.resource.clone(),
            });
        }
        Ok(())
    }

    /// Releases the lease if it is still ours; releasing a lease that was already lost or taken
    /// over is not an error (and leaves the other holder's lease alone).
    pub async fn release_lease(&self, lease: &Lease) -> Result<(), CoordError> {
        check_name("resource", &lease.resource)?;
        let released: i64 = self
            .scripts
            .release
            .key(lease_key(&lease.resource))
            .arg(lease.value())
            .invoke_async(&mut self.conn.clone())
            .await?;
        debug!(resource = %lease.resource, token = lease.token, released = released == 1, "lease released");
        Ok(())
    }

    /// Ok iff the lease on `resource` exists and carries `token`; otherwise
    /// [`CoordError::LeaseLost`] (no lease) or [`CoordError::Fenced`] (another token).
    pub async fn check_fence(&self, resource: &str, token: u64) -> Result<(), CoordError> {
        match self.lease_holder(resource).await? {
            None => Err(CoordError::LeaseLost {
                resource: resource.to_string(),
            }),
            Some((_, current)) if current == token => Ok(()),
            Some((_, current)) => Err(CoordError::Fenced {
                resource: resource.to_string(),
                presented: token,
                current,
            }),
        }
    }

    /// The current holder and token of `resource`, if leased.
    pub async fn lease_holder(&self, resource: &str) -> Result<Option<(String, u64)>, CoordError> {
        check_name("resource", resource)?;
        let v: Option<String> = redis::cmd("GET")
            .arg(lease_key(resource))
            .query_async(&mut self.conn.clone())
            .await?;
        v.map(|v| parse_lease(resource, &v)).transpose()
    }

    /// Sets `ferry:kv:{key}` to `value` for `ttl`.
    pub async fn set_ex(&self, key: &str, value: &str, ttl: Duration) -> Result<(), CoordError> {
        check_name("key", key)?;
        let ms = ttl_ms(ttl)?;
        let () = redis::cmd("SET")
            .arg(kv_key(key))
            .arg(value)
            .arg("PX")
            .arg(ms)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// The value of `ferry:kv:{key}`, if set and not expired.
    pub async fn get(&self, key: &str) -> Result<Option<String>, CoordError> {
        check_name("key", key)?;
        Ok(redis::cmd("GET")
            .arg(kv_key(key))
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// Removes `ferry:kv:{key}`.
    pub async fn del(&self, key: &str) -> Result<(), CoordError> {
        check_name("key", key)?;
        let _: i64 = redis::cmd("DEL")
            .arg(kv_key(key))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}

fn check_holder(holder: &str) -> Result<(), CoordError> {
    if holder.is_empty() || holder.len() > 512 || holder.chars().any(char::is_control) {
        return Err(CoordError::invalid(
            "lease holder",
            format!("{holder:?} (1-512 chars, no control characters)"),
        ));
    }
    Ok(())
}
