//! Host scoping: a host certificate may act only on the VMs that host reports, and read
//! those it is the recovery host for (DESIGN §11). Every vault host holds the data key, so
//! without this check one host could begin cycles for, commit block maps into, or read the
//! points, block hashes and chunks of another host's VM.
//!
//! The registry is the source of truth for which host a VM belongs to and which host it
//! fails over to; answers are cached for [`OWNER_TTL`] so a resync's many reads cost one
//! registry call. Writes ([`VmOwners::check_host`]) are the owner's alone; reads
//! ([`VmOwners::check_reader`]) are the owner's and the recovery host's, which must read a
//! VM's points to fail it over.
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::registry::v1::{GetVmRequest, Vm, registry_client::RegistryClient};
use tonic::{Code, Request, Status};

use crate::auth::{Caller, Role, caller, require_role};
use crate::{ClientTls, Component, MeshConfig};

/// How long an answer of the registry is reused.
pub const OWNER_TTL: Duration = Duration::from_secs(2);

/// The hosts of a VM as the registry has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmHosts {
    /// The host the VM belongs to (reports it, replicates it).
    pub host: String,
    /// The host it fails over to; empty when its policy names none.
    pub recovery_host: String,
    /// Raised by every failover start: a cycle begun under an older epoch is refused.
    pub epoch: u64,
    /// A planned or unplanned failover moved (or is moving) the VM away from `host`.
    pub failed_over: bool,
    /// The VM's disks on `host` as (id, path): after a re-protect the ids are those of the
    /// VM's points, not derived from the paths there.
    pub disks: Vec<(String, String)>,
    /// After a re-protect, until the new source's first point: the point its changes apply to.
    pub base_point: String,
}

impl VmHosts {
    /// The hosts of a registry VM record: `recovery_host`, or the policy's when that is empty
    /// (records written before the field existed).
    pub fn of(vm: &Vm) -> Self {
        let recovery_host = if vm.recovery_host.is_empty() {
            vm.policy
                .as_ref()
                .map(|p| p.recovery_host.clone())
                .unwrap_or_default()
        } else {
            vm.recovery_host.clone()
        };
        use ferry_proto::registry::v1::VmState as S;
        Self {
            host: vm.host.clone(),
            recovery_host,
            epoch: vm.epoch,
            failed_over: matches!(
                S::try_from(vm.state),
                Ok(S::FailingOver | S::FailedOver | S::FailoverCommitted)
            ),
            disks: vm
                .disks
                .iter()
                .map(|d| (d.id.clone(), d.path.clone()))
                .collect(),
            base_point: vm.base_point.clone(),
        }
    }

    /// Whether `host` may read the VM: it is the VM's host or its recovery host.
    pub fn may_read(&self, host: &str) -> bool {
        !host.is_empty() && (self.host == host || self.recovery_host == host)
    }
}

type LookupFuture = Pin<Box<dyn Future<Output = Result<Option<String>, Status>> + Send>>;
type HostsFuture = Pin<Box<dyn Future<Output = Result<Option<VmHosts>, Status>> + Send>>;
type Lookup = Arc<dyn Fn(String) -> HostsFuture + Send + Sync>;
/// Per VM: when the registry answered, and the hosts it named.
type HostsCache = Arc<Mutex<HashMap<String, (Instant, Option<VmHosts>)>>>;

