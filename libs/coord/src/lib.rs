//! Redis: leases with fencing tokens, work and retry queues, a `redis-server` launcher.
//!
//! Redis holds only what can be rebuilt from the catalog: losing it loses no data. Every key is
//! prefixed `ferry:` and carries a hash tag so related keys share a Redis Cluster slot:
//!
//! | key | type | what |
//! |---|---|---|
//! | `ferry:lease:{res}` | string `holder\ntoken`, PX ttl | a lease |
//! | `ferry:fence:{res}` | integer | fencing counter of `res` |
//! | `ferry:work:{host}` | list of ids | queued work of a host |
//! | `ferry:inflight:{host}` | list of ids | work handed out, not acked |
//! | `ferry:items:{host}` | hash id -> payload | payloads of both lists |
//! | `ferry:{retry}:due` | sorted set id by due ms | retry queue |
//! | `ferry:{retry}:payload` | hash id -> payload | retry payloads |
//! | `ferry:slots:{host}` | hash series -> last slot, `~fence` -> token | scheduled work queued once per slot |
//! | `ferry:kv:{key}` | string, PX ttl | heartbeats, progress |
//! | `ferry:cut:{cut}:expect`, `:joined` | sets of VM names, PX ttl | a group cut's members and who joined |
//! | `ferry:cut:{cut}:decision` | string `go` or `abort`, set once | a group cut's outcome |

mod coord;
mod cuts;
mod error;
mod keeper;
mod queue;
mod server;
mod slots;
mod target;

pub use coord::{Coord, Lease};
pub use cuts::{CutDecision, CutJoin};
pub use error::CoordError;
pub use keeper::KeptLease;
pub use server::{RedisServer, RedisTls, redis_server_available};
pub use slots::SlotPush;
pub use target::{RedisTarget, redact_url};
