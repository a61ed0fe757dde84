//! Host certificates the registry no longer accepts, for every other component. The registry
//! is the source of truth (its catalog in object storage); components poll it and refuse what
//! it lists. Until the first answer, and while the registry is unreachable, the last known
//! list stays in force (a component that never reached the registry refuses nothing yet:
//! refusing every host would stop replication whenever the registry restarts).
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_proto::registry::v1::{ListRevokedCertificatesRequest, registry_client::RegistryClient};
use tokio_util::sync::CancellationToken;

use crate::{Component, MeshConfig, MeshError, Peers, RevocationCheck};

/// How often components re-read the revocation list.
pub const REVOCATION_POLL: Duration = Duration::from_secs(2);

/// The revoked serial numbers and removed host names last read from the registry.
#[derive(Clone, Default)]
pub struct RevocationList {
    inner: Arc<RwLock<(HashSet<String>, HashSet<String>)>>,
}

impl RevocationList {
    /// Replaces the list.
    pub fn set(
        &self,
        serials: impl IntoIterator<Item = String>,
        hosts: impl IntoIterator<Item = String>,
    ) {
        if let Ok(mut g) = self.inner.write() {
            *g = (serials.into_iter().collect(), hosts.into_iter().collect());
        }
    }

    /// Whether a certificate of `host` with serial `serial` is refused.
    pub fn is_revoked(&self, host: &str, serial: &str) -> bool {
        self.inner
            .read()
            .map(|g| (!serial.is_empty() && g.0.contains(serial)) || g.1.contains(host))
            .unwrap_or(true)
    }

    /// The check an [`crate::Authenticator`] runs on every host certificate.
    pub fn check(&self) -> RevocationCheck {
        let me = self.clone();
        Arc::new(move |host: &str, serial: &str| me.is_revoked(host, serial))
    }

    /// Reads the list from the registry once.
    pub async fn refresh(&self, peers: &Peers) -> Result<(), MeshError> {
        let r = RegistryClient::new(peers.channel(Component::Registry)?)
            .list_revoked_certificates(ListRevokedCertificatesRequest {})
            .await
            .map_err(|s| MeshError::Connect {
                endpoint: "registry".into(),
                reason: format!("listing revoked certificates: {}", s.message()),
            })?
            .into_inner();
        self.set(r.serials, r.removed_hosts);
        Ok(())
    }

    /// Keeps the list fresh until `shutdown`: one read now (bounded, so a component starting
    /// before the registry does not wait), then every [`REVOCATION_POLL`].
    pub async fn watch(cfg: &MeshConfig, shutdown: CancellationToken) -> Self {
        let list = Self::default();
        let peers = match Peers::service(cfg) {
            Ok(p) => p,
            Err(e) => {
                // Without the service certificate nothing reaches the registry: the component
                // fails on its own calls with the reason; the list stays empty.
                tracing::warn!(error = %e, "revocation list cannot be read");
                return list;
            }
        };
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), list.refresh(&peers)).await
        {
            tracing::debug!(error = %e, "revocation list not read yet; retrying in the background");
        }
        let me = list.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(REVOCATION_POLL) => {}
                }
                if let Err(e) = me.refresh(&peers).await {
                    tracing::debug!(error = %e, "revocation list refresh failed; keeping the last one");
                }
            }
        });
        list
    }
}

/// The authenticator of a component other than the registry: the admin token, and host
/// certificates checked against the registry's revocation list (kept fresh until `shutdown`).
pub async fn component_authenticator(
    cfg: &MeshConfig,
    shutdown: CancellationToken,
) -> Result<crate::Authenticator, MeshError> {
    let token = cfg.admin_token()?;
    let revoked = RevocationList::watch(cfg, shutdown).await;
    Ok(crate::Authenticator::with_admin_token(&token).with_revocation(revoked.check()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_and_removed_hosts_are_refused() {
        let l = RevocationList::default();
        assert!(!l.is_revoked("hv1", "1a"));
        l.set(["1a".to_string()], ["gone".to_string()]);
        assert!(l.is_revoked("hv1", "1a"));
        assert!(!l.is_revoked("hv1", "2b"));
        assert!(l.is_revoked("gone", "2b"));
        assert!(!l.is_revoked("hv1", ""));
        assert!((l.check())("gone", ""));
    }
}
