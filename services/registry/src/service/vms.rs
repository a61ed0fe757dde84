//! VMs: listing and showing them, and the operator's protect, resync and repair requests,
//! plus the failover service's record of a VM's failover state.
use std::sync::Arc;

use ferry_mesh::Role;
use ferry_model::TestFailover;
use ferry_proto::common::v1::Job;
use ferry_proto::registry::v1 as pb;
use tonic::{Request, Response};

use super::{R, RegistryService};
use crate::error::RegistryError;
use crate::state::{Event, PolicyRecord};

impl RegistryService {
    pub(super) async fn list_vms(
        &self,
        req: Request<pb::ListVmsRequest>,
    ) -> R<pb::ListVmsResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let st = self.state.lock().await;
        let vms = st
            .vms
            .values()
            .map(|v| {
                self.vm_view(
                    v,
                    st.hosts
                        .get(&v.host)
                        .map(|h| h.site.clone())
                        .unwrap_or_default(),
                )
            })
            .collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    pub(super) async fn get_vm(&self, req: Request<pb::GetVmRequest>) -> R<pb::Vm> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        Ok(Response::new(self.vm_proto(&req.into_inner().name).await?))
    }

    pub(super) async fn protect_vm(self: &Arc<Self>, req: Request<pb::ProtectVmRequest>) -> R<Job> {
        ferry_mesh::require_role(&req, Role::Contributor)?;
        let req = req.into_inner();
        let job = self
            .start_protection(&req.name, PolicyRecord::from_proto(req.policy.as_ref()))
            .await?;
        Ok(Response::new(job))
    }

    pub(super) async fn unprotect_vm(
        self: &Arc<Self>,
        req: Request<pb::UnprotectVmRequest>,
    ) -> R<Job> {
        ferry_mesh::require_role(&req, Role::Contributor)?;
        let req = req.into_inner();
        let job = self
            .start_unprotect(&req.name, req.delete_points, req.force)
            .await?;
        Ok(Response::new(job))
    }

    pub(super) async fn update_policy(&self, req: Request<pb::UpdatePolicyRequest>) -> R<pb::Vm> {
        ferry_mesh::require_role(&req, Role::Contributor)?;
        let req = req.into_inner();
        let Some(policy) = req.policy.as_ref() else {
            return Err(RegistryError::InvalidArgument(format!(
                "update policy of vm {}: no policy given",
                req.name
            ))
            .into());
        };
        self.update_policy_of(&req.name, PolicyRecord::from_proto(Some(policy)))
            .await?;
        Ok(Response::new(self.vm_proto(&req.name).await?))
    }

    pub(super) async fn resync_vm(self: &Arc<Self>, req: Request<pb::ResyncVmRequest>) -> R<Job> {
        // Operators start one now; the scheduler starts automatic ones in the resync window.
        if !matches!(ferry_mesh::caller(&req), ferry_mesh::Caller::Service(_)) {
            ferry_mesh::require_role(&req, Role::Operator)?;
        }
        let name = req.into_inner().name;
        Ok(Response::new(self.start_resync(&name).await?))
    }

    pub(super) async fn repair_vm(
        self: &Arc<Self>,
        req: Request<pb::RepairVmRequest>,
    ) -> R<pb::Vm> {
        ferry_mesh::require_role(&req, Role::Operator)?;
        let name = req.into_inner().name;
        self.repair(&name).await?;
        Ok(Response::new(self.vm_proto(&name).await?))
    }

    pub(super) async fn set_failover_state(
        &self,
        req: Request<pb::SetFailoverStateRequest>,
    ) -> R<pb::Vm> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        let failover_state = TestFailover::try_from(req.failover_state)
            .map_err(|e| RegistryError::InvalidArgument(e.to_string()))?;
        if !self.state.lock().await.vms.contains_key(&req.vm) {
            return Err(RegistryError::VmNotFound(req.vm).into());
        }
        self.persist(vec![Event::VmFailover {
            vm: req.vm.clone(),
            failover_state,
        }])
        .await?;
        Ok(Response::new(self.vm_proto(&req.vm).await?))
    }

    /// Records a drill's result on the VM (the failover service, after each drill).
    pub(super) async fn record_verification(
        &self,
        req: Request<pb::RecordVerificationRequest>,
    ) -> R<pb::Vm> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        if !self.state.lock().await.vms.contains_key(&req.vm) {
            return Err(RegistryError::VmNotFound(req.vm).into());
        }
        let verification = crate::state::Verification {
            point_id: req.point_id,
            time_ms: ferry_proto::now_ms(),
            ok: req.ok,
            message: req.message,
            job_id: req.job_id,
        };
        tracing::info!(vm = %req.vm, point = %verification.point_id, ok = verification.ok, "drill result recorded");
        self.persist(vec![Event::VmVerified {
            vm: req.vm.clone(),
            verification,
        }])
        .await?;
        Ok(Response::new(self.vm_proto(&req.vm).await?))
    }

    /// Sets or removes the VM's drill schedule (the failover service, for `ferry drill
    /// schedule`); an interval out of range is refused with the range.
    pub(super) async fn set_drill_schedule(
        &self,
        req: Request<pb::SetDrillScheduleRequest>,
    ) -> R<pb::Vm> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        if !self.state.lock().await.vms.contains_key(&req.vm) {
            return Err(RegistryError::VmNotFound(req.vm).into());
        }
        let schedule = match req.schedule.filter(|s| s.every_seconds > 0) {
            None => None,
            Some(s) => {
                ferry_model::drill::check_every(s.every_seconds)
                    .map_err(RegistryError::InvalidArgument)?;
                Some(crate::state::DrillSchedule {
                    target: s.target,
                    every_seconds: s.every_seconds,
                    boot_check: s.boot_check,
                    since_ms: if s.since_ms > 0 {
                        s.since_ms
                    } else {
                        ferry_proto::now_ms()
                    },
                })
            }
        };
        tracing::info!(vm = %req.vm, every_s = schedule.as_ref().map_or(0, |s| s.every_seconds), "drill schedule set");
        self.persist(vec![Event::VmDrillScheduled {
            vm: req.vm.clone(),
            schedule,
        }])
        .await?;
        Ok(Response::new(self.vm_proto(&req.vm).await?))
    }
}
