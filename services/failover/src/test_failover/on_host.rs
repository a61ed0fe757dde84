//! Test failover on the VM's recovery host: the work is dispatched to that host's agent
//! through the scheduler (RECOVER_VM: it fetches the point over QUIC, writes the disks into
//! its `[recovery]` folder, serves them and starts the VM with the test network), and the job
//! waits for the outcome the scheduler keeps. Cleanup dispatches REMOVE_RECOVERED.
//!
//! Both work items are named after the job (`job-<id>`), so a replica that resumes the job
//! dispatches the same item again and waits for the same outcome; the agent's marker file
//! makes a re-delivered item answer without redoing it.
use ferry_coord::KeptLease;
use ferry_model::TestFailover;
use ferry_proto::common::v1::{RecoveryPoint, VmHardware};
use ferry_proto::registry::v1::Vm;
use ferry_proto::scheduler::v1::{FailoverWork, WorkKind};
use tracing::info;

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::records::{Record, STATE_ACTIVE};

impl Orchestrator {
    pub(super) async fn run_test_on_host(
        &self,
        job: &mut JobTracker,
        kept: &KeptLease,
        record: &mut Record,
        vm: &Vm,
        point: &RecoveryPoint,
    ) -> Result<()> {
        job.enter_step(0).await?;
        job.step_done(
            0,
            format!(
                "point {} ({} ms), {} disks, on host {}",
                point.id,
                point.time_ms,
                point.disks.len(),
                record.host
            ),
        )
        .await;
        job.enter_step(1).await?;
        let total: u64 = point.disks.iter().map(|d| d.virtual_size).sum();
        job.set_bytes(total, 0);
        let work = FailoverWork {
            point: point.id.clone(),
            network: "test".into(),
            kind: "test".into(),
            failover_id: record.job_id.clone(),
            hardware: Some(test_hardware(vm)),
            final_sync: false,
            nic_addresses: Default::default(),
            instant: record.instant,
            ..FailoverWork::default()
        };
        let kind = WorkKind::RecoverVm;
        let recovered = self
            .dispatch_for_job(&record.host, kind, &vm.name, job, work)
            .await?;
        job.set_bytes(total, total);
        job.step_done(
            1,
            format!(
                "{} disks in {} on {} ({} driver){}",
                recovered.disks.len(),
                recovered.dir,
                record.host,
                recovered.driver,
                crate::host_work::made_from(&recovered)
            ),
        )
        .await;
        job.enter_step(2).await?;
        record.set_recovered(&recovered);
        record.state = STATE_ACTIVE.into();
        record.updated_at_ms = chrono::Utc::now().timestamp_millis();
        self.ledger
            .put_fenced(record, &self.coord, kept.lease())
            .await?;
        if let Err(e) = self
            .set_failover_state(&vm.name, TestFailover::Active)
            .await
        {
            return Err(FailoverError::FailedPrecondition(format!(
                "{e}; the test failover on {} is recorded: run cleanup to remove it",
                record.host
            )));
        }
        job.step_done(2, format!("test vm running on {}", record.host))
            .await;
        info!(vm = %vm.name, point = %point.id, host = %record.host, dir = %recovered.dir, "test failover running on the recovery host");
        Ok(())
    }

    /// Stops the recovered VM of `record` and removes its folder on its host (job `job_id`).
    pub(super) async fn remove_on_host(&self, job_id: &str, record: &Record) -> Result<()> {
        let work = FailoverWork {
            point: record.point_id.clone(),
            network: "test".into(),
            kind: record.kind.clone(),
            failover_id: record.job_id.clone(),
            hardware: None,
            final_sync: false,
            nic_addresses: Default::default(),
            ..FailoverWork::default()
        };
        let kind = WorkKind::RemoveRecovered;
        self.dispatch_and_wait(&record.host, kind, &record.vm, job_id, work, None)
            .await?;
        Ok(())
    }
}

/// The VM's hardware with every NIC on the policy's test network (at least one NIC, so the
/// test VM has a network to be reached on).
fn test_hardware(vm: &Vm) -> VmHardware {
    let hw = vm.hardware.clone().unwrap_or_default();
    let nics = hw.networks.len().max(1);
    let network = vm
        .policy
        .as_ref()
        .map(|p| p.test_network.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| ferry_model::policy::DEFAULT_TEST_NETWORK.to_owned());
    VmHardware {
        networks: vec![network; nics],
        ..hw
    }
}
