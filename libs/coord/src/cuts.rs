//! Group cuts: the rendezvous that lets the VMs of a replication group, on several hosts, seal
//! their logs at one instant (docs/ARCHITECTURE.md, "Consistent cuts across hosts").
//!
//! The scheduler opens a cut with its members; each member's host pauses the VM's writes and
//! joins; the join that completes the set decides "go", a member that waited too long decides
//! "abort". The decision is written once (`SET NX`): every member learns the same one. A VM
//! joins a cut at most once, so a retried cycle (which would seal later writes) never carries
//! the cut.
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use crate::coord::{check_name, ttl_ms};
use crate::{Coord, CoordError};

/// How long a cut's record is kept (ingest checks it when the cycle begins).
const CUT_TTL: Duration = Duration::from_secs(3600);

/// KEYS: expect, joined, decision. ARGV: vm, ttl ms.
/// Returns {0} not a member, {1, decision-or-''} joined now, {2} joined before.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {0, ''} end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return {2, ''} end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
local d = redis.call('GET', KEYS[3])
if d then return {1, d} end
if redis.call('SCARD', KEYS[2]) >= redis.call('SCARD', KEYS[1]) then
  redis.call('SET', KEYS[3], 'go', 'PX', ARGV[2])
  return {1, 'go'}
end
return {1, ''}
",
    )
});

/// What the cut decided, as every member sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutDecision {
    Go,
    Abort,
}

/// The outcome of [`Coord::join_cut`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutJoin {
    /// Joined; the decision when it is already made.
    Joined(Option<CutDecision>),
    /// The VM is not a member of the cut (or the cut is unknown or expired).
    NotMember,
    /// The VM joined this cut before: its instant has passed for this VM.
    AlreadyJoined,
}

fn keys(cut: &str) -> [String; 3] {
    ["expect", "joined", "decision"].map(|k| format!("ferry:cut:{{{cut}}}:{k}"))
}

fn parse(v: &str) -> Result<Option<CutDecision>, CoordError> {
    match v {
        "" => Ok(None),
        "go" => Ok(Some(CutDecision::Go)),
        "abort" => Ok(Some(CutDecision::Abort)),
        other => Err(CoordError::Protocol {
            what: "cut decision".into(),
            reason: format!("{other:?} is neither go nor abort"),
        }),
    }
}

impl Coord {
    /// Opens cut `cut` for `members` (VM names).
    pub async fn open_cut(&self, cut: &str, members: &[String]) -> Result<(), CoordError> {
        check_name("cut", cut)?;
        if members.is_empty() {
            return Err(CoordError::invalid("cut members", "none"));
        }
        let [expect, _, _] = keys(cut);
        let () = redis::pipe()
            .atomic()
            .sadd(&expect, members)
            .ignore()
            .pexpire(&expect, ttl_ms(CUT_TTL)? as i64)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Joins `vm` to cut `cut` (its writes are paused now).
    pub async fn join_cut(&self, cut: &str, vm: &str) -> Result<CutJoin, CoordError> {
        check_name("cut", cut)?;
        let (code, d): (i64, String) = JOIN
            .key(&keys(cut)[..])
            .arg(vm)
            .arg(ttl_ms(CUT_TTL)?)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(match code {
            0 => CutJoin::NotMember,
            2 => CutJoin::AlreadyJoined,
            _ => CutJoin::Joined(parse(&d)?),
        })
    }

    /// Decides `cut` as `want` unless it is decided already; returns the decision.
    pub async fn decide_cut(
        &self,
        cut: &str,
        want: CutDecision,
    ) -> Result<CutDecision, CoordError> {
        check_name("cut", cut)?;
        let [_, _, decision] = keys(cut);
        let v = match want {
            CutDecision::Go => "go",
            CutDecision::Abort => "abort",
        };
        let (_, now): (Option<String>, Option<String>) = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&decision)
            .arg(v)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms(CUT_TTL)?)
            .get(&decision)
            .query_async(&mut self.conn.clone())
            .await?;
        parse(now.as_deref().unwrap_or(v))?.ok_or_else(|| CoordError::Protocol {
            what: format!("cut {cut}"),
            reason: "no decision after deciding".into(),
        })
    }

    /// The decision of `cut` so far.
    pub async fn cut_decision(&self, cut: &str) -> Result<Option<CutDecision>, CoordError> {
        check_name("cut", cut)?;
        let v: Option<String> = redis::cmd("GET")
            .arg(&keys(cut)[2])
            .query_async(&mut self.conn.clone())
            .await?;
        parse(v.as_deref().unwrap_or(""))
    }

    /// Whether `vm` joined `cut` and the cut went ahead: a cycle may carry it.
    pub async fn cut_went_ahead_with(&self, cut: &str, vm: &str) -> Result<bool, CoordError> {
        if self.cut_decision(cut).await? != Some(CutDecision::Go) {
            return Ok(false);
        }
        let joined: bool = redis::cmd("SISMEMBER")
            .arg(&keys(cut)[1])
            .arg(vm)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(joined)
    }
}
