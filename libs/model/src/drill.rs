//! Scheduled drills (`ferry drill schedule TARGET --every D`): the allowed interval, when a
//! drill is due, and when a VM's health warns about it — one rule for the registry (health),
//! the failover service (which runs due drills) and `ferry drill list`.

/// The shortest and longest interval a schedule may have.
pub const MIN_EVERY_SECONDS: u64 = 5;
pub const MAX_EVERY_SECONDS: u64 = 366 * 24 * 3600;

/// Refuses an interval out of range, saying the range.
pub fn check_every(every_seconds: u64) -> Result<(), String> {
    if (MIN_EVERY_SECONDS..=MAX_EVERY_SECONDS).contains(&every_seconds) {
        return Ok(());
    }
    Err(format!(
        "drill interval {every_seconds} s: allowed {MIN_EVERY_SECONDS} s to {MAX_EVERY_SECONDS} s (366 days)"
    ))
}

/// A VM's last drill, as far as a schedule cares.
#[derive(Clone, Copy, Debug)]
pub struct LastDrill<'a> {
    pub time_ms: i64,
    pub ok: bool,
    pub message: &'a str,
}

/// When the next drill is due: one interval after the last drill, or after the schedule was
/// set when no drill ran since.
pub fn due_ms(every_seconds: u64, since_ms: i64, last: Option<LastDrill<'_>>) -> i64 {
    let from = last.map_or(since_ms, |l| l.time_ms.max(since_ms));
    from.saturating_add(ms(every_seconds))
}

/// Overdue: a whole interval past its due time (a drill that runs late, or takes long, is not
/// yet overdue).
pub fn overdue(every_seconds: u64, due_ms: i64, now_ms: i64) -> bool {
    now_ms > due_ms.saturating_add(ms(every_seconds))
}

/// Why a VM with this schedule is in warning health, if it is: its last drill since the
/// schedule was set failed, or the drill is overdue.
pub fn warning(
    every_seconds: u64,
    since_ms: i64,
    last: Option<LastDrill<'_>>,
    now_ms: i64,
) -> Option<String> {
    if let Some(l) = last.filter(|l| !l.ok) {
        return Some(format!("the last scheduled drill failed: {}", l.message));
    }
    let due = due_ms(every_seconds, since_ms, last);
    overdue(every_seconds, due, now_ms).then(|| {
        format!(
            "a drill is overdue by {} s (scheduled every {every_seconds} s)",
            (now_ms - due) / 1000
        )
    })
}

fn ms(seconds: u64) -> i64 {
    i64::try_from(seconds.saturating_mul(1000)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3600;

    #[test]
    fn intervals_out_of_range_are_refused_with_the_range() {
        assert!(check_every(5).is_ok() && check_every(7 * 24 * H).is_ok());
        let e = check_every(1).unwrap_err();
        assert!(e.contains("1 s") && e.contains("allowed 5 s"), "{e}");
        assert!(check_every(400 * 24 * H).is_err());
    }

    #[test]
    fn a_drill_is_due_an_interval_after_the_last_and_overdue_one_more() {
        let since = 1_000_000;
        assert_eq!(due_ms(60, since, None), since + 60_000);
        let last = LastDrill {
            time_ms: since + 10_000,
            ok: true,
            message: "",
        };
        assert_eq!(due_ms(60, since, Some(last)), since + 70_000);
        // A drill from before the schedule counts from the schedule.
        let old = LastDrill {
            time_ms: since - 5_000,
            ..last
        };
        assert_eq!(due_ms(60, since, Some(old)), since + 60_000);
        let due = since + 70_000;
        assert_eq!(warning(60, since, Some(last), due + 60_000), None);
        let w = warning(60, since, Some(last), due + 61_000).unwrap();
        assert!(w.contains("overdue by 61 s"), "{w}");
    }

    #[test]
    fn a_failed_drill_warns_at_once() {
        let failed = LastDrill {
            time_ms: 2_000,
            ok: false,
            message: "disk 0 block 3 does not read back",
        };
        let w = warning(60, 1_000, Some(failed), 3_000).unwrap();
        assert!(w.contains("failed: disk 0 block 3"), "{w}");
    }
}
