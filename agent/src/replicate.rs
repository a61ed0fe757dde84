//! Initial replication of one VM: begin a cycle (leases + fencing tokens), copy every disk's
//! allocated, non-zero blocks over QUIC, commit the block maps.
//!
//! The copy is a pipeline: one blocking reader per disk reads and names blocks (keyed
//! BLAKE3), the async side offers batches to the gateway, seals (zstd + AEAD) only the blocks
//! the gateway does not have yet, and keeps several batches in flight. A restarted copy
//! therefore re-reads and re-hashes but re-sends nothing already stored.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ferry_gateway::client::{Offer, Uploader};
use ferry_model::{Backoff, CycleKind};
use ferry_proto::common::v1::Disk;
use ferry_proto::ingest::v1::{
    BlockRef, DiskBlockMap, RenewCycleRequest, ingest_client::IngestClient,
};
use ferry_store::{ChunkId, VaultKey};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::Agent;

/// Why replication failed, and whether trying again later can help (DESIGN §2.6).
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    #[error("{0}")]
    Recoverable(String),
    #[error("{0}")]
    Permanent(String),
    /// The change logs cannot carry the VM forward (a log lost, broken, not closed cleanly, or
    /// too large): only a checksum resync makes its replica consistent again.
    #[error("{0}")]
    ResyncRequired(String),
}

impl ReplError {
    pub fn recoverable(&self) -> bool {
        matches!(self, Self::Recoverable(_))
    }

    pub fn resync_required(&self) -> bool {
        matches!(self, Self::ResyncRequired(_))
    }

    /// The class the scheduler and registry act on.
    pub fn class(&self) -> ferry_model::ErrorClass {
        use ferry_model::ErrorClass as C;
        match self {
            Self::Recoverable(_) => C::Recoverable,
            Self::Permanent(_) => C::Permanent,
            Self::ResyncRequired(_) => C::ResyncRequired,
        }
    }
}

pub(crate) fn from_status(what: &str, s: tonic::Status) -> ReplError {
    use tonic::Code;
    let msg = format!("{what}: {}", s.message());
    match s.code() {
        Code::PermissionDenied | Code::Unauthenticated | Code::NotFound | Code::InvalidArgument => {
            ReplError::Permanent(msg)
        }
        _ => ReplError::Recoverable(msg),
    }
}

/// Counters of one copy, for logs.
#[derive(Default)]
pub struct CopyStats {
    pub blocks_read: AtomicU64,
    pub blocks_zero: AtomicU64,
    pub blocks_sent: AtomicU64,
    pub blocks_skipped: AtomicU64,
    pub bytes_sent: AtomicU64,
}

pub(crate) struct ReadBlock {
    pub(crate) index: u64,
    pub(crate) id: ChunkId,
    pub(crate) data: Vec<u8>,
}

impl Agent {
    pub(crate) async fn ingest(&self) -> Result<IngestClient<Channel>, ReplError> {
        let ch = self
            .peers
            .channel(ferry_mesh::Component::Ingest)
            .map_err(|e| ReplError::Permanent(format!("ingest endpoint: {e}")))?;
        Ok(IngestClient::new(ch))
    }

