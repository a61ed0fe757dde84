//! Retention thinning in the whole mesh: a VM protected at a 1 s policy with keep-all 10 s and
//! thin-to 5 s, written through the tracker's NBD export every few seconds for about a minute
//! while the scheduler runs retention every 2 s. Points older than the keep-all window end up
//! at least 5 s apart, the recent ones all stay, and the kept points — thinned ones included —
//! fail over identical to the disk as it was at their time. And out-of-range policies are
//! refused, by the CLI before it calls the registry and by the registry itself.
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::common::v1::{RecoveryPoint, ReplicationPolicy, StepStatus};
use ferry_proto::failover::v1::CleanupTestFailoverRequest;
use ferry_tests::*;

const VM: &str = "web01";
const KEEP_ALL_S: i64 = 10;
const THIN_TO_S: i64 = 5;
const RETENTION_EVERY: Duration = Duration::from_secs(2);

/// The disk between two writes, and which points surely hold exactly it: a point committed
/// before the next write began cannot hold that write, and the second point committed after
/// this write returned was cut after it (one cycle of a VM runs at a time).
struct State {
    copy: PathBuf,
    /// The first seq surely cut after the write that made this state.
    from_seq: u64,
    /// The last seq surely committed before the next write began.
    to_seq: u64,
}

async fn latest_seq(t: &TestMesh) -> anyhow::Result<u64> {
    Ok(t.points(VM).await?.last().map_or(0, |p| p.seq))
}

fn copy_of(src: &Path, dst: PathBuf) -> anyhow::Result<PathBuf> {
    std::fs::copy(src, &dst)?;
    Ok(dst)
}

/// The states a point may hold: not one made by a write it was surely committed before, nor
/// one a later write replaced when the point was surely cut after that write. Usually one;
/// more when its cut raced writes.
fn states_of(states: &[State], seq: u64) -> Vec<&State> {
    let n = states.len();
    (0..n)
        .filter(|&i| i == 0 || seq > states[i - 1].to_seq)
        .filter(|&i| i + 1 == n || seq < states[i + 1].from_seq)
        .map(|i| &states[i])
        .collect()
}

