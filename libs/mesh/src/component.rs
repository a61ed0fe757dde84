//! The one skeleton of a component. Every binary's `main` is [`component_main`] (the
//! gateway, which listens on UDP, uses [`ComponentArgs::load`] alone); every gRPC service's
//! `run` ends in [`serve_component`]: TLS from the config, every call through the caller
//! authenticator and the audit layer ([`crate::audit`]), health under the service's own
//! name, reflection, drain on shutdown.
//!
//! This is the binary edge of every component, so it speaks `anyhow` like a `main` does.
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::{Authenticator, Component, MeshConfig, MeshError, ServerTls};

/// The command line of every component binary.
#[derive(Debug, clap::Parser)]
pub struct ComponentArgs {
    /// The mesh configuration written by `ferry up` (D/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: PathBuf,
    /// Listen address; overrides the component's `listen` from the configuration.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

impl ComponentArgs {
    /// Parses `ferry-<component> --config D/ferry.toml [--listen ADDR]` (exits with usage on
    /// a bad command line), installs tracing and loads the mesh config, the listen address
    /// from the command line winning.
    pub fn load(component: Component, about: &'static str) -> anyhow::Result<MeshConfig> {
        let cmd = Self::command()
            .name(component.binary())
            .bin_name(component.binary())
            .about(about)
            .version(env!("CARGO_PKG_VERSION"));
        let args = Self::from_arg_matches(&cmd.get_matches())?;
        crate::init_tracing(component.as_str());
        let mut cfg = MeshConfig::load(Some(&args.config), figment::Figment::new())
            .with_context(|| format!("loading {}", args.config.display()))?;
        if let Some(addr) = args.listen {
            cfg.set_listen(component, addr);
        }
        Ok(cfg)
    }
}

/// The `main` of a gRPC component: its command line and config, its TCP listener, and
/// `run` until SIGTERM or SIGINT.
pub async fn component_main<F, Fut>(
    component: Component,
    about: &'static str,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(MeshConfig, TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let cfg = ComponentArgs::load(component, about)?;
    let addr = cfg.listen(component);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    run(cfg, listener, crate::shutdown_on_signal()).await
}

/// Serves one generated gRPC service (`XServer::new(impl)`) on `listener` until `shutdown`:
/// TLS with the config's server certificate, every call authenticated by `auth`, health
/// SERVING under the service's own name (and ""), reflection, then NOT_SERVING and a drain.
pub async fn serve_component<S>(
    cfg: &MeshConfig,
    listener: TcpListener,
    auth: &Authenticator,
    service: S,
    shutdown: CancellationToken,
) -> Result<(), MeshError>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let tls = ServerTls::load(cfg)?;
    let routes = Routes::new(crate::Audited::new(
        service,
        auth.clone(),
        component_name(S::NAME),
    ));
    tracing::info!(service = S::NAME, addr = ?listener.local_addr().ok(), "serving");
    crate::serve(listener, &tls, routes, &[S::NAME], shutdown).await
}

/// The component's name in audit records, from its service name
/// (`ferry.storage.v1.StorageWriter` → `storagewriter`).
fn component_name(service: &str) -> &str {
    service.rsplit('.').next().unwrap_or(service)
}
