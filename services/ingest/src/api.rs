//! The gRPC face of ingest: `ferry.ingest.v1.Ingest`.
use std::sync::Arc;

use ferry_coord::Lease;
use ferry_mesh::{Component, Role};
use ferry_model::{Consistency, CycleKind, DiskSpec};
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::ingest::v1::{self as pb, ingest_server::Ingest};
use ferry_proto::now_ms;
use ferry_proto::storage::v1::{
    BlockEntry, CommitDisk, CommitPointRequest, storage_writer_client::StorageWriterClient,
};
use tonic::{Request, Response, Status};

use crate::cycle::{CycleRecord, CycleState, Stats};
use crate::error::IngestError;
use crate::{IngestService, LEASE_TTL};

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
            return Err(IngestError::PermissionDenied(format!(
                "host {host} cannot begin a cycle for host {}",
                req.host_name
            ))
            .into());
        }
        if req.disks.is_empty() {
            return Err(IngestError::InvalidArgument(format!(
                "cycle for vm {} names no disks",
                req.vm
            ))
            .into());
        }
        let kind = CycleKind::try_from(req.kind).map_err(|e| {
            IngestError::InvalidArgument(format!("cycle for vm {}: kind: {e}", req.vm))
        })?;
        // A host that does not say is crash-consistent, as before the enum.
        let consistency = match req.consistency {
            0 => Consistency::Crash,
            v => Consistency::try_from(v).map_err(|e| {
                IngestError::InvalidArgument(format!("cycle for vm {}: consistency: {e}", req.vm))
            })?,
        };
        // A point carries a group cut only when the cut went ahead with this VM paused in it.
        if !req.cut_id.is_empty()
            && !self
                .coord
                .cut_went_ahead_with(&req.cut_id, &req.vm)
                .await
                .map_err(IngestError::from)?
        {
            return Err(IngestError::FailedPrecondition(format!(
                "cycle for vm {}: group cut {} did not go ahead with this vm",
                req.vm, req.cut_id
            ))
            .into());
        }
        // A VM that failed over replicates from nowhere but its new site: the epoch the
        // cycle begins under is checked again at commit (and by storage-writer).
        let epoch = self
            .owners
            .check_epoch(&host, &req.vm, None, "begin a replication cycle of")
            .await?;
        // Answered from the lookup check_epoch just made.
        let hosts = self.owners.hosts(&req.vm).await?.unwrap_or_default();
        for d in &req.disks {
            let expected = ferry_proto::disk_id(&req.vm, &d.path);
            // A re-protected VM's disks keep the ids of its points at their new paths.
            let registered = hosts
                .disks
                .iter()
                .any(|(id, p)| *id == d.id && *p == d.path);
            if d.id != expected && !registered {
                return Err(IngestError::InvalidArgument(format!(
                    "disk {} of vm {} has id {}, expected {expected}",
                    d.path, req.vm, d.id
                ))
                .into());
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
                    return Err(IngestError::from(e).into());
                }
            }
        }
        let c = CycleRecord {
            id: uuid::Uuid::new_v4().to_string(),
            vm: req.vm.clone(),
            host: host.clone(),
            kind,
            job_id: req.job_id.clone(),
            consistency,
            state: CycleState::Open,
            started_at_ms: now_ms(),
            tokens: leases
                .iter()
                .map(|l| (l.resource.clone(), l.token))
                .collect(),
            disks: req.disks.iter().map(DiskSpec::from).collect(),
            stats: Stats::default(),
            epoch,
            base_point: hosts.base_point.clone(),
            cut_id: req.cut_id.clone(),
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
                .map_err(IngestError::from)?;
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
        if c.state != CycleState::Open {
            return Err(
                IngestError::FailedPrecondition(format!("cycle {} is {}", c.id, c.state)).into(),
            );
        }
        self.owners
            .check_epoch(&host, &c.vm, Some(c.epoch), "commit a cycle of")
            .await?;
        let disks = self.commit_disks(&c, &req)?;
        let point = self.commit_point(&c, disks).await?;
        c.state = CycleState::Committed;
        self.save(&c).await?;
        for l in IngestService::leases(&c) {
            if let Err(e) = self.coord.release_lease(&l).await {
                tracing::warn!(disk = %l.resource, error = %e, "lease release failed; it will expire");
            }
        }
        tracing::info!(cycle = %c.id, vm = %c.vm, point = %point.id, "cycle committed");
        self.report_progress(&c).await;
        self.report_committed(&c, &point).await;
        Ok(Response::new(pb::CommitCycleResponse {
            point: Some(point),
        }))
    }

    async fn abort_cycle(&self, req: Request<pb::AbortCycleRequest>) -> R<pb::AbortCycleResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        let mut c = self.load(&req.cycle_id).await?;
        c.check_host(&host, "abort")?;
        c.state = CycleState::Aborted;
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
                Err(e) => (false, e.to_string()),
                Ok(()) if c.state != CycleState::Open => {
                    (false, format!("cycle {} is {}", c.id, c.state))
                }
                Ok(()) => (true, String::new()),
            },
            Err(e) => return Err(e.into()),
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
            kind: c.kind.into(),
            state: c.state.to_string(),
            chunks_written: c.stats.chunks_written,
            bytes_written: c.stats.bytes_written,
            chunks_skipped: c.stats.chunks_skipped,
            bytes_skipped: c.stats.bytes_skipped,
            started_at_ms: c.started_at_ms,
        }))
    }
}

impl IngestService {
    /// The disks of a commit: every fencing token of the cycle presented, and a block map
    /// for each of its disks.
    fn commit_disks(
        &self,
        c: &CycleRecord,
        req: &pb::CommitCycleRequest,
    ) -> Result<Vec<CommitDisk>, IngestError> {
        for (disk, token) in &c.tokens {
            match req.fencing_tokens.get(disk) {
                Some(t) if t == token => {}
                other => {
                    return Err(IngestError::Aborted(format!(
                        "stale fencing token for disk {disk}: presented {other:?}, cycle holds {token}"
                    )));
                }
            }
        }
        let full = c.kind != CycleKind::Delta;
        let mut disks = Vec::new();
        for d in &c.disks {
            let map = req
                .disks
                .iter()
                .find(|m| m.disk_id == d.id)
                .ok_or_else(|| {
                    IngestError::InvalidArgument(format!(
                        "commit of cycle {} lacks the block map of disk {}",
                        c.id, d.id
                    ))
                })?;
            disks.push(CommitDisk {
                disk: Some(d.into()),
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
        Ok(disks)
    }

    /// Has the storage-writer commit the cycle's point (it re-checks the fencing tokens).
    async fn commit_point(
        &self,
        c: &CycleRecord,
        disks: Vec<CommitDisk>,
    ) -> Result<RecoveryPoint, IngestError> {
        let ch = self
            .peers
            .channel(Component::StorageWriter)
            .map_err(|e| IngestError::Internal(e.to_string()))?;
        StorageWriterClient::new(ch)
            .commit_point(CommitPointRequest {
                vm: c.vm.clone(),
                cycle_id: c.id.clone(),
                kind: c.kind.into(),
                consistency: c.consistency.into(),
                disks,
                fencing_tokens: c.tokens.clone(),
                host: c.host.clone(),
                epoch: c.epoch,
                base_point: c.base_point.clone(),
                cut_id: c.cut_id.clone(),
            })
            .await
            .map_err(|s| IngestError::peer(&s))?
            .into_inner()
            .point
            .ok_or_else(|| IngestError::Internal("storage-writer committed no point".into()))
    }
}
