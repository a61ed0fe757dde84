//! Scheduled drills (`ferry drill schedule TARGET --every D`, `ferry drill list`) and drills
//! of a whole plan. A schedule lives on its VMs in the registry (`Vm.drill_schedule`, which
//! also turns their health to warning when the drill is overdue or failed); this service runs
//! each target's drill when due. A Redis lease per target, held for one interval, lets only
//! one replica start it, and keeps a drill that cannot even start from being retried before
//! the next interval.
use std::collections::BTreeMap;
use std::time::Duration;

use ferry_model::drill::{self, LastDrill};
use ferry_proto::common::v1::{Job, StepStatus};
use ferry_proto::failover::v1::{RunDrillRequest, ScheduleDrillRequest, ScheduledDrill};
use ferry_proto::registry::v1::{DrillSchedule, ListVmsRequest, SetDrillScheduleRequest, Vm};

use crate::Orchestrator;
use crate::error::{FailoverError, Result};
use crate::job::JobTracker;

/// How often the schedules are looked at.
const SCAN: Duration = Duration::from_secs(2);

/// A VM's last drill since its schedule was set.
fn last_drill(v: &Vm, since_ms: i64) -> Option<LastDrill<'_>> {
    v.last_verified
        .as_ref()
        .filter(|l| l.time_ms >= since_ms)
        .map(|l| LastDrill {
            time_ms: l.time_ms,
            ok: l.ok,
            message: &l.message,
        })
}

/// The schedule of `target` from the VMs in it.
fn summarize(target: &str, vms: &[&Vm], now_ms: i64) -> ScheduledDrill {
    let mut out = ScheduledDrill {
        target: target.to_owned(),
        last_ok: true,
        next_due_ms: i64::MAX,
        last_run_ms: i64::MAX,
        ..Default::default()
    };
    for v in vms {
        let Some(s) = v.drill_schedule.as_ref() else {
            continue;
        };
        out.every_seconds = s.every_seconds;
        out.boot_check.clone_from(&s.boot_check);
        out.vms.push(v.name.clone());
        let last = last_drill(v, s.since_ms);
        out.last_run_ms = out.last_run_ms.min(last.map_or(0, |l| l.time_ms));
        if let Some(l) = last.filter(|l| !l.ok) {
            if out.last_ok {
                out.last_message = format!("{}: {}", v.name, l.message);
            }
            out.last_ok = false;
        }
        if last.is_none() {
            out.last_ok = false;
        }
        let due = drill::due_ms(s.every_seconds, s.since_ms, last);
        out.next_due_ms = out.next_due_ms.min(due);
        out.overdue |= drill::overdue(s.every_seconds, due, now_ms);
    }
    out
}

impl Orchestrator {
    /// Every drill schedule, by target.
    pub async fn drill_schedules(&self) -> Result<Vec<ScheduledDrill>> {
        let vms = self
            .registry
            .clone()
            .list_vms(ListVmsRequest {})
            .await
            .map_err(|s| FailoverError::remote("registry", "list vms", &s))?
            .into_inner()
            .vms;
        let mut by_target: BTreeMap<&str, Vec<&Vm>> = BTreeMap::new();
        for v in &vms {
            if let Some(s) = v.drill_schedule.as_ref() {
                by_target.entry(s.target.as_str()).or_default().push(v);
            }
        }
        let now = ferry_proto::now_ms();
        Ok(by_target
            .into_iter()
            .map(|(t, vms)| summarize(t, &vms, now))
            .collect())
    }

    /// Schedules (or, with every 0, unschedules) the drills of a VM or a plan.
    pub async fn schedule_drill(&self, req: ScheduleDrillRequest) -> Result<ScheduledDrill> {
        let target = req.target.as_str();
        if req.every_seconds > 0 {
            drill::check_every(req.every_seconds).map_err(FailoverError::InvalidArgument)?;
        }
        let current: Vec<String> = self
            .drill_schedules()
            .await?
            .into_iter()
            .filter(|d| d.target == target)
            .flat_map(|d| d.vms)
            .collect();
        let vms: Vec<String> = if req.every_seconds == 0 {
            current.clone()
        } else {
            self.drill_targets(target).await?
        };
        if req.every_seconds > 0 {
            for vm in &vms {
                let v = self.get_vm(vm).await?;
                if let Some(s) = v.drill_schedule.filter(|s| s.target != target) {
                    return Err(FailoverError::FailedPrecondition(format!(
                        "vm {vm} is drilled by the schedule of {}: unschedule that first (ferry drill unschedule {})",
                        s.target, s.target
                    )));
                }
            }
        }
        // VMs that left the plan since leave its schedule.
        for vm in current.iter().filter(|v| !vms.contains(v)) {
            self.set_drill_schedule(vm, None).await?;
        }
        let schedule = (req.every_seconds > 0).then(|| DrillSchedule {
            target: target.to_owned(),
            every_seconds: req.every_seconds,
            boot_check: req.boot_check.clone(),
            since_ms: 0,
        });
        for vm in &vms {
            self.set_drill_schedule(vm, schedule.clone()).await?;
        }
        tracing::info!(
            target,
            every_s = req.every_seconds,
            vms = vms.len(),
            "drill schedule set"
        );
        Ok(self
            .drill_schedules()
            .await?
            .into_iter()
            .find(|d| d.target == target)
            .unwrap_or(ScheduledDrill {
                target: target.to_owned(),
                ..Default::default()
            }))
    }

