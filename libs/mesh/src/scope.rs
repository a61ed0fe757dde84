//! Host scoping: a host certificate may act only on the VMs that host reports (DESIGN §11:
//! later also those it is the recovery host for). Every vault host holds the data key, so
//! without this check one host could begin cycles for, commit block maps into, or read the
//! points and block hashes of another host's VM.
//!
//! The registry is the source of truth for which host a VM belongs to; answers are cached for
//! [`OWNER_TTL`] so a resync's many reads cost one registry call.
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::registry::v1::{GetVmRequest, registry_client::RegistryClient};
use tonic::{Code, Request, Status};

use crate::auth::{Caller, Role, caller, require_role};
use crate::{ClientTls, Component, MeshConfig};

/// How long an answer of the registry is reused.
pub const OWNER_TTL: Duration = Duration::from_secs(2);

type LookupFuture = Pin<Box<dyn Future<Output = Result<Option<String>, Status>> + Send>>;
type Lookup = Arc<dyn Fn(String) -> LookupFuture + Send + Sync>;
/// Per VM: when the registry answered, and the owner it named.
type OwnerCache = Arc<Mutex<HashMap<String, (Instant, Option<String>)>>>;

/// Answers "which host does this VM belong to?" and checks host callers against it.
#[derive(Clone)]
pub struct VmOwners {
    lookup: Lookup,
    cache: OwnerCache,
}

impl std::fmt::Debug for VmOwners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmOwners").finish_non_exhaustive()
    }
}

impl VmOwners {
    /// Asks the registry of `cfg` (with the service certificate).
    pub fn registry(cfg: &MeshConfig) -> Result<Self, crate::MeshError> {
        let tls = ClientTls::service(cfg)?;
        let channel = crate::connect_lazy(&cfg.endpoint(Component::Registry), &tls)?;
        Ok(Self::from_fn(move |vm| {
            let mut client = RegistryClient::new(channel.clone());
            Box::pin(async move {
                match client.get_vm(GetVmRequest { name: vm }).await {
                    Ok(r) => Ok(Some(r.into_inner().host)),
                    Err(s) if s.code() == Code::NotFound => Ok(None),
                    Err(s) => Err(Status::unavailable(format!(
                        "cannot check which host the vm belongs to: registry: {}",
                        s.message()
                    ))),
                }
            })
        }))
    }

    /// Answers from `f` (tests, or a component that holds the registry's state itself).
    pub fn from_fn(f: impl Fn(String) -> LookupFuture + Send + Sync + 'static) -> Self {
        Self {
            lookup: Arc::new(f),
            cache: Default::default(),
        }
    }

    /// The host `vm` belongs to; `None` for a VM the registry does not know.
    pub async fn owner(&self, vm: &str) -> Result<Option<String>, Status> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, owner)) = cache.get(vm)
            && at.elapsed() < OWNER_TTL
        {
            return Ok(owner.clone());
        }
        let owner = (self.lookup)(vm.to_string()).await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(vm.to_string(), (Instant::now(), owner.clone()));
        }
        Ok(owner)
    }

    /// Passes when `host` is the host of `vm`; otherwise PERMISSION_DENIED naming both.
    /// `action` completes "host H may not ACTION vm V".
    pub async fn check_host(&self, host: &str, vm: &str, action: &str) -> Result<(), Status> {
        match self.owner(vm).await? {
            Some(owner) if owner == host => Ok(()),
            Some(owner) => {
                tracing::warn!(host = %host, vm = %vm, owner = %owner, action, "host refused: the vm belongs to another host");
                Err(Status::permission_denied(format!(
                    "host {host} may not {action} vm {vm}: the vm belongs to host {owner}"
                )))
            }
            None => Err(Status::permission_denied(format!(
                "host {host} may not {action} vm {vm}: the registry knows no such vm"
            ))),
        }
    }

    /// Operators with at least `min` and services pass; a host passes only for its own VM.
    pub async fn require_role_or_owner<T>(
        &self,
        req: &Request<T>,
        min: Role,
        vm: &str,
        action: &str,
    ) -> Result<(), Status> {
        match caller(req) {
            Caller::Host(host) => self.check_host(&host, vm, action).await,
            _ => require_role(req, min),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners() -> VmOwners {
        VmOwners::from_fn(|vm| {
            Box::pin(async move {
                Ok(match vm.as_str() {
                    "web01" => Some("hva".to_string()),
                    _ => None,
                })
            })
        })
    }

    fn host_req(host: &str) -> Request<()> {
        let mut r = Request::new(());
        r.extensions_mut().insert(Caller::Host(host.into()));
        r
    }

    #[tokio::test]
    async fn hosts_act_only_on_their_vms() {
        let o = owners();
        o.check_host("hva", "web01", "read").await.unwrap();
        let err = o.check_host("hvb", "web01", "read").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("hvb") && err.message().contains("web01"));
        assert!(err.message().contains("hva"), "{}", err.message());
        let err = o.check_host("hvb", "nope", "read").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let err = o
            .require_role_or_owner(
                &host_req("hvb"),
                Role::Reader,
                "web01",
                "list the points of",
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        o.require_role_or_owner(&host_req("hva"), Role::Reader, "web01", "read")
            .await
            .unwrap();
        let mut op = Request::new(());
        op.extensions_mut().insert(Caller::Operator(Role::Reader));
        o.require_role_or_owner(&op, Role::Reader, "web01", "read")
            .await
            .unwrap();
        let err = o
            .require_role_or_owner(&Request::new(()), Role::Reader, "web01", "read")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
}
