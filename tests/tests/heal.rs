//! Replication that heals itself: a gateway outage is retried on the backoff schedule (in the
//! test's 100 ms time unit) and caught up without an operator; a host removed from the vault
//! makes its VM critical at once (no retry storm), its old certificate is refused everywhere,
//! and after it registers again with a new key `RepairVm` resumes replication.
use std::path::Path;
use std::time::Duration;

use ferry_mesh::Component;
use ferry_proto::common::v1::StepStatus;
use ferry_proto::registry::v1 as reg;
use ferry_proto::registry::v1::{Health, VmState};
use ferry_tests::*;

async fn point_count(t: &TestMesh, vm: &str) -> anyhow::Result<usize> {
    Ok(t.points(vm).await?.len())
}

async fn wait_points(t: &TestMesh, vm: &str, n: usize) -> anyhow::Result<()> {
    t.wait_points(vm, n, Duration::from_secs(120))
        .await
        .map(|_| ())
}

/// The latest point, materialised, equals the source disk.
async fn latest_equals_source(
    t: &TestMesh,
    vm: &str,
    disk: &Path,
    out: &str,
) -> anyhow::Result<()> {
    let out = t.path(out);
    let fo = t.test_failover(vm, "latest", &out).await?;
    anyhow::ensure!(fo.status == StepStatus::Succeeded as i32, "{fo:?}");
    let name = disk.file_name().unwrap_or_default();
    anyhow::ensure!(
        qemu_compare(disk, "raw", &out.join(name), "raw")?,
        "the latest point of {vm} differs from its source"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_outage_backs_off_then_catches_up() -> anyhow::Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let mesh = ferry::up::Mesh::start(ferry::up::UpOptions {
        data_dir: dir.path().join("mesh"),
        export_roots: Some(vec![dir.path().to_path_buf()]),
        without: vec![Component::Gateway],
        retry_time_unit: Some(Duration::from_millis(100)),
        ..Default::default()
    })
    .await?;
    let cfg = mesh.cfg.clone();
    let ctl = ferry::ctl::Ctl::load(&mesh.config_path)?;
    let gw = InProcessGateway::start(&cfg)?;
    let t = TestMesh { mesh, dir, ctl };
    t.wait_serving().await?;

    let disk = t.path("web.raw");
    qemu_create(&disk, "raw", "", "32M")?;
    fill_random(&disk, 0, 8 << 20, 11)?;
    let acfg = t
        .agent_config_tracked(&t.path("agent"), "hv-g", &[("web", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&acfg)?;
    let vm = t.wait_vm("web").await?;
    let uri = vm.disks[0].nbd_uri.clone();
    let job = t.protect_every("web", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    wait_points(&t, "web", 2).await?;

    gw.stop().await?;
    nbd_write(&uri, &["write -P 0x5a 1M 256k", "write -P 0x6b 9M 64k"])?;
    // Watch the retries: each failed attempt a reports when attempt a+1 runs. Attempt a+1
    // starts no earlier than that, so the next report's time is at least backoff(a+1) later:
    // the schedule 1, 2, 4, 8, 10, 30 units shows in the gaps.
    let unit = Duration::from_millis(100);
    let mut seen: Vec<(u32, i64)> = Vec::new();
    for _ in 0..1200 {
        let v = t.vm("web").await?;
        if v.retry_attempts > 0 && seen.last().is_none_or(|(a, _)| *a != v.retry_attempts) {
            assert_eq!(v.health(), Health::Warning, "{v:?}");
            assert!(!v.last_error.is_empty(), "{v:?}");
            seen.push((v.retry_attempts, v.next_retry_ms));
        }
        if v.retry_attempts >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen.last().is_some_and(|(a, _)| *a >= 6),
        "retries never reached attempt 6: {seen:?}"
    );
    let mut checked = 0;
    for w in seen.windows(2) {
        let ((a, due_a), (b, due_b)) = (w[0], w[1]);
        assert!(b > a, "attempts went backwards: {seen:?}");
        if b == a + 1 {
            let min_gap = ferry_scheduler::backoff(b, unit).as_millis() as i64;
            assert!(
                due_b - due_a >= min_gap,
                "retry {b} came {} ms after retry {a}, less than its backoff {min_gap} ms: {seen:?}",
                due_b - due_a
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "too few consecutive attempts observed: {seen:?}"
    );
    // While retrying, the work waits in the scheduler's retry set.
    let queue = t
        .ctl
        .scheduler()
        .await?
        .list_queue(ferry_proto::scheduler::v1::ListQueueRequest {
            host_name: "hv-g".into(),
        })
        .await?
        .into_inner();
    let waiting: Vec<_> = queue
        .entries
        .iter()
        .filter(|e| e.item.as_ref().is_some_and(|i| i.vm == "web"))
        .collect();
    assert!(
        waiting
            .iter()
            .any(|e| e.state == "retry" && e.next_attempt_ms > 0 && !e.last_error.is_empty()),
        "the cycle waits in the retry set with its due time and error: {queue:?}"
    );
    let before = point_count(&t, "web").await?;

    // The gateway comes back: the next retry (at most 30 units away) catches up by itself.
    let gw = InProcessGateway::start(&cfg)?;
    wait_points(&t, "web", before + 1).await?;
    for _ in 0..600 {
        let v = t.vm("web").await?;
        if v.retry_attempts == 0 && v.health() == Health::Normal {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = t.vm("web").await?;
    assert_eq!(
        (v.retry_attempts, v.health()),
        (0, Health::Normal),
        "{v:?} queue was {queue:?}"
    );
    // Writes stop; two more points surely hold all of them.
    let n = point_count(&t, "web").await?;
    wait_points(&t, "web", n + 2).await?;
    latest_equals_source(&t, "web", &disk, "out").await?;
    agent.shutdown().await?;
    gw.stop().await?;
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_host_goes_critical_and_repair_resumes() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disk = t.path("db.raw");
    qemu_create(&disk, "raw", "", "32M")?;
    fill_random(&disk, 0, 4 << 20, 5)?;
    let adir = t.path("agent");
    let acfg = t
        .agent_config_tracked(&adir, "hv-r", &[("db", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&acfg)?;
    let vm = t.wait_vm("db").await?;
    let uri = vm.disks[0].nbd_uri.clone();
    let job = t.protect_every("db", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    wait_points(&t, "db", 2).await?;

    // The host's current certificate, to try it after the removal.
    let old_tls = host_tls(&adir)?;

    t.ctl
        .registry()
        .await?
        .remove_host(reg::RemoveHostRequest {
            host: "hv-r".into(),
        })
        .await?;
    let v = t.vm("db").await?;
    assert_eq!(v.health(), Health::Critical, "{v:?}");
    assert!(v.last_error.contains("removed"), "{v:?}");
    // At most the cycle already running commits; then nothing: no cycle, no retry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let frozen = point_count(&t, "db").await?;
    nbd_write(&uri, &["write -P 0x33 2M 128k"])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        point_count(&t, "db").await?,
        frozen,
        "a removed host kept replicating"
    );
    let v = t.vm("db").await?;
    assert_eq!(
        (v.health(), v.retry_attempts),
        (Health::Critical, 0),
        "{v:?}"
    );
    // The old certificate is refused by every component, not only the registry.
    let ingest = ferry_mesh::connect(&t.mesh.cfg.endpoint(Component::Ingest), &old_tls).await?;
    let err = ferry_proto::ingest::v1::ingest_client::IngestClient::new(ingest)
        .get_cycle(ferry_proto::ingest::v1::GetCycleRequest {
            cycle_id: "none".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let sched = ferry_mesh::connect(&t.mesh.cfg.endpoint(Component::Scheduler), &old_tls).await?;
    let err = ferry_proto::scheduler::v1::scheduler_client::SchedulerClient::new(sched)
        .complete_work(ferry_proto::scheduler::v1::CompleteWorkRequest {
            work_id: "delta-db".into(),
            host_name: "hv-r".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // The gateway closes its QUIC connection, and the trail says so.
    let (ca, cert, key) = host_identity(&adir)?;
    let quic = ferry_mesh::quic_client_config(&ca, &cert, &key)?;
    let up = ferry_gateway::client::Uploader::connect(t.mesh.cfg.gateway.listen, quic).await?;
    assert!(
        up.ping().await.is_err(),
        "a removed host's QUIC connection is served"
    );
    let trail = t.cli_json(&["audit", "--caller", "host:hv-r", "-o", "json"])?;
    let refused = trail.as_array().into_iter().flatten().any(|r| {
        r["operation"] == "quic/connect" && r["result"] == "refused" && r["code"] == "NOT_HOST"
    });
    assert!(refused, "{trail}");
    // Repair before the host is back is refused with the reason.
    let err = t
        .ctl
        .registry()
        .await?
        .repair_vm(reg::RepairVmRequest { name: "db".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // The host registers again with a new key (a new identity); the old one stays refused.
    agent.shutdown().await?;
    for f in ["identity.json", "host.key", "vault-data.key"] {
        std::fs::remove_file(adir.join("agent-data").join(f))?;
    }
    t.registration_key(&adir.join("key.json"), 3600).await?;
    let agent = InProcessAgent::start(&acfg)?;
    t.wait_host("hv-r", |h| h.status == "connected", Duration::from_secs(30))
        .await?;
    let reg_ch = ferry_mesh::connect(&t.mesh.cfg.endpoint(Component::Registry), &old_tls).await?;
    let err = ferry_proto::registry::v1::registry_client::RegistryClient::new(reg_ch)
        .heartbeat(reg::HeartbeatRequest {
            host_name: "hv-r".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let v = t
        .ctl
        .registry()
        .await?
        .repair_vm(reg::RepairVmRequest { name: "db".into() })
        .await?
        .into_inner();
    assert_eq!(v.health(), Health::Normal, "{v:?}");
    wait_points(&t, "db", frozen + 2).await?;
    let n = point_count(&t, "db").await?;
    wait_points(&t, "db", n + 2).await?;
    latest_equals_source(&t, "db", &disk, "out").await?;
    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}

/// A sealed log lost on the host (deleted while the agent was stopped): the next log does not
/// chain to the last one committed, so no point is built from the broken chain — the VM is
/// marked for resync; after `ResyncVm` the latest point equals the source, the lost write
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_log_marks_for_resync_and_resync_heals() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join("mail.raw");
    qemu_create(&disk, "raw", "", "32M")?;
    fill_random(&disk, 0, 4 << 20, 9)?;
    let acfg = t
        .agent_config_tracked(&t.path("agent"), "hv-l", &[("mail", vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&acfg)?;
    let vm = t.wait_vm("mail").await?;
    let uri = vm.disks[0].nbd_uri.clone();
    let job = t.protect_every("mail", 1).await?;
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    wait_points(&t, "mail", 2).await?;

    // An acknowledged write, then a clean stop (its log is sealed) and the log is lost.
    nbd_write(&uri, &["write -P 0x4c 3M 192k"])?;
    agent.shutdown().await?;
    let before = point_count(&t, "mail").await?;
    let mut lost = 0;
    for e in std::fs::read_dir(&host)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "hrl") {
            std::fs::remove_file(&p)?;
            lost += 1;
        }
    }
    assert!(lost > 0, "no sealed log to lose");
    let agent = InProcessAgent::start(&acfg)?;
    let mut marked = None;
    for _ in 0..300 {
        let v = t.vm("mail").await?;
        if v.state() == VmState::ResyncPending {
            marked = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = marked.ok_or_else(|| anyhow::anyhow!("the broken chain was never noticed"))?;
    assert!(v.last_error.contains("does not follow"), "{v:?}");
    assert_eq!(
        point_count(&t, "mail").await?,
        before,
        "a point from a broken chain"
    );

    let job = t
        .ctl
        .registry()
        .await?
        .resync_vm(reg::ResyncVmRequest {
            name: "mail".into(),
        })
        .await?
        .into_inner();
    let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
    assert_eq!(j.status, StepStatus::Succeeded as i32, "{j:?}");
    let v = t.vm("mail").await?;
    assert_eq!(
        (v.state(), v.health()),
        (VmState::Protected, Health::Normal),
        "{v:?}"
    );
    // Delta cycles resume by themselves after the resync.
    let n = point_count(&t, "mail").await?;
    wait_points(&t, "mail", n + 2).await?;
    latest_equals_source(&t, "mail", &disk, "out").await?;
    agent.shutdown().await?;
    t.stop().await;
    Ok(())
}
