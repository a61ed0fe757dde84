//! Test failover and cleanup against a real registry and a real storage-writer (both served
//! over mutually authenticated gRPC from a vault made in a tempdir), a real `redis-server` and
//! a local-filesystem object store.
use std::path::{Path, PathBuf};

use ferry_coord::{Coord, RedisServer};
use ferry_failover::{FailoverError, FailoverService, Orchestrator};
use ferry_mesh::{
    Caller, ClientTls, Component, ErrorCode, Identity, MeshConfig, Role, ServiceError, VaultCa,
};
use ferry_proto::common::v1::{Disk, Job, StepStatus};
use ferry_proto::failover::v1::failover_server::Failover as _;
use ferry_proto::failover::v1::{
    CleanupTestFailoverRequest, ListFailoversRequest, PlannedFailoverRequest, TestFailoverRequest,
};
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_proto::registry::v1::{
    CreateRegistrationKeyRequest, FailoverState, GetVmRequest, HeartbeatRequest, ListJobsRequest,
    RegisterHostRequest, VmInventory,
};
use ferry_proto::storage::v1::{BlockEntry, CommitDisk, CommitPointRequest};
use ferry_storage_writer::Writer;
use ferry_store::{Store, VaultKey, chunk_id, seal_chunk};
use tokio_util::sync::CancellationToken;

const BS: u32 = 64 * 1024;
const VSIZE: u64 = 8 * BS as u64;
const DISK_PATH: &str = "/vms/web/disk0.raw";

struct Mesh {
    dir: tempfile::TempDir,
    cfg: MeshConfig,
    shutdown: CancellationToken,
    _redis: RedisServer,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A vault like `ferry up` makes, with the registry and the storage-writer serving.
async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = VaultCa::create("test-vault").unwrap();
    std::fs::create_dir_all(d.join("pki")).unwrap();
    std::fs::write(d.join("pki/ca.pem"), ca.cert_pem()).unwrap();
    let (cert, key) = ca.issue_server(&[]).unwrap();
    std::fs::write(d.join("pki/server.pem"), cert).unwrap();
    std::fs::write(d.join("pki/server.key"), key).unwrap();
    let (cert, key) = ca.issue_client(&Identity::Service("ferry".into())).unwrap();
    std::fs::write(d.join("pki/service.pem"), cert).unwrap();
    std::fs::write(d.join("pki/service.key"), key).unwrap();
    ferry_mesh::write_secret(&d.join("pki/ca.key"), ca.key_pem().as_bytes()).unwrap();
    ferry_mesh::write_secret(&d.join("vault/data.key"), &[7u8; 32]).unwrap();
    ferry_mesh::write_secret(&d.join("admin.token"), b"admin-token").unwrap();
    let redis = RedisServer::start(&d.join("redis")).unwrap();
    let mut cfg = MeshConfig {
        data_dir: d.to_path_buf(),
        redis_url: redis.url(),
        store_url: format!("file://{}?fsync=false", d.join("store").display()),
        ..MeshConfig::default()
    };
    cfg.vault.id = "test-vault".into();
    // Test failovers with a target_dir write under the test's folder.
    cfg.export_roots = vec![d.to_path_buf()];
    let mut cfg = cfg.finish().unwrap();
    let shutdown = CancellationToken::new();
    for c in [Component::Registry, Component::StorageWriter] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        cfg.set_listen(c, listener.local_addr().unwrap());
        let (cfg, stop) = (cfg.clone(), shutdown.clone());
        tokio::spawn(async move {
            let res = match c {
                Component::Registry => ferry_registry::run(cfg, listener, stop).await,
                _ => ferry_storage_writer::run(cfg, listener, stop).await,
            };
            if let Err(e) = res {
                eprintln!("{} stopped: {e:#}", c.as_str());
            }
        });
    }
    Mesh {
        dir,
        cfg,
        shutdown,
        _redis: redis,
    }
}

