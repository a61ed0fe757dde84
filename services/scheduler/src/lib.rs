//! The scheduler: a Redis work queue per host and a server stream that hands work to each
//! host's agent. Work that was sent but never completed is re-sent when the host's agent
//! reconnects, so an agent killed mid-copy picks its copy up again after a restart. Failed
//! recoverable work goes to the retry set with backoff (DESIGN §2.6).
pub mod leader;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferry_coord::Coord;
use ferry_mesh::{ClientTls, Component, MeshConfig, Role};
use ferry_proto::now_ms;
use ferry_proto::registry::v1::{
    ListVmsRequest, ReportReplicationErrorRequest, registry_client::RegistryClient,
};
use ferry_proto::scheduler::v1::{self as pb, WorkItem, scheduler_server::Scheduler};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Backoff steps in retry time units (DESIGN §2.6: 1, 2, 4, 8, 10 minutes, then every 30).
pub const BACKOFF_UNITS: [u32; 5] = [1, 2, 4, 8, 10];
pub const BACKOFF_TAIL_UNITS: u32 = 30;

/// The JSON form of a work item in Redis.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct QueuedWork {
    id: String,
    kind: i32,
    vm: String,
    job_id: String,
    attempt: u32,
    created_at_ms: i64,
    host: String,
    #[serde(default)]
    last_error: String,
    #[serde(default)]
    app_consistent: bool,
}

impl QueuedWork {
    fn to_proto(&self) -> WorkItem {
        WorkItem {
            id: self.id.clone(),
            kind: self.kind,
            vm: self.vm.clone(),
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            created_at_ms: self.created_at_ms,
            retry_time_unit_ms: 0,
            app_consistent: self.app_consistent,
        }
    }
}

/// Delay before retry `attempt` (1-based) in the configured time unit.
pub fn backoff(attempt: u32, unit: Duration) -> Duration {
    let steps = BACKOFF_UNITS
        .get(attempt.saturating_sub(1) as usize)
        .copied()
        .unwrap_or(BACKOFF_TAIL_UNITS);
    unit * steps
}

pub struct SchedulerService {
    cfg: MeshConfig,
    coord: Coord,
    shutdown: CancellationToken,
    /// Delta cycle timing per protected VM. Rebuilt from the registry (the catalog) every few
    /// seconds and at start, so losing this process or Redis loses no schedule.
    cycles: tokio::sync::Mutex<HashMap<String, CycleSchedule>>,
}

#[derive(Clone, Debug)]
struct CycleSchedule {
    host: String,
    every: Duration,
    next_due_ms: i64,
    /// The policy's retention window and thinning (every point for `keep_all_seconds`, then
    /// one per `thin_to_seconds`); retention runs every `[retention] interval` of the config.
    retention: Duration,
    keep_all_seconds: u64,
    thin_to_seconds: u64,
    /// How often a cycle is app-consistent (policy), and when the last one was queued.
    app_every: Option<Duration>,
    last_app_ms: i64,
}

/// When a VM's previous cycle is still running at its next due time, check again this soon.
const CYCLE_BUSY_RETRY: Duration = Duration::from_millis(200);

/// How often the schedule is re-read from the registry.
const SCHEDULE_SYNC: Duration = Duration::from_secs(5);

pub async fn run(
    cfg: MeshConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let coord = Coord::connect(&cfg.redis_url)
        .await
        .context("connecting to redis")?;
    let svc = Arc::new(SchedulerService {
        cfg: cfg.clone(),
        coord,
        shutdown: shutdown.clone(),
        cycles: Default::default(),
    });
    // Only the leader replica runs the timing loops; every replica serves the API.
    tokio::spawn(leader::campaign(
        svc.coord.clone(),
        leader::replica_id(listener.local_addr().ok()),
        shutdown.clone(),
        {
            let svc = svc.clone();
            move |term| {
                tokio::spawn(svc.clone().retry_loop(term.clone()));
                tokio::spawn(svc.clone().cycle_loop(term));
            }
        },
    ));
    let auth = ferry_mesh::component_authenticator(&cfg, shutdown.clone()).await?;
    let server = pb::scheduler_server::SchedulerServer::new(Api(svc));
    let routes = tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
        server,
        auth.interceptor(),
    ));
    let tls = ferry_mesh::ServerTls::load(&cfg)?;
    tracing::info!(addr = %listener.local_addr()?, "scheduler serving");
    ferry_mesh::serve(
        listener,
        &tls,
        routes,
        &["ferry.scheduler.v1.Scheduler"],
        shutdown,
    )
    .await?;
    Ok(())
}

