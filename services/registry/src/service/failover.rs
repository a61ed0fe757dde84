//! Planned and unplanned failover as the registry keeps it: the lifecycle moves only as the
//! state machine allows ([`vm_event`]), and with it the VM's site — where it runs, where it
//! is going, and the epoch that fences the host it left. A STARTED (or FAILED_OVER,
//! COMMITTED) repeated by a resumed job of the same failover answers the VM as it is.
use ferry_model::{Direction, DiskSpec, Transition, VmState};
use ferry_proto::registry::v1::{self as pb, FailoverEvent};
use tonic::{Request, Response};

use super::{R, RegistryService};
use crate::error::RegistryError;
use crate::lifecycle::vm_event;
use crate::state::{Event, FailoverSite, VmRecord};

impl VmRecord {
    /// The host the VM runs on now.
    pub fn active_host(&self) -> &str {
        match self.site.active_host.is_empty() {
            true => &self.host,
            false => &self.site.active_host,
        }
    }

    /// The VM failed over (or is failing over) away from its host: that host must refuse
    /// its writes and replicate nothing of it.
    pub fn fenced_on_host(&self) -> bool {
        matches!(
            self.state,
            VmState::FailingOver | VmState::FailedOver | VmState::FailoverCommitted
        )
    }

    /// Whether `host` must refuse the VM's writes: its own host while it failed over away,
    /// and a host it left by a re-protect (it still has the VM's old disks) unless the VM
    /// runs there or is failing back to it right now.
    pub fn fenced_for(&self, host: &str) -> bool {
        if self.host == host {
            return self.fenced_on_host();
        }
        self.state != VmState::Unprotected
            && self.host_history.iter().any(|s| s.host == host)
            && self.active_host() != host
            && !(self.state == VmState::FailingOver && self.site.failover_host == host)
    }

    /// Whether `host`, as the VM's recovery host, keeps a standby copy of it (`[recovery]
    /// standby`): `Some(true)` current with the latest point, while the VM replicates
    /// forward; `Some(false)` as it is, while a failover that may take it runs; None: none.
    pub fn standby_on(&self, host: &str) -> Option<bool> {
        let recovery = self.policy.as_ref().map(|p| p.recovery_host.as_str());
        if recovery != Some(host) || self.host == host || self.site.direction != Direction::Forward
        {
            return None;
        }
        match self.state {
            VmState::Protected | VmState::ResyncPending | VmState::Resyncing => Some(true),
            VmState::FailingOver => Some(false),
            _ => None,
        }
    }
}

/// The re-protect of `v` to the host it runs on, with its disks there (the ids of its
/// points); None when a resumed job repeats it.
fn reprotect_events(
    v: &VmRecord,
    req: &pb::RecordFailoverRequest,
) -> Result<Option<Vec<Event>>, RegistryError> {
    if v.state == VmState::Protected && v.host == req.host && v.site.failover_id.is_empty() {
        return Ok(None);
    }
    let to = v.site.active_host.clone();
    if to.is_empty() || to != req.host {
        return Err(RegistryError::FailedPrecondition(format!(
            "vm {} runs on {}, not on {}: re-protect makes the host it runs on its source",
            v.name,
            v.active_host(),
            req.host
        )));
    }
    let disks: Vec<DiskSpec> = req.disks.iter().map(DiskSpec::from).collect();
    let mut have: Vec<&str> = v.disks.iter().map(|d| d.id.as_str()).collect();
    let mut given: Vec<&str> = disks.iter().map(|d| d.id.as_str()).collect();
    have.sort_unstable();
    given.sort_unstable();
    if have != given {
        return Err(RegistryError::InvalidArgument(format!(
            "re-protect of vm {} names disks {given:?}; the vm's points hold {have:?}",
            v.name
        )));
    }
    let state = vm_event(v, &Transition::Reprotected)?;
    let site = FailoverSite {
        epoch: v.site.epoch,
        direction: match v.site.direction {
            Direction::Forward => Direction::Reverse,
            Direction::Reverse => Direction::Forward,
        },
        base_point: v.site.point.clone(),
        ..FailoverSite::default()
    };
    Ok(Some(vec![
        state,
        Event::VmReprotected {
            vm: v.name.clone(),
            host: to,
            disks,
            recovery_host: v.host.clone(),
            site,
            at_ms: ferry_proto::now_ms(),
        },
    ]))
}

