//! `ferry vm protect`'s policy flags: checked here, before the registry is called, and refused
//! with the allowed range instead of rounded (the registry refuses out-of-range values too, but
//! cannot tell a 0 from "not given").
use std::time::Duration;

use ferry_proto::common::v1::ReplicationPolicy;

use ferry_model::policy::{MAX_FREQUENCY_SECONDS, MAX_RETENTION_HOURS};

const MAX_FREQUENCY: Duration = Duration::from_secs(MAX_FREQUENCY_SECONDS);

/// The protect command's policy flags as given.
pub struct PolicyFlags {
    pub frequency: Duration,
    pub retention: Duration,
    pub keep_all: Duration,
    pub thin_to: Duration,
    pub app_consistent: Duration,
    /// `START-END`, `HH:MM-HH:MM`.
    pub resync_window: String,
}

fn show(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// Whole seconds of `d`, or an error naming `flag`, `d` and `allowed`.
fn whole_seconds(flag: &str, d: Duration, allowed: &str) -> anyhow::Result<u64> {
    if d.subsec_nanos() != 0 {
        anyhow::bail!("--{flag} {} is out of range: {allowed}", show(d));
    }
    Ok(d.as_secs())
}

/// The policy the flags ask for, or why not (each message gives the allowed range).
pub fn policy(f: &PolicyFlags) -> anyhow::Result<ReplicationPolicy> {
    let freq_range = "the replication frequency is whole seconds from 1s to 24h";
    let frequency = whole_seconds("frequency", f.frequency, freq_range)?;
    if frequency == 0 || f.frequency > MAX_FREQUENCY {
        anyhow::bail!(
            "--frequency {} is out of range: {freq_range}",
            show(f.frequency)
        );
    }
    let ret_range = "retention is kept in whole hours: 1h to 8760h";
    let retention_s = whole_seconds("retention", f.retention, ret_range)?;
    let hours = retention_s / 3600;
    if retention_s % 3600 != 0 || !(1..=MAX_RETENTION_HOURS).contains(&hours) {
        anyhow::bail!(
            "--retention {} is out of range: {ret_range}",
            show(f.retention)
        );
    }
    let upto = format!(
        "whole seconds from 1s up to the retention ({})",
        show(f.retention)
    );
    let within = |flag: &str, d: Duration| -> anyhow::Result<u64> {
        let s = whole_seconds(flag, d, &upto)?;
        if s == 0 || s > retention_s {
            anyhow::bail!("--{flag} {} is out of range: {upto}", show(d));
        }
        Ok(s)
    };
    let keep_all = within("keep-all", f.keep_all)?;
    let thin_to = within("thin-to", f.thin_to)?;
    let app_range = format!(
        "0s (never) or whole seconds of at least the frequency ({})",
        show(f.frequency)
    );
    let app = whole_seconds("app-consistent", f.app_consistent, &app_range)?;
    if app != 0 && app < frequency {
        anyhow::bail!(
            "--app-consistent {} is out of range: {app_range}",
            show(f.app_consistent)
        );
    }
    let (start, end) = f.resync_window.split_once('-').ok_or_else(|| {
        anyhow::anyhow!(
            "--resync-window {:?}: expected START-END, e.g. 18:30-06:00",
            f.resync_window
        )
    })?;
    Ok(ReplicationPolicy {
        frequency_seconds: frequency,
        retention_hours: hours,
        app_consistent_seconds: app,
        resync_window_start: start.trim().to_string(),
        resync_window_end: end.trim().to_string(),
        keep_all_seconds: keep_all,
        thin_to_seconds: thin_to,
        ..ReplicationPolicy::default()
    })
}

/// The flags that give `current` (a VM's policy as the registry has it), for `ferry vm set`
/// to change only what the operator names.
pub fn flags_of(current: &ReplicationPolicy) -> PolicyFlags {
    PolicyFlags {
        frequency: Duration::from_secs(current.frequency_seconds),
        retention: Duration::from_secs(current.retention_hours * 3600),
        keep_all: Duration::from_secs(current.keep_all_seconds),
        thin_to: Duration::from_secs(current.thin_to_seconds),
        app_consistent: Duration::from_secs(current.app_consistent_seconds),
        resync_window: format!(
            "{}-{}",
            current.resync_window_start, current.resync_window_end
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(frequency: &str, retention: &str, keep_all: &str, thin_to: &str) -> PolicyFlags {
        let d = |s: &str| Duration::from(s.parse::<humantime::Duration>().unwrap());
        PolicyFlags {
            frequency: d(frequency),
            retention: d(retention),
            keep_all: d(keep_all),
            thin_to: d(thin_to),
            app_consistent: Duration::ZERO,
            resync_window: "18:30-06:00".into(),
        }
    }

    #[test]
    fn the_defaults_and_the_limits_pass() {
        let p = policy(&flags("5m", "24h", "1h", "5m")).unwrap();
        assert_eq!(
            (
                p.frequency_seconds,
                p.retention_hours,
                p.keep_all_seconds,
                p.thin_to_seconds
            ),
            (300, 24, 3600, 300)
        );
        let p = policy(&flags("1s", "1h", "10s", "5s")).unwrap();
        assert_eq!((p.frequency_seconds, p.retention_hours), (1, 1));
        assert!(policy(&flags("24h", "8760h", "8760h", "8760h")).is_ok());
    }

    #[test]
    fn out_of_range_is_refused_with_the_range() {
        for (f, want) in [
            (
                flags("0s", "24h", "1h", "5m"),
                "--frequency 0s is out of range: the replication frequency is whole seconds from 1s to 24h",
            ),
            (
                flags("1500ms", "24h", "1h", "5m"),
                "--frequency 1s 500ms is out of range",
            ),
            (flags("25h", "24h", "1h", "5m"), "from 1s to 24h"),
            (
                flags("5m", "30m", "1m", "5m"),
                "--retention 30m is out of range: retention is kept in whole hours: 1h to 8760h",
            ),
            (flags("5m", "90m", "1h", "5m"), "whole hours: 1h to 8760h"),
            (flags("5m", "8761h", "1h", "5m"), "whole hours: 1h to 8760h"),
            (
                flags("5m", "1h", "2h", "5m"),
                "--keep-all 2h is out of range: whole seconds from 1s up to the retention (1h)",
            ),
            (
                flags("5m", "24h", "0s", "5m"),
                "--keep-all 0s is out of range",
            ),
            (
                flags("5m", "24h", "1h", "0s"),
                "--thin-to 0s is out of range: whole seconds from 1s",
            ),
            (
                flags("5m", "1h", "1h", "2h"),
                "--thin-to 2h is out of range",
            ),
        ] {
            let e = policy(&f).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        let mut f = flags("5m", "24h", "1h", "5m");
        f.app_consistent = Duration::from_secs(60);
        let e = policy(&f).unwrap_err().to_string();
        assert!(e.contains("at least the frequency (5m)"), "{e}");
        f.app_consistent = Duration::from_secs(300);
        assert_eq!(policy(&f).unwrap().app_consistent_seconds, 300);
    }
}