impl SchedulerService {
    /// Dispatches a delta cycle to each protected VM's host every policy interval. One work
    /// item per VM (`delta-<vm>`): while a cycle is queued or running, no second one piles up.
    async fn cycle_loop(self: Arc<Self>, term: leader::Term) {
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
            let due: Vec<(String, CycleSchedule, bool)> = {
                let mut cycles = self.cycles.lock().await;
                let now = now_ms();
                cycles
                    .iter_mut()
                    .filter(|(_, c)| c.next_due_ms <= now)
                    .map(|(vm, c)| {
                        c.next_due_ms = now + c.every.as_millis() as i64;
                        let app = c
                            .app_every
                            .is_some_and(|e| now - c.last_app_ms >= e.as_millis() as i64);
                        if app {
                            c.last_app_ms = now;
                        }
                        (vm.clone(), c.clone(), app)
                    })
                    .collect()
            };
            for (vm, c, app) in due {
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
                };
                let Ok(payload) = serde_json::to_string(&w) else {
                    continue;
                };
                // A failed cycle waiting for its backoff is this VM's next cycle: the retry
                // loop queues it when due, so the schedule does not reset its attempts.
                match self.coord.pending_retry(&w.id).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(vm = %vm, error = %e, "reading the retry set failed");
                        continue;
                    }
                }
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
                    continue;
                }
                // Fenced by the leader lease, at most once per slot of the policy interval: a
                // deposed leader and its successor cannot both queue one slot.
                let slot = (now_ms().max(0) as u64) / (c.every.as_millis().max(1) as u64);
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
                        return;
                    }
                    Err(e) => tracing::warn!(vm = %vm, error = %e, "queueing a delta cycle failed"),
                }
            }
        }
    }

    /// Thins each protected VM's points, prunes those past its retention window and collects
    /// what no point references (storage-writer does the work; failures are retried next
    /// round).
    async fn run_retention(&self) {
        let vms: Vec<(String, Duration, u64, u64)> = self
            .cycles
            .lock()
            .await
            .iter()
            .map(|(vm, c)| {
                let (k, t) = (c.keep_all_seconds, c.thin_to_seconds);
                (vm.clone(), c.retention, k, t)
            })
            .collect();
        for (vm, retention, keep_all_seconds, thin_to_seconds) in vms {
            let res: anyhow::Result<ferry_proto::storage::v1::RunRetentionResponse> = async {
                let tls = ClientTls::service(&self.cfg)?;
                let ch =
                    ferry_mesh::connect(&self.cfg.endpoint(Component::StorageWriter), &tls).await?;
                let req = ferry_proto::storage::v1::RunRetentionRequest {
                    vm: vm.clone(),
                    retention_seconds: retention.as_secs(),
                    gc_grace_seconds: 0,
                    keep_all_seconds,
                    thin_to_seconds,
                };
                let client =
                    ferry_proto::storage::v1::storage_writer_client::StorageWriterClient::new(ch);
                Ok(client
                    .max_decoding_message_size(64 << 20)
                    .run_retention(req)
                    .await?
                    .into_inner())
            }
            .await;
            match res {
                Ok(r) => {
                    tracing::debug!(vm = %vm, pruned = r.points_pruned, collected = r.chunks_collected, "retention ran")
                }
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "retention failed; retrying next round")
                }
            }
        }
    }

    /// Protected VMs and their policies, from the registry. A VM in critical health waits for
    /// an operator instead of failing the same way every cycle.
    async fn sync_schedule(&self) -> anyhow::Result<()> {
        let tls = ClientTls::service(&self.cfg)?;
        let ch = ferry_mesh::connect(&self.cfg.endpoint(Component::Registry), &tls).await?;
        let vms = RegistryClient::new(ch)
            .list_vms(ListVmsRequest {})
            .await?
            .into_inner()
            .vms;
        self.start_due_resyncs(&vms).await;
        let mut cycles = self.cycles.lock().await;
        let mut keep = std::collections::HashSet::new();
        for v in vms
            .into_iter()
            .filter(|v| v.state == "protected" && v.health != "critical")
        {
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
                }
            });
            e.host = v.host.clone();
            e.retention = retention;
            e.keep_all_seconds = keep_all_seconds;
            e.thin_to_seconds = thin_to_seconds;
            e.app_every = app_every;
            if e.every != every {
                e.next_due_ms = e.next_due_ms.min(now_ms() + every.as_millis() as i64);
                e.every = every;
            }
        }
        cycles.retain(|vm, _| keep.contains(vm));
        Ok(())
    }

    /// Moves due retries back into their host's queue.
    async fn retry_loop(self: Arc<Self>, term: leader::Term) {
        let tick = (self.cfg.retry.time_unit / 10)
            .clamp(Duration::from_millis(20), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = term.ended() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            match self.coord.take_due(now_ms(), 100).await {
                Ok(due) => {
                    for (id, payload) in due {
                        let Ok(w) = serde_json::from_str::<QueuedWork>(&payload) else {
                            tracing::warn!(work = %id, "dropping unreadable retry entry");
                            continue;
                        };
                        if let Err(e) = self.coord.push_work(&w.host, &w.id, &payload).await {
                            tracing::warn!(work = %id, error = %e, "requeue of retry failed");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the retry set failed"),
            }
        }
    }

    /// Tells the registry how a VM's work failed: it shows the error, the retry attempts and
    /// the next retry time in the VM's health, marks it for resync, or makes it critical.
    async fn report_error(&self, w: &QueuedWork, req: ReportReplicationErrorRequest) {
        let res: anyhow::Result<()> = async {
            let tls = ClientTls::service(&self.cfg)?;
            let ch = ferry_mesh::connect(&self.cfg.endpoint(Component::Registry), &tls).await?;
            RegistryClient::new(ch)
                .report_replication_error(req)
                .await?;
            Ok(())
        }
        .await;
        if let Err(e) = res {
            tracing::warn!(vm = %w.vm, error = %e, "could not report a replication error to the registry");
        }
    }

    /// VMs marked for resync whose policy window is open now get their resync started (the
    /// registry answers with the running job when one already runs).
    async fn start_due_resyncs(&self, vms: &[ferry_proto::registry::v1::Vm]) {
        let now = chrono::Local::now().time();
        for v in vms.iter().filter(|v| v.state == "resync-pending") {
            let (start, end) = v.policy.as_ref().map_or(("18:30", "06:00"), |p| {
                (p.resync_window_start.as_str(), p.resync_window_end.as_str())
            });
            match in_window(now, start, end) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(vm = %v.name, error = %e, "the resync window is invalid; resync waits for an operator");
                    continue;
                }
            }
            let res: anyhow::Result<String> = async {
                let tls = ClientTls::service(&self.cfg)?;
                let ch = ferry_mesh::connect(&self.cfg.endpoint(Component::Registry), &tls).await?;
                let job = RegistryClient::new(ch)
                    .resync_vm(ferry_proto::registry::v1::ResyncVmRequest {
                        name: v.name.clone(),
                    })
                    .await?
                    .into_inner();
                Ok(job.id)
            }
            .await;
            match res {
                Ok(job) => {
                    tracing::info!(vm = %v.name, job = %job, "resync window open; resync started")
                }
                Err(e) => {
                    tracing::warn!(vm = %v.name, error = %e, "starting a resync failed; trying again")
                }
            }
        }
    }
}