    /// The VMs a drill of `target` drills: a plan's, or the VM itself.
    async fn drill_targets(&self, target: &str) -> Result<Vec<String>> {
        if let Some(plan) = self.plans.get(target).await? {
            return Ok(plan.vms().map(str::to_owned).collect());
        }
        match self.get_vm(target).await {
            Ok(v) => Ok(vec![v.name]),
            Err(FailoverError::NotFound(_)) => Err(FailoverError::NotFound(format!(
                "drill target {target}: neither a vm nor a recovery plan"
            ))),
            Err(e) => Err(e),
        }
    }

    async fn set_drill_schedule(&self, vm: &str, schedule: Option<DrillSchedule>) -> Result<()> {
        self.registry
            .clone()
            .set_drill_schedule(SetDrillScheduleRequest {
                vm: vm.to_owned(),
                schedule,
            })
            .await
            .map_err(|s| FailoverError::remote("registry", "set drill schedule", &s))?;
        Ok(())
    }

    /// Drills every VM of `plan`, group by group, one after the other: one `drill-plan` job
    /// with a step per VM (each VM's drill is its own job, recorded on the VM).
    pub(crate) async fn run_plan_drill(
        &self,
        plan: &ferry_model::plan::Plan,
        boot_check: &str,
    ) -> Result<Job> {
        let vms: Vec<String> = plan.vms().map(str::to_owned).collect();
        let names: Vec<String> = vms.iter().map(|v| format!("drill {v}")).collect();
        let steps: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut job =
            JobTracker::start(self.registry.clone(), "drill-plan", &plan.name, &steps).await?;
        let mut failures = Vec::new();
        for (i, vm) in vms.iter().enumerate() {
            job.step_running(i).await;
            let req = RunDrillRequest {
                vm: vm.clone(),
                boot_check: boot_check.to_owned(),
                point: String::new(),
            };
            match self.run_vm_drill(req).await {
                Ok(j) if j.status == StepStatus::Succeeded as i32 => {
                    job.step_done(i, format!("job {} succeeded", j.id)).await;
                }
                Ok(j) => {
                    let why = format!("job {} failed: {}", j.id, j.error);
                    failures.push(format!("{vm}: {why}"));
                    job.step_ended(i, StepStatus::Failed, why).await;
                }
                Err(e) => {
                    failures.push(format!("{vm}: {e}"));
                    job.step_ended(i, StepStatus::Failed, e.to_string()).await;
                }
            }
        }
        if failures.is_empty() {
            return Ok(job.succeed().await);
        }
        let why = FailoverError::FailedPrecondition(failures.join("; "));
        Ok(job.fail(&why).await)
    }

    /// Every [`SCAN`] until shutdown: starts the drills that are due.
    pub async fn drill_schedule_loop(self) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(SCAN) => {}
            }
            if let Err(e) = self.start_due_drills().await {
                tracing::warn!(error = %e, "looking for due drills failed");
            }
        }
    }

    async fn start_due_drills(&self) -> Result<()> {
        let now = ferry_proto::now_ms();
        for d in self.drill_schedules().await? {
            if d.next_due_ms > now || d.every_seconds == 0 {
                continue;
            }
            let Some(running) = self.mark_running(&format!("drill-schedule-{}", d.target)) else {
                continue;
            };
            // Held for one interval, never released: the next start is an interval later.
            let gate = self
                .coord
                .acquire_lease(
                    &format!("drill-schedule-{}", d.target),
                    &uuid::Uuid::new_v4().to_string(),
                    Duration::from_secs(d.every_seconds),
                )
                .await;
            match gate {
                Ok(_) => {}
                Err(ferry_coord::CoordError::LeaseHeld { .. }) => continue,
                Err(e) => return Err(FailoverError::Lease(e)),
            }
            let me = self.clone();
            tokio::spawn(async move {
                let req = RunDrillRequest {
                    vm: d.target.clone(),
                    boot_check: d.boot_check.clone(),
                    point: String::new(),
                };
                tracing::info!(target = %d.target, "scheduled drill started");
                match me.run_drill(req).await {
                    Ok(j) => {
                        tracing::info!(target = %d.target, job = %j.id, status = j.status, "scheduled drill ended")
                    }
                    Err(e) => {
                        tracing::warn!(target = %d.target, error = %e, "scheduled drill could not run")
                    }
                }
                drop(running);
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::registry::v1::Verification;

    fn vm(name: &str, since: i64, last: Option<(i64, bool)>) -> Vm {
        Vm {
            name: name.into(),
            drill_schedule: Some(DrillSchedule {
                target: "app".into(),
                every_seconds: 60,
                boot_check: String::new(),
                since_ms: since,
            }),
            last_verified: last.map(|(t, ok)| Verification {
                time_ms: t,
                ok,
                message: "block 3".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_plans_schedule_is_as_due_and_as_failed_as_its_worst_vm() {
        let (a, b) = (vm("a", 1_000, Some((5_000, true))), vm("b", 1_000, None));
        let s = summarize("app", &[&a, &b], 2_000);
        assert_eq!(s.vms, ["a", "b"]);
        assert_eq!(
            s.next_due_ms, 61_000,
            "b was never drilled: due from the schedule"
        );
        assert_eq!(s.last_run_ms, 0);
        assert!(!s.last_ok && !s.overdue);
        let c = vm("c", 1_000, Some((4_000, false)));
        let s = summarize("app", &[&a, &c], 200_000);
        assert!(!s.last_ok && s.last_message.contains("c: block 3"), "{s:?}");
        assert!(s.overdue, "{s:?}");
    }
}