    /// One QUIC connection to the gateway, re-made when it closed.
    pub(crate) async fn uploader(&self) -> Result<Uploader, ReplError> {
        let mut slot = self.uploader.lock().await;
        if let Some(u) = slot.as_ref()
            && u.connection().close_reason().is_none()
        {
            return Ok(u.clone());
        }
        let addr = tokio::net::lookup_host(&self.creds.endpoints.gateway)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                ReplError::Permanent(format!(
                    "gateway address {:?} does not resolve",
                    self.creds.endpoints.gateway
                ))
            })?;
        let mut qcfg = ferry_mesh::quic_client_config(
            &self.creds.ca_pem,
            &self.creds.cert_pem,
            &self.creds.key_pem,
        )
        .map_err(|e| ReplError::Permanent(format!("quic client config: {e}")))?;
        // A dead gateway is noticed within seconds (keep-alive 2 s, idle 8 s) so the batch
        // retry reconnects to its replacement instead of waiting out the server's 30 s.
        let mut transport = ferry_gateway::transport_config();
        transport.keep_alive_interval(Some(Duration::from_secs(2)));
        if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(8)) {
            transport.max_idle_timeout(Some(idle));
        }
        qcfg.transport_config(Arc::new(transport));
        let u = Uploader::connect(addr, qcfg)
            .await
            .map_err(|e| ReplError::Recoverable(format!("gateway {addr}: {e}")))?;
        *slot = Some(u.clone());
        Ok(u)
    }

    pub(crate) async fn initial_replication(
        &self,
        vm: &str,
        job_id: &str,
        cancel: &CancellationToken,
    ) -> Result<(), ReplError> {
        self.refuse_while_filling(vm, "an initial copy")?;
        let disks = self.vm_disks(vm)?;
        let mut shipped_files = Vec::new();
        let point = self
            .run_cycle(
                vm,
                CycleKind::Initial,
                job_id,
                &disks,
                async |cycle, block_size, lost| {
                    // Tracking starts before the copy: logs sealed now hold writes the copy reads
                    // anyway, so they go; writes made during the copy land in the next logs, which
                    // ship with the copy and are applied on top of it (a point consistent as of the
                    // end of those logs).
                    if self.tracker.is_some() {
                        self.cut(vm).await?;
                        for d in &disks {
                            let sealed = crate::delta::sealed_logs(
                                std::path::Path::new(&d.path),
                                self.tracker.as_ref(),
                            )?;
                            crate::delta::remove_logs(&self.cfg.data_dir, &sealed);
                        }
                    }
                    let mut maps = Vec::new();
                    for d in &disks {
                        let blocks = self.copy_disk(cycle, d, block_size, cancel, lost).await?;
                        maps.push(DiskBlockMap {
                            disk_id: d.id.clone(),
                            blocks,
                            ..Default::default()
                        });
                    }
                    if self.tracker.is_some() {
                        self.cut(vm).await?;
                        for (d, m) in disks.iter().zip(maps.iter_mut()) {
                            let (logs, files) =
                                self.ship_disk_logs(cycle, d, block_size, lost).await?;
                            m.shipped_logs = logs;
                            shipped_files.extend(files);
                        }
                    }
                    Ok(maps)
                },
            )
            .await?;
        crate::delta::remove_logs(&self.cfg.data_dir, &shipped_files);
        tracing::info!(vm, point = %point.id, "initial replication committed");
        Ok(())
    }

    pub(crate) fn spawn_renewer(
        &self,
        cycle: String,
        every: Duration,
        lost: CancellationToken,
    ) -> CancellationToken {
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop2.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let res = match me.ingest().await {
                    Ok(mut c) => c
                        .renew_cycle(RenewCycleRequest {
                            cycle_id: cycle.clone(),
                        })
                        .await
                        .map(|_| ()),
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                match res {
                    Ok(()) => {}
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Aborted
                                | tonic::Code::NotFound
                                | tonic::Code::PermissionDenied
                        ) =>
                    {
                        tracing::warn!(cycle = %cycle, error = %s.message(), "cycle lease lost");
                        lost.cancel();
                        return;
                    }
                    Err(s) => {
                        tracing::warn!(cycle = %cycle, error = %s.message(), "lease renewal failed; will retry")
                    }
                }
            }
        });
        stop
    }

    async fn copy_disk(
        &self,
        cycle: &str,
        disk: &Disk,
        block_size: u32,
        cancel: &CancellationToken,
        lost: &CancellationToken,
    ) -> Result<Vec<BlockRef>, ReplError> {
        let stats = Arc::new(CopyStats::default());
        let (tx, mut rx) = mpsc::channel::<ReadBlock>(self.cfg.batch_blocks * 2);
        let reader = {
            let path = std::path::PathBuf::from(&disk.path);
            let key = self.vault_key();
            let stats = stats.clone();
            let stop = cancel.clone();
            tokio::task::spawn_blocking(move || {
                read_blocks(&path, block_size, &key, &tx, &stats, &stop, 0)
            })
        };
        let mut map: Vec<BlockRef> = Vec::new();
        let mut inflight: JoinSet<Result<(), ReplError>> = JoinSet::new();
        let mut batch: Vec<ReadBlock> = Vec::with_capacity(self.cfg.batch_blocks);
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Err(ReplError::Recoverable("copy cancelled".into())),
                _ = lost.cancelled() => return Err(ReplError::Recoverable("the cycle's lease was lost".into())),
                b = rx.recv() => b,
            };
            let done = next.is_none();
            if let Some(b) = next {
                map.push(BlockRef {
                    index: b.index,
                    chunk: b.id.to_vec(),
                });
                batch.push(b);
            }
            if batch.len() >= self.cfg.batch_blocks || (done && !batch.is_empty()) {
                while inflight.len() >= self.cfg.batches_in_flight {
                    if let Some(r) = inflight.join_next().await {
                        r.map_err(|e| ReplError::Recoverable(format!("upload task: {e}")))??;
                    }
                }
                let blocks = std::mem::take(&mut batch);
                inflight.spawn(self.clone().upload_with_retry(
                    cycle.to_string(),
                    blocks,
                    stats.clone(),
                    lost.clone(),
                ));
            }
            if done {
                break;
            }
        }
        while let Some(r) = inflight.join_next().await {
            r.map_err(|e| ReplError::Recoverable(format!("upload task: {e}")))??;
        }
        reader
            .await
            .map_err(|e| ReplError::Recoverable(format!("disk reader: {e}")))??;
        tracing::info!(
            disk = %disk.path,
            blocks_read = stats.blocks_read.load(Ordering::Relaxed),
            blocks_zero = stats.blocks_zero.load(Ordering::Relaxed),
            blocks_sent = stats.blocks_sent.load(Ordering::Relaxed),
            blocks_skipped = stats.blocks_skipped.load(Ordering::Relaxed),
            bytes_sent = stats.bytes_sent.load(Ordering::Relaxed),
            "disk copied"
        );
        map.sort_by_key(|b| b.index);
        Ok(map)
    }
}