fn coord_status(e: ferry_coord::CoordError) -> Status {
    tracing::warn!(error = %e, "redis operation failed");
    Status::unavailable(format!("work queue unavailable: {e}"))
}

type WorkStream = Pin<Box<dyn Stream<Item = Result<WorkItem, Status>> + Send>>;

/// The gRPC face of the service (a newtype: the orphan rule forbids `impl Trait for Arc<_>`).
#[derive(Clone)]
pub struct Api(pub Arc<SchedulerService>);

impl std::ops::Deref for Api {
    type Target = SchedulerService;
    fn deref(&self) -> &SchedulerService {
        &self.0
    }
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl Scheduler for Api {
    type WorkStreamStream = WorkStream;

    async fn work_stream(&self, req: Request<pb::WorkStreamRequest>) -> R<WorkStream> {
        let host = ferry_mesh::require_host(&req)?;
        let requeued = self
            .coord
            .requeue_inflight(&host)
            .await
            .map_err(coord_status)?;
        tracing::info!(host = %host, requeued, "agent connected to the work stream");
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<WorkItem, Status>>(4);
        let me = self.0.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => break,
                    _ = me.shutdown.cancelled() => break,
                    n = me.coord.next_work(&host, Duration::from_secs(2)) => n,
                };
                match next {
                    Ok(Some((id, payload))) => match serde_json::from_str::<QueuedWork>(&payload) {
                        Ok(w) => {
                            tracing::info!(host = %host, work = %id, vm = %w.vm, attempt = w.attempt, "work sent");
                            let mut item = w.to_proto();
                            item.retry_time_unit_ms = me.cfg.retry.time_unit.as_millis() as u64;
                            if tx.send(Ok(item)).await.is_err() {
                                // The agent left; the item stays in flight and is re-sent on reconnect.
                                break;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(work = %id, error = %e, "dropping unreadable work item");
                            let _ = me.coord.ack_work(&host, &id).await;
                        }
                    },
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(host = %host, error = %e, "work queue read failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            tracing::info!(host = %host, "work stream closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn complete_work(
        &self,
        req: Request<pb::CompleteWorkRequest>,
    ) -> R<pb::CompleteWorkResponse> {
        let host = ferry_mesh::require_host(&req)?;
        let req = req.into_inner();
        if !req.host_name.is_empty() && req.host_name != host {
            return Err(Status::permission_denied(format!(
                "host {host} may not complete work {} of host {}",
                req.work_id, req.host_name
            )));
        }
        // Only the caller's own queue is searched: another host's work is never found here.
        let items = self.coord.list_work(&host).await.map_err(coord_status)?;
        let Some((_, _, payload)) = items.into_iter().find(|(id, _, _)| *id == req.work_id) else {
            return Err(Status::not_found(format!(
                "work {} is not queued for host {host}",
                req.work_id
            )));
        };
        let mut w: QueuedWork = serde_json::from_str(&payload)
            .map_err(|e| Status::internal(format!("work {} is unreadable: {e}", req.work_id)))?;
        self.coord
            .ack_work(&host, &req.work_id)
            .await
            .map_err(coord_status)?;
        if req.ok {
            tracing::info!(host = %host, work = %req.work_id, vm = %w.vm, "work completed");
        } else if req.recoverable {
            let delay = backoff(w.attempt, self.cfg.retry.time_unit);
            w.attempt += 1;
            w.last_error = req.error.clone();
            let due = now_ms() + delay.as_millis() as i64;
            let payload = serde_json::to_string(&w).map_err(|e| Status::internal(e.to_string()))?;
            self.coord
                .schedule_retry(&w.id, due, &payload)
                .await
                .map_err(coord_status)?;
            tracing::warn!(host = %host, work = %w.id, vm = %w.vm, attempt = w.attempt, delay_ms = delay.as_millis() as u64, error = %req.error, "work failed; retry scheduled");
            let report = ReportReplicationErrorRequest {
                vm: w.vm.clone(),
                job_id: w.job_id.clone(),
                error: req.error.clone(),
                recoverable: true,
                attempts: w.attempt - 1,
                next_retry_ms: due,
                ..Default::default()
            };
            self.report_error(&w, report).await;
        } else {
            tracing::warn!(host = %host, work = %w.id, vm = %w.vm, error = %req.error, resync_required = req.resync_required, "work failed; not recoverable");
            let report = ReportReplicationErrorRequest {
                vm: w.vm.clone(),
                job_id: w.job_id.clone(),
                error: req.error.clone(),
                resync_required: req.resync_required,
                attempts: w.attempt,
                ..Default::default()
            };
            self.report_error(&w, report).await;
        }
        Ok(Response::new(pb::CompleteWorkResponse {}))
    }

    async fn dispatch(&self, req: Request<pb::DispatchRequest>) -> R<pb::DispatchResponse> {
        ferry_mesh::require_service(&req)?;
        let req = req.into_inner();
        if req.host_name.is_empty() || req.vm.is_empty() {
            return Err(Status::invalid_argument(
                "dispatch needs a host_name and a vm",
            ));
        }
        // One work item per job: a registry that resumes a job re-dispatches the same id.
        let id = if req.job_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            format!("job-{}", req.job_id)
        };
        let w = QueuedWork {
            id: id.clone(),
            kind: req.kind,
            vm: req.vm,
            job_id: req.job_id,
            attempt: 1,
            created_at_ms: now_ms(),
            host: req.host_name.clone(),
            last_error: String::new(),
            app_consistent: false,
        };
        // Work waiting for its retry stays there: dispatching it again (the registry does so
        // periodically, to rebuild queues Redis lost) must not cut its backoff short.
        if self
            .coord
            .pending_retry(&id)
            .await
            .map_err(coord_status)?
            .is_some()
        {
            return Ok(Response::new(pb::DispatchResponse { work_id: id }));
        }
        let payload = serde_json::to_string(&w).map_err(|e| Status::internal(e.to_string()))?;
        self.coord
            .push_work(&req.host_name, &id, &payload)
            .await
            .map_err(coord_status)?;
        tracing::debug!(host = %req.host_name, work = %id, vm = %w.vm, "work queued");
        Ok(Response::new(pb::DispatchResponse { work_id: id }))
    }

    async fn list_queue(&self, req: Request<pb::ListQueueRequest>) -> R<pb::ListQueueResponse> {
        ferry_mesh::require_role(&req, Role::Reader)?;
        let host = req.into_inner().host_name;
        if host.is_empty() {
            return Err(Status::invalid_argument("list_queue needs a host_name"));
        }
        let entries = self
            .coord
            .list_work(&host)
            .await
            .map_err(coord_status)?
            .into_iter()
            .filter_map(|(_, state, payload)| {
                let w: QueuedWork = serde_json::from_str(&payload).ok()?;
                Some(pb::QueueEntry {
                    item: Some(w.to_proto()),
                    host_name: host.clone(),
                    state,
                    next_attempt_ms: 0,
                    last_error: w.last_error,
                })
            })
            .collect();
        Ok(Response::new(pb::ListQueueResponse { entries }))
    }

    async fn reschedule(&self, req: Request<pb::RescheduleRequest>) -> R<pb::RescheduleResponse> {
        ferry_mesh::require_service(&req)?;
        Err(ferry_mesh::unimplemented(
            "delta cycle scheduling (change tracking issue)",
        ))
    }
}

/// Whether `now` falls in the window `[start, end)` ("HH:MM", local time). A window that
/// ends before it starts runs over midnight; equal ends mean always.
pub fn in_window(now: chrono::NaiveTime, start: &str, end: &str) -> Result<bool, String> {
    let parse = |s: &str| {
        chrono::NaiveTime::parse_from_str(s.trim(), "%H:%M")
            .map_err(|_| format!("{s:?} is not a time of day (HH:MM)"))
    };
    let (s, e) = (parse(start)?, parse(end)?);
    Ok(if s == e {
        true
    } else if s < e {
        s <= now && now < e
    } else {
        now >= s || now < e
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_window_runs_over_midnight() {
        let t = |h, m| chrono::NaiveTime::from_hms_opt(h, m, 0).unwrap();
        assert!(in_window(t(23, 0), "18:30", "06:00").unwrap());
        assert!(in_window(t(5, 59), "18:30", "06:00").unwrap());
        assert!(!in_window(t(12, 0), "18:30", "06:00").unwrap());
        assert!(in_window(t(12, 0), "09:00", "17:00").unwrap());
        assert!(!in_window(t(17, 0), "09:00", "17:00").unwrap());
        assert!(in_window(t(3, 0), "00:00", "00:00").unwrap());
        assert!(in_window(t(3, 0), "25:00", "00:00").is_err());
    }

    #[test]
    fn backoff_follows_the_design_schedule() {
        let unit = Duration::from_millis(100);
        let got: Vec<u128> = (1..=8).map(|a| backoff(a, unit).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 3000, 3000, 3000]);
    }
}
