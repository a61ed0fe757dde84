//! Host scoping (issue #9): with host hvb's own certificate (its `agent-data/identity.json` and
//! `host.key`), nothing of host hva's VM web01 can be begun, committed, renewed, aborted,
//! uploaded into, read or completed — over gRPC (tonic and the real grpcurl) and QUIC — and
//! hva's replication goes on undisturbed. `ferry points verify` names each point's committing
//! host and flags a point committed by a host that was not the VM's.
use std::process::Command;
use std::time::Duration;

use ferry_gateway::client::Uploader;
use ferry_gateway::frame::{ErrorCode, Offer};
use ferry_mesh::{ClientTls, Component};
use ferry_proto::common::v1::{Consistency, CycleKind, StepStatus};
use ferry_proto::ingest::v1::{
    AbortCycleRequest, BeginCycleRequest, BlockRef, CommitCycleRequest, DiskBlockMap,
    GetCycleRequest, RenewCycleRequest, ingest_client::IngestClient,
};
use ferry_proto::registry::v1::{
    DrillSchedule, Health, RecordVerificationRequest, SetDrillScheduleRequest,
    registry_client::RegistryClient,
};
use ferry_proto::scheduler::v1::{CompleteWorkRequest, scheduler_client::SchedulerClient};
use ferry_proto::storage::v1::{
    BlockHashesRequest, GetPointRequest, ListPointsRequest, QuarantineChunksRequest,
    storage_writer_client::StorageWriterClient,
};
use ferry_tests::*;
use tonic::Code;

/// A refusal that names the calling host and the VM.
fn assert_refused(what: &str, s: &tonic::Status) {
    assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
    assert!(
        s.message().contains("hvb") && s.message().contains("web01"),
        "{what}: the refusal names host and vm: {}",
        s.message()
    );
}