impl Mesh {
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    async fn registry(&self) -> RegistryClient<tonic::transport::Channel> {
        let tls = ClientTls::service(&self.cfg).unwrap();
        let ch = ferry_mesh::connect(&self.cfg.endpoint(Component::Registry), &tls)
            .await
            .unwrap();
        RegistryClient::new(ch)
    }

    /// Registers host `h1` and reports VM `web` with one raw disk.
    async fn add_vm(&self) {
        let ep = self.cfg.endpoint(Component::Registry);
        let admin = ferry_mesh::with_token(
            ferry_mesh::connect(&ep, &ClientTls::operator(&self.cfg).unwrap())
                .await
                .unwrap(),
            "admin-token",
        )
        .unwrap();
        let mut admin = RegistryClient::new(admin);
        let key = admin
            .create_registration_key(CreateRegistrationKeyRequest::default())
            .await
            .unwrap()
            .into_inner();
        let (csr, host_key) = ferry_mesh::new_csr(&Identity::Host("h1".into())).unwrap();
        let reg = admin
            .register_host(RegisterHostRequest {
                key_id: key.key_id,
                secret: key.secret,
                host_name: "h1".into(),
                site: String::new(),
                csr_pem: csr,
            })
            .await
            .unwrap()
            .into_inner();
        let tls = ClientTls::host(reg.ca_pem, reg.cert_pem, host_key);
        let mut host = RegistryClient::new(ferry_mesh::connect(&ep, &tls).await.unwrap());
        host.heartbeat(HeartbeatRequest {
            host_name: "h1".into(),
            vms: vec![VmInventory {
                name: "web".into(),
                disks: vec![disk()],
                hardware: None,
            }],
            agent_version: "test".into(),
            change_tracking: true,
            recovery: false,
            standby: Vec::new(),
        })
        .await
        .unwrap();
    }

