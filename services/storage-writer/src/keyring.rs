//! The storage-writer's vault keyring: key 0 from the data key file, and the keys
//! `ferry vault rotate-key` added, polled from the registry (`GetVaultKeys`, service
//! certificate) every [`KEY_POLL`]. Merges seal with the newest; every key opens its chunks.
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_mesh::{Component, MeshConfig, Peers};
use ferry_proto::registry::v1::{GetVaultKeysRequest, registry_client::RegistryClient};
use ferry_store::VaultKey;
use tokio_util::sync::CancellationToken;

/// How often the keys are read: a rotation reaches merges within about this long.
pub const KEY_POLL: Duration = Duration::from_secs(2);

/// The keyring, shared by every clone of the writer.
#[derive(Clone)]
pub(crate) struct Keyring(Arc<RwLock<Arc<VaultKey>>>);

impl Keyring {
    pub(crate) fn new(key: VaultKey) -> Self {
        Keyring(Arc::new(RwLock::new(Arc::new(key))))
    }

    pub(crate) fn get(&self) -> Arc<VaultKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, key: VaultKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }

    /// Polls the registry until `shutdown`; a failed read keeps the keys held.
    pub(crate) fn watch(&self, cfg: &MeshConfig, shutdown: CancellationToken) {
        let peers = match Peers::service(cfg) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "the vault keys cannot be read: merges seal with key 0");
                return;
            }
        };
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match me.refresh(&peers).await {
                    Ok(Some(id)) => {
                        tracing::info!(key_id = id, "vault keys read; merges seal with the newest")
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the vault keys failed; keeping those held")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(KEY_POLL) => {}
                }
            }
        });
    }

    /// Reads the keys once; the newest id when it changed.
    async fn refresh(&self, peers: &Peers) -> anyhow::Result<Option<u16>> {
        let r = RegistryClient::new(peers.channel(Component::Registry)?)
            .get_vault_keys(GetVaultKeysRequest {})
            .await?
            .into_inner();
        let held = self.get();
        if u32::from(held.key_id()) == r.current_key_id {
            return Ok(None);
        }
        let ring = VaultKey::from_bytes(held.to_bytes())
            .with_keys(r.keys.iter().map(|k| (k.key_id, k.key.as_slice())))?;
        let id = ring.key_id();
        self.set(ring);
        Ok(Some(id))
    }
}
