//! The host's vault keyring: key 0 from its registration, and the keys `ferry vault
//! rotate-key` added, fetched over mutual TLS (`Registry.GetVaultKeys`) when a heartbeat
//! names a newer key or a fetched chunk was sealed with one. Held in memory only: a restarted
//! host fetches them again with its first heartbeat.
use bytes::Bytes;
use ferry_mesh::Component;
use ferry_proto::registry::v1::{GetVaultKeysRequest, registry_client::RegistryClient};
use ferry_store::VaultKey;

use crate::Agent;

impl Agent {
    /// The keyring as it stands: new chunks are sealed with its newest key.
    pub(crate) fn vault_key(&self) -> VaultKey {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fetches the keys when the registry's newest (`newest`, from a heartbeat) is not held.
    pub(crate) async fn learn_vault_key(&self, newest: u32) {
        if newest > u32::from(self.vault_key().key_id()) {
            self.refresh_vault_keys().await;
        }
    }

    /// The keyring, fetched again first when one of `sealed` names a key it lacks.
    pub(crate) async fn vault_key_for(&self, sealed: &[Bytes]) -> VaultKey {
        let key = self.vault_key();
        let needed = sealed
            .iter()
            .filter_map(|s| ferry_store::sealed_key_id(s))
            .max();
        if needed.is_some_and(|n| n > key.key_id()) {
            self.refresh_vault_keys().await;
            return self.vault_key();
        }
        key
    }

    /// Rebuilds the keyring from key 0 and the registry's rotated keys; on failure the one
    /// held stays (a chunk it cannot open says which key it lacks).
    async fn refresh_vault_keys(&self) {
        let fetched = async {
            let ch = self.peers.channel(Component::Registry)?;
            let r = RegistryClient::new(ch)
                .get_vault_keys(GetVaultKeysRequest {})
                .await?
                .into_inner();
            let keys = r.keys.iter().map(|k| (k.key_id, k.key.as_slice()));
            anyhow::Ok(self.creds.vault_key.with_keys(keys)?)
        }
        .await;
        match fetched {
            Ok(ring) => {
                let id = ring.key_id();
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = ring;
                tracing::info!(
                    key_id = id,
                    "vault keys fetched; new chunks are sealed with the newest"
                );
            }
            Err(e) => tracing::warn!(error = %e, "fetching the vault keys failed"),
        }
    }
}