    /// Commits a point of `web` with blocks 0 and 5; returns the raw image it stands for.
    async fn commit_point(&self) -> Vec<u8> {
        let key = VaultKey::from_bytes(self.cfg.data_key().unwrap());
        let store = Store::from_url(&self.cfg.store_url()).unwrap();
        let coord = Coord::connect(&self.cfg.redis_url).await.unwrap();
        let lease = coord
            .acquire_lease(&disk().id, "agent", std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let mut image = vec![0u8; VSIZE as usize];
        let mut blocks = Vec::new();
        for (index, seed) in [(0u64, 3u8), (5, 9)] {
            let data: Vec<u8> = (0..BS as usize).map(|i| (i as u8) ^ seed | 1).collect();
            let id = chunk_id(&key, &data);
            store
                .put_chunk(&id, seal_chunk(&key, &id, &data).into())
                .await
                .unwrap();
            let off = (index * u64::from(BS)) as usize;
            image[off..off + data.len()].copy_from_slice(&data);
            blocks.push(BlockEntry {
                index,
                chunk: id.to_vec(),
            });
        }
        let writer = Writer::new(store, coord, key);
        writer
            .commit_point(CommitPointRequest {
                vm: "web".into(),
                cycle_id: "c1".into(),
                kind: ferry_model::CycleKind::Initial.into(),
                consistency: ferry_model::Consistency::Crash.into(),
                disks: vec![CommitDisk {
                    disk: Some(disk()),
                    block_size: BS,
                    blocks,
                    full: true,
                    shipped_logs: vec![],
                    ..CommitDisk::default()
                }],
                fencing_tokens: [(disk().id, lease.token)].into_iter().collect(),
                host: "h1".into(),
                epoch: 0,
                base_point: String::new(),
                cut_id: String::new(),
            })
            .await
            .unwrap();
        image
    }
}

fn disk() -> Disk {
    Disk {
        id: ferry_proto::disk_id("web", DISK_PATH),
        path: DISK_PATH.into(),
        format: "raw".into(),
        virtual_size: VSIZE,
        logical_sector_size: 512,
        ..Disk::default()
    }
}

fn test_req(target: &Path) -> TestFailoverRequest {
    TestFailoverRequest {
        vm: "web".into(),
        point: "latest".into(),
        target_dir: target.display().to_string(),
        instant: false,
    }
}

fn assert_succeeded(job: &Job, steps: usize) {
    assert_eq!(job.status, StepStatus::Succeeded as i32, "{job:?}");
    assert_eq!(job.steps.len(), steps);
    assert!(
        job.steps
            .iter()
            .all(|s| s.status == StepStatus::Succeeded as i32 && s.progress_percent == 100),
        "{job:?}"
    );
}

#[tokio::test]
async fn test_failover_then_cleanup() {
    let m = mesh().await;
    m.add_vm().await;
    let image = m.commit_point().await;
    let orch = Orchestrator::from_config(&m.cfg).await.unwrap();
    let target = m.path("tf/web");

    let job = orch.test_failover(test_req(&target)).await.unwrap();
    assert_succeeded(&job, 3);
    assert_eq!(
        (job.kind.as_str(), job.target.as_str()),
        ("test-failover", "web")
    );
    assert_eq!(std::fs::read(target.join("disk0.raw")).unwrap(), image);
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("web.vm.json")).unwrap()).unwrap();
    assert_eq!(desc["name"], "web");
    assert_eq!(desc["host"], "h1");
    assert_eq!(desc["point"]["consistency"], "crash");
    assert_eq!(desc["disks"][0]["file"], "disk0.raw");
    assert_eq!(desc["disks"][0]["format"], "raw");
    assert_eq!(desc["disks"][0]["virtual_size"], VSIZE);

    let mut registry = m.registry().await;
    let vm = registry
        .get_vm(GetVmRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.failover_state(), FailoverState::Test);
    let jobs = registry
        .list_jobs(ListJobsRequest {
            target: "web".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let listed = jobs
        .iter()
        .find(|j| j.id == job.id)
        .expect("job in the registry");
    assert_eq!(listed.status, StepStatus::Succeeded as i32);

    let records = orch.list_failovers().await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].state.as_str(), records[0].kind.as_str()),
        ("active", "test")
    );
    assert_eq!(records[0].files.len(), 2);

    // One at a time.
    let err = orch
        .test_failover(test_req(&m.path("tf/other")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::FailedPrecondition);
    assert!(err.to_string().contains("cleanup"), "{err}");

    // A file that is not the failover's stays; the directory then stays too.
    std::fs::write(target.join("notes.txt"), b"mine").unwrap();
    let job = orch
        .cleanup_test_failover(CleanupTestFailoverRequest { vm: "web".into() })
        .await
        .unwrap();
    assert_succeeded(&job, 2);
    assert!(!target.join("disk0.raw").exists() && !target.join("web.vm.json").exists());
    assert!(target.join("notes.txt").exists());
    let vm = registry
        .get_vm(GetVmRequest { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vm.failover_state(), FailoverState::None);
    // A fresh orchestrator (another replica) replays the same state from the catalog.
    let replayed = Orchestrator::from_config(&m.cfg).await.unwrap();
    let records = replayed.list_failovers().await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].state, "cleaned-up");
    let err = replayed
        .cleanup_test_failover(CleanupTestFailoverRequest { vm: "web".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::FailedPrecondition);

    // After cleanup a new test failover is possible; the emptied directory is removed.
    std::fs::remove_file(target.join("notes.txt")).unwrap();
    let job = replayed.test_failover(test_req(&target)).await.unwrap();
    assert_succeeded(&job, 3);
    replayed
        .cleanup_test_failover(CleanupTestFailoverRequest { vm: "web".into() })
        .await
        .unwrap();
    assert!(!target.exists());
}

