//! The channels a component calls the other components on, made once and kept.
//!
//! The service certificate is read once, when the component starts; each peer's channel is
//! created on first use (peers may start later) and reused by every call after. A channel
//! reconnects by itself after a failure, trying the addresses of the peer's endpoint list in
//! turn (see [`crate::connect`]), so a replica that went away is replaced by the next one
//! without a new channel — and without re-reading PEM files on every request.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::transport::Channel;

use crate::{ClientTls, Component, MeshConfig, MeshError};

#[derive(Clone)]
pub struct Peers {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: HashMap<Component, String>,
    tls: ClientTls,
    channels: Mutex<HashMap<Component, Channel>>,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers")
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

impl Peers {
    /// The peers of `cfg`, called with the mesh's service certificate.
    pub fn service(cfg: &MeshConfig) -> Result<Self, MeshError> {
        Ok(Self::with_tls(cfg, ClientTls::service(cfg)?))
    }

    /// The peers of `cfg`, called with `tls`.
    pub fn with_tls(cfg: &MeshConfig, tls: ClientTls) -> Self {
        Self::new(Component::ALL.map(|c| (c, cfg.endpoint(c))), tls)
    }

    /// Peers at the given endpoints (an agent has them from its registration), called with
    /// `tls`.
    pub fn new(endpoints: impl IntoIterator<Item = (Component, String)>, tls: ClientTls) -> Self {
        let endpoints = endpoints.into_iter().collect();
        Self {
            inner: Arc::new(Inner {
                endpoints,
                tls,
                channels: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The channel to `component` (created on first use; connects when first called).
    pub fn channel(&self, component: Component) -> Result<Channel, MeshError> {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(ch) = channels.get(&component) {
            return Ok(ch.clone());
        }
        let endpoint =
            self.inner
                .endpoints
                .get(&component)
                .ok_or_else(|| MeshError::InvalidEndpoint {
                    endpoint: component.to_string(),
                    reason: "no endpoint is known for it".into(),
                })?;
        let ch = crate::connect_lazy(endpoint, &self.inner.tls)?;
        channels.insert(component, ch.clone());
        Ok(ch)
    }
}
