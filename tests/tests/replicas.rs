//! Two schedulers and two failover orchestrators on one vault (the config lists both
//! addresses of each). Cycles run every second while the VM writes through the tracker: no
//! cycle slot runs twice, test failovers each run once, the leader scheduler's death leaves
//! cycles going, and a job whose orchestrator dies mid-way is finished by the other one.
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::Context;
use ferry_mesh::Component;
use ferry_proto::common::v1::StepStatus;
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_proto::failover::v1::{CleanupTestFailoverRequest, TestFailoverRequest};
use ferry_tests::*;

const VM: &str = "app01";

/// A failover catalog entry (`ferry_failover::Record`), the fields counted here.
#[derive(Debug, serde::Deserialize)]
struct Record {
    job_id: String,
    state: String,
    #[serde(default)]
    holder: String,
}

/// Every failover catalog entry, by the job that created its record.
async fn failover_entries(t: &TestMesh) -> anyhow::Result<BTreeMap<String, Vec<Record>>> {
    let store = ferry_store::Store::from_url(&t.ctl.cfg.store_url())?;
    let catalog = ferry_store::Catalog::new(store, "failover");
    let mut out: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for (_, r) in catalog.read_from::<Record>(0).await? {
        out.entry(r.job_id.clone()).or_default().push(r);
    }
    Ok(out)
}

/// How many runs wrote the record of `job` (each run of a job has its own lease holder).
fn runs(entries: &BTreeMap<String, Vec<Record>>, job: &str) -> usize {
    entries.get(job).map_or(0, |e| {
        e.iter()
            .filter(|r| r.state == "running" || r.state == "active")
            .map(|r| r.holder.clone())
            .collect::<BTreeSet<_>>()
            .len()
    })
}

