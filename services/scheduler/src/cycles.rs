//! Cycle timing: the schedule of delta cycles per protected VM (rebuilt from the registry),
//! and the leader's loop that queues each cycle when due and starts retention runs.
use std::sync::Arc;
use std::time::Duration;

use ferry_mesh::Component;
use ferry_model::{Health, VmState};
use ferry_proto::now_ms;
use ferry_proto::registry::v1::{ListVmsRequest, registry_client::RegistryClient};
use ferry_proto::scheduler::v1 as pb;

use crate::leader;
use crate::work::QueuedWork;
use crate::{SchedulerService, lifecycle_of};

#[derive(Clone, Debug)]
pub(crate) struct CycleSchedule {
    pub(crate) host: String,
    pub(crate) every: Duration,
    pub(crate) next_due_ms: i64,
    /// The policy's retention window and thinning (every point for `keep_all_seconds`, then
    /// one per `thin_to_seconds`); retention runs every `[retention] interval` of the config.
    pub(crate) retention: Duration,
    pub(crate) keep_all_seconds: u64,
    pub(crate) thin_to_seconds: u64,
    /// How often a cycle is app-consistent (policy), and when the last one was queued.
    pub(crate) app_every: Option<Duration>,
    pub(crate) last_app_ms: i64,
    /// The VM's replication group ("" = none): its members are cut together.
    pub(crate) group: String,
}

/// Cycles due together: one VM, or the VMs of a replication group, cut at one instant (the
/// group runs at its members' shortest interval).
pub(crate) struct Due {
    members: Vec<(String, CycleSchedule, bool)>,
    group: String,
    every: Duration,
}

/// When a VM's previous cycle is still running at its next due time, check again this soon.
const CYCLE_BUSY_RETRY: Duration = Duration::from_millis(200);

/// How often the schedule is re-read from the registry.
const SCHEDULE_SYNC: Duration = Duration::from_secs(5);

