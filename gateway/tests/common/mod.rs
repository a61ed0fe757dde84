//! Test harness: a throwaway vault PKI (ferry-mesh's `VaultCa`), a real store in a tempdir,
//! real tonic Ingest and StorageWriter servers answering from test state, and the real
//! gateway on a UDP port of 127.0.0.1.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferry_gateway::client::ChunkId;
use ferry_gateway::client::{Offer, Uploader};
use ferry_gateway::frame::{self, Response};
use ferry_mesh::{CancellationToken, Identity, MeshConfig, ServerTls, VaultCa};
use ferry_proto::ingest::v1::ingest_server::{Ingest, IngestServer};
use ferry_proto::ingest::v1::*;
use ferry_proto::storage::v1 as storage;
use ferry_proto::storage::v1::storage_writer_server::{StorageWriter, StorageWriterServer};
use ferry_store::Store;
use tokio::task::JoinHandle;
use tonic::{Request, Response as GrpcResponse, Status};

pub const BLOCK: u32 = 64 * 1024;

/// Stands in for the replication-ingest service (which has its own tests): it knows which
/// host owns which cycle, answers AuthorizeUpload from that, and records ReportLanded calls.
#[derive(Default)]
pub struct TestIngest {
    cycles: Mutex<HashMap<String, String>>,
    pub reports: Mutex<Vec<ReportLandedRequest>>,
    pub authorize_calls: AtomicUsize,
}

impl TestIngest {
    pub fn open_cycle(&self, cycle: &str, host: &str) {
        self.cycles
            .lock()
            .unwrap()
            .insert(cycle.into(), host.into());
    }

    pub fn reports(&self) -> Vec<ReportLandedRequest> {
        self.reports.lock().unwrap().clone()
    }