fn succeeded(job: &ferry_proto::common::v1::Job) -> anyhow::Result<()> {
    anyhow::ensure!(
        job.status == StepStatus::Succeeded as i32,
        "job failed: {job:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_work_without_doing_it_twice() -> anyhow::Result<()> {
    let (t, mut replicas) =
        TestMesh::start_replicated(&[Component::Scheduler, Component::Failover], 2).await?;
    let host = t.path("host");
    std::fs::create_dir_all(&host)?;
    let disk = host.join("app01.raw");
    qemu_create(&disk, "raw", "", "256M")?;
    // Incompressible data: materialising it takes long enough to stop a replica mid-job.
    fill_random(&disk, 0, 96 << 20, 7)?;
    let cfg = t
        .agent_config_tracked(&t.path("agent"), "hv01", &[(VM, vec![disk.clone()])])
        .await?;
    let agent = InProcessAgent::start(&cfg)?;
    let vm = t.wait_vm(VM).await?;
    let uri = vm.disks[0].nbd_uri.clone();
    let job = t.protect_every(VM, 1).await?;
    succeeded(&t.wait_job(&job.id, Duration::from_secs(600)).await?)?;

    // Cycles every second while the VM writes. Each slot of the policy interval is queued at
    // most once, whichever scheduler leads: the points committed between two observations
    // are at most the slots begun between them, plus the one running at the first.
    let before = t.points(VM).await?.len();
    let started_ms = ferry_proto::now_ms();
    for i in 0..12u32 {
        nbd_write(&uri, &[&format!("write -P {} {}M 64k", i + 1, 100 + i)])?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = t
        .wait_points(VM, before + 4, Duration::from_secs(120))
        .await?
        .len();
    let ended_ms = ferry_proto::now_ms();
    let slots = (ended_ms / 1000 - started_ms / 1000) as usize + 1;
    eprintln!(
        "count: {} points in {slots} one-second slots",
        after - before
    );
    assert!(
        after - before <= slots + 1,
        "{} points in {slots} one-second slots: a slot ran twice",
        after - before
    );

    // Several test failovers, through either orchestrator: each job runs exactly once.
    let admin = t.ctl.cfg.admin_token()?;
    let tls = ferry_mesh::ClientTls::operator(&t.ctl.cfg)?;
    let failovers: Vec<&Replica> = replicas
        .iter()
        .filter(|r| r.component == Component::Failover)
        .collect();
    let mut jobs = Vec::new();
    for i in 0..4 {
        let via = failovers[i % 2].endpoint();
        let ch = ferry_mesh::with_token(ferry_mesh::connect(&via, &tls).await?, &admin)?;
        let mut client = FailoverClient::new(ch);
        let out = t.path(&format!("tf{i}"));
        let job = client
            .test_failover(TestFailoverRequest {
                vm: VM.into(),
                point: "latest".into(),
                target_dir: out.display().to_string(),
                instant: false,
            })
            .await?
            .into_inner();
        succeeded(&job)?;
        succeeded(
            &client
                .cleanup_test_failover(CleanupTestFailoverRequest { vm: VM.into() })
                .await?
                .into_inner(),
        )?;
        jobs.push(job.id);
    }
    let entries = failover_entries(&t).await?;
    for j in &jobs {
        assert_eq!(
            runs(&entries, j),
            1,
            "job {j} ran {} times",
            runs(&entries, j)
        );
        let active = entries[j].iter().filter(|r| r.state == "active").count();
        assert_eq!(active, 1, "job {j} committed {active} times");
    }

    // The leader scheduler dies: the other one leads and cycles go on.
    let coord = ferry_coord::Coord::connect_config(&t.ctl.cfg).await?;
    let (holder, token) = coord
        .lease_holder("scheduler-leader")
        .await?
        .context("no scheduler leads")?;
    let leader = replicas
        .iter_mut()
        .find(|r| r.component == Component::Scheduler && holder.contains(&r.addr.to_string()))
        .with_context(|| format!("leader {holder} is none of the replicas"))?;
    let dead_addr = leader.addr;
    leader.kill().await;
    let n = t.points(VM).await?.len();
    for i in 0..4u32 {
        nbd_write(&uri, &[&format!("write -P {} {}M 64k", 0x40 + i, 150 + i)])?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    t.wait_points(VM, n + 3, Duration::from_secs(120)).await?;
    let (holder2, token2) = coord
        .lease_holder("scheduler-leader")
        .await?
        .context("no scheduler leads after the leader died")?;
    assert!(!holder2.contains(&dead_addr.to_string()), "{holder2}");
    assert!(token2 > token);

    // The writer stops; once a cycle after the last write is committed, the latest point is
    // the source.
    let n = t.points(VM).await?.len();
    t.wait_points(VM, n + 2, Duration::from_secs(120)).await?;
    let snap = t.path("snap");
    std::fs::create_dir_all(&snap)?;
    let source = snap.join("app01.raw");
    std::fs::copy(&disk, &source)?;

    // The orchestrator running a test failover dies mid-job: the other one finishes it.
    let out = t.path("tf-killed");
    let mut client = t.ctl.failover().await?;
    let req = TestFailoverRequest {
        vm: VM.into(),
        point: "latest".into(),
        target_dir: out.display().to_string(),
        instant: false,
    };
    let call = tokio::spawn(async move { client.test_failover(req).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let job_id = loop {
        let running = failover_entries(&t)
            .await?
            .into_iter()
            .find(|(j, e)| !jobs.contains(j) && e.last().is_some_and(|r| r.state == "running"));
        if let Some((j, _)) = running {
            break j;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the job never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The CLI reaches the first address: that orchestrator runs the job.
    let first = replicas
        .iter_mut()
        .find(|r| r.component == Component::Failover)
        .context("no orchestrator")?;
    first.kill().await;
    let interrupted = call.await?;
    let done = t.wait_job(&job_id, Duration::from_secs(300)).await?;
    succeeded(&done)?;
    let entries = failover_entries(&t).await?;
    assert_eq!(
        runs(&entries, &job_id),
        2,
        "the job was not taken over (call: {interrupted:?}); finished before the kill?"
    );
    assert_eq!(
        entries[&job_id]
            .iter()
            .filter(|r| r.state == "active")
            .count(),
        1
    );
    assert!(qemu_compare(&source, "raw", &out.join("app01.raw"), "raw")?);

    agent.shutdown().await?;
    for r in &mut replicas {
        r.kill().await;
    }
    t.stop().await;
    Ok(())
}