/// Answers "which host does this VM belong to, and which host does it fail over to?" and
/// checks host callers against it.
#[derive(Clone)]
pub struct VmOwners {
    lookup: Lookup,
    cache: HostsCache,
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
        Ok(Self::from_fn_hosts(move |vm| {
            let mut client = RegistryClient::new(channel.clone());
            Box::pin(async move {
                match client.get_vm(GetVmRequest { name: vm }).await {
                    Ok(r) => Ok(Some(VmHosts::of(&r.into_inner()))),
                    Err(s) if s.code() == Code::NotFound => Ok(None),
                    Err(s) => Err(Status::unavailable(format!(
                        "cannot check which host the vm belongs to: registry: {}",
                        s.message()
                    ))),
                }
            })
        }))
    }

    /// Answers the owner from `f`, with no recovery host (tests, or a component that holds
    /// the registry's state itself).
    pub fn from_fn(f: impl Fn(String) -> LookupFuture + Send + Sync + 'static) -> Self {
        Self::from_fn_hosts(move |vm| {
            let owner = f(vm);
            Box::pin(async move {
                Ok(owner.await?.map(|host| VmHosts {
                    host,
                    ..VmHosts::default()
                }))
            })
        })
    }

    /// Answers both hosts of a VM from `f`.
    pub fn from_fn_hosts(f: impl Fn(String) -> HostsFuture + Send + Sync + 'static) -> Self {
        Self {
            lookup: Arc::new(f),
            cache: Default::default(),
        }
    }

    /// The hosts of `vm`; `None` for a VM the registry does not know.
    pub async fn hosts(&self, vm: &str) -> Result<Option<VmHosts>, Status> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, hosts)) = cache.get(vm)
            && at.elapsed() < OWNER_TTL
        {
            return Ok(hosts.clone());
        }
        let hosts = (self.lookup)(vm.to_string()).await?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(vm.to_string(), (Instant::now(), hosts.clone()));
        }
        Ok(hosts)
    }

    /// Passes when `host` may still replicate `vm`: the VM is its own, has not failed over,
    /// and (with `epoch`, the one a cycle began under) no failover started since. Asks the
    /// registry afresh (a fence must not wait for the cache); the VM's current epoch.
    pub async fn check_epoch(
        &self,
        host: &str,
        vm: &str,
        epoch: Option<u64>,
        action: &str,
    ) -> Result<u64, Status> {
        self.forget(vm);
        self.check_host(host, vm, action).await?;
        let h = self.hosts(vm).await?.unwrap_or_default();
        if h.failed_over || epoch.is_some_and(|e| e != h.epoch) {
            tracing::warn!(host = %host, vm = %vm, epoch = h.epoch, cycle_epoch = ?epoch, action, "host fenced: the vm failed over");
            return Err(Status::failed_precondition(format!(
                "host {host} may not {action} vm {vm}: the vm failed over (epoch {}{}); \
                 its replication from {host} is fenced",
                h.epoch,
                epoch
                    .map(|e| format!(", the cycle's {e}"))
                    .unwrap_or_default()
            )));
        }
        Ok(h.epoch)
    }

    /// Drops the cached answer for `vm`: the next question asks the registry.
    fn forget(&self, vm: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(vm);
        }
    }

    /// The host `vm` belongs to; `None` for a VM the registry does not know.
    pub async fn owner(&self, vm: &str) -> Result<Option<String>, Status> {
        Ok(self.hosts(vm).await?.map(|h| h.host))
    }

    /// Passes when `host` is the host of `vm`; otherwise PERMISSION_DENIED naming both.
    /// `action` completes "host H may not ACTION vm V". The recovery host does not pass:
    /// this guards writes.
    pub async fn check_host(&self, host: &str, vm: &str, action: &str) -> Result<(), Status> {
        match self.owner(vm).await? {
            Some(owner) if owner == host => Ok(()),
            Some(owner) => {
                tracing::warn!(host = %host, vm = %vm, owner = %owner, action, "host refused: the vm belongs to another host");
                Err(Status::permission_denied(format!(
                    "host {host} may not {action} vm {vm}: the vm belongs to host {owner}"
                )))
            }
            None => Err(unknown_vm(host, vm, action)),
        }
    }

    /// Passes when `host` is the host of `vm` or its recovery host; otherwise
    /// PERMISSION_DENIED naming the host, the VM, its owner and its recovery host. For reads.
    pub async fn check_reader(&self, host: &str, vm: &str, action: &str) -> Result<(), Status> {
        if self.hosts(vm).await?.is_some_and(|h| h.may_read(host)) {
            return Ok(());
        }
        // Refuse only on a fresh answer: the recovery host may have been set a moment ago.
        self.forget(vm);
        match self.hosts(vm).await? {
            Some(hosts) if hosts.may_read(host) => Ok(()),
            Some(VmHosts {
                host: owner,
                recovery_host,
                ..
            }) => {
                let recovery = if recovery_host.is_empty() {
                    "none".to_string()
                } else {
                    recovery_host
                };
                tracing::warn!(host = %host, vm = %vm, owner = %owner, recovery_host = %recovery, action, "host refused: neither the vm's host nor its recovery host");
                Err(Status::permission_denied(format!(
                    "host {host} may not {action} vm {vm}: the vm belongs to host {owner} \
                     and its recovery host is {recovery}"
                )))
            }
            None => Err(unknown_vm(host, vm, action)),
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

    /// Operators with at least `min` and services pass; a host passes for its own VM and for
    /// a VM it is the recovery host of.
    pub async fn require_role_or_reader<T>(
        &self,
        req: &Request<T>,
        min: Role,
        vm: &str,
        action: &str,
    ) -> Result<(), Status> {
        match caller(req) {
            Caller::Host(host) => self.check_reader(&host, vm, action).await,
            _ => require_role(req, min),
        }
    }
}

fn unknown_vm(host: &str, vm: &str, action: &str) -> Status {
    Status::permission_denied(format!(
        "host {host} may not {action} vm {vm}: the registry knows no such vm"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::common::v1::ReplicationPolicy;

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

    /// web01 on hva failing over to hvr; db01 on hva with no recovery host.
    fn hosts() -> VmOwners {
        VmOwners::from_fn_hosts(|vm| {
            Box::pin(async move {
                let hosts = |host: &str, recovery_host: &str| VmHosts {
                    host: host.into(),
                    recovery_host: recovery_host.into(),
                    ..VmHosts::default()
                };
                Ok(match vm.as_str() {
                    "web01" => Some(hosts("hva", "hvr")),
                    "db01" => Some(hosts("hva", "")),
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
        op.extensions_mut()
            .insert(Caller::operator(Role::Reader, "test"));
        o.require_role_or_owner(&op, Role::Reader, "web01", "read")
            .await
            .unwrap();
        let err = o
            .require_role_or_owner(&Request::new(()), Role::Reader, "web01", "read")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[tokio::test]
    async fn from_fn_has_no_recovery_host() {
        let o = owners();
        assert_eq!(
            o.hosts("web01").await.unwrap(),
            Some(VmHosts {
                host: "hva".into(),
                ..VmHosts::default()
            })
        );
        assert_eq!(o.owner("nope").await.unwrap(), None);
        o.check_reader("hva", "web01", "read").await.unwrap();
        // an empty host name never matches an empty recovery host
        let err = o.check_reader("", "web01", "read").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
    }

    #[tokio::test]
    async fn the_recovery_host_reads_but_does_not_write() {
        let o = hosts();
        o.check_reader("hva", "web01", "read the chunks of")
            .await
            .unwrap();
        o.check_reader("hvr", "web01", "read the chunks of")
            .await
            .unwrap();
        // writes stay the owner's
        let err = o.check_host("hvr", "web01", "commit").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        o.require_role_or_reader(&host_req("hvr"), Role::Reader, "web01", "read")
            .await
            .unwrap();
        let err = o
            .require_role_or_owner(&host_req("hvr"), Role::Reader, "web01", "read")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);

        // another host is told who may read
        let err = o
            .check_reader("hvx", "web01", "read the chunks of")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let msg = err.message();
        for name in ["hvx", "web01", "hva", "hvr", "read the chunks of"] {
            assert!(msg.contains(name), "{name} not in {msg}");
        }
        let err = o.check_reader("hvr", "db01", "read").await.unwrap_err();
        assert!(
            err.message().contains("recovery host is none"),
            "{}",
            err.message()
        );
        let err = o.check_reader("hva", "nope", "read").await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains("no such vm"), "{}", err.message());

        // operators and services as before, anonymous callers not at all
        let mut op = Request::new(());
        op.extensions_mut()
            .insert(Caller::operator(Role::Reader, "test"));
        o.require_role_or_reader(&op, Role::Reader, "web01", "read")
            .await
            .unwrap();
        let mut svc = Request::new(());
        svc.extensions_mut().insert(Caller::Service("ferry".into()));
        o.require_role_or_reader(&svc, Role::Admin, "web01", "read")
            .await
            .unwrap();
        let err = o
            .require_role_or_reader(&Request::new(()), Role::Reader, "web01", "read")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[test]
    fn recovery_host_falls_back_to_the_policy() {
        let mut vm = Vm {
            host: "hva".into(),
            policy: Some(ReplicationPolicy {
                recovery_host: "hvp".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(VmHosts::of(&vm).recovery_host, "hvp");
        vm.recovery_host = "hvr".into();
        assert_eq!(VmHosts::of(&vm).recovery_host, "hvr");
        vm.policy = None;
        vm.recovery_host.clear();
        assert_eq!(
            VmHosts::of(&vm),
            VmHosts {
                host: "hva".into(),
                ..VmHosts::default()
            }
        );
    }
}
