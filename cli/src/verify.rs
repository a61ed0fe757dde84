//! `ferry points verify VM`: every point names the host whose cycle committed it; a point
//! whose host was not the VM's host at the point's time was forged by another host of the
//! vault (possible before ingest scoped cycles to the VM's own host) and must not be trusted.
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::registry::v1::HostSpan;
use serde::Serialize;

/// What verification says of one point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Committed by the VM's host at the time.
    Ok,
    /// Committed by another host: not to be failed over to.
    WrongHost,
    /// The point predates recording the committing host; nothing to check it against.
    Unrecorded,
}

#[derive(Clone, Debug, Serialize)]
pub struct PointCheck {
    pub id: String,
    pub seq: u64,
    pub time_ms: i64,
    pub kind: String,
    /// The host whose cycle committed the point ("" when unrecorded).
    pub host: String,
    /// The host the registry had for the VM at the point's time ("" when none).
    pub vm_host: String,
    pub verdict: Verdict,
}

/// The host of the VM at `time_ms`: the last span that began at or before it.
fn host_at(history: &[HostSpan], time_ms: i64) -> Option<&str> {
    history
        .iter()
        .rev()
        .find(|s| s.since_ms <= time_ms)
        .map(|s| s.host.as_str())
}

/// Checks each point's committing host against the VM's host history.
pub fn check_points(points: &[RecoveryPoint], history: &[HostSpan]) -> Vec<PointCheck> {
    points
        .iter()
        .map(|p| {
            let vm_host = host_at(history, p.time_ms).unwrap_or_default().to_string();
            let verdict = if p.host.is_empty() {
                Verdict::Unrecorded
            } else if p.host == vm_host {
                Verdict::Ok
            } else {
                Verdict::WrongHost
            };
            PointCheck {
                id: p.id.clone(),
                seq: p.seq,
                time_ms: p.time_ms,
                kind: crate::output::point_kind(p).to_string(),
                host: p.host.clone(),
                vm_host,
                verdict,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(seq: u64, time_ms: i64, host: &str) -> RecoveryPoint {
        RecoveryPoint {
            id: format!("{seq:020}"),
            seq,
            time_ms,
            host: host.into(),
            ..Default::default()
        }
    }

    fn span(host: &str, since_ms: i64) -> HostSpan {
        HostSpan {
            host: host.into(),
            since_ms,
        }
    }

    #[test]
    fn points_of_another_host_are_flagged() {
        let history = [span("hva", 0), span("hvc", 1000)];
        let checks = check_points(
            &[
                point(1, 10, "hva"),
                point(2, 20, "hvb"),
                point(3, 30, ""),
                point(4, 1000, "hvc"),
                point(5, 1500, "hva"),
            ],
            &history,
        );
        let verdicts: Vec<_> = checks.iter().map(|c| c.verdict.clone()).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Ok,
                Verdict::WrongHost,
                Verdict::Unrecorded,
                Verdict::Ok,
                Verdict::WrongHost
            ]
        );
        assert_eq!(checks[1].vm_host, "hva");
        assert_eq!(checks[4].vm_host, "hvc");
        // A point older than any report of the VM has no host to match.
        let early = check_points(&[point(1, 5, "hva")], &[span("hva", 10)]);
        assert_eq!(early[0].verdict, Verdict::WrongHost);
        assert_eq!(early[0].vm_host, "");
    }
}