#[tokio::test]
async fn bad_input_and_failed_jobs() {
    let m = mesh().await;
    m.add_vm().await;
    let orch = Orchestrator::from_config(&m.cfg).await.unwrap();
    let target = m.path("tf");

    // No recovery point yet: not found, and no job.
    let err = orch.test_failover(test_req(&target)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");
    m.commit_point().await;
    let mut req = test_req(&target);
    req.vm = "nosuchvm".into();
    let err = orch.test_failover(req).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");
    let mut req = test_req(&target);
    req.point = "00000000000000000099".into();
    assert_eq!(
        orch.test_failover(req).await.unwrap_err().code(),
        ErrorCode::NotFound
    );
    let mut req = test_req(&target);
    req.target_dir = "relative/dir".into();
    assert!(matches!(
        orch.test_failover(req).await.unwrap_err(),
        FailoverError::InvalidArgument(_)
    ));

    // A disk file already in the target: the job fails, the file is untouched, nothing stays.
    std::fs::create_dir_all(&target).unwrap();
    std::fs::write(target.join("disk0.raw"), b"precious").unwrap();
    let job = orch.test_failover(test_req(&target)).await.unwrap();
    assert_eq!(job.status, StepStatus::Failed as i32, "{job:?}");
    assert!(job.error.contains("already exists"), "{}", job.error);
    assert_eq!(job.steps[0].status, StepStatus::Failed as i32);
    assert_eq!(job.steps[2].status, StepStatus::Skipped as i32);
    assert_eq!(
        std::fs::read(target.join("disk0.raw")).unwrap(),
        b"precious"
    );
    assert!(!target.join("web.vm.json").exists());
    assert!(orch.list_failovers().await.unwrap().is_empty());

    // A replica shutting down starts no new job (another replica takes the call).
    let stopping = CancellationToken::new();
    stopping.cancel();
    let orch = Orchestrator::from_config(&m.cfg)
        .await
        .unwrap()
        .with_shutdown(stopping);
    let fresh = m.path("tf2");
    let err = orch.test_failover(test_req(&fresh)).await.unwrap_err();
    assert!(matches!(err, FailoverError::Cancelled), "{err}");
    assert!(!fresh.exists());
}

fn as_caller<T>(msg: T, caller: Option<Caller>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(c) = caller {
        req.extensions_mut().insert(c);
    }
    req
}

#[tokio::test]
async fn every_call_is_authorized() {
    let m = mesh().await;
    let svc = FailoverService::new(Orchestrator::from_config(&m.cfg).await.unwrap());
    let reader = Some(Caller::operator(Role::Reader, "test"));
    let operator = Some(Caller::operator(Role::Operator, "test"));
    let target = m.path("tf");
    let err = svc
        .test_failover(as_caller(test_req(&target), reader.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = svc
        .test_failover(as_caller(
            test_req(&target),
            Some(Caller::Host("h1".into())),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = svc
        .test_failover(as_caller(test_req(&target), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let listed = svc
        .list_failovers(as_caller(ListFailoversRequest {}, reader))
        .await
        .unwrap();
    assert!(listed.into_inner().failovers.is_empty());
    let planned = PlannedFailoverRequest {
        vm: "web".into(),
        target_dir: String::new(),
        instant: false,
    };
    let err = svc
        .planned_failover(as_caller(planned, operator))
        .await
        .unwrap_err();
    // An operator passes the role check; the VM is then looked up.
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("web"), "{}", err.message());
}

/// A replica died mid-job: its lease expires, another replica's scan takes the job over,
/// removes what the dead run left, finishes it, and records it under a newer token; the dead
/// run can no longer write, and a stale entry in the catalog is ignored on replay.
#[tokio::test]
async fn a_job_whose_replica_died_is_resumed_elsewhere() {
    use ferry_failover::records::{NAMESPACE, STATE_RUNNING};
    let m = mesh().await;
    m.add_vm().await;
    let image = m.commit_point().await;
    let target = m.path("tf/web");
    std::fs::create_dir_all(&target).unwrap();
    // What the dead replica left: a job running in the registry, its record, a half-made
    // disk file and a partial file of its own, and a lease nobody renews.
    let job = m
        .registry()
        .await
        .upsert_job(Job {
            kind: "test-failover".into(),
            target: "web".into(),
            status: StepStatus::Running as i32,
            steps: ferry_failover::TEST_FAILOVER_STEPS
                .iter()
                .map(|n| ferry_proto::common::v1::JobStep {
                    name: (*n).into(),
                    status: StepStatus::Pending as i32,
                    ..Default::default()
                })
                .collect(),
            ..Job::default()
        })
        .await
        .unwrap()
        .into_inner();
    let coord = Coord::connect(&m.cfg.redis_url).await.unwrap();
    let dead = coord
        .acquire_lease(
            &format!("failover-job-{}", job.id),
            "dead-replica",
            std::time::Duration::from_millis(500),
        )
        .await
        .unwrap();
    let store = Store::from_url(&m.cfg.store_url()).unwrap();
    let ledger = ferry_failover::Ledger::new(store.clone());
    let disk_file = target.join("disk0.raw");
    let desc_file = target.join("web.vm.json");
    let mut record = ferry_failover::Record {
        vm: "web".into(),
        kind: "test".into(),
        point_id: "latest".into(),
        target_dir: target.display().to_string(),
        files: vec![],
        state: STATE_RUNNING.into(),
        created_at_ms: 1,
        job_id: job.id.clone(),
        updated_at_ms: 1,
        last_job_id: job.id.clone(),
        fence: 0,
        holder: "dead-replica".into(),
        planned: vec![
            disk_file.display().to_string(),
            desc_file.display().to_string(),
        ],
        created_dir: true,
        host: String::new(),
        disks: vec![],
        driver: String::new(),
        started_at_ms: 0,
        shutdown: false,
        ..Default::default()
    };
    ledger.put_fenced(&mut record, &coord, &dead).await.unwrap();
    std::fs::write(&disk_file, b"half").unwrap();
    std::fs::write(target.join(".disk0.raw.17.partial"), b"half").unwrap();

    // The lease is still live: a scan leaves the job alone.
    let orch = Orchestrator::from_config(&m.cfg).await.unwrap();
    assert_eq!(orch.resume_orphans().await.unwrap(), 0);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(orch.resume_orphans().await.unwrap(), 1);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let done = loop {
        let j = m
            .registry()
            .await
            .get_job(ferry_proto::registry::v1::GetJobRequest { id: job.id.clone() })
            .await
            .unwrap()
            .into_inner();
        if j.status != StepStatus::Running as i32 {
            break j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never ended: {j:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_succeeded(&done, 3);
    assert_eq!(std::fs::read(&disk_file).unwrap(), image);
    assert!(desc_file.exists());
    let names: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "only the copy stays: {names:?}");
    let records = orch.list_failovers().await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].state, "active");
    // Nothing left to resume.
    assert_eq!(orch.resume_orphans().await.unwrap(), 0);

    // The dead run cannot write any more; an entry it slipped in is ignored on replay.
    let mut stale = record.clone();
    stale.state = "cleaned-up".into();
    assert!(ledger.put_fenced(&mut stale, &coord, &dead).await.is_err());
    stale.fence = dead.token;
    ledger.put(&stale).await.unwrap();
    let replayed = Orchestrator::from_config(&m.cfg).await.unwrap();
    let records = replayed.list_failovers().await.unwrap();
    assert_eq!(records[0].state, "active");
    // Two runs wrote the record: the dead one and the one that resumed it.
    let holders: std::collections::BTreeSet<String> = ferry_store::Catalog::new(store, NAMESPACE)
        .read_from::<ferry_failover::Record>(0)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, r)| r.job_id == job.id)
        .map(|(_, r)| r.holder)
        .collect();
    assert_eq!(holders.len(), 2, "{holders:?}");
}