impl Agent {
    /// How long a cycle rides out upload failures before it fails (recoverable) and the
    /// scheduler's backoff takes over: half the mesh's retry time unit, 1 s to 30 s.
    pub(crate) fn ride_out(&self) -> Duration {
        let unit = self.retry_unit_ms.load(Ordering::Relaxed);
        if unit == 0 {
            return Duration::from_secs(30);
        }
        (Duration::from_millis(unit) / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
    }

    /// Uploads a batch, riding out a gateway restart or a network blip: a transient failure
    /// reconnects and offers the batch again (storage keeps what landed, so nothing stored is
    /// sent twice); after [`Agent::ride_out`] of failures the cycle gives up and the
    /// scheduler's retry takes over.
    pub(crate) async fn upload_with_retry(
        self,
        cycle: String,
        blocks: Vec<ReadBlock>,
        stats: Arc<CopyStats>,
        lost: CancellationToken,
    ) -> Result<(), ReplError> {
        let blocks = Arc::new(blocks);
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
        let mut attempt = 0u32;
        let budget = self.ride_out();
        let started = tokio::time::Instant::now();
        loop {
            attempt += 1;
            let left = budget.saturating_sub(started.elapsed());
            let connected =
                match tokio::time::timeout(left.max(Duration::from_millis(100)), self.uploader())
                    .await
                {
                    Ok(r) => r,
                    Err(_) => Err(ReplError::Recoverable(format!(
                        "gateway {}: no connection within {} ms",
                        self.creds.endpoints.gateway,
                        left.as_millis()
                    ))),
                };
            let res = match connected {
                Ok(up) => {
                    let key = self.vault_key();
                    let r = upload_batch(&up, &cycle, blocks.clone(), key, &stats).await;
                    if r.as_ref().is_err_and(ReplError::recoverable) {
                        up.close(); // the next attempt reconnects
                    }
                    r
                }
                Err(e) => Err(e),
            };
            let e = match res {
                Err(e) if e.recoverable() && !lost.is_cancelled() => e,
                other => return other,
            };
            let delay = backoff.next_delay();
            if started.elapsed() + delay >= budget {
                return Err(e);
            }
            tracing::warn!(cycle = %cycle, attempt, retry_ms = delay.as_millis() as u64, error = %e, "upload failed; retrying the batch");
            tokio::time::sleep(delay).await;
        }
    }
}

/// Offers a batch, seals only what the gateway lacks, sends it.
async fn upload_batch(
    up: &Uploader,
    cycle: &str,
    blocks: Arc<Vec<ReadBlock>>,
    key: VaultKey,
    stats: &CopyStats,
) -> Result<(), ReplError> {
    let offers: Vec<Offer> = blocks
        .iter()
        .map(|b| Offer {
            id: b.id,
            plain_len: b.data.len() as u32,
        })
        .collect();
    let pending = up.offer(cycle, &offers).await.map_err(upload_err)?;
    let needed: Vec<usize> = pending
        .needed
        .iter()
        .enumerate()
        .filter(|(_, n)| **n)
        .map(|(i, _)| i)
        .collect();
    let skipped = offers.len() - needed.len();
    stats
        .blocks_skipped
        .fetch_add(skipped as u64, Ordering::Relaxed);
    let sealed = tokio::task::spawn_blocking(move || {
        needed
            .iter()
            .map(|&i| {
                Bytes::from(ferry_store::seal_chunk(
                    &key,
                    &blocks[i].id,
                    &blocks[i].data,
                ))
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ReplError::Recoverable(format!("sealing blocks: {e}")))?;
    let n = sealed.len() as u64;
    let bytes: u64 = sealed.iter().map(|s| s.len() as u64).sum();
    pending.send(sealed).await.map_err(upload_err)?;
    stats.blocks_sent.fetch_add(n, Ordering::Relaxed);
    stats.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    Ok(())
}

fn upload_err(e: ferry_gateway::client::UploadError) -> ReplError {
    if e.is_transient() {
        ReplError::Recoverable(format!("upload: {e}"))
    } else {
        ReplError::Permanent(format!("upload rejected: {e}"))
    }
}

/// Reads the allocated blocks of a disk in order from block `from`, skipping zero blocks,
/// naming each one.
pub(crate) fn read_blocks(
    path: &std::path::Path,
    block_size: u32,
    key: &VaultKey,
    tx: &mpsc::Sender<ReadBlock>,
    stats: &CopyStats,
    stop: &CancellationToken,
    from: u64,
) -> Result<(), ReplError> {
    let dev = ferry_disk::open(path)
        .map_err(|e| ReplError::Permanent(format!("{}: {e}", path.display())))?;
    let size = dev.virtual_size();
    let bs = u64::from(block_size.max(4096));
    // Through the whole parent chain: a differencing disk's data may live in its parents.
    let extents = ferry_disk::visible_extents(&*dev)
        .map_err(|e| ReplError::Permanent(format!("{}: allocation map: {e}", path.display())))?;
    let mut last_index: Option<u64> = None;
    for ext in extents
        .iter()
        .filter(|e| matches!(e.kind, ferry_disk::ExtentKind::Allocated))
    {
        let first = (ext.offset / bs).max(from);
        let end = (ext.offset + ext.len).div_ceil(bs);
        for index in first..end {
            if last_index.is_some_and(|l| index <= l) {
                continue; // a block spanning two extents is read once
            }
            last_index = Some(index);
            if stop.is_cancelled() {
                return Err(ReplError::Recoverable("copy cancelled".into()));
            }
            let off = index * bs;
            let len = bs.min(size - off) as usize;
            let mut data = vec![0u8; len];
            dev.read_at(off, &mut data).map_err(|e| {
                ReplError::Permanent(format!("{}: read at {off}: {e}", path.display()))
            })?;
            stats.blocks_read.fetch_add(1, Ordering::Relaxed);
            if ferry_store::is_zero(&data) {
                stats.blocks_zero.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let id = ferry_store::chunk_id(key, &data);
            if tx.blocking_send(ReadBlock { index, id, data }).is_err() {
                return Ok(()); // the uploader stopped; its error is the one that counts
            }
        }
    }
    Ok(())
}