/// Test-fails `point` over and compares its disk with the states it may hold. None when the
/// point is gone (pruned meanwhile).
async fn fails_over_identical(
    t: &TestMesh,
    states: &[State],
    point: &RecoveryPoint,
) -> anyhow::Result<Option<bool>> {
    let out = t.path(&format!("failover-{}", point.seq));
    let res = t.test_failover(VM, &point.id, &out).await;
    if !matches!(&res, Ok(j) if j.status == StepStatus::Succeeded as i32) {
        let _ = t
            .ctl
            .failover()
            .await?
            .cleanup_test_failover(CleanupTestFailoverRequest { vm: VM.into() })
            .await;
        let gone = !t.points(VM).await?.iter().any(|p| p.seq == point.seq);
        anyhow::ensure!(gone, "test failover of point {}: {res:?}", point.seq);
        return Ok(None);
    }
    let disk = out.join(format!("{VM}.raw"));
    let mut same = false;
    for s in states_of(states, point.seq) {
        same |= qemu_compare(&s.copy, "raw", &disk, "raw")?;
    }
    if !same {
        // Say which state it holds instead, if any (a wrong bound or a wrong point).
        let mut holds = Vec::new();
        for (i, s) in states.iter().enumerate() {
            if qemu_compare(&s.copy, "raw", &disk, "raw")? {
                holds.push((i, s.from_seq, s.to_seq));
            }
        }
        let wanted: Vec<(u64, u64)> = states_of(states, point.seq)
            .iter()
            .map(|s| (s.from_seq, s.to_seq))
            .collect();
        eprintln!(
            "point {} (time {}) holds states {holds:?}, expected one of {wanted:?}",
            point.seq, point.time_ms
        );
    }
    t.ctl
        .failover()
        .await?
        .cleanup_test_failover(CleanupTestFailoverRequest { vm: VM.into() })
        .await?;
    Ok(Some(same))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_points_are_thinned_and_every_kept_point_fails_over_identical() -> anyhow::Result<()> {
    let t = TestMesh::start_with(|o| o.retention_interval = Some(RETENTION_EVERY)).await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join(format!("{VM}.raw"));
    qemu_create(&disk, "raw", "", "4M")?;
    qemu_io(&disk, "raw", &["write -P 0x01 0 1M"])?;
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[(VM, vec![disk.clone()])])
        .await?;
    let _agent = InProcessAgent::start(&cfg)?;
    let uri = t.wait_vm(VM).await?.disks[0].nbd_uri.clone();
    let policy = ReplicationPolicy {
        frequency_seconds: 1,
        retention_hours: 1,
        keep_all_seconds: KEEP_ALL_S as u64,
        thin_to_seconds: THIN_TO_S as u64,
        ..Default::default()
    };
    let job = t.protect_with(VM, policy).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(300)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let shown = t.vm(VM).await?.policy.unwrap_or_default();
    assert_eq!((shown.keep_all_seconds, shown.thin_to_seconds), (10, 5));

    // About a minute of writes, one every 3 s, each into its own 64 KiB of one of 16 places.
    let snaps = t.path("states");
    std::fs::create_dir_all(&snaps)?;
    let mut states = vec![State {
        copy: copy_of(&disk, snaps.join("initial.raw"))?,
        from_seq: 1,
        to_seq: u64::MAX,
    }];
    for i in 0..20u64 {
        let before = latest_seq(&t).await?;
        if let Some(s) = states.last_mut() {
            s.to_seq = before;
        }
        let at = (i % 16) * 256 * 1024;
        nbd_write(&uri, &[&format!("write -P {:#x} {at} 64k", 0x10 + i)])?;
        let after = latest_seq(&t).await?;
        states.push(State {
            copy: copy_of(&disk, snaps.join(format!("after-{i}.raw")))?,
            from_seq: after + 2,
            to_seq: u64::MAX,
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // Two more points after the last write: the newest points hold it.
    let after = latest_seq(&t).await?;
    while latest_seq(&t).await? < after + 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The points now. Those past the keep-all window by more than a few retention runs have
    // been thinned; those inside it are all there.
    let now = ferry_proto::now_ms();
    let points = t.points(VM).await?;
    let newest = points.last().cloned().expect("points");
    let thinned_before = now - (KEEP_ALL_S + 8) * 1000;
    let old: Vec<&RecoveryPoint> = points
        .iter()
        .filter(|p| p.time_ms < thinned_before)
        .collect();
    let recent: Vec<&RecoveryPoint> = points
        .iter()
        .filter(|p| p.time_ms >= now - KEEP_ALL_S * 1000)
        .collect();
    let gaps = |ps: &[&RecoveryPoint]| -> Vec<i64> {
        ps.windows(2).map(|w| w[1].time_ms - w[0].time_ms).collect()
    };
    let (old_gaps, recent_gaps) = (gaps(&old), gaps(&recent));
    tracing::info!(
        committed = newest.seq,
        kept = points.len(),
        pruned = newest.seq as usize - points.len(),
        old = old.len(),
        recent = recent.len(),
        ?old_gaps,
        ?recent_gaps,
        "points after a minute"
    );
    eprintln!(
        "points: {} committed, {} kept, {} pruned; thinned range: {} points, gaps {old_gaps:?} ms; keep-all window: {} points, gaps {recent_gaps:?} ms",
        newest.seq,
        points.len(),
        newest.seq as usize - points.len(),
        old.len(),
        recent.len()
    );
    assert!(old.len() >= 5, "thinned range: {old_gaps:?}");
    assert_eq!(old[0].seq, 1, "the oldest point (the initial copy) stays");
    assert!(
        old_gaps.iter().all(|g| *g >= THIN_TO_S * 1000),
        "points older than the keep-all window are at least {THIN_TO_S} s apart: {old_gaps:?}"
    );
    assert!(
        newest.seq as usize > points.len() + 20,
        "most old points were pruned"
    );
    // Every point of the keep-all window stays: consecutive seqs, about a second apart.
    assert!(recent.len() >= 3, "{recent_gaps:?}");
    assert!(
        recent.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "no point of the keep-all window is pruned: {:?}",
        recent.iter().map(|p| p.seq).collect::<Vec<_>>()
    );
    let mut sorted = recent_gaps.clone();
    sorted.sort_unstable();
    assert!(
        sorted[sorted.len() / 2] < THIN_TO_S * 1000,
        "cycles every second: {recent_gaps:?}"
    );

    // Every thinned point (they no longer change: retention is an hour) and the newest fail
    // over identical to the disk at their time; so do the recent ones not pruned meanwhile.
    let (mut checked, mut exact) = (Vec::new(), 0);
    for p in old.iter().copied().chain(recent.iter().copied()) {
        match fails_over_identical(&t, &states, p).await? {
            Some(same) => {
                exact += usize::from(states_of(&states, p.seq).len() == 1);
                assert!(
                    same,
                    "point {} fails over identical to the disk at its time",
                    p.seq
                );
                checked.push(p.seq);
            }
            None => {
                assert!(
                    p.time_ms >= thinned_before,
                    "thinned point {} vanished",
                    p.seq
                );
            }
        }
    }
    assert!(checked.contains(&newest.seq));
    assert!(old.iter().all(|p| checked.contains(&p.seq)), "{checked:?}");
    assert!(checked.len() >= 5, "{checked:?}");
    assert!(exact >= 5, "{exact} of {checked:?} pinned to one state");
    eprintln!(
        "failed over identical: {checked:?} ({exact} pinned to exactly one state of the disk)"
    );
    // The writes made a difference (the check can fail).
    assert!(!qemu_compare(&states[0].copy, "raw", &disk, "raw")?);
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_policies_are_refused_with_the_allowed_range() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    // The CLI refuses before it calls the registry, and says what is allowed.
    for (args, want) in [
        (
            &["--frequency", "0s"][..],
            "--frequency 0s is out of range: the replication frequency is whole seconds from 1s to 24h",
        ),
        (&["--frequency", "1500ms"], "whole seconds from 1s to 24h"),
        (
            &["--retention", "30m"],
            "--retention 30m is out of range: retention is kept in whole hours: 1h to 8760h",
        ),
        (&["--retention", "9000h"], "whole hours: 1h to 8760h"),
        (
            &["--retention", "1h", "--keep-all", "2h"],
            "--keep-all 2h is out of range: whole seconds from 1s up to the retention (1h)",
        ),
        (&["--thin-to", "0s"], "--thin-to 0s is out of range"),
        (
            &["--frequency", "1m", "--app-consistent", "30s"],
            "at least the frequency (1m)",
        ),
    ] {
        let mut argv = vec!["vm", "protect", VM];
        argv.extend_from_slice(args);
        let out = t.ferry_cli(&argv)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{argv:?} succeeded");
        assert!(err.contains(want), "{argv:?}: {err}");
        assert!(
            !err.contains("not known"),
            "{argv:?} reached the registry: {err}"
        );
    }
    // A valid policy reaches the registry (which does not know the VM).
    let out = t.ferry_cli(&["vm", "protect", VM, "--keep-all", "10s", "--thin-to", "5s"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not known"), "{err}");

    // The registry refuses what the CLI would (other clients), naming field and range.
    for (policy, want) in [
        (
            ReplicationPolicy {
                frequency_seconds: 86_401,
                ..Default::default()
            },
            "frequency_seconds is 86401: allowed 1 s to 86400 s",
        ),
        (
            ReplicationPolicy {
                retention_hours: 8761,
                ..Default::default()
            },
            "retention_hours is 8761",
        ),
        (
            ReplicationPolicy {
                retention_hours: 1,
                keep_all_seconds: 3601,
                ..Default::default()
            },
            "keep_all_seconds is 3601: allowed 1 s up to the retention (3600 s)",
        ),
        (
            ReplicationPolicy {
                retention_hours: 1,
                thin_to_seconds: 7200,
                ..Default::default()
            },
            "thin_to_seconds is 7200",
        ),
        (
            ReplicationPolicy {
                frequency_seconds: 60,
                app_consistent_seconds: 30,
                ..Default::default()
            },
            "app_consistent_seconds is 30",
        ),
    ] {
        let status = t.protect_with(VM, policy).await.unwrap_err();
        let status = status
            .downcast_ref::<tonic::Status>()
            .expect("a grpc status");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(want), "{}", status.message());
    }
    t.stop().await;
    Ok(())
}