/// A cycle of hva's web01 (open or already committed: the host check comes before any other,
/// and idle one-second cycles are open for milliseconds only).
async fn a_cycle_of_web01(t: &TestMesh) -> anyhow::Result<String> {
    let keys = run(t
        .redis_cli()?
        .args(["--scan", "--pattern", "ferry:kv:{ferry:cycle:*}"]))?;
    let mut ingest = IngestClient::new(t.ctl.channel(Component::Ingest).await?);
    for id in keys.lines().filter_map(|k| {
        k.trim()
            .strip_prefix("ferry:kv:{ferry:cycle:")
            .and_then(|k| k.strip_suffix('}'))
    }) {
        let c = ingest
            .get_cycle(GetCycleRequest {
                cycle_id: id.into(),
            })
            .await?
            .into_inner();
        if c.vm == "web01" && c.host_name == "hva" {
            return Ok(c.id);
        }
    }
    anyhow::bail!("no cycle of web01 found")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_hosts_certificate_reaches_nothing_of_a_vm() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let disk_a = t.path("hva/web01.vhdx");
    let disk_b = t.path("hvb/app01.vhdx");
    for d in [&disk_a, &disk_b] {
        std::fs::create_dir_all(d.parent().unwrap())?;
        qemu_create(d, "vhdx", "subformat=dynamic", "8M")?;
    }
    qemu_io(&disk_a, "vhdx", &["write -P 0xa1 0 1M"])?;
    qemu_io(&disk_b, "vhdx", &["write -P 0xb2 0 1M"])?;
    let cfg_a = t
        .agent_config_tracked(&t.path("hva"), "hva", &[("web01", vec![disk_a.clone()])])
        .await?;
    let cfg_b = t
        .agent_config_tracked(&t.path("hvb"), "hvb", &[("app01", vec![disk_b.clone()])])
        .await?;
    let agent_a = InProcessAgent::start(&cfg_a)?;
    let agent_b = InProcessAgent::start(&cfg_b)?;
    let web01 = t.wait_vm("web01").await?;
    t.wait_vm("app01").await?;
    for vm in ["web01", "app01"] {
        let job = t.protect_every(vm, 1).await?;
        let j = t.wait_job(&job.id, Duration::from_secs(120)).await?;
        assert_eq!(j.status, StepStatus::Succeeded as i32, "{vm}: {j:?}");
    }
    let app01_point = t.points("app01").await?.pop().expect("app01 has a point");

    let (ca, cert, key) = host_identity(&t.path("hvb"))?;
    let tls = ClientTls::host(ca.clone(), cert.clone(), key.clone());
    let cfg = &t.ctl.cfg;
    let mut ingest =
        IngestClient::new(ferry_mesh::connect(&cfg.endpoint(Component::Ingest), &tls).await?);
    let mut storage = StorageWriterClient::new(
        ferry_mesh::connect(&cfg.endpoint(Component::StorageWriter), &tls).await?,
    );
    let mut scheduler =
        SchedulerClient::new(ferry_mesh::connect(&cfg.endpoint(Component::Scheduler), &tls).await?);

    // 1. BeginCycle for web01 in hvb's own name, with web01's real disks.
    let begin = BeginCycleRequest {
        vm: "web01".into(),
        host_name: "hvb".into(),
        kind: CycleKind::Delta as i32,
        disks: web01.disks.clone(),
        job_id: String::new(),
        consistency: Consistency::Crash.into(),
        cut_id: String::new(),
    };
    let err = ingest.begin_cycle(begin.clone()).await.unwrap_err();
    assert_refused("BeginCycle", &err);
    assert!(
        err.message().contains("hva"),
        "names the owner: {}",
        err.message()
    );

    // 2. Commit, renew and abort on a cycle of hva's, with block 0 pointing at app01's chunk.
    let cycle = a_cycle_of_web01(&t).await?;
    let forged = DiskBlockMap {
        disk_id: web01.disks[0].id.clone(),
        blocks: vec![BlockRef {
            index: 0,
            chunk: app01_chunk(&t, &app01_point.id).await?,
        }],
        ..Default::default()
    };
    let err = ingest
        .commit_cycle(CommitCycleRequest {
            cycle_id: cycle.clone(),
            disks: vec![forged],
            fencing_tokens: Default::default(),
        })
        .await
        .unwrap_err();
    assert_refused("CommitCycle", &err);
    let err = ingest
        .renew_cycle(RenewCycleRequest {
            cycle_id: cycle.clone(),
        })
        .await
        .unwrap_err();
    assert_refused("RenewCycle", &err);
    let err = ingest
        .abort_cycle(AbortCycleRequest {
            cycle_id: cycle.clone(),
            reason: "forged".into(),
        })
        .await
        .unwrap_err();
    assert_refused("AbortCycle", &err);

    // 3. Reads of web01's points and block hashes.
    let err = storage
        .list_points(ListPointsRequest { vm: "web01".into() })
        .await
        .unwrap_err();
    assert_refused("ListPoints", &err);
    let err = storage
        .get_point(GetPointRequest {
            vm: "web01".into(),
            point: "latest".into(),
        })
        .await
        .unwrap_err();
    assert_refused("GetPoint", &err);
    let latest = t.points("web01").await?.pop().expect("web01 has a point");
    let err = storage
        .block_hashes(BlockHashesRequest {
            vm: "web01".into(),
            point: latest.id.clone(),
            disk_id: web01.disks[0].id.clone(),
            omit_lost: false,
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_refused("BlockHashes", &err);
    // The drills' service-only calls: no host quarantines a chunk, not even one of its own
    // VM's (it stays stored), nor records a drill's result.
    let own = app01_chunk(&t, &app01_point.id).await?;
    let err = storage
        .quarantine_chunks(QuarantineChunksRequest {
            vm: "app01".into(),
            chunks: vec![own.clone()],
        })
        .await
        .unwrap_err();
    let service_only = |what: &str, s: &tonic::Status| {
        assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
        assert!(s.message().contains("only ferry services"), "{what}: {s:?}");
    };
    service_only("QuarantineChunks", &err);
    let id: ferry_store::ChunkId = own.as_slice().try_into()?;
    assert!(
        t.path("mesh/store")
            .join(ferry_store::chunk_key(&id))
            .is_file()
    );
    let mut registry =
        RegistryClient::new(ferry_mesh::connect(&cfg.endpoint(Component::Registry), &tls).await?);
    let err = registry
        .record_verification(RecordVerificationRequest {
            vm: "app01".into(),
            ok: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    service_only("RecordVerification", &err);
    // Nor may it schedule (or unschedule) drills of its own VM behind the operator's back.
    let err = registry
        .set_drill_schedule(SetDrillScheduleRequest {
            vm: "app01".into(),
            schedule: Some(DrillSchedule {
                target: "app01".into(),
                every_seconds: 60,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    service_only("SetDrillSchedule", &err);
    // hvb still reads its own VM's points: the refusal is about the VM, not the host.
    storage
        .list_points(ListPointsRequest { vm: "app01".into() })
        .await?;

    // 4. Work of web01: hvb's queue never holds it, and hvb cannot name hva.
    let err = scheduler
        .complete_work(CompleteWorkRequest {
            work_id: "delta-web01".into(),
            host_name: "hva".into(),
            ok: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = scheduler
        .complete_work(CompleteWorkRequest {
            work_id: "delta-web01".into(),
            host_name: "hvb".into(),
            ok: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // 5. A QUIC offer into a cycle of hva's over hvb's connection.
    let quic = ferry_mesh::quic_client_config(&ca, &cert, &key)?;
    let up = Uploader::connect(cfg.gateway.listen, quic).await?;
    let cycle = a_cycle_of_web01(&t).await?;
    let offer = Offer {
        id: [7u8; 32],
        plain_len: 4096,
    };
    let err = up.offer(&cycle, &[offer]).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("refused") && msg.contains("hvb") && msg.contains("web01"),
        "the gateway refuses and names host and vm: {msg}"
    );
    // 5b. Fetches over the same connection: web01's chunks, and a chunk outside app01's
    // point (hvb's own VM).
    let err = up.fetch("web01", "latest", &[[7u8; 32]]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    let err = up
        .fetch("app01", &app01_point.id, &[[7u8; 32]])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotEntitled), "{err}");
    up.close();

    // 6. The real grpcurl with hvb's certificate files, as an operator would try it.
    grpcurl_begin_refused(&t, &ca, &cert, &key, &begin)?;

    // Every refusal above is in the audit trail, in hvb's name, with web01 as the target.
    let trail = t.cli_json(&["audit", "--caller", "host:hvb", "-o", "json"])?;
    let refused: Vec<&str> = trail
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["result"] == "refused")
        .filter_map(|r| r["operation"].as_str()?.rsplit('/').next())
        .collect();
    for op in [
        "BeginCycle",
        "CommitCycle",
        "RenewCycle",
        "AbortCycle",
        "ListPoints",
        "GetPoint",
        "BlockHashes",
        "upload",
        "fetch",
    ] {
        assert!(refused.contains(&op), "{op} not audited: {trail}");
    }
    let begin_refusals = trail
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["operation"] == "ferry.ingest.v1.Ingest/BeginCycle")
        .collect::<Vec<_>>();
    let fetch_codes: Vec<&str> = trail
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["operation"] == "quic/fetch" && r["component"] == "gateway")
        .filter_map(|r| r["code"].as_str())
        .collect();
    assert!(
        fetch_codes.contains(&"DENIED") && fetch_codes.contains(&"NOT_ENTITLED"),
        "{trail}"
    );
    assert!(
        begin_refusals
            .iter()
            .all(|r| r["target"] == "vm:web01" && r["for_host"] == "hvb"),
        "{trail}"
    );

    // hva's replication was never disturbed: more points, all committed by hva, health normal.
    let n = t.points("web01").await?.len();
    let points = t
        .wait_points("web01", n + 3, Duration::from_secs(60))
        .await?;
    assert!(points.iter().all(|p| p.host == "hva"), "{points:?}");
    let vm = t.vm("web01").await?;
    assert_eq!(vm.health(), Health::Normal, "{vm:?}");
    let verify = t.ferry_cli(&["points", "verify", "web01", "-o", "json"])?;
    assert!(verify.status.success(), "{verify:?}");
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout)?;
    assert_eq!(report["flagged"], 0, "{report}");
    assert!(
        report["points"]
            .as_array()
            .is_some_and(|p| p.len() >= n + 3 && p.iter().all(|p| p["verdict"] == "ok")),
        "{report}"
    );

    // A point committed by another host (what a forger could do before cycles were scoped,
    // made here with the store's writer and hvb's name on the lease) is flagged.
    forge_point(&t, &web01.disks[0]).await?;
    let verify = t.ferry_cli(&["points", "verify", "web01", "-o", "json"])?;
    assert!(!verify.status.success(), "verify fails on a forged point");
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout)?;
    assert_eq!(report["flagged"], 1, "{report}");
    let bad: Vec<_> = report["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["verdict"] == "wrong-host")
        .collect();
    assert_eq!(bad.len(), 1, "{report}");
    assert_eq!(bad[0]["host"], "hvb");
    assert_eq!(bad[0]["vm_host"], "hva");
    assert!(String::from_utf8_lossy(&verify.stderr).contains("web01"));

    agent_a.shutdown().await?;
    agent_b.shutdown().await?;
    t.stop().await;
    Ok(())
}

/// Commits an empty delta point of web01 under hvb's name, holding the disk's lease as hvb.
async fn forge_point(t: &TestMesh, disk: &ferry_proto::common::v1::Disk) -> anyhow::Result<()> {
    use ferry_proto::storage::v1::{CommitDisk, CommitPointRequest};
    let coord = ferry_coord::Coord::connect_config(&t.ctl.cfg).await?;
    let mut lease = None;
    for _ in 0..500 {
        if let Ok(l) = coord
            .acquire_lease(&disk.id, "hvb", Duration::from_secs(10))
            .await
        {
            lease = Some(l);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lease =
        lease.ok_or_else(|| anyhow::anyhow!("the lease of web01's disk never came free"))?;
    let req = CommitPointRequest {
        vm: "web01".into(),
        cycle_id: "forged".into(),
        kind: CycleKind::Delta.into(),
        consistency: Consistency::Crash.into(),
        disks: vec![CommitDisk {
            disk: Some(disk.clone()),
            block_size: t.ctl.cfg.vault.block_size,
            full: false,
            ..Default::default()
        }],
        fencing_tokens: [(disk.id.clone(), lease.token)].into_iter().collect(),
        host: "hvb".into(),
        epoch: 0,
        base_point: String::new(),
        cut_id: String::new(),
    };
    // Storage-writer's gRPC face refuses a commit naming a host that is not the VM's ...
    let tls = ClientTls::service(&t.ctl.cfg)?;
    let ch = ferry_mesh::connect(&t.ctl.cfg.endpoint(Component::StorageWriter), &tls).await?;
    let refused = StorageWriterClient::new(ch)
        .commit_point(req.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("hvb"), "{refused:?}");
    // ... so the forger here writes with the store's own writer, as one holding the store
    // and the vault key could.
    let writer = ferry_storage_writer::Writer::from_config(&t.ctl.cfg).await?;
    let res = writer.commit_point(req).await;
    coord.release_lease(&lease).await?;
    res?;
    Ok(())
}

/// The chunk id of app01's block 0 (another VM's data): what a forger would point web01 at.
async fn app01_chunk(t: &TestMesh, point: &str) -> anyhow::Result<Vec<u8>> {
    let p = t.points("app01").await?;
    let disk = &p.last().expect("a point").disks[0];
    let mut s = t
        .ctl
        .storage()
        .await?
        .block_hashes(BlockHashesRequest {
            vm: "app01".into(),
            point: point.into(),
            disk_id: disk.disk_id.clone(),
            omit_lost: false,
        })
        .await?
        .into_inner();
    let page = s.message().await?.expect("a page of hashes");
    Ok(page.blocks[0].chunk.clone())
}

fn grpcurl_begin_refused(
    t: &TestMesh,
    ca: &str,
    cert: &str,
    key: &str,
    begin: &BeginCycleRequest,
) -> anyhow::Result<()> {
    let dir = t.path("hvb-pem");
    std::fs::create_dir_all(&dir)?;
    for (name, pem) in [("ca.pem", ca), ("cert.pem", cert), ("key.pem", key)] {
        std::fs::write(dir.join(name), pem)?;
    }
    let disks: Vec<serde_json::Value> = begin
        .disks
        .iter()
        .map(|d| serde_json::json!({"id": d.id, "path": d.path, "format": d.format}))
        .collect();
    let body = serde_json::json!({
        "vm": "web01", "host_name": "hvb", "kind": "CYCLE_KIND_DELTA", "disks": disks,
    });
    let addr = t.ctl.cfg.endpoint(Component::Ingest);
    let out = Command::new("grpcurl")
        .arg("-cacert")
        .arg(dir.join("ca.pem"))
        .arg("-cert")
        .arg(dir.join("cert.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"))
        .args(["-d", &body.to_string()])
        .arg(addr.trim_start_matches("https://"))
        .arg("ferry.ingest.v1.Ingest/BeginCycle")
        .output()
        .map_err(|e| anyhow::anyhow!("grpcurl is required (deploy/test.sh installs it): {e}"))?;
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "grpcurl BeginCycle must fail: {text}"
    );
    assert!(
        text.contains("PermissionDenied") && text.contains("hvb") && text.contains("web01"),
        "{text}"
    );
    Ok(())
}
