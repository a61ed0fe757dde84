//! `ferry status`: every component's health, Redis and the object store included.
use ferry_mesh::{Component, MeshConfig};
use serde::Serialize;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::up::GRPC_COMPONENTS;

#[derive(Debug, Serialize)]
pub struct ComponentStatus {
    pub component: String,
    pub endpoint: String,
    pub status: String,
}

impl ComponentStatus {
    pub fn ok(&self) -> bool {
        self.status == "serving"
    }
}

async fn grpc(cfg: &MeshConfig, c: Component, endpoint: &str) -> String {
    let tls = match ferry_mesh::ClientTls::operator(cfg) {
        Ok(t) => t,
        Err(e) => return format!("error: {e}"),
    };
    let ch = match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        ferry_mesh::connect(endpoint, &tls),
    )
    .await
    {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => return format!("unreachable: {e}"),
        Err(_) => return "unreachable: timed out".into(),
    };
    let service = match c {
        Component::Registry => "ferry.registry.v1.Registry",
        Component::Scheduler => "ferry.scheduler.v1.Scheduler",
        Component::Ingest => "ferry.ingest.v1.Ingest",
        Component::StorageWriter => "ferry.storage.v1.StorageWriter",
        Component::Failover => "ferry.failover.v1.Failover",
        Component::Gateway => "",
    };
    match HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
    {
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => "serving".into(),
        Ok(r) => format!("not serving ({})", r.get_ref().status),
        Err(s) => format!("unhealthy: {}", s.message()),
    }
}

async fn gateway(cfg: &MeshConfig, addr: std::net::SocketAddr) -> String {
    let res: anyhow::Result<()> = async {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        };
        let qcfg = ferry_mesh::quic_client_config(
            &read(&cfg.tls.ca_cert)?,
            &read(&cfg.tls.service_cert)?,
            &read(&cfg.tls.service_key)?,
        )?;
        let up = ferry_gateway::client::Uploader::connect(addr, qcfg).await?;
        up.ping().await?;
        Ok(())
    }
    .await;
    match tokio::time::timeout(std::time::Duration::from_secs(5), async { res }).await {
        Ok(Ok(())) => "serving".into(),
        Ok(Err(e)) => format!("unreachable: {e}"),
        Err(_) => "unreachable: timed out".into(),
    }
}

pub async fn collect(cfg: &MeshConfig) -> Vec<ComponentStatus> {
    let mut out = Vec::new();
    for c in GRPC_COMPONENTS {
        out.push(component(cfg, c, None).await);
    }
    out.push(component(cfg, Component::Gateway, None).await);
    out.push(redis(cfg).await);
    out.push(store(cfg).await);
    out
}

/// One of what [`collect`] checks, by name (a component, `redis` or `store`): what a
/// Kubernetes exec probe runs. `endpoint` replaces the config's address of a component
/// (`https://127.0.0.1:7401`; the gateway's `host:port`), e.g. the pod's own port.
pub async fn collect_one(
    cfg: &MeshConfig,
    name: &str,
    endpoint: Option<&str>,
) -> anyhow::Result<ComponentStatus> {
    match (name, endpoint) {
        ("redis" | "store", Some(_)) => {
            anyhow::bail!("--endpoint names a component's address; {name} is checked as configured")
        }
        ("redis", None) => Ok(redis(cfg).await),
        ("store", None) => Ok(store(cfg).await),
        _ => {
            let c: Component = name
                .parse()
                .map_err(|e| anyhow::anyhow!("{e} (or redis, store)"))?;
            Ok(component(cfg, c, endpoint).await)
        }
    }
}

async fn component(cfg: &MeshConfig, c: Component, endpoint: Option<&str>) -> ComponentStatus {
    if c == Component::Gateway {
        let addr = match endpoint.map(str::parse::<std::net::SocketAddr>) {
            None => Ok(cfg.gateway.listen),
            Some(r) => r,
        };
        let (endpoint, status) = match addr {
            Ok(a) => (format!("quic://{a}"), gateway(cfg, a).await),
            Err(e) => (
                endpoint.unwrap_or_default().to_string(),
                format!("bad address (host:port): {e}"),
            ),
        };
        return ComponentStatus {
            component: c.to_string(),
            endpoint,
            status,
        };
    }
    let endpoint = endpoint.map_or_else(|| cfg.endpoint(c), str::to_owned);
    ComponentStatus {
        component: c.to_string(),
        status: grpc(cfg, c, &endpoint).await,
        endpoint,
    }
}

async fn redis(cfg: &MeshConfig) -> ComponentStatus {
    let status = match ferry_coord::Coord::connect_config(cfg).await {
        Ok(c) => match c.ping().await {
            Ok(()) => "serving".to_string(),
            Err(e) => format!("unhealthy: {e}"),
        },
        Err(e) => format!("unreachable: {e}"),
    };
    ComponentStatus {
        component: "redis".into(),
        endpoint: ferry_coord::redact_url(&cfg.redis_url),
        status,
    }
}

async fn store(cfg: &MeshConfig) -> ComponentStatus {
    let status = match ferry_store::Store::from_url(&cfg.store_url()) {
        Ok(s) => match s.list(ferry_store::layout::POINTS_PREFIX).await {
            Ok(_) => "serving".to_string(),
            Err(e) => format!("unhealthy: {e}"),
        },
        Err(e) => format!("unreachable: {e}"),
    };
    ComponentStatus {
        component: "store".into(),
        endpoint: cfg.store_url(),
        status,
    }
}