impl SchedulerService {
    /// Dispatches a delta cycle to each protected VM's host every policy interval. One work
    /// item per VM (`delta-<vm>`): while a cycle is queued or running, no second one piles up.
    pub(crate) async fn cycle_loop(self: Arc<Self>, term: leader::Term) {
        let mut last_sync = 0i64;
        let mut last_retention = now_ms();
        let every_retention = self.cfg.retention.interval.as_millis() as i64;
        let mut retention: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = term.ended() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if now_ms() - last_sync >= SCHEDULE_SYNC.as_millis() as i64 {
                last_sync = now_ms();
                if let Err(e) = self.sync_schedule().await {
                    tracing::debug!(error = %e, "schedule sync with the registry failed");
                }
            }
            // One run at a time: a run longer than the interval delays the next one.
            if now_ms() - last_retention >= every_retention
                && retention.as_ref().is_none_or(|r| r.is_finished())
            {
                last_retention = now_ms();
                let me = self.clone();
                retention = Some(tokio::spawn(async move { me.run_retention().await }));
            }
            for due in self.take_due().await {
                if !self.queue_due(&term, due).await {
                    return;
                }
            }
        }
    }

    /// The cycles due now, each with whether it is app-consistent (a VM due takes the rest of
    /// its replication group along); their next due times (and last app-consistent times) are
    /// moved on.
    async fn take_due(&self) -> Vec<Due> {
        let mut cycles = self.cycles.lock().await;
        let now = now_ms();
        let mut due: Vec<String> = cycles
            .iter()
            .filter(|(_, c)| c.next_due_ms <= now)
            .map(|(vm, _)| vm.clone())
            .collect();
        due.sort();
        let mut taken = std::collections::HashSet::new();
        let mut out = Vec::new();
        for vm in due {
            let Some(group) = cycles.get(&vm).map(|c| c.group.clone()) else {
                continue;
            };
            if taken.contains(&vm) {
                continue;
            }
            let names: Vec<String> = if group.is_empty() {
                vec![vm]
            } else {
                let mut n: Vec<String> = cycles
                    .iter()
                    .filter(|(_, c)| c.group == group)
                    .map(|(n, _)| n.clone())
                    .collect();
                n.sort();
                n
            };
            let every = names
                .iter()
                .filter_map(|n| cycles.get(n).map(|c| c.every))
                .min()
                .unwrap_or(Duration::from_secs(300));
            let mut members = Vec::with_capacity(names.len());
            for n in names {
                let Some(c) = cycles.get_mut(&n) else {
                    continue;
                };
                c.next_due_ms = now + every.as_millis() as i64;
                let app = c
                    .app_every
                    .is_some_and(|e| now - c.last_app_ms >= e.as_millis() as i64);
                if app {
                    c.last_app_ms = now;
                }
                taken.insert(n.clone());
                members.push((n, c.clone(), app));
            }
            out.push(Due {
                members,
                group,
                every,
            });
        }
        out
    }

    /// Queues due cycles. A group's members that can start now are queued under one new cut
    /// (opened first, so every member can join it); a member still busy or waiting for a retry
    /// is queued as before, alone, and misses this cut. False when this replica is no longer
    /// the leader.
    async fn queue_due(&self, term: &leader::Term, due: Due) -> bool {
        let Due {
            members,
            group,
            every,
        } = due;
        let mut cut = String::new();
        let mut alone = Vec::new();
        let mut together = Vec::new();
        if group.is_empty() {
            alone = members;
        } else {
            for m in members {
                if self.ready(&m.0, &m.1.host).await {
                    together.push(m);
                } else {
                    alone.push(m);
                }
            }
            let names: Vec<String> = together.iter().map(|m| m.0.clone()).collect();
            if !names.is_empty() {
                cut = crate::cuts::new_cut_id(&group, now_ms());
                match self.coord.open_cut(&cut, &names).await {
                    Ok(()) => {
                        tracing::info!(group = %group, cut = %cut, members = names.len(), "group cut queued")
                    }
                    Err(e) => {
                        tracing::warn!(group = %group, error = %e, "opening a group cut failed; its vms cut alone");
                        cut.clear();
                    }
                }
            }
        }
        for (vm, c, app) in together {
            if !self.queue_cycle(term, vm, c, app, &cut, every).await {
                return false;
            }
        }
        for (vm, c, app) in alone {
            if !self.queue_cycle(term, vm, c, app, "", every).await {
                return false;
            }
        }
        true
    }

    /// Whether a cycle of `vm` can be queued now: none waits for a retry, none is queued or
    /// running.
    async fn ready(&self, vm: &str, host: &str) -> bool {
        // The queue first, then the retry set: failed work moves from the one to the other
        // atomically, so in this order it is seen in one of them (ACK_AND_RETRY).
        let id = format!("delta-{vm}");
        let queued = self
            .coord
            .list_work(host)
            .await
            .map_or(true, |items| items.iter().any(|(i, _, _)| *i == id));
        !queued && matches!(self.coord.pending_retry(&id).await, Ok(None))
    }

    /// Queues the delta cycle of `vm` (schedule `c`, app-consistent if `app`) unless it waits
    /// for a retry or its previous cycle is still queued or running. False when this replica
    /// is no longer the leader (the cycle loop ends).
    async fn queue_cycle(
        &self,
        term: &leader::Term,
        vm: String,
        c: CycleSchedule,
        app: bool,
        cut: &str,
        every: Duration,
    ) -> bool {
        let w = QueuedWork {
            id: format!("delta-{vm}"),
            kind: pb::WorkKind::DeltaCycle as i32,
            vm: vm.clone(),
            job_id: String::new(),
            attempt: 1,
            created_at_ms: now_ms(),
            host: c.host.clone(),
            last_error: String::new(),
            app_consistent: app,
            failover: String::new(),
            cancels: String::new(),
            cut_id: cut.to_owned(),
        };
        let Ok(payload) = serde_json::to_string(&w) else {
            return true;
        };
        // The previous cycle is still queued or running: try again shortly instead of
        // skipping a whole interval, so the next cut follows it at once.
        let busy = match self.coord.list_work(&c.host).await {
            Ok(items) => items.iter().any(|(id, _, _)| *id == w.id),
            Err(_) => false,
        };
        if busy {
            if let Some(e) = self.cycles.lock().await.get_mut(&vm) {
                e.next_due_ms = now_ms() + CYCLE_BUSY_RETRY.as_millis() as i64;
            }
            return true;
        }
        // A failed cycle waiting for its backoff is this VM's next cycle: the retry
        // loop queues it when due, so the schedule does not reset its attempts. Asked after
        // the queue: failed work moves from the one to the other atomically (ACK_AND_RETRY),
        // so in this order it cannot be missed in both.
        match self.coord.pending_retry(&w.id).await {
            Ok(Some(_)) => return true,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(vm = %vm, error = %e, "reading the retry set failed");
                return true;
            }
        }
        // Fenced by the leader lease, at most once per slot of the policy interval: a
        // deposed leader and its successor cannot both queue one slot.
        let slot = (now_ms().max(0) as u64) / (every.as_millis().max(1) as u64);
        match self
            .coord
            .push_slot(&term.lease, &c.host, &vm, slot, &w.id, &payload)
            .await
        {
            Ok(ferry_coord::SlotPush::Queued) => {
                tracing::debug!(vm = %vm, host = %c.host, slot, "delta cycle queued")
            }
            Ok(ferry_coord::SlotPush::AlreadyQueued { last }) => {
                tracing::debug!(vm = %vm, slot, last, "delta cycle of this slot already queued")
            }
            Ok(ferry_coord::SlotPush::Busy) => {
                if let Some(e) = self.cycles.lock().await.get_mut(&vm) {
                    e.next_due_ms = now_ms() + CYCLE_BUSY_RETRY.as_millis() as i64;
                }
            }
            Err(
                e @ (ferry_coord::CoordError::LeaseLost { .. }
                | ferry_coord::CoordError::Fenced { .. }),
            ) => {
                tracing::info!(vm = %vm, error = %e, "no longer the scheduler leader; cycle not queued");
                return false;
            }
            Err(e) => tracing::warn!(vm = %vm, error = %e, "queueing a delta cycle failed"),
        }
        true
    }

    /// Protected VMs and their policies, from the registry. A VM in critical health waits for
    /// an operator instead of failing the same way every cycle. A VM failing back keeps
    /// replicating until phase 2 shuts it down (phase 1 runs while it runs).
    async fn sync_schedule(&self) -> anyhow::Result<()> {
        let ch = self.peers.channel(Component::Registry)?;
        let vms = RegistryClient::new(ch)
            .list_vms(ListVmsRequest {})
            .await?
            .into_inner()
            .vms;
        self.start_due_resyncs(&vms).await;
        let mut cycles = self.cycles.lock().await;
        let mut keep = std::collections::HashSet::new();
        for v in vms.into_iter().filter(|v| {
            lifecycle_of(v).is_some_and(|(s, h)| {
                matches!(s, VmState::Protected | VmState::FailingBack) && h != Health::Critical
            })
        }) {
            let every = Duration::from_secs(
                v.policy
                    .as_ref()
                    .map_or(300, |p| p.frequency_seconds.max(1)),
            );
            let retention = Duration::from_secs(
                3600 * v.policy.as_ref().map_or(24, |p| p.retention_hours.max(1)),
            );
            // 0 (a policy from before thinning) is the storage-writer's default.
            let (keep_all_seconds, thin_to_seconds) = v
                .policy
                .as_ref()
                .map_or((0, 0), |p| (p.keep_all_seconds, p.thin_to_seconds));
            let app_every = v
                .policy
                .as_ref()
                .map(|p| p.app_consistent_seconds)
                .filter(|s| *s > 0)
                .map(Duration::from_secs);
            let group = v
                .policy
                .as_ref()
                .map(|p| p.replication_group.clone())
                .unwrap_or_default();
            keep.insert(v.name.clone());
            let e = cycles.entry(v.name.clone()).or_insert_with(|| {
                tracing::info!(vm = %v.name, host = %v.host, every_s = every.as_secs(), "delta cycles scheduled");
                CycleSchedule {
                    host: v.host.clone(),
                    every,
                    next_due_ms: now_ms() + every.as_millis() as i64,
                    retention,
                    keep_all_seconds,
                    thin_to_seconds,
                    app_every,
                    last_app_ms: 0,
                    group: group.clone(),
                }
            });
            e.host = v.host.clone();
            e.retention = retention;
            e.keep_all_seconds = keep_all_seconds;
            e.thin_to_seconds = thin_to_seconds;
            e.app_every = app_every;
            e.group = group;
            if e.every != every {
                e.next_due_ms = e.next_due_ms.min(now_ms() + every.as_millis() as i64);
                e.every = every;
            }
        }
        cycles.retain(|vm, _| keep.contains(vm));
        Ok(())
    }
}
