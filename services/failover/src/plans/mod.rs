//! Recovery plans (DESIGN §11): stored in the catalog namespace `plans` (each change appends a
//! whole plan or its deletion; the current set is the replay), checked by
//! `ferry_model::plan::Plan::problem` and against the registry's VMs before they are stored,
//! and run as plan jobs ([`run`]).
mod actions;
mod cuts;
mod resume;
mod run;

use std::collections::BTreeMap;

use ferry_model::plan::Plan;
use ferry_proto::registry::v1::ListJobsRequest;
use ferry_store::{Catalog, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::error::{FailoverError, Result};
use crate::job::JobTracker;
use crate::{JOB_LEASE_TTL, Orchestrator, job_resource};

/// The catalog namespace of recovery plans.
pub const NAMESPACE: &str = "plans";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
enum Entry {
    Put { plan: Plan },
    Delete { name: String },
}

#[derive(Debug, Default)]
struct Replayed {
    seq: u64,
    plans: BTreeMap<String, Plan>,
}

impl Replayed {
    fn apply(&mut self, seq: u64, entry: Entry) {
        self.seq = self.seq.max(seq);
        match entry {
            // The first of two creations racing on one name wins; the other is told so.
            Entry::Put { plan } => {
                self.plans.entry(plan.name.clone()).or_insert(plan);
            }
            Entry::Delete { name } => {
                self.plans.remove(&name);
            }
        }
    }
}

/// The plans, replayed incrementally from the catalog (other replicas' changes are picked up
/// on the next read).
#[derive(Debug)]
pub struct PlanBook {
    catalog: Catalog,
    state: Mutex<Replayed>,
}

impl PlanBook {
    pub fn new(store: Store) -> Self {
        Self {
            catalog: Catalog::new(store, NAMESPACE),
            state: Mutex::new(Replayed::default()),
        }
    }

    pub async fn plans(&self) -> Result<Vec<Plan>> {
        let mut st = self.state.lock().await;
        self.refresh(&mut st).await?;
        Ok(st.plans.values().cloned().collect())
    }

    pub async fn get(&self, name: &str) -> Result<Option<Plan>> {
        let mut st = self.state.lock().await;
        self.refresh(&mut st).await?;
        Ok(st.plans.get(name).cloned())
    }

    async fn append(&self, entry: &Entry) -> Result<()> {
        self.catalog.append(entry).await?;
        let mut st = self.state.lock().await;
        self.refresh(&mut st).await
    }

    async fn refresh(&self, st: &mut Replayed) -> Result<()> {
        for (seq, e) in self.catalog.read_from::<Entry>(st.seq).await? {
            st.apply(seq, e);
        }
        Ok(())
    }
}

impl Orchestrator {
    /// Stores a new plan: refused when it is not valid, names a VM the registry does not
    /// know, or its name is taken.
    pub async fn create_plan(&self, mut plan: Plan) -> Result<Plan> {
        if let Some(problem) = plan.problem() {
            return Err(FailoverError::InvalidArgument(problem));
        }
        for vm in plan.vms() {
            self.get_vm(vm).await.map_err(|e| match e {
                FailoverError::NotFound(_) => FailoverError::InvalidArgument(format!(
                    "plan {}: vm {vm} is not known to the registry",
                    plan.name
                )),
                e => e,
            })?;
        }
        let taken = || FailoverError::AlreadyExists(format!("plan {}", plan.name));
        if self.plans.get(&plan.name).await?.is_some() {
            return Err(taken());
        }
        if plan.consistent {
            self.group_plan_vms(&plan).await?;
        }
        plan.created_at_ms = chrono::Utc::now().timestamp_millis();
        self.plans
            .append(&Entry::Put { plan: plan.clone() })
            .await?;
        // Another replica may have stored a plan of that name first.
        match self.plans.get(&plan.name).await? {
            Some(stored) if stored == plan => {
                tracing::info!(plan = %plan.name, groups = plan.groups.len(), "recovery plan created");
                Ok(plan)
            }
            _ => Err(taken()),
        }
    }

    pub async fn list_plans(&self) -> Result<Vec<Plan>> {
        self.plans.plans().await
    }

    pub async fn get_plan(&self, name: &str) -> Result<Plan> {
        self.plans
            .get(name)
            .await?
            .ok_or_else(|| FailoverError::NotFound(format!("recovery plan {name}")))
    }

    /// Deletes a plan; refused while a job of the plan runs.
    pub async fn delete_plan(&self, name: &str) -> Result<()> {
        let plan = self.get_plan(name).await?;
        if let Some(job) = self.running_plan_job(name).await? {
            return Err(FailoverError::FailedPrecondition(format!(
                "plan {name} has job {job} running; delete it once the job has ended"
            )));
        }
        self.plans
            .append(&Entry::Delete {
                name: name.to_owned(),
            })
            .await?;
        if plan.consistent {
            self.ungroup_plan_vms(&plan).await;
        }
        tracing::info!(plan = %name, "recovery plan deleted");
        Ok(())
    }

    /// Resumes every plan job whose runner is gone (its lease is free: the replica running it
    /// stopped or died) from its first step that had not ended; a job that cannot be resumed
    /// (the plan was deleted or changed since) is ended as failed, saying to run the plan
    /// again. How many were taken.
    pub async fn resume_orphan_plan_jobs(&self) -> Result<usize> {
        let jobs = self
            .registry
            .clone()
            .list_jobs(ListJobsRequest::default())
            .await
            .map_err(|s| FailoverError::remote("registry", "list jobs", &s))?
            .into_inner()
            .jobs;
        // A job just created may not hold its lease yet.
        let settled = chrono::Utc::now().timestamp_millis() - 2 * JOB_LEASE_TTL.as_millis() as i64;
        let mut taken = 0;
        for j in jobs.iter().filter(|j| {
            j.kind.starts_with("plan-")
                && ferry_model::job::is_in_progress(j.status)
                && j.created_at_ms < settled
        }) {
            let Some(running) = self.mark_running(&j.id) else {
                continue;
            };
            let kept = match self
                .coord
                .acquire_kept(&job_resource(&j.id), &self.holder(), JOB_LEASE_TTL)
                .await
            {
                Ok(k) => k,
                Err(ferry_coord::CoordError::LeaseHeld { .. }) => continue,
                Err(e) => return Err(FailoverError::Lease(e)),
            };
            taken += 1;
            let job = JobTracker::resume(self.registry.clone(), &j.id).await?;
            let (run, steps, from, failures) = match self.resume_point(&job).await {
                Ok(r) => r,
                Err(e) => {
                    let why = FailoverError::FailedPrecondition(format!(
                        "{e}; run the plan again (vms that already failed over are skipped)"
                    ));
                    tracing::warn!(job = %j.id, plan = %j.target, error = %e, "plan job cannot be resumed; ended as failed");
                    job.fail(&why).await;
                    continue;
                }
            };
            tracing::info!(job = %j.id, plan = %j.target, step = from, "plan job resumed");
            let me = self.clone();
            tokio::spawn(async move {
                let job = me.drive_plan(job, run, steps, from, failures).await;
                tracing::info!(job = %job.id, plan = %job.target, status = job.status, "resumed plan job ended");
                drop(kept);
                drop(running);
            });
        }
        Ok(taken)
    }

    /// The id of a plan job of `plan` that has not ended, if any.
    async fn running_plan_job(&self, plan: &str) -> Result<Option<String>> {
        let jobs = self
            .registry
            .clone()
            .list_jobs(ListJobsRequest {
                target: plan.to_owned(),
            })
            .await
            .map_err(|s| FailoverError::remote("registry", "list jobs", &s))?
            .into_inner()
            .jobs;
        Ok(jobs
            .into_iter()
            .find(|j| j.kind.starts_with("plan-") && ferry_model::job::is_in_progress(j.status))
            .map(|j| j.id))
    }
}
