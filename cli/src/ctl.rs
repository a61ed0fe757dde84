//! Operator commands: clients of the mesh authenticated with `FERRY_TOKEN` or the vault's admin
//! token over TLS
//! verified against the vault CA (both from `D/ferry.toml`).
use std::path::Path;

use anyhow::Context;
use ferry_mesh::{AuthChannel, ClientTls, Component, MeshConfig};
use ferry_proto::failover::v1::failover_client::FailoverClient;
use ferry_proto::registry::v1::registry_client::RegistryClient;
use ferry_proto::scheduler::v1::scheduler_client::SchedulerClient;
use ferry_proto::storage::v1::storage_writer_client::StorageWriterClient;

pub struct Ctl {
    pub cfg: MeshConfig,
    tls: ClientTls,
    token: String,
}

/// The mesh config alone (what needs no token: `ferry status`).
pub fn load_config(config: &Path) -> anyhow::Result<MeshConfig> {
    MeshConfig::load(Some(config), figment::Figment::new())
        .with_context(|| format!("loading {}", config.display()))
}

impl Ctl {
    pub fn load(config: &Path) -> anyhow::Result<Self> {
        let cfg = load_config(config)?;
        let tls = ClientTls::operator(&cfg)?;
        // An operator's own token (`ferry token create`) when set, else the admin token.
        let token = match std::env::var("FERRY_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            _ => cfg.admin_token()?,
        };
        Ok(Self { cfg, tls, token })
    }

    pub async fn channel(&self, c: Component) -> anyhow::Result<AuthChannel> {
        let endpoint = self.cfg.endpoint(c);
        let ch = ferry_mesh::connect(&endpoint, &self.tls)
            .await
            .with_context(|| format!("{c} at {endpoint} is unreachable"))?;
        Ok(ferry_mesh::with_token(ch, &self.token)?)
    }

    pub async fn registry(&self) -> anyhow::Result<RegistryClient<AuthChannel>> {
        Ok(RegistryClient::new(
            self.channel(Component::Registry).await?,
        ))
    }

    pub async fn scheduler(&self) -> anyhow::Result<SchedulerClient<AuthChannel>> {
        Ok(SchedulerClient::new(
            self.channel(Component::Scheduler).await?,
        ))
    }

    pub async fn storage(&self) -> anyhow::Result<StorageWriterClient<AuthChannel>> {
        Ok(StorageWriterClient::new(
            self.channel(Component::StorageWriter).await?,
        ))
    }

    pub async fn failover(&self) -> anyhow::Result<FailoverClient<AuthChannel>> {
        Ok(FailoverClient::new(
            self.channel(Component::Failover).await?,
        ))
    }
}

/// gRPC errors as the operator should read them: the server's message, not a debug dump.
pub fn status_err(what: &str, s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", s.message(), s.code())
}