    pub fn authorize_calls(&self) -> usize {
        self.authorize_calls.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Ingest for TestIngest {
    async fn begin_cycle(
        &self,
        _: Request<BeginCycleRequest>,
    ) -> Result<GrpcResponse<BeginCycleResponse>, Status> {
        Err(Status::unimplemented("not part of the gateway tests"))
    }
    async fn renew_cycle(
        &self,
        _: Request<RenewCycleRequest>,
    ) -> Result<GrpcResponse<RenewCycleResponse>, Status> {
        Err(Status::unimplemented("not part of the gateway tests"))
    }
    async fn commit_cycle(
        &self,
        _: Request<CommitCycleRequest>,
    ) -> Result<GrpcResponse<CommitCycleResponse>, Status> {
        Err(Status::unimplemented("not part of the gateway tests"))
    }
    async fn abort_cycle(
        &self,
        _: Request<AbortCycleRequest>,
    ) -> Result<GrpcResponse<AbortCycleResponse>, Status> {
        Err(Status::unimplemented("not part of the gateway tests"))
    }
    async fn get_cycle(&self, _: Request<GetCycleRequest>) -> Result<GrpcResponse<Cycle>, Status> {
        Err(Status::unimplemented("not part of the gateway tests"))
    }

    async fn report_landed(
        &self,
        req: Request<ReportLandedRequest>,
    ) -> Result<GrpcResponse<ReportLandedResponse>, Status> {
        self.reports.lock().unwrap().push(req.into_inner());
        Ok(GrpcResponse::new(ReportLandedResponse {}))
    }

    async fn authorize_upload(
        &self,
        req: Request<AuthorizeUploadRequest>,
    ) -> Result<GrpcResponse<AuthorizeUploadResponse>, Status> {
        self.authorize_calls.fetch_add(1, Ordering::SeqCst);
        let req = req.into_inner();
        let owner = self.cycles.lock().unwrap().get(&req.cycle_id).cloned();
        match owner {
            None => Err(Status::not_found(format!(
                "cycle {} not found",
                req.cycle_id
            ))),
            Some(owner) if owner == req.host_name => {
                Ok(GrpcResponse::new(AuthorizeUploadResponse {
                    allowed: true,
                    reason: String::new(),
                }))
            }
            Some(_) => Ok(GrpcResponse::new(AuthorizeUploadResponse {
                allowed: false,
                reason: format!("cycle {} belongs to another host", req.cycle_id),
            })),
        }
    }
}

/// Stands in for storage-writer's `PointChunks` (which has its own tests): which hosts may
/// read which VM, and the chunk ids of each (vm, point). Refuses callers other than the
/// service certificate, as the real one does, and records every call.
#[derive(Default)]
pub struct TestStorage {
    readers: Mutex<HashMap<String, Vec<String>>>,
    points: Mutex<HashMap<(String, String), Vec<ChunkId>>>,
    pub calls: Mutex<Vec<storage::PointChunksRequest>>,
}

impl TestStorage {
    /// `hosts` may read `vm` (its host and its recovery host).
    pub fn readers(&self, vm: &str, hosts: &[&str]) {
        let hosts = hosts.iter().map(|h| h.to_string()).collect();
        self.readers.lock().unwrap().insert(vm.into(), hosts);
    }

    /// The point `point` of `vm` references `ids` (replacing what it referenced).
    pub fn point(&self, vm: &str, point: &str, ids: &[ChunkId]) {
        let key = (vm.to_string(), point.to_string());
        self.points.lock().unwrap().insert(key, ids.to_vec());
    }

    pub fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

fn not_for_the_gateway<T>() -> Result<GrpcResponse<T>, Status> {
    Err(Status::unimplemented("not part of the gateway tests"))
}

type Pages = futures::stream::Iter<std::vec::IntoIter<Result<storage::PointChunksPage, Status>>>;
type Hashes = futures::stream::Iter<std::vec::IntoIter<Result<storage::BlockHashesChunk, Status>>>;

#[tonic::async_trait]
impl StorageWriter for TestStorage {
    async fn commit_point(
        &self,
        _: Request<storage::CommitPointRequest>,
    ) -> Result<GrpcResponse<storage::CommitPointResponse>, Status> {
        not_for_the_gateway()
    }
    async fn list_points(
        &self,
        _: Request<storage::ListPointsRequest>,
    ) -> Result<GrpcResponse<storage::ListPointsResponse>, Status> {
        not_for_the_gateway()
    }
    async fn get_point(
        &self,
        _: Request<storage::GetPointRequest>,
    ) -> Result<GrpcResponse<ferry_proto::common::v1::RecoveryPoint>, Status> {
        not_for_the_gateway()
    }
    async fn has_chunks(
        &self,
        _: Request<storage::HasChunksRequest>,
    ) -> Result<GrpcResponse<storage::HasChunksResponse>, Status> {
        not_for_the_gateway()
    }
    type BlockHashesStream = Hashes;
    async fn block_hashes(
        &self,
        _: Request<storage::BlockHashesRequest>,
    ) -> Result<GrpcResponse<Hashes>, Status> {
        not_for_the_gateway()
    }
    async fn materialize_disk(
        &self,
        _: Request<storage::MaterializeDiskRequest>,
    ) -> Result<GrpcResponse<storage::MaterializeDiskResponse>, Status> {
        not_for_the_gateway()
    }
    async fn run_retention(
        &self,
        _: Request<storage::RunRetentionRequest>,
    ) -> Result<GrpcResponse<storage::RunRetentionResponse>, Status> {
        not_for_the_gateway()
    }
    async fn delete_points(
        &self,
        _: Request<storage::DeletePointsRequest>,
    ) -> Result<GrpcResponse<storage::DeletePointsResponse>, Status> {
        not_for_the_gateway()
    }
    async fn quarantine_chunks(
        &self,
        _: Request<storage::QuarantineChunksRequest>,
    ) -> Result<GrpcResponse<storage::QuarantineChunksResponse>, Status> {
        not_for_the_gateway()
    }

    type PointChunksStream = Pages;
    async fn point_chunks(
        &self,
        req: Request<storage::PointChunksRequest>,
    ) -> Result<GrpcResponse<Pages>, Status> {
        let auth = ferry_mesh::Authenticator::new(Vec::<(String, ferry_mesh::Role)>::new());
        match auth.authenticate(&req)? {
            ferry_mesh::Caller::Service(_) => {}
            other => {
                return Err(Status::permission_denied(format!(
                    "only ferry services may make this call, not {other}"
                )));
            }
        }
        let req = req.into_inner();
        self.calls.lock().unwrap().push(req.clone());
        let readers = self.readers.lock().unwrap().get(&req.vm).cloned();
        match readers {
            Some(hosts) if hosts.contains(&req.host_name) => {}
            _ => {
                return Err(Status::permission_denied(format!(
                    "host {} may not read the chunks of vm {}",
                    req.host_name, req.vm
                )));
            }
        }
        let key = (req.vm.clone(), req.point.clone());
        let Some(ids) = self.points.lock().unwrap().get(&key).cloned() else {
            return Err(Status::not_found(format!(
                "recovery point {:?} of vm {} not found",
                req.point, req.vm
            )));
        };
        // Small pages, so the gateway's reading of several pages is exercised.
        let pages: Vec<_> = ids
            .chunks(3)
            .map(|c| {
                Ok(storage::PointChunksPage {
                    chunk_ids: c.iter().map(|id| id.to_vec()).collect(),
                })
            })
            .collect();
        Ok(GrpcResponse::new(futures::stream::iter(pages)))
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub ca: VaultCa,
    pub cfg: MeshConfig,
    pub ingest: Arc<TestIngest>,
    pub storage: Arc<TestStorage>,
    pub store: Store,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub gateway: JoinHandle<anyhow::Result<()>>,
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

impl Harness {
    /// Gateway and ingest both running.
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    /// With `ingest_up == false` the gateway's ingest and storage-writer endpoints are
    /// closed ports.
    pub async fn start_with(ingest_up: bool) -> Self {
        Self::start_opts(ingest_up, BLOCK).await
    }

    pub async fn start_opts(ingest_up: bool, block_size: u32) -> Self {
        Self::start_full(ingest_up, block_size, None).await
    }

    /// The gateway over `store` (e.g. an `UnreliableStore`) instead of the tempdir's.
    pub async fn start_with_store(store: Store) -> Self {
        Self::start_full(true, BLOCK, Some(store)).await
    }

    async fn start_full(ingest_up: bool, block_size: u32, store: Option<Store>) -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let ca = VaultCa::create("test").unwrap();
        let (server_cert, server_key) = ca.issue_server(&[]).unwrap();
        let (service_cert, service_key) =
            ca.issue_client(&Identity::Service("ferry".into())).unwrap();
        let d = dir.path();
        let mut cfg = MeshConfig {
            data_dir: d.to_path_buf(),
            store_url: format!("file://{}/store?fsync=false", d.display()),
            ..MeshConfig::default()
        };
        cfg.tls.ca_cert = write(d, "ca.pem", &ca.cert_pem());
        cfg.tls.ca_key = None;
        cfg.tls.server_cert = write(d, "server.pem", &server_cert);
        cfg.tls.server_key = write(d, "server.key", &server_key);
        cfg.tls.service_cert = write(d, "service.pem", &service_cert);
        cfg.tls.service_key = write(d, "service.key", &service_key);
        cfg.vault.block_size = block_size;
        // The gateway keys its audit trail with the vault data key (a test key, hex).
        cfg.vault.data_key_file = write(d, "data.key", &"a5".repeat(32));

        let shutdown = CancellationToken::new();
        let ingest = Arc::new(TestIngest::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        cfg.ingest.listen = listener.local_addr().unwrap();
        if ingest_up {
            let tls = ServerTls::from_pem(&ca.cert_pem(), &server_cert, &server_key).unwrap();
            let routes = tonic::service::Routes::new(IngestServer::from_arc(ingest.clone()));
            let token = shutdown.clone();
            tokio::spawn(async move {
                ferry_mesh::serve(listener, &tls, routes, &["ferry.ingest.v1.Ingest"], token)
                    .await
                    .unwrap();
            });
        } else {
            drop(listener);
        }
        let storage = Arc::new(TestStorage::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        cfg.storage_writer.listen = listener.local_addr().unwrap();
        if ingest_up {
            let tls = ServerTls::from_pem(&ca.cert_pem(), &server_cert, &server_key).unwrap();
            let routes =
                tonic::service::Routes::new(StorageWriterServer::from_arc(storage.clone()));
            let token = shutdown.clone();
            let names = ["ferry.storage.v1.StorageWriter"];
            tokio::spawn(async move {
                ferry_mesh::serve(listener, &tls, routes, &names, token)
                    .await
                    .unwrap();
            });
        } else {
            drop(listener);
        }

        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        cfg.gateway.listen = addr;
        let (store, gateway) = match store {
            Some(store) => {
                let run = ferry_gateway::run_with_store(
                    cfg.clone(),
                    store.clone(),
                    socket,
                    shutdown.clone(),
                );
                (store, tokio::spawn(run))
            }
            None => {
                let run = ferry_gateway::run(cfg.clone(), socket, shutdown.clone());
                (Store::from_url(&cfg.store_url).unwrap(), tokio::spawn(run))
            }
        };
        Self {
            dir,
            ca,
            cfg,
            ingest,
            storage,
            store,
            addr,
            shutdown,
            gateway,
        }
    }

    /// A QUIC client config for a host certificate of this vault.
    pub fn client_config(&self, identity: Identity) -> quinn::ClientConfig {
        let (cert, key) = self.ca.issue_client(&identity).unwrap();
        ferry_mesh::quic_client_config(&self.ca.cert_pem(), &cert, &key).unwrap()
    }

    pub async fn uploader(&self, host: &str) -> Uploader {
        Uploader::connect(self.addr, self.client_config(Identity::Host(host.into())))
            .await
            .unwrap()
    }

    /// A bare quinn connection as `host`, for sending hand-made frames.
    pub async fn raw(&self, host: &str) -> quinn::Connection {
        self.raw_with_addr(host).await.0
    }

    /// Like [`Harness::raw`], also returning the client's own address (as the gateway sees it).
    pub async fn raw_with_addr(&self, host: &str) -> (quinn::Connection, SocketAddr) {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(self.client_config(Identity::Host(host.into())));
        let conn = endpoint
            .connect(self.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        (conn, endpoint.local_addr().unwrap())
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.gateway.await.unwrap().unwrap();
    }
}

/// `n` chunks with distinct random-looking content; returns offers and sealed bytes (the
/// gateway never opens sealed bytes, so any bytes stand in for them here).
pub fn chunks(n: usize, seed: u8) -> (Vec<Offer>, Vec<Bytes>) {
    let mut offers = Vec::new();
    let mut sealed = Vec::new();
    for i in 0..n {
        let len = 1000 + (i * 7919 + usize::from(seed) * 131) % (BLOCK as usize - 1000);
        let data = xof(&[seed, i as u8, (i >> 8) as u8], len);
        offers.push(Offer {
            id: *blake3::hash(&data).as_bytes(),
            plain_len: len as u32 + 100,
        });
        sealed.push(Bytes::from(data));
    }
    (offers, sealed)
}

/// `n` pseudo-random bytes derived from `seed`.
pub fn xof(seed: &[u8], n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    blake3::Hasher::new()
        .update(seed)
        .finalize_xof()
        .fill(&mut v);
    v
}

/// What came back on a raw stream.
#[derive(Debug)]
pub enum Outcome {
    Frame(Response),
    Reset(u64),
    Failed(String),
}

/// Reads the next response frame from a raw stream.
pub async fn read_outcome(recv: &mut quinn::RecvStream, offered: usize) -> Outcome {
    let read = frame::read_response(recv, offered);
    match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
        Err(_) => Outcome::Failed("timed out".into()),
        Ok(Ok(r)) => Outcome::Frame(r),
        Ok(Err(frame::FrameError::Io(e))) => match e.downcast::<quinn::ReadError>() {
            Ok(quinn::ReadError::Reset(code)) => Outcome::Reset(code.into_inner()),
            Ok(other) => Outcome::Failed(other.to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        },
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
    }
}

/// Sends `bytes` on a new stream, finishes it, and reads the answer.
pub async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Outcome {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The gateway may stop the stream before all is written; the answer tells why.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    read_outcome(&mut recv, 0).await
}

/// Asserts `outcome` is an ERROR frame with `code` whose message contains `needle`.
pub fn assert_error(outcome: &Outcome, code: frame::ErrorCode, needle: &str) {
    match outcome {
        Outcome::Frame(Response::Error(e)) => {
            assert_eq!(e.code, code.as_u32(), "wrong code in {e:?}");
            assert!(
                e.message.contains(needle),
                "{needle:?} not in {:?}",
                e.message
            );
        }
        other => panic!("expected an error frame with code {code:?}, got {other:?}"),
    }
}

/// The payload section for `sealed`, as the protocol frames it.
pub fn payloads(sealed: &[Bytes]) -> Vec<u8> {
    let mut buf = Vec::new();
    for s in sealed {
        buf.extend_from_slice(&frame::encode_payload_len(s.len() as u32));
        buf.extend_from_slice(s);
        buf.extend_from_slice(&frame::payload_hash(s));
    }
    buf
}

thread_local! {
    static LOG_SINK: std::cell::RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { std::cell::RefCell::new(None) };
}

/// Installs one global subscriber for the test binary that writes each event into the
/// capture buffer of the thread it happens on, if any. A global subscriber installed before
/// any gateway code runs avoids tracing's callsite-interest caching, which makes per-thread
/// `set_default` subscribers miss events when tests run in parallel.
pub fn init_logs() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(|| ThreadSink)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

/// Captures the log lines of everything that runs on this thread (the tests use tokio's
/// current-thread runtime, so the gateway's tasks do) until the guard is dropped.
pub fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, CaptureGuard) {
    init_logs();
    let buf = Arc::new(Mutex::new(Vec::new()));
    LOG_SINK.with(|s| *s.borrow_mut() = Some(buf.clone()));
    (buf, CaptureGuard)
}

pub struct CaptureGuard;

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        LOG_SINK.with(|s| *s.borrow_mut() = None);
    }
}

struct ThreadSink;

impl std::io::Write for ThreadSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        LOG_SINK.with(|s| {
            if let Some(buf) = &*s.borrow() {
                buf.lock().unwrap().extend_from_slice(data);
            }
        });
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The `warn` lines captured so far.
pub fn warnings(buf: &Mutex<Vec<u8>>) -> Vec<String> {
    let text = String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    text.lines()
        .filter(|l| l.contains(" WARN "))
        .map(str::to_owned)
        .collect()
}
