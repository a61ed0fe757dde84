//! The gRPC face of [`Orchestrator`]: authorization for every call (operators read with the
//! reader role and act with the operator role; services count as admin), then the handler,
//! with errors mapped through `ferry_mesh::to_status` only.
use ferry_mesh::{Role, require_role, to_status};
use ferry_model::Operation;
use ferry_model::plan::Plan;
use ferry_proto::common::v1::Job;
use ferry_proto::failover::v1::failover_server::Failover;
use ferry_proto::failover::v1::{
    ChangeRecoveryPointRequest, CleanupTestFailoverRequest, CommitFailoverRequest,
    CompleteFailbackRequest, DeleteRecoveryPlanRequest, DeleteRecoveryPlanResponse,
    FailbackRequest, GetRecoveryPlanRequest, ListDrillSchedulesRequest, ListDrillSchedulesResponse,
    ListFailoversRequest, ListFailoversResponse, ListRecoveryPlansRequest,
    ListRecoveryPlansResponse, PlannedFailoverRequest, RecoveryPlan, ReprotectRequest,
    RunDrillRequest, RunRecoveryPlanRequest, ScheduleDrillRequest, ScheduledDrill,
    TestFailoverRequest, UnplannedFailoverRequest,
};
use tonic::{Request, Response, Status};

use crate::{FailoverError, Orchestrator};

/// `ferry.failover.v1.Failover` over an [`Orchestrator`].
#[derive(Debug, Clone)]
pub struct FailoverService {
    orchestrator: Orchestrator,
}

impl FailoverService {
    pub fn new(orchestrator: Orchestrator) -> Self {
        Self { orchestrator }
    }

    /// FAILED_PRECONDITION naming the VM's state unless it allows `op` now.
    async fn allowed(&self, vm: &str, op: Operation) -> Result<(), Status> {
        self.orchestrator
            .require_allowed(vm, op)
            .await
            .map_err(|e| to_status(&e))
    }
}

#[tonic::async_trait]
impl Failover for FailoverService {
    async fn test_failover(
        &self,
        request: Request<TestFailoverRequest>,
    ) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let req = request.into_inner();
        // A folder outside this machine's roots is bad input, whatever the VM's state.
        self.orchestrator
            .check_target_dir(&req.target_dir)
            .map_err(|e| to_status(&e))?;
        self.allowed(&req.vm, Operation::TestFailover).await?;
        let job = self
            .orchestrator
            .test_failover(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn cleanup_test_failover(
        &self,
        request: Request<CleanupTestFailoverRequest>,
    ) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let job = self
            .orchestrator
            .cleanup_test_failover(request.into_inner())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn planned_failover(
        &self,
        request: Request<PlannedFailoverRequest>,
    ) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let req = request.into_inner();
        self.allowed(&req.vm, Operation::PlannedFailover).await?;
        let job = self
            .orchestrator
            .planned_failover(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn unplanned_failover(
        &self,
        request: Request<UnplannedFailoverRequest>,
    ) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let req = request.into_inner();
        self.allowed(&req.vm, Operation::UnplannedFailover).await?;
        let job = self
            .orchestrator
            .unplanned_failover(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn commit_failover(
        &self,
        request: Request<CommitFailoverRequest>,
    ) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let req = request.into_inner();
        self.allowed(&req.vm, Operation::Commit).await?;
        let job = self
            .orchestrator
            .commit_failover(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn change_recovery_point(
        &self,
        request: Request<ChangeRecoveryPointRequest>,
    ) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let req = request.into_inner();
        self.allowed(&req.vm, Operation::ChangePoint).await?;
        let job = self
            .orchestrator
            .change_recovery_point(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn failback(&self, request: Request<FailbackRequest>) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let req = request.into_inner();
        self.allowed(&req.vm, Operation::Failback).await?;
        let job = self
            .orchestrator
            .failback(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn complete_failback(
        &self,
        request: Request<CompleteFailbackRequest>,
    ) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let req = request.into_inner();
        self.allowed(&req.vm, Operation::CompleteFailback).await?;
        let job = self
            .orchestrator
            .complete_failback(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn reprotect(&self, request: Request<ReprotectRequest>) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let req = request.into_inner();
        self.allowed(&req.vm, Operation::Reprotect).await?;
        let job = self
            .orchestrator
            .reprotect(req)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn create_recovery_plan(
        &self,
        request: Request<RecoveryPlan>,
    ) -> Result<Response<RecoveryPlan>, Status> {
        require_role(&request, Role::Contributor)?;
        let plan = Plan::try_from(request.get_ref())
            .map_err(|e| to_status(&FailoverError::InvalidArgument(e)))?;
        let plan = self
            .orchestrator
            .create_plan(plan)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(RecoveryPlan::from(&plan)))
    }

    async fn list_recovery_plans(
        &self,
        request: Request<ListRecoveryPlansRequest>,
    ) -> Result<Response<ListRecoveryPlansResponse>, Status> {
        require_role(&request, Role::Reader)?;
        let plans = self
            .orchestrator
            .list_plans()
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ListRecoveryPlansResponse {
            plans: plans.iter().map(RecoveryPlan::from).collect(),
        }))
    }

    async fn get_recovery_plan(
        &self,
        request: Request<GetRecoveryPlanRequest>,
    ) -> Result<Response<RecoveryPlan>, Status> {
        require_role(&request, Role::Reader)?;
        let plan = self
            .orchestrator
            .get_plan(&request.get_ref().name)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(RecoveryPlan::from(&plan)))
    }

    async fn delete_recovery_plan(
        &self,
        request: Request<DeleteRecoveryPlanRequest>,
    ) -> Result<Response<DeleteRecoveryPlanResponse>, Status> {
        require_role(&request, Role::Contributor)?;
        self.orchestrator
            .delete_plan(&request.get_ref().name)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(DeleteRecoveryPlanResponse {}))
    }

    async fn run_recovery_plan(
        &self,
        request: Request<RunRecoveryPlanRequest>,
    ) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let job = self
            .orchestrator
            .run_plan(request.into_inner())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn run_drill(&self, request: Request<RunDrillRequest>) -> Result<Response<Job>, Status> {
        require_role(&request, Role::Operator)?;
        let job = self
            .orchestrator
            .run_drill(request.into_inner())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(job))
    }

    async fn schedule_drill(
        &self,
        request: Request<ScheduleDrillRequest>,
    ) -> Result<Response<ScheduledDrill>, Status> {
        require_role(&request, Role::Operator)?;
        let d = self
            .orchestrator
            .schedule_drill(request.into_inner())
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(d))
    }

    async fn list_drill_schedules(
        &self,
        request: Request<ListDrillSchedulesRequest>,
    ) -> Result<Response<ListDrillSchedulesResponse>, Status> {
        require_role(&request, Role::Reader)?;
        let drills = self
            .orchestrator
            .drill_schedules()
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ListDrillSchedulesResponse { drills }))
    }

    async fn list_failovers(
        &self,
        request: Request<ListFailoversRequest>,
    ) -> Result<Response<ListFailoversResponse>, Status> {
        require_role(&request, Role::Reader)?;
        let records = self
            .orchestrator
            .list_failovers()
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ListFailoversResponse {
            failovers: records.iter().map(crate::Record::to_proto).collect(),
        }))
    }
}
