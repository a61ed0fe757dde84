//! Registration with the vault and the credentials it yields. The registration key is
//! one-time: after the first run the agent uses the certificate kept in its data dir.
use std::path::{Path, PathBuf};

use ferry_mesh::{ClientTls, Component, Identity};
use ferry_proto::registry::v1::{Endpoints, RegisterHostRequest, registry_client::RegistryClient};
use ferry_store::VaultKey;
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;

/// What `ferry vault registration-key --out FILE` writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationKeyFile {
    pub vault_id: String,
    pub key_id: String,
    pub secret: String,
    pub registry_endpoint: String,
    pub ca_pem: String,
    pub expires_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointsJson {
    pub registry: String,
    pub scheduler: String,
    pub ingest: String,
    pub storage_writer: String,
    pub failover: String,
    pub gateway: String,
}

impl EndpointsJson {
    /// Each component with its endpoint.
    pub fn components(&self) -> [(Component, String); 6] {
        [
            (Component::Registry, self.registry.clone()),
            (Component::Scheduler, self.scheduler.clone()),
            (Component::Ingest, self.ingest.clone()),
            (Component::StorageWriter, self.storage_writer.clone()),
            (Component::Failover, self.failover.clone()),
            (Component::Gateway, self.gateway.clone()),
        ]
    }
}

impl From<Endpoints> for EndpointsJson {
    fn from(e: Endpoints) -> Self {
        Self {
            registry: e.registry,
            scheduler: e.scheduler,
            ingest: e.ingest,
            storage_writer: e.storage_writer,
            failover: e.failover,
            gateway: e.gateway,
        }
    }
}

/// Public part of the agent's credentials (`identity.json`); the private key and the vault
/// data key are separate 0600 files.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdentityFile {
    host: String,
    vault_id: String,
    cert_pem: String,
    ca_pem: String,
    endpoints: EndpointsJson,
    block_size: u32,
}

#[derive(Clone)]
pub struct Credentials {
    pub host: String,
    pub vault_id: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub endpoints: EndpointsJson,
    pub block_size: u32,
    pub vault_key: VaultKey,
}

impl Credentials {
    pub fn client_tls(&self) -> ClientTls {
        ClientTls {
            ca_pem: self.ca_pem.clone(),
            identity: Some((self.cert_pem.clone(), self.key_pem.clone())),
        }
    }
}

fn paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("identity.json"),
        dir.join("host.key"),
        dir.join("vault-data.key"),
    )
}

/// Loads saved credentials, or registers with the one-time key and saves them.
pub async fn load_or_register(cfg: &AgentConfig) -> anyhow::Result<Credentials> {
    let (id_path, key_path, vk_path) = paths(&cfg.data_dir);
    if id_path.exists() {
        let id: IdentityFile = serde_json::from_slice(&std::fs::read(&id_path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", id_path.display()))?;
        if id.host != cfg.host.name {
            anyhow::bail!(
                "{} holds credentials of host {}, but the config names host {}; use another data_dir",
                id_path.display(),
                id.host,
                cfg.host.name
            );
        }
        let key_pem = std::fs::read_to_string(&key_path)?;
        let vk = std::fs::read(&vk_path)?;
        let vk: [u8; 32] = vk
            .as_slice()
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} is not a 32-byte key", vk_path.display()))?;
        tracing::info!(host = %id.host, vault = %id.vault_id, "using saved host credentials");
        return Ok(Credentials {
            host: id.host,
            vault_id: id.vault_id,
            cert_pem: id.cert_pem,
            key_pem,
            ca_pem: id.ca_pem,
            endpoints: id.endpoints,
            block_size: id.block_size,
            vault_key: VaultKey::from_bytes(vk),
        });
    }
    register(cfg).await
}

async fn register(cfg: &AgentConfig) -> anyhow::Result<Credentials> {
    let kf_path = &cfg.registration_key;
    let kf: RegistrationKeyFile = serde_json::from_slice(
        &std::fs::read(kf_path)
            .map_err(|e| anyhow::anyhow!("reading registration key {}: {e}", kf_path.display()))?,
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "registration key {} is not a ferry key file: {e}",
            kf_path.display()
        )
    })?;
    let endpoint = cfg
        .registry
        .clone()
        .unwrap_or_else(|| kf.registry_endpoint.clone());
    let identity = Identity::Host(cfg.host.name.clone());
    let (csr_pem, key_pem) = ferry_mesh::new_csr(&identity)?;
    let tls = ClientTls {
        ca_pem: kf.ca_pem.clone(),
        identity: None,
    };
    let ch = ferry_mesh::connect(&endpoint, &tls).await?;
    let resp = RegistryClient::new(ch)
        .register_host(RegisterHostRequest {
            key_id: kf.key_id.clone(),
            secret: kf.secret.clone(),
            host_name: cfg.host.name.clone(),
            site: cfg.host.site.clone(),
            csr_pem,
        })
        .await
        .map_err(|s| anyhow::anyhow!("registration refused: {}", s.message()))?
        .into_inner();
    let vk: [u8; 32] = resp.vault_data_key.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "registry sent a vault key of {} bytes, expected 32",
            resp.vault_data_key.len()
        )
    })?;
    let endpoints: EndpointsJson = resp
        .endpoints
        .ok_or_else(|| anyhow::anyhow!("registry sent no endpoints"))?
        .into();
    let (id_path, key_path, vk_path) = paths(&cfg.data_dir);
    std::fs::create_dir_all(&cfg.data_dir)?;
    ferry_mesh::write_secret(&key_path, key_pem.as_bytes())?;
    ferry_mesh::write_secret(&vk_path, &vk)?;
    let id = IdentityFile {
        host: cfg.host.name.clone(),
        vault_id: resp.vault_id.clone(),
        cert_pem: resp.cert_pem.clone(),
        ca_pem: resp.ca_pem.clone(),
        endpoints: endpoints.clone(),
        block_size: resp.block_size,
    };
    // identity.json last: its presence means registration completed.
    let tmp = id_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&id)?)?;
    std::fs::rename(&tmp, &id_path)?;
    tracing::info!(host = %cfg.host.name, vault = %resp.vault_id, "registered with the vault");
    Ok(Credentials {
        host: cfg.host.name.clone(),
        vault_id: resp.vault_id,
        cert_pem: resp.cert_pem,
        key_pem,
        ca_pem: resp.ca_pem,
        endpoints,
        block_size: resp.block_size,
        vault_key: VaultKey::from_bytes(vk),
    })
}
