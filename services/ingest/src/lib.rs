//! Replication-ingest: the replication cycle. BeginCycle takes every disk's lease (with a
//! fencing token), the gateway asks whether a host may upload into a cycle and reports what
//! landed, CommitCycle hands the block maps to storage-writer, which re-checks the fencing
//! tokens and commits the recovery point, and the registry hears of it.
//!
//! Cycles live in Redis (`ferry:cycle:<id>`) so any ingest replica can serve any call; a
//! lost cycle costs a restart of the copy, never data (chunks are durable and deduplicated).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_coord::{Coord, CoordError, Lease};
use ferry_mesh::{ClientTls, Component, MeshConfig, Role, VmOwners};
use ferry_proto::common::v1::Disk;
use ferry_proto::ingest::v1::{self as pb, CycleKind, ingest_server::Ingest};
use ferry_proto::now_ms;
use ferry_proto::registry::v1::{
    ReportCommittedRequest, ReportProgressRequest, registry_client::RegistryClient,
};
use ferry_proto::storage::v1::{
    BlockEntry, CommitDisk, CommitPointRequest, storage_writer_client::StorageWriterClient,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Lease period of a disk's replication; the agent renews at a third of it.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
const CYCLE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CycleRecord {
    id: String,
    vm: String,
    host: String,
    kind: i32,
    job_id: String,
    consistency: String,
    state: String,
    started_at_ms: i64,
    /// disk id -> fencing token
    tokens: HashMap<String, u64>,
    disks: Vec<DiskJson>,
    #[serde(default)]
    stats: Stats,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Stats {
    chunks_written: u64,
    bytes_written: u64,
    chunks_skipped: u64,
    bytes_skipped: u64,
    plain_bytes_written: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct DiskJson {
    id: String,
    path: String,
    format: String,
    subformat: String,
    virtual_size: u64,
    logical_sector_size: u32,
}

impl From<&Disk> for DiskJson {
    fn from(d: &Disk) -> Self {
        Self {
            id: d.id.clone(),
            path: d.path.clone(),
            format: d.format.clone(),
            subformat: d.subformat.clone(),
            virtual_size: d.virtual_size,
            logical_sector_size: d.logical_sector_size,
        }
    }
}

impl DiskJson {
    fn to_proto(&self) -> Disk {
        Disk {
            id: self.id.clone(),
            path: self.path.clone(),
            format: self.format.clone(),
            subformat: self.subformat.clone(),
            virtual_size: self.virtual_size,
            logical_sector_size: self.logical_sector_size,
            ..Default::default()
        }
    }
}

pub struct IngestService {
    cfg: MeshConfig,
    coord: Coord,
    /// Which host each VM belongs to (the registry's answer): a host begins cycles only for
    /// its own VMs.
    owners: VmOwners,
    /// Serialises read-modify-write of a cycle record within this replica.
    lock: tokio::sync::Mutex<()>,
}

pub async fn run(
    cfg: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let coord = Coord::connect(&cfg.redis_url)
        .await
        .context("connecting to redis")?;
    let svc = Arc::new(IngestService {
        cfg: cfg.clone(),
        coord,
        owners: VmOwners::registry(&cfg)?,
        lock: Default::default(),
    });
    let auth = ferry_mesh::component_authenticator(&cfg, shutdown.clone()).await?;
    let server = pb::ingest_server::IngestServer::new(Api(svc)).max_decoding_message_size(64 << 20);
    let routes = tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
        server,
        auth.interceptor(),
    ));
    let tls = ferry_mesh::ServerTls::load(&cfg)?;
    tracing::info!(addr = %listener.local_addr()?, "ingest serving");
    ferry_mesh::serve(
        listener,
        &tls,
        routes,
        &["ferry.ingest.v1.Ingest"],
        shutdown,
    )
    .await?;
    Ok(())
}

fn cycle_key(id: &str) -> String {
    format!("ferry:cycle:{id}")
}

fn coord_status(e: CoordError) -> Status {
    match e {
        CoordError::LeaseHeld { resource, holder } => Status::failed_precondition(format!(
            "disk {resource} is being replicated by host {holder}; its lease is held"
        )),
        CoordError::LeaseLost { resource } => Status::aborted(format!(
            "the lease on disk {resource} was lost; begin a new cycle"
        )),
        other => Status::unavailable(format!("lease store unavailable: {other}")),
    }
}

impl CycleRecord {
    /// Only the host that began a cycle may act on it; the refusal names both hosts and the VM.
    fn check_host(&self, host: &str, action: &str) -> Result<(), Status> {
        if self.host == host {
            return Ok(());
        }
        tracing::warn!(cycle = %self.id, vm = %self.vm, owner = %self.host, host = %host, action, "host refused: cycle of another host");
        Err(Status::permission_denied(format!(
            "host {host} may not {action} cycle {} of vm {}: it was begun by host {}",
            self.id, self.vm, self.host
        )))
    }
}

impl IngestService {
    async fn load(&self, id: &str) -> Result<CycleRecord, Status> {
        let raw = self
            .coord
            .get(&cycle_key(id))
            .await
            .map_err(coord_status)?
            // Aborted, not NotFound: a cycle that expired or vanished with Redis's data is
            // recoverable (the agent begins a new one and ships the same sealed logs).
            .ok_or_else(|| {
                Status::aborted(format!(
                    "cycle {id} is not open (unknown, expired, or lost by redis); begin a new cycle"
                ))
            })?;
        serde_json::from_str(&raw)
            .map_err(|e| Status::internal(format!("cycle {id} record is unreadable: {e}")))
    }

    async fn save(&self, c: &CycleRecord) -> Result<(), Status> {
        let raw = serde_json::to_string(c).map_err(|e| Status::internal(e.to_string()))?;
        self.coord
            .set_ex(&cycle_key(&c.id), &raw, CYCLE_TTL)
            .await
            .map_err(coord_status)
    }

    fn leases(c: &CycleRecord) -> Vec<Lease> {
        c.tokens
            .iter()
            .map(|(disk, token)| Lease {
                resource: disk.clone(),
                holder: c.host.clone(),
                token: *token,
            })
            .collect()
    }

    async fn registry(&self) -> anyhow::Result<RegistryClient<tonic::transport::Channel>> {
        let tls = ClientTls::service(&self.cfg)?;
        Ok(RegistryClient::new(
            ferry_mesh::connect(&self.cfg.endpoint(Component::Registry), &tls).await?,
        ))
    }

    async fn report_progress(&self, c: &CycleRecord) {
        if c.job_id.is_empty() {
            return;
        }
        let total: u64 = c.disks.iter().map(|d| d.virtual_size).sum();
        let req = ReportProgressRequest {
            job_id: c.job_id.clone(),
            bytes_total: total,
            bytes_done: c.stats.plain_bytes_written,
            bytes_skipped: c.stats.bytes_skipped,
            message: format!(
                "{} chunks written, {} skipped as already stored ({} bytes)",
                c.stats.chunks_written, c.stats.chunks_skipped, c.stats.bytes_skipped
            ),
        };
        match self.registry().await {
            Ok(mut r) => {
                if let Err(e) = r.report_progress(req).await {
                    tracing::debug!(cycle = %c.id, error = %e, "progress report failed");
                }
            }
            Err(e) => {
                tracing::debug!(cycle = %c.id, error = %e, "registry unreachable for progress")
            }
        }
    }
}

/// The gRPC face of the service (a newtype: the orphan rule forbids `impl Trait for Arc<_>`).
#[derive(Clone)]
pub struct Api(pub Arc<IngestService>);

impl std::ops::Deref for Api {
    type Target = IngestService;
    fn deref(&self) -> &IngestService {
        &self.0
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Ingest for Api {
    async fn begin_cycle(&self, req: Request<pb::BeginCycleRequest>) -> R<pb::BeginCycleResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        if req.host_name != host {
            return Err(Status::permission_denied(format!(
                "host {host} cannot begin a cycle for host {}",
                req.host_name
            )));
        }
        if req.disks.is_empty() {
            return Err(Status::invalid_argument(format!(
                "cycle for vm {} names no disks",
                req.vm
            )));
        }
        self.owners
            .check_host(&host, &req.vm, "begin a replication cycle of")
            .await?;
        for d in &req.disks {
            let expected = ferry_proto::disk_id(&req.vm, &d.path);
            if d.id != expected {
                return Err(Status::invalid_argument(format!(
                    "disk {} of vm {} has id {}, expected {expected}",
                    d.path, req.vm, d.id
                )));
            }
        }
        let mut leases: Vec<Lease> = Vec::new();
        for d in &req.disks {
            match self.coord.acquire_lease(&d.id, &host, LEASE_TTL).await {
                Ok(l) => leases.push(l),
                Err(e) => {
                    for l in &leases {
                        let _ = self.coord.release_lease(l).await;
                    }
                    tracing::warn!(vm = %req.vm, disk = %d.id, host = %host, error = %e, "lease refused");
                    return Err(coord_status(e));
                }
            }
        }
        let c = CycleRecord {
            id: uuid::Uuid::new_v4().to_string(),
            vm: req.vm.clone(),
            host: host.clone(),
            kind: req.kind,
            job_id: req.job_id.clone(),
            consistency: if req.consistency.is_empty() {
                "crash".into()
            } else {
                req.consistency.clone()
            },
            state: "open".into(),
            started_at_ms: now_ms(),
            tokens: leases
                .iter()
                .map(|l| (l.resource.clone(), l.token))
                .collect(),
            disks: req.disks.iter().map(DiskJson::from).collect(),
            stats: Stats::default(),
        };
        self.save(&c).await?;
        tracing::info!(cycle = %c.id, vm = %c.vm, host = %host, disks = c.disks.len(), "cycle begun");
        Ok(Response::new(pb::BeginCycleResponse {
            cycle_id: c.id,
            fencing_tokens: c.tokens,
            lease_ttl_ms: LEASE_TTL.as_millis() as u64,
            block_size: self.cfg.vault.block_size,
        }))
    }

    async fn renew_cycle(&self, req: Request<pb::RenewCycleRequest>) -> R<pb::RenewCycleResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let c = self.load(&req.into_inner().cycle_id).await?;
        c.check_host(&host, "renew")?;
        for l in IngestService::leases(&c) {
            self.coord
                .renew_lease(&l, LEASE_TTL)
                .await
                .map_err(coord_status)?;
        }
        Ok(Response::new(pb::RenewCycleResponse {}))
    }

    async fn commit_cycle(
        &self,
        req: Request<pb::CommitCycleRequest>,
    ) -> R<pb::CommitCycleResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        let mut c = self.load(&req.cycle_id).await?;
        c.check_host(&host, "commit")?;
        if c.state != "open" {
            return Err(Status::failed_precondition(format!(
                "cycle {} is {}",
                c.id, c.state
            )));
        }
        for (disk, token) in &c.tokens {
            match req.fencing_tokens.get(disk) {
                Some(t) if t == token => {}
                other => {
                    return Err(Status::aborted(format!(
                        "stale fencing token for disk {disk}: presented {other:?}, cycle holds {token}"
                    )));
                }
            }
        }
        let full = c.kind != CycleKind::Delta as i32;
        let mut disks = Vec::new();
        for d in &c.disks {
            let map = req
                .disks
                .iter()
                .find(|m| m.disk_id == d.id)
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "commit of cycle {} lacks the block map of disk {}",
                        c.id, d.id
                    ))
                })?;
            disks.push(CommitDisk {
                disk: Some(d.to_proto()),
                block_size: self.cfg.vault.block_size,
                blocks: map
                    .blocks
                    .iter()
                    .map(|b| BlockEntry {
                        index: b.index,
                        chunk: b.chunk.clone(),
                    })
                    .collect(),
                zeroed: map.zeroed.clone(),
                logs: map.logs.clone(),
                full,
                shipped_logs: map.shipped_logs.clone(),
            });
        }
        let kind = match CycleKind::try_from(c.kind) {
            Ok(CycleKind::Delta) => "delta",
            Ok(CycleKind::Resync) => "resync",
            _ => "initial",
        };
        let tls = ClientTls::service(&self.cfg).map_err(|e| Status::internal(e.to_string()))?;
        let ch = ferry_mesh::connect(&self.cfg.endpoint(Component::StorageWriter), &tls)
            .await
            .map_err(|e| Status::unavailable(format!("storage-writer unreachable: {e}")))?;
        let point = StorageWriterClient::new(ch)
            .commit_point(CommitPointRequest {
                vm: c.vm.clone(),
                cycle_id: c.id.clone(),
                kind: kind.into(),
                consistency: c.consistency.clone(),
                disks,
                fencing_tokens: c.tokens.clone(),
                host: c.host.clone(),
            })
            .await?
            .into_inner()
            .point
            .ok_or_else(|| Status::internal("storage-writer committed no point"))?;
        c.state = "committed".into();
        self.save(&c).await?;
        for l in IngestService::leases(&c) {
            if let Err(e) = self.coord.release_lease(&l).await {
                tracing::warn!(disk = %l.resource, error = %e, "lease release failed; it will expire");
            }
        }
        tracing::info!(cycle = %c.id, vm = %c.vm, point = %point.id, "cycle committed");
        self.report_progress(&c).await;
        match self.registry().await {
            Ok(mut r) => {
                let res = r
                    .report_committed(ReportCommittedRequest {
                        vm: c.vm.clone(),
                        job_id: c.job_id.clone(),
                        point: Some(point.clone()),
                        cycle_duration_ms: (now_ms() - c.started_at_ms).max(0) as u64,
                        cycle_bytes: c.stats.plain_bytes_written + c.stats.bytes_skipped,
                    })
                    .await;
                if let Err(e) = res {
                    tracing::warn!(vm = %c.vm, error = %e, "registry did not take the commit report");
                }
            }
            Err(e) => {
                tracing::warn!(vm = %c.vm, error = %e, "registry unreachable for the commit report")
            }
        }
        Ok(Response::new(pb::CommitCycleResponse {
            point: Some(point),
        }))
    }

    async fn abort_cycle(&self, req: Request<pb::AbortCycleRequest>) -> R<pb::AbortCycleResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        let mut c = self.load(&req.cycle_id).await?;
        c.check_host(&host, "abort")?;
        c.state = "aborted".into();
        self.save(&c).await?;
        for l in IngestService::leases(&c) {
            let _ = self.coord.release_lease(&l).await;
        }
        tracing::info!(cycle = %c.id, vm = %c.vm, reason = %req.reason, "cycle aborted");
        Ok(Response::new(pb::AbortCycleResponse {}))
    }

    async fn report_landed(
        &self,
        req: Request<pb::ReportLandedRequest>,
    ) -> R<pb::ReportLandedResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        let c = {
            let _g = self.lock.lock().await;
            let mut c = self.load(&req.cycle_id).await?;
            c.check_host(&req.host_name, "report uploads into")?;
            c.stats.chunks_written += req.chunks_written;
            c.stats.bytes_written += req.bytes_written;
            c.stats.chunks_skipped += req.chunks_skipped;
            c.stats.bytes_skipped += req.bytes_skipped;
            c.stats.plain_bytes_written += req.plain_bytes_written;
            self.save(&c).await?;
            c
        };
        self.report_progress(&c).await;
        Ok(Response::new(pb::ReportLandedResponse {}))
    }

    async fn authorize_upload(
        &self,
        req: Request<pb::AuthorizeUploadRequest>,
    ) -> R<pb::AuthorizeUploadResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        let (allowed, reason) = match self.load(&req.cycle_id).await {
            Ok(c) => match c.check_host(&req.host_name, "upload into") {
                Err(s) => (false, s.message().to_string()),
                Ok(()) if c.state != "open" => (false, format!("cycle {} is {}", c.id, c.state)),
                Ok(()) => (true, String::new()),
            },
            Err(s) if s.code() == tonic::Code::NotFound => (false, s.message().to_string()),
            Err(s) => return Err(s),
        };
        Ok(Response::new(pb::AuthorizeUploadResponse {
            allowed,
            reason,
        }))
    }

    async fn get_cycle(&self, req: Request<pb::GetCycleRequest>) -> R<pb::Cycle> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let c = self.load(&req.into_inner().cycle_id).await?;
        Ok(Response::new(pb::Cycle {
            id: c.id,
            vm: c.vm,
            host_name: c.host,
            kind: c.kind,
            state: c.state,
            chunks_written: c.stats.chunks_written,
            bytes_written: c.stats.bytes_written,
            chunks_skipped: c.stats.chunks_skipped,
            bytes_skipped: c.stats.bytes_skipped,
            started_at_ms: c.started_at_ms,
        }))
    }
}
