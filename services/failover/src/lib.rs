//! Ferry failover orchestrator. Test failover (an isolated copy of a VM's disks at a recovery
//! point, written by the storage-writer, plus a VM description) and its cleanup, each as a
//! registry job; failover records in the catalog. Planned/unplanned failover, commit,
//! failback, re-protect and recovery plans come later and answer UNIMPLEMENTED for now.
//!
//! The logic lives on [`Orchestrator`] as plain async methods; [`service`] adds authorization
//! and maps errors to statuses.

pub mod error;
mod job;
pub mod records;
pub mod service;
mod test_failover;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use ferry_mesh::{Authenticator, ClientTls, Component, MeshConfig, ServerTls};
use ferry_proto::failover::v1::failover_server::FailoverServer;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_proto::storage::v1::storage_writer_client::StorageWriterClient;
use ferry_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use error::FailoverError;
pub use records::{Ledger, Record};
pub use service::FailoverService;
pub use test_failover::{CLEANUP_STEPS, TEST_FAILOVER_STEPS, disk_file_name};

/// The gRPC service name, as health and reflection list it.
pub const SERVICE_NAME: &str = "ferry.failover.v1.Failover";

/// The orchestrator's state: clients of the registry and the storage-writer (service
/// certificate), and the failover records. Cheap to clone.
#[derive(Clone)]
pub struct Orchestrator {
    registry: RegistryClient<Channel>,
    storage: StorageWriterClient<Channel>,
    ledger: Arc<Ledger>,
    /// VMs with a failover operation running in this process.
    busy: Arc<Mutex<HashSet<String>>>,
    /// Server shutdown: running jobs stop, clean up and end as failed instead of being cut
    /// off while the registry still shows them running.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").finish_non_exhaustive()
    }
}

/// Releases a VM claimed by [`Orchestrator::claim`].
struct Claim {
    busy: Arc<Mutex<HashSet<String>>>,
    vm: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(&self.vm);
        }
    }
}

impl Orchestrator {
    /// An orchestrator over channels to the registry and the storage-writer (authenticated
    /// with the service certificate) and the object store holding the catalog.
    pub fn new(registry: Channel, storage: Channel, store: Store) -> Self {
        Self {
            registry: RegistryClient::new(registry),
            storage: StorageWriterClient::new(storage),
            ledger: Arc::new(Ledger::new(store)),
            busy: Arc::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Stops running jobs when `shutdown` is cancelled.
    pub fn with_shutdown(mut self, shutdown: CancellationToken) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Connects (lazily: peers may start later) to the peers named in the config.
    pub fn from_config(cfg: &MeshConfig) -> anyhow::Result<Self> {
        let tls = ClientTls::service(cfg).context("loading the service certificate")?;
        let registry = ferry_mesh::connect_lazy(&cfg.endpoint(Component::Registry), &tls)?;
        let storage = ferry_mesh::connect_lazy(&cfg.endpoint(Component::StorageWriter), &tls)?;
        let store = Store::from_url(&cfg.store_url()).context("opening the object store")?;
        Ok(Self::new(registry, storage, store))
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Every failover record in its latest state, oldest first.
    pub async fn list_failovers(&self) -> error::Result<Vec<Record>> {
        self.ledger.records().await
    }

    /// One failover operation per VM at a time in this process; the catalog state catches
    /// the rest (an active test failover refuses another).
    fn claim(&self, vm: &str) -> error::Result<Claim> {
        let mut busy = self
            .busy
            .lock()
            .map_err(|_| FailoverError::Internal("failover lock poisoned".into()))?;
        if !busy.insert(vm.to_owned()) {
            return Err(FailoverError::FailedPrecondition(format!(
                "a failover operation for vm {vm} is already running"
            )));
        }
        Ok(Claim {
            busy: self.busy.clone(),
            vm: vm.to_owned(),
        })
    }
}

/// Serves `ferry.failover.v1.Failover` (TLS, health, reflection, caller authentication) on
/// `listener` until `shutdown` is cancelled.
pub async fn run(
    cfg: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let orchestrator = Orchestrator::from_config(&cfg)?.with_shutdown(shutdown.clone());
    let tls = ServerTls::load(&cfg).context("loading the server certificate")?;
    let auth =
        Authenticator::with_admin_token(&cfg.admin_token().context("reading the admin token")?);
    let server =
        FailoverServer::with_interceptor(FailoverService::new(orchestrator), auth.interceptor());
    let routes = tonic::service::Routes::new(server);
    ferry_mesh::serve(listener, &tls, routes, &[SERVICE_NAME], shutdown).await?;
    Ok(())
}
