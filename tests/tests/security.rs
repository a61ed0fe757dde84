//! Registration keys are one-time and expire; a disk's lease refuses a second host and
//! fences out a stale holder's commit; every port answers reflection and health.
use std::time::Duration;

use ferry_mesh::{ClientTls, Component, Identity};
use ferry_proto::common::v1::{Consistency, CycleKind, Disk};
use ferry_proto::ingest::v1::{
    BeginCycleRequest, BlockRef, CommitCycleRequest, DiskBlockMap, ingest_client::IngestClient,
};
use ferry_proto::registry::v1::{
    HeartbeatRequest, RegisterHostRequest, VmInventory, registry_client::RegistryClient,
};
use ferry_tests::*;
use tonic::Code;

async fn register(
    t: &TestMesh,
    host: &str,
    key: &std::path::Path,
) -> Result<(String, String, String), tonic::Status> {
    let kf: ferry_agent::RegistrationKeyFile =
        serde_json::from_slice(&std::fs::read(key).unwrap_or_default())
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let (csr, key_pem) = ferry_mesh::new_csr(&Identity::Host(host.into()))
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let tls = ClientTls {
        ca_pem: kf.ca_pem.clone(),
        identity: None,
    };
    let ch = ferry_mesh::connect(&t.ctl.cfg.endpoint(Component::Registry), &tls)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let r = RegistryClient::new(ch)
        .register_host(RegisterHostRequest {
            key_id: kf.key_id,
            secret: kf.secret,
            host_name: host.into(),
            site: String::new(),
            csr_pem: csr,
        })
        .await?
        .into_inner();
    Ok((r.cert_pem, key_pem, r.ca_pem))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_key_is_one_time_and_expires() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let key = t.path("key.json");
    t.registration_key(&key, 3600).await?;
    register(&t, "hv01", &key).await?;
    let err = register(&t, "hv02", &key)
        .await
        .expect_err("a reused key must be refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("already used by host hv01"),
        "{}",
        err.message()
    );

    let short = t.path("short.json");
    t.registration_key(&short, 1).await?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = register(&t, "hv03", &short)
        .await
        .expect_err("an expired key must be refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("expired"), "{}", err.message());
    t.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_lease_refuses_second_host_and_fences_stale_commit() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let ingest_ep = t.ctl.cfg.endpoint(Component::Ingest);
    let mut clients = Vec::new();
    let mut registries = Vec::new();
    for host in ["hv01", "hv02"] {
        let key = t.path(&format!("{host}.json"));
        t.registration_key(&key, 3600).await?;
        let (cert, key_pem, ca) = register(&t, host, &key).await?;
        let tls = ClientTls {
            ca_pem: ca,
            identity: Some((cert, key_pem)),
        };
        let ch = ferry_mesh::connect(&ingest_ep, &tls).await?;
        clients.push(IngestClient::new(ch));
        let ch = ferry_mesh::connect(&t.ctl.cfg.endpoint(Component::Registry), &tls).await?;
        registries.push(RegistryClient::new(ch));
    }
    let path = "/srv/vms/db01-os.vhdx";
    let disk = Disk {
        id: ferry_proto::disk_id("db01", path),
        path: path.into(),
        format: "raw".into(),
        virtual_size: 1 << 20,
        ..Default::default()
    };
    // Hosts begin cycles only for the VMs they report: db01 is reported by hv01, then moves
    // to hv02 (an unprotected VM follows the host that reports it) while hv01 still holds the
    // disk's lease, then comes back. Ingest caches the owner for OWNER_TTL.
    let report = |i: usize| {
        let mut r = registries[i].clone();
        let disk = disk.clone();
        async move {
            r.heartbeat(HeartbeatRequest {
                host_name: ["hv01", "hv02"][i].into(),
                vms: vec![VmInventory {
                    name: "db01".into(),
                    disks: vec![disk],
                    hardware: None,
                }],
                ..Default::default()
            })
            .await?;
            tokio::time::sleep(ferry_mesh::scope::OWNER_TTL + Duration::from_millis(100)).await;
            anyhow::Ok(())
        }
    };
    report(0).await?;
    let begin = |host: &str| BeginCycleRequest {
        vm: "db01".into(),
        host_name: host.into(),
        kind: CycleKind::Initial as i32,
        disks: vec![disk.clone()],
        job_id: String::new(),
        consistency: Consistency::Crash.into(),
        cut_id: String::new(),
    };
    let first = clients[0].begin_cycle(begin("hv01")).await?.into_inner();
    report(1).await?;
    let err = clients[1]
        .begin_cycle(begin("hv02"))
        .await
        .expect_err("second host must be refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("hv01"),
        "names the holder: {}",
        err.message()
    );

    // The same host begins again (as after a crash): a new token; the old one is stale.
    report(0).await?;
    let second = clients[0].begin_cycle(begin("hv01")).await?.into_inner();
    assert!(second.fencing_tokens[&disk.id] > first.fencing_tokens[&disk.id]);
    let empty = DiskBlockMap {
        disk_id: disk.id.clone(),
        blocks: Vec::<BlockRef>::new(),
        ..Default::default()
    };
    let err = clients[0]
        .commit_cycle(CommitCycleRequest {
            cycle_id: first.cycle_id.clone(),
            disks: vec![empty.clone()],
            fencing_tokens: first.fencing_tokens.clone(),
        })
        .await
        .expect_err("a stale holder's commit must be rejected");
    assert!(
        matches!(err.code(), Code::Aborted | Code::FailedPrecondition),
        "{err:?}"
    );
    assert!(
        err.message().contains("fenc")
            || err.message().contains("lease")
            || err.message().contains("token"),
        "{}",
        err.message()
    );
    // The current holder commits.
    clients[0]
        .commit_cycle(CommitCycleRequest {
            cycle_id: second.cycle_id,
            disks: vec![empty],
            fencing_tokens: second.fencing_tokens,
        })
        .await?;
    t.stop().await;
    Ok(())
}

/// Folders an operator names (a test failover's `--target`, `MaterializeDisk`'s file) must lie
/// under the machine's `export_roots` once links are resolved (issue #16 scope 3): `..`, a
/// folder elsewhere and a symbolic link out of a root are each refused, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_folders_stay_under_the_export_roots() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let elsewhere = tempfile::tempdir()?;
    std::os::unix::fs::symlink(elsewhere.path(), t.path("out-link"))?;
    let dots = format!("{}/../../etc", t.path("tf").display());
    let far = elsewhere.path().join("tf").display().to_string();
    let linked = t.path("out-link/tf").display().to_string();
    for (target, says) in [
        (dots.as_str(), ".."),
        (far.as_str(), "not under"),
        (linked.as_str(), "symbolic link"),
    ] {
        let (ok, _, err) = t.cli(&["failover", "test", "web01", "--target", target])?;
        assert!(!ok && err.contains(says), "{target}: {err}");
        let addr = t.ctl.cfg.endpoint(Component::StorageWriter);
        let req = serde_json::json!({"vm": "web01", "target_path": format!("{target}/d.raw")});
        let out = std::process::Command::new("grpcurl")
            .arg("-cacert")
            .arg(&t.ctl.cfg.tls.ca_cert)
            .args([
                "-H",
                &format!("authorization: Bearer {}", t.ctl.cfg.admin_token()?),
            ])
            .args(["-d", &req.to_string()])
            .arg(addr.trim_start_matches("https://"))
            .arg("ferry.storage.v1.StorageWriter/MaterializeDisk")
            .output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && text.contains("InvalidArgument") && text.contains(says),
            "{target}: {text}"
        );
    }
    assert_eq!(
        std::fs::read_dir(elsewhere.path())?.count(),
        0,
        "written outside"
    );
    assert!(!t.path("tf").exists());
    t.stop().await;
    Ok(())
}

/// A registration key is valid five days unless `--valid` (or `--ttl`) says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_keys_are_valid_five_days_by_default() -> anyhow::Result<()> {
    let t = TestMesh::start().await?;
    let expires = |args: &[&str]| -> anyhow::Result<i64> {
        let out = t.path("key.json");
        let _ = std::fs::remove_file(&out);
        let mut all = vec![
            "vault",
            "registration-key",
            "--out",
            out.to_str().unwrap_or(""),
        ];
        all.extend_from_slice(args);
        let (ok, o, e) = t.cli(&all)?;
        anyhow::ensure!(ok, "{o}{e}");
        let key: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
        Ok(key["expires_at_ms"].as_i64().unwrap_or_default() - ferry_proto::now_ms())
    };
    let day = 24 * 3600 * 1000;
    let default = expires(&[])?;
    assert!((5 * day - 60_000..=5 * day).contains(&default), "{default}");
    let two = expires(&["--valid", "2d"])?;
    assert!((2 * day - 60_000..=2 * day).contains(&two), "{two}");
    t.stop().await;
    Ok(())
}
