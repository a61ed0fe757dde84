//! Ferry storage-writer: the object layout's gRPC face. Commits recovery points (fencing,
//! block maps, chunk checks), lists and reads them, answers chunk presence and block-hash
//! lists, the chunk ids of a point (which chunks the gateway may serve a recovery host), and
//! materialises a point's disk as an image file. In the background it merges
//! shipped change logs into block maps ([`merge`]).
//!
//! The handler logic lives on [`Writer`] as plain async methods (tests call them without
//! gRPC); [`service`] adds authorization and maps errors to statuses.

mod commit;
pub mod error;
mod keyring;
pub mod logs;
mod materialize;
pub mod merge;
mod point_chunks;
mod points;
mod quarantine;
pub mod retention;
pub mod service;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use ferry_coord::Coord;
use ferry_mesh::MeshConfig;
use ferry_proto::storage::v1::storage_writer_server::StorageWriterServer;
use ferry_store::{Store, VaultKey};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::WriterError;
pub use materialize::FETCH_AHEAD;
pub use point_chunks::{POINT_CHUNKS_PAGE, chunk_pages};
pub use points::{HASH_PAGE_ENTRIES, MAX_HAS_CHUNKS, hash_pages, point_to_proto};
pub use service::StorageWriterService;

/// Largest request accepted: a full map of a 1.5 TiB disk at 1 MiB blocks (40 bytes an entry).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The storage-writer's state: the object store, Redis (fencing) and the vault key. Cheap to
/// clone.
#[derive(Clone)]
pub struct Writer {
    store: Store,
    coord: Coord,
    key: keyring::Keyring,
    /// Commits hold it shared, the garbage sweep exclusively: a chunk a commit has verified
    /// cannot be swept before that commit's manifest lands. Merges hold it shared too.
    sweep_lock: Arc<tokio::sync::RwLock<()>>,
    /// The merge queue and the per-VM merge locks.
    merges: Arc<merge::Merges>,
    /// Where merges spool shipped logs (removed when each merge ends).
    spool_dir: Arc<PathBuf>,
    /// The folders `MaterializeDisk` may write into (none: every target refused).
    export_roots: Arc<Vec<PathBuf>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Writer {
    pub fn new(store: Store, coord: Coord, key: VaultKey) -> Self {
        Self {
            store,
            coord,
            key: keyring::Keyring::new(key),
            sweep_lock: Default::default(),
            merges: Default::default(),
            spool_dir: Arc::new(std::env::temp_dir()),
            export_roots: Arc::default(),
        }
    }

    /// Lets `MaterializeDisk` write files into folders under `roots` on this machine.
    pub fn with_export_roots(mut self, roots: Vec<PathBuf>) -> Self {
        self.export_roots = Arc::new(roots);
        self
    }

    /// Spools logs being merged under `dir` instead of the system's temporary directory.
    pub fn with_spool_dir(mut self, dir: PathBuf) -> Self {
        self.spool_dir = Arc::new(dir);
        self
    }

    /// Opens the store, Redis and the vault key named in the config.
    pub async fn from_config(cfg: &MeshConfig) -> anyhow::Result<Self> {
        let store = Store::from_url(&cfg.store_url()).context("opening the object store")?;
        let coord = Coord::connect_config(cfg)
            .await
            .context("connecting to redis")?;
        let key = VaultKey::from_bytes(cfg.data_key().context("reading the vault data key")?);
        let spool = cfg.data_dir.join("merge-spool");
        merge::clean_spool_dir(&spool);
        Ok(Self::new(store, coord, key)
            .with_spool_dir(spool)
            .with_export_roots(cfg.export_roots.clone()))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The keyring as it stands (merges seal with its newest key).
    pub(crate) fn key(&self) -> Arc<VaultKey> {
        self.key.get()
    }

    /// Keeps the keyring current with the registry's rotations until `shutdown`.
    pub fn watch_vault_keys(&self, cfg: &MeshConfig, shutdown: CancellationToken) {
        self.key.watch(cfg, shutdown);
    }
}

/// Serves `ferry.storage.v1.StorageWriter` (TLS, health, reflection, caller authentication) on
/// `listener` until `shutdown` is cancelled.
pub async fn run(
    cfg: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let writer = Writer::from_config(&cfg).await?;
    writer.watch_vault_keys(&cfg, shutdown.clone());
    let auth = ferry_mesh::component_authenticator(&cfg, shutdown.clone())
        .await
        .context("setting up authentication")?
        .with_audit(ferry_store::AuditWriter::open(
            &cfg.store_url(),
            &cfg.data_key()?,
        )?);
    let stop_merger = shutdown.child_token();
    let merger = writer.spawn_merger(stop_merger.clone());
    let owners = ferry_mesh::VmOwners::registry(&cfg).context("registry client")?;
    let svc = StorageWriterService::new(writer, owners, shutdown.clone());
    let server = StorageWriterServer::new(svc).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let served = ferry_mesh::serve_component(&cfg, listener, &auth, server, shutdown).await;
    // The merger stops with the server (also when serving failed).
    stop_merger.cancel();
    if let Err(e) = merger.await {
        tracing::warn!(error = %e, "merger task failed");
    }
    served?;
    Ok(())
}
