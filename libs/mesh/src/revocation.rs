//! Host certificates the registry no longer accepts, and the operator tokens it grants, for
//! every other component. The registry
//! is the source of truth (its catalog in object storage); components poll it and refuse what
//! it lists. Until the first answer, and while the registry is unreachable, the last known
//! list stays in force (a component that never reached the registry refuses nothing yet:
//! refusing every host would stop replication whenever the registry restarts).
use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_proto::registry::v1::{
    ListRevokedCertificatesRequest, ListTokenGrantsRequest, registry_client::RegistryClient,
};
use tokio_util::sync::CancellationToken;

use crate::{
    Component, MeshConfig, MeshError, Peers, RevocationCheck, Role, TokenGrant, TokenGrants,
};

/// How often components re-read the revocation list.
pub const REVOCATION_POLL: Duration = Duration::from_secs(2);

/// The revoked serial numbers and removed host names last read from the registry, and the
/// token grants in force.
#[derive(Clone, Default)]
pub struct RevocationList {
    inner: Arc<RwLock<(HashSet<String>, HashSet<String>)>>,
    grants: TokenGrants,
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

    /// The token grants, for an [`crate::Authenticator`].
    pub fn grants(&self) -> TokenGrants {
        self.grants.clone()
    }

    /// Reads the lists from the registry once.
    pub async fn refresh(&self, peers: &Peers) -> Result<(), MeshError> {
        let failed = |what: &str, s: tonic::Status| MeshError::Connect {
            endpoint: "registry".into(),
            reason: format!("listing {what}: {}", s.message()),
        };
        let mut registry = RegistryClient::new(peers.channel(Component::Registry)?);
        let r = registry
            .list_revoked_certificates(ListRevokedCertificatesRequest {})
            .await
            .map_err(|s| failed("revoked certificates", s))?
            .into_inner();
        self.set(r.serials, r.removed_hosts);
        let g = registry
            .list_token_grants(ListTokenGrantsRequest {})
            .await
            .map_err(|s| failed("token grants", s))?
            .into_inner();
        self.grants
            .set(g.grants.iter().filter_map(grant_from_proto).collect());
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
    Ok(crate::Authenticator::with_admin_token(&token)
        .with_revocation(revoked.check())
        .with_grants(revoked.grants()))
}

/// A grant as the registry lists it; one that does not parse is left out (it grants nothing).
pub fn grant_from_proto(g: &ferry_proto::registry::v1::TokenGrant) -> Option<TokenGrant> {
    let (Ok(hash), Ok(role)) = (blake3::Hash::from_hex(&g.hash), g.role.parse::<Role>()) else {
        tracing::warn!(token_name = %g.name, "a token grant that does not parse is ignored");
        return None;
    };
    Some(TokenGrant {
        name: g.name.clone(),
        role,
        hash,
        expires_at_ms: g.expires_at_ms,
    })
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