/// The events of `e` on `v`, or None when a resumed job repeats what is already recorded.
fn failover_events(
    v: &VmRecord,
    e: FailoverEvent,
    req: &pb::RecordFailoverRequest,
) -> Result<Option<Vec<Event>>, RegistryError> {
    use FailoverEvent as E;
    let same = !req.failover_id.is_empty() && v.site.failover_id == req.failover_id;
    let mut site = v.site.clone();
    let starts = matches!(
        e,
        E::PlannedStarted | E::UnplannedStarted | E::FailbackStarted
    );
    let t = match e {
        E::Reprotected => {
            let repeated = v.state == VmState::Protected && v.site.failover_id.is_empty();
            if !(same || repeated) {
                return Err(RegistryError::FailedPrecondition(format!(
                    "vm {}: failover {:?} is not the committed one ({:?})",
                    v.name, req.failover_id, v.site.failover_id
                )));
            }
            return reprotect_events(v, req);
        }
        E::FailbackStarted => {
            if same && v.state == VmState::FailingBack {
                return Ok(None);
            }
            if req.host.is_empty() || req.failover_id.is_empty() {
                return Err(RegistryError::InvalidArgument(
                    "a failback start names its target host and failover id".into(),
                ));
            }
            site = FailoverSite {
                failover_host: req.host.clone(),
                failover_id: req.failover_id.clone(),
                ..site
            };
            Transition::FailbackStarted
        }
        E::FailbackCutover => {
            if same && v.state == VmState::FailingOver {
                return Ok(None);
            }
            site.epoch = v.site.epoch + 1;
            Transition::FailbackCutover
        }
        E::FailbackFailed => {
            site.failover_host.clear();
            Transition::FailbackFailed {
                error: req.error.clone(),
            }
        }
        E::PlannedStarted | E::UnplannedStarted => {
            if same && v.state == VmState::FailingOver {
                return Ok(None);
            }
            if req.host.is_empty() || req.failover_id.is_empty() {
                return Err(RegistryError::InvalidArgument(
                    "a failover start names its host and failover id".into(),
                ));
            }
            site = FailoverSite {
                failover_host: req.host.clone(),
                epoch: v.site.epoch + 1,
                failover_id: req.failover_id.clone(),
                ..site
            };
            Transition::FailoverStarted {
                planned: e == E::PlannedStarted,
            }
        }
        E::FailedOver => {
            if same && v.state == VmState::FailedOver {
                return Ok(None);
            }
            site.active_host = site.failover_host.clone();
            site.point = req.point.clone();
            Transition::FailedOver
        }
        E::Failed => {
            site.failover_host.clear();
            Transition::FailoverFailed {
                error: req.error.clone(),
            }
        }
        E::PointChanged => {
            site.point = req.point.clone();
            Transition::PointChanged
        }
        E::Committed => {
            if same && v.state == VmState::FailoverCommitted {
                return Ok(None);
            }
            Transition::FailoverCommitted
        }
        E::Unspecified => {
            return Err(RegistryError::InvalidArgument(
                "record failover: event is unspecified".into(),
            ));
        }
    };
    if !same && !starts {
        return Err(RegistryError::FailedPrecondition(format!(
            "vm {}: failover {:?} is not the running one ({:?})",
            v.name, req.failover_id, v.site.failover_id
        )));
    }
    let state = vm_event(v, &t)?;
    Ok(Some(vec![
        state,
        Event::VmSite {
            vm: v.name.clone(),
            site,
        },
    ]))
}

impl RegistryService {
    pub(super) async fn record_failover(
        &self,
        req: Request<pb::RecordFailoverRequest>,
    ) -> R<pb::Vm> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        let e = FailoverEvent::try_from(req.event).map_err(|_| {
            RegistryError::InvalidArgument(format!("unknown failover event {}", req.event))
        })?;
        let events = {
            let st = self.state.lock().await;
            let v = st
                .vms
                .get(&req.vm)
                .ok_or_else(|| RegistryError::VmNotFound(req.vm.clone()))?;
            failover_events(v, e, &req)?
        };
        if let Some(events) = events {
            tracing::info!(vm = %req.vm, event = ?e, host = %req.host, point = %req.point, failover = %req.failover_id, "failover recorded");
            self.persist(events).await?;
        }
        Ok(Response::new(self.vm_proto(&req.vm).await?))
    }
}
