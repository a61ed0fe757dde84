//! Random store faults for whole-mesh fault tests: `FERRY_STORE_FAULTS` makes every store a
//! process opens by URL an [`crate::UnreliableStore`] that fails a share of its writes (half
//! before writing, half after: a lost response) and delays the others. Tests only: a mesh
//! started with it logs a warning on every store it opens.
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::StoreError;

/// How a randomly unreliable store misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultPlan {
    /// Percent of puts that fail (0–90).
    pub write_fail_percent: u8,
    /// Percent of gets and heads that fail (0–90).
    pub read_fail_percent: u8,
    /// Puts that do not fail wait up to this long first (0–10 s).
    pub max_delay: Duration,
    /// Seeds the fault choices (the interleaving of concurrent calls still varies).
    pub seed: u64,
}

/// Faults injected by plans in this process so far (every store, every component).
static INJECTED: AtomicU64 = AtomicU64::new(0);

pub(crate) fn count_injected() {
    INJECTED.fetch_add(1, Ordering::Relaxed);
}

/// How many faults random plans injected in this process so far.
pub fn injected_faults() -> u64 {
    INJECTED.load(Ordering::Relaxed)
}

impl FaultPlan {
    /// The environment variable [`crate::Store::from_url`] reads.
    pub const ENV: &str = "FERRY_STORE_FAULTS";

    /// Parses `write_fail=20,read_fail=0,delay_ms=30,seed=7` (every field optional, default
    /// 0). Refuses unknown fields and values out of range, naming the range.
    pub fn parse(spec: &str) -> Result<Self, StoreError> {
        let mut plan = FaultPlan {
            write_fail_percent: 0,
            read_fail_percent: 0,
            max_delay: Duration::ZERO,
            seed: 0,
        };
        for field in spec.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let (name, value) = field
                .split_once('=')
                .ok_or_else(|| bad(field, "name=value"))?;
            let n: u64 = value
                .parse()
                .map_err(|_| bad(field, "a non-negative integer"))?;
            match name {
                "write_fail" => plan.write_fail_percent = percent(field, n)?,
                "read_fail" => plan.read_fail_percent = percent(field, n)?,
                "delay_ms" if n <= 10_000 => plan.max_delay = Duration::from_millis(n),
                "delay_ms" => return Err(bad(field, "0 to 10000")),
                "seed" => plan.seed = n,
                _ => {
                    return Err(bad(field, "one of write_fail, read_fail, delay_ms, seed"));
                }
            }
        }
        Ok(plan)
    }

    /// The plan in [`Self::ENV`], if set.
    pub fn from_env() -> Result<Option<Self>, StoreError> {
        match std::env::var(Self::ENV) {
            Ok(spec) => Self::parse(&spec).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(StoreError::invalid(Self::ENV, "not valid unicode"))
            }
        }
    }
}

fn percent(field: &str, n: u64) -> Result<u8, StoreError> {
    u8::try_from(n)
        .ok()
        .filter(|p| *p <= 90)
        .ok_or_else(|| bad(field, "a percentage from 0 to 90"))
}

fn bad(field: &str, expected: &str) -> StoreError {
    StoreError::invalid(FaultPlan::ENV, format!("{field:?}: expected {expected}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_out_of_range() {
        let p = FaultPlan::parse("write_fail=20, delay_ms=30,seed=7").unwrap();
        assert_eq!(p.write_fail_percent, 20);
        assert_eq!(p.read_fail_percent, 0);
        assert_eq!(p.max_delay, Duration::from_millis(30));
        assert_eq!(p.seed, 7);
        assert_eq!(FaultPlan::parse("").unwrap().write_fail_percent, 0);
        for (spec, says) in [
            ("write_fail=91", "0 to 90"),
            ("read_fail=300", "0 to 90"),
            ("delay_ms=10001", "0 to 10000"),
            ("write_fail=-1", "non-negative"),
            ("fail=3", "one of"),
            ("write_fail", "name=value"),
        ] {
            let e = FaultPlan::parse(spec).unwrap_err().to_string();
            assert!(
                e.contains(says) && e.contains(FaultPlan::ENV),
                "{spec}: {e}"
            );
        }
    }
}
