//! Vault key rotation (`ferry vault rotate-key`): each rotation adds a random 32-byte key,
//! kept in the catalog wrapped under key 0 (the vault's data key file). Hosts and the
//! storage-writer fetch the keys over mutual TLS and seal new chunks with the newest; old
//! chunks keep the id of the key that sealed them and are never rewritten.
use ferry_mesh::{Caller, Role};
use ferry_proto::now_ms;
use ferry_proto::registry::v1 as pb;
use tonic::{Request, Response, Status};

use super::{R, RegistryService};
use crate::error::RegistryError;
use crate::state::{Event, State, VaultKeyRecord};

impl RegistryService {
    pub(super) async fn rotate_vault_key(
        &self,
        req: Request<pb::RotateVaultKeyRequest>,
    ) -> R<pb::VaultKeyInfo> {
        ferry_mesh::require_role(&req, Role::Admin)?;
        let first = self.vault_key.clone();
        let key = rand::random::<[u8; 32]>();
        let rec = self
            .persist_checked(move |st| {
                let id = newest(st).checked_add(1).ok_or_else(|| {
                    RegistryError::FailedPrecondition(format!(
                        "the vault holds {} keys, the most a key id can name",
                        u16::MAX
                    ))
                })?;
                let rec = VaultKeyRecord {
                    key_id: id,
                    wrapped: hex::encode(first.wrap_key(id, &key)),
                    created_at_ms: now_ms(),
                };
                Ok((vec![Event::VaultKeyAdded(rec.clone())], rec))
            })
            .await?;
        tracing::info!(key_id = rec.key_id, "vault key rotated");
        Ok(Response::new(info(rec.key_id, rec.created_at_ms, true)))
    }

    pub(super) async fn list_vault_keys(
        &self,
        req: Request<pb::ListVaultKeysRequest>,
    ) -> R<pb::ListVaultKeysResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let st = self.state.lock().await;
        let current = newest(&st);
        // Key 0's time is not recorded: it is as old as the vault.
        let mut keys = vec![info(0, 0, current == 0)];
        keys.extend(
            st.vault_keys
                .values()
                .map(|k| info(k.key_id, k.created_at_ms, k.key_id == current)),
        );
        Ok(Response::new(pb::ListVaultKeysResponse { keys }))
    }

    pub(super) async fn get_vault_keys(
        &self,
        req: Request<pb::GetVaultKeysRequest>,
    ) -> R<pb::GetVaultKeysResponse> {
        match ferry_mesh::caller(&req) {
            Caller::Host(_) | Caller::Service(_) => {}
            Caller::Anonymous => {
                return Err(Status::unauthenticated(
                    "the vault keys go to host or service certificates only",
                ));
            }
            other => {
                return Err(Status::permission_denied(format!(
                    "the vault keys go to host or service certificates only, not {other}"
                )));
            }
        }
        let first = &self.vault_key;
        let st = self.state.lock().await;
        let keys = st
            .vault_keys
            .values()
            .map(|k| {
                let wrapped = hex::decode(&k.wrapped).map_err(|e| {
                    RegistryError::Internal(format!("vault key {} in the catalog: {e}", k.key_id))
                })?;
                Ok(pb::VaultKeyMaterial {
                    key_id: u32::from(k.key_id),
                    key: first
                        .unwrap_key(k.key_id, &wrapped)
                        .map_err(|e| RegistryError::Internal(e.to_string()))?
                        .to_vec(),
                })
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        Ok(Response::new(pb::GetVaultKeysResponse {
            keys,
            current_key_id: u32::from(newest(&st)),
        }))
    }
}

/// The id new chunks are sealed with.
pub(crate) fn newest(st: &State) -> u16 {
    st.vault_keys.keys().next_back().copied().unwrap_or(0)
}

fn info(key_id: u16, created_at_ms: i64, current: bool) -> pb::VaultKeyInfo {
    pb::VaultKeyInfo {
        key_id: u32::from(key_id),
        created_at_ms,
        current,
    }
}
