//! The gRPC face of [`Writer`]: authorization for every call, then the plain handler, with
//! errors mapped through `ferry_mesh::to_status` only.
//!
//! The ingest service commits points with the service certificate; operators read with the
//! reader role and act with the operator role. Hosts may read points and block-hash lists
//! (keyed BLAKE3 ids, not data) for a checksum resync, of their own VMs and of the VMs they are
//! the recovery host of only: every host holds the vault key, so another host's block hashes
//! would let it confirm guessed content. `PointChunks` is the gateway's (service certificate):
//! it names the host it asks for, checked the same way, before the gateway serves any chunk.
use ferry_mesh::{Role, VmOwners, require_role, require_service, to_status};
use ferry_proto::common::v1::RecoveryPoint;
use ferry_proto::storage::v1::storage_writer_server::StorageWriter;
use ferry_proto::storage::v1::{
    BlockHashesChunk, BlockHashesRequest, CommitPointRequest, CommitPointResponse,
    DeletePointsRequest, DeletePointsResponse, GetPointRequest, HasChunksRequest,
    HasChunksResponse, ListPointsRequest, ListPointsResponse, MaterializeDiskRequest,
    MaterializeDiskResponse, PointChunksPage, PointChunksRequest, QuarantineChunksRequest,
    QuarantineChunksResponse, RunRetentionRequest, RunRetentionResponse,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::Writer;
use crate::error::WriterError;
use crate::point_chunks::{POINT_CHUNKS_PAGE, chunk_pages};
use crate::points::{HASH_PAGE_ENTRIES, hash_pages};

/// `ferry.storage.v1.StorageWriter` over a [`Writer`].
#[derive(Debug, Clone)]
pub struct StorageWriterService {
    writer: Writer,
    /// Which host each VM belongs to and fails over to: hosts read only those VMs' points.
    owners: VmOwners,
    /// Server shutdown: stops long calls (materialising) instead of waiting for them.
    shutdown: CancellationToken,
}

impl StorageWriterService {
    pub fn new(writer: Writer, owners: VmOwners, shutdown: CancellationToken) -> Self {
        Self {
            writer,
            owners,
            shutdown,
        }
    }

    /// Reader role, the service, the VM's own host (resync reads points and block hashes) or
    /// its recovery host (failover reads them too).
    async fn require_reader_or_host<T>(
        &self,
        req: &Request<T>,
        vm: &str,
        action: &str,
    ) -> Result<(), Status> {
        self.owners
            .require_role_or_reader(req, Role::Reader, vm, action)
            .await
    }
}

type HashStream = tokio_stream::Iter<std::vec::IntoIter<Result<BlockHashesChunk, Status>>>;
type ChunkStream = tokio_stream::Iter<std::vec::IntoIter<Result<PointChunksPage, Status>>>;

#[tonic::async_trait]
impl StorageWriter for StorageWriterService {
    async fn commit_point(
        &self,
        request: Request<CommitPointRequest>,
    ) -> Result<Response<CommitPointResponse>, Status> {
        require_service(&request)?;
        let req = request.get_ref();
        // A second fence behind ingest's: a cycle begun before a failover never commits.
        self.owners
            .check_epoch(&req.host, &req.vm, Some(req.epoch), "commit a point of")
            .await?;
        let point = self
            .writer
            .commit_point(request.into_inner())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(CommitPointResponse { point: Some(point) }))
    }

    async fn list_points(
        &self,
        request: Request<ListPointsRequest>,
    ) -> Result<Response<ListPointsResponse>, Status> {
        self.require_reader_or_host(&request, &request.get_ref().vm, "list the points of")
            .await?;
        let points = self
            .writer
            .list_points(&request.get_ref().vm)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ListPointsResponse { points }))
    }

    async fn get_point(
        &self,
        request: Request<GetPointRequest>,
    ) -> Result<Response<RecoveryPoint>, Status> {
        self.require_reader_or_host(&request, &request.get_ref().vm, "read a point of")
            .await?;
        let req = request.get_ref();
        let point = self
            .writer
            .get_point(&req.vm, &req.point)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(point))
    }

    async fn has_chunks(
        &self,
        request: Request<HasChunksRequest>,
    ) -> Result<Response<HasChunksResponse>, Status> {
        require_role(&request, Role::Reader)?;
        let present = self
            .writer
            .has_chunks(&request.get_ref().chunks)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(HasChunksResponse { present }))
    }

    type BlockHashesStream = HashStream;

    async fn block_hashes(
        &self,
        request: Request<BlockHashesRequest>,
    ) -> Result<Response<Self::BlockHashesStream>, Status> {
        self.require_reader_or_host(&request, &request.get_ref().vm, "read block hashes of")
            .await?;
        let mut map = self
            .writer
            .block_map(request.get_ref())
            .await
            .map_err(|e| to_status(&e))?;
        if request.get_ref().omit_lost {
            let lost = self
                .writer
                .store()
                .lost_chunks()
                .await
                .map_err(|e| to_status(&WriterError::from(e)))?;
            map.entries.retain(|_, id| !lost.contains(id));
        }
        let pages: Vec<Result<BlockHashesChunk, Status>> = hash_pages(&map, HASH_PAGE_ENTRIES)
            .into_iter()
            .map(Ok)
            .collect();
        Ok(Response::new(tokio_stream::iter(pages)))
    }

    async fn quarantine_chunks(
        &self,
        request: Request<QuarantineChunksRequest>,
    ) -> Result<Response<QuarantineChunksResponse>, Status> {
        require_service(&request)?;
        let req = request.into_inner();
        let ids = req
            .chunks
            .iter()
            .map(|c| {
                <ferry_store::ChunkId>::try_from(c.as_slice()).map_err(|_| {
                    WriterError::InvalidArgument(format!(
                        "a chunk id has {} bytes, not 32",
                        c.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| to_status(&e))?;
        let (quarantined, healthy) = self
            .writer
            .quarantine(&req.vm, &ids)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(QuarantineChunksResponse {
            quarantined: quarantined.iter().map(|c| c.to_vec()).collect(),
            healthy: healthy.iter().map(|c| c.to_vec()).collect(),
        }))
    }

    async fn materialize_disk(
        &self,
        request: Request<MaterializeDiskRequest>,
    ) -> Result<Response<MaterializeDiskResponse>, Status> {
        require_role(&request, Role::Operator)?;
        // A client that goes away drops this future; the writer thread then removes the
        // partial file. Server shutdown cancels explicitly.
        let resp = self
            .writer
            .materialize_disk(request.into_inner(), self.shutdown.child_token())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(resp))
    }

    async fn run_retention(
        &self,
        request: Request<RunRetentionRequest>,
    ) -> Result<Response<RunRetentionResponse>, Status> {
        require_role(&request, Role::Contributor)?;
        let req = request.into_inner();
        let policy = crate::retention::RetentionPolicy::from_seconds(
            req.retention_seconds,
            req.keep_all_seconds,
            req.thin_to_seconds,
        )
        .map_err(|e| to_status(&e))?;
        let grace = if req.gc_grace_seconds == 0 {
            crate::retention::DEFAULT_GC_GRACE
        } else {
            std::time::Duration::from_secs(req.gc_grace_seconds)
        };
        let out = self
            .writer
            .run_retention(&req.vm, policy, grace)
            .await
            .map_err(|e| ferry_mesh::to_status(&e))?;
        Ok(Response::new(RunRetentionResponse {
            points_pruned: out.points_pruned,
            chunks_collected: out.objects_collected,
            sweep_deferred: out.sweep_deferred,
        }))
    }

    type PointChunksStream = ChunkStream;

    async fn point_chunks(
        &self,
        request: Request<PointChunksRequest>,
    ) -> Result<Response<Self::PointChunksStream>, Status> {
        // The gateway asks on behalf of the host its QUIC peer proved to be.
        require_service(&request)?;
        let req = request.get_ref();
        if req.vm.is_empty() {
            return Err(Status::invalid_argument("vm is required"));
        }
        if req.host_name.is_empty() {
            return Err(Status::invalid_argument("host_name is required"));
        }
        self.owners
            .check_reader(&req.host_name, &req.vm, "read the chunks of")
            .await?;
        let ids = self
            .writer
            .point_chunks(&req.vm, &req.point)
            .await
            .map_err(|e| to_status(&e))?;
        let pages: Vec<Result<PointChunksPage, Status>> = chunk_pages(&ids, POINT_CHUNKS_PAGE)
            .into_iter()
            .map(Ok)
            .collect();
        Ok(Response::new(tokio_stream::iter(pages)))
    }

    async fn delete_points(
        &self,
        request: Request<DeletePointsRequest>,
    ) -> Result<Response<DeletePointsResponse>, Status> {
        // The registry's disable-protection job only: operators go through it.
        require_service(&request)?;
        let points_deleted = self
            .writer
            .delete_points(&request.get_ref().vm)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(DeletePointsResponse { points_deleted }))
    }
}
