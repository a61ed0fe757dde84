//! App-consistent points: with `app_consistent_seconds` in the policy, some cycles run the
//! VM's quiesce hooks around the cut. The pre hook here plays a guest agent flushing its
//! application's data (a write through the tracker's NBD export) before the freeze, so the
//! first "app" point must hold that write and the crash points before it must not. A VM whose
//! hook fails still replicates, crash-consistent.
use std::time::Duration;

use ferry_proto::common::v1::Consistency;
use ferry_proto::common::v1::{ReplicationPolicy, StepStatus};
use ferry_proto::registry::v1 as reg;
use ferry_tests::*;

async fn protect(t: &TestMesh, vm: &str) -> anyhow::Result<()> {
    let policy = ReplicationPolicy {
        frequency_seconds: 1,
        app_consistent_seconds: 2,
        ..Default::default()
    };
    let job = t
        .ctl
        .registry()
        .await?
        .protect_vm(reg::ProtectVmRequest {
            name: vm.into(),
            policy: Some(policy),
        })
        .await?
        .into_inner();
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    anyhow::ensure!(j.status == StepStatus::Succeeded as i32, "{j:?}");
    Ok(())
}

/// The first 64 KiB of a point's disk, materialised by a test failover.
async fn head_of(t: &TestMesh, vm: &str, point: &str, out: &str) -> anyhow::Result<Vec<u8>> {
    let out = t.path(out);
    let fo = t.test_failover(vm, point, &out).await?;
    anyhow::ensure!(fo.status == StepStatus::Succeeded as i32, "{fo:?}");
    let data = std::fs::read(out.join(format!("{vm}.raw")))?;
    t.ctl
        .failover()
        .await?
        .cleanup_test_failover(ferry_proto::failover::v1::CleanupTestFailoverRequest {
            vm: vm.into(),
        })
        .await?;
    Ok(data[..64 << 10].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_hooks_make_app_consistent_points() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let app = host.join("app.raw");
    let bad = host.join("bad.raw");
    for d in [&app, &bad] {
        qemu_create(d, "raw", "", "16M")?;
        fill_random(d, 1 << 20, 1 << 20, 3)?;
    }
    let adir = t.path("agent");
    let cfg = t
        .agent_config_tracked(
            &adir,
            "hv-app",
            &[("app", vec![app.clone()]), ("bad", vec![bad.clone()])],
        )
        .await?;
    let socket = adir.join("agent-data/nbd/ferry-tracker.sock");
    let marks = t.path("hooks.log");
    // The pre hook flushes "application data" through the tracker, then freezes; the post
    // hook thaws. Both leave a line in hooks.log.
    let pre = format!(
        "qemu-io -f raw -c 'write -P 0x77 0 64k' 'nbd+unix:///app-app.raw?socket={}' >/dev/null && echo pre >> {}",
        socket.display(),
        marks.display()
    );
    let hooks = format!(
        "quiesce_pre = {pre:?}\nquiesce_post = {:?}\nquiesce_timeout = \"20s\"\n",
        format!("echo post >> {}", marks.display())
    );
    let text = std::fs::read_to_string(&cfg)?;
    let (head, rest) = text
        .split_once("[[vm]]\nname = \"bad\"")
        .ok_or_else(|| anyhow::anyhow!("unexpected agent.toml layout:\n{text}"))?;
    let text = format!(
        "{head}{hooks}[[vm]]\nname = \"bad\"\nquiesce_pre = \"exit 3\"\n{}",
        rest.trim_start_matches('\n')
    );
    // `hooks` belongs to the first [[vm]] ("app"): it is written right before the second.
    std::fs::write(&cfg, text)?;
    let agent = InProcessAgent::start(&cfg)?;
    t.wait_vm("app").await?;
    t.wait_vm("bad").await?;
    protect(&t, "app").await?;
    protect(&t, "bad").await?;

    let mut app_points = Vec::new();
    for _ in 0..600 {
        app_points = t.points("app").await?;
        if app_points
            .iter()
            .filter(|p| p.consistency() == Consistency::App)
            .count()
            >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_app = app_points
        .iter()
        .position(|p| p.consistency() == Consistency::App)
        .ok_or_else(|| anyhow::anyhow!("no app-consistent point: {app_points:?}"))?;
    assert!(
        app_points
            .iter()
            .any(|p| p.consistency() == Consistency::Crash),
        "every point is app-consistent, though only every 2 s should be: {app_points:?}"
    );
    let log = std::fs::read_to_string(&marks)?;
    let pres = log.lines().filter(|l| *l == "pre").count();
    let posts = log.lines().filter(|l| *l == "post").count();
    let apps = app_points
        .iter()
        .filter(|p| p.consistency() == Consistency::App)
        .count();
    assert!(
        pres >= apps && posts >= pres.saturating_sub(1),
        "hooks ran {pres} pre / {posts} post for {apps} app points"
    );
    // The hook's flush is in the first app point; nothing before it had run the hook.
    let head = head_of(&t, "app", &app_points[first_app].id, "app-first").await?;
    assert!(
        head.iter().all(|b| *b == 0x77),
        "the app point lacks the pre hook's write"
    );
    let before = head_of(&t, "app", &app_points[first_app - 1].id, "app-before").await?;
    assert!(
        before.iter().all(|b| *b == 0),
        "a point before any hook holds its write"
    );

    // The failing hook: points keep coming, all crash-consistent.
    let bad_points = t.points("bad").await?;
    assert!(bad_points.len() >= 3, "{bad_points:?}");
    assert!(
        bad_points
            .iter()
            .all(|p| p.consistency() == Consistency::Crash),
        "{bad_points:?}"
    );
    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}
