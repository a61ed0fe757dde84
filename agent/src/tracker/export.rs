//! One tracked disk: the open image, its current `.hrl`, and the two threads that apply writes.
//!
//! All writes of a disk go through a two-stage pipeline, in arrival order. The log thread
//! takes whatever requests are queued (group commit), appends their data to the log and writes
//! one metadata block for them; the apply thread then writes them to the image and answers. So
//! an acknowledged write is in the log and in the image (a process crash loses neither), and
//! the log is a superset of the image (a crash between the stages leaves a record of an
//! unacknowledged write, never an image change the log misses). A write the log stage takes up
//! while the VM is fenced is answered EPERM there, before anything is logged or applied. The stages overlap: while one
//! batch is copied into the image the next is copied into the log (one thread doing both was
//! the bottleneck for 64 KiB writes). FLUSH and FUA sync the log, then the image. Reads take
//! the image's read lock on the blocking pool and run alongside one another.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use ferry_disk::{DiskError, DiskRw};
use tokio::sync::{OwnedRwLockReadGuard, OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use super::TrackerError;
use super::fill::Fill;
use super::log::{LogAppender, SealedLog, log_path};
use super::registry::VmShared;

/// Zero writes (TRIM, WRITE_ZEROES) are checked and recorded in pieces of this size.
pub(crate) const ZERO_PIECE: usize = 1 << 20;
/// Most requests one batch takes from the queue.
const MAX_BATCH: usize = 128;

pub(crate) const NBD_EPERM: u32 = 1;
pub(crate) const NBD_EIO: u32 = 5;
pub(crate) const NBD_ESHUTDOWN: u32 = 108;

/// An answer for the connection that sent the request; `permit` bounds the connection's memory
/// until the answer is on the wire.
pub(crate) struct Reply {
    pub handle: u64,
    pub error: u32,
    pub data: Option<Vec<u8>>,
    pub permit: Option<OwnedSemaphorePermit>,
}

pub(crate) type ReplyTx = mpsc::UnboundedSender<Reply>;

/// A request waiting for the disk thread. `gate` is the VM's cut barrier, held until answered.
pub(crate) struct Req {
    pub handle: u64,
    pub reply: ReplyTx,
    pub permit: Option<OwnedSemaphorePermit>,
    pub gate: Option<OwnedRwLockReadGuard<()>>,
}

pub(crate) enum Op {
    Write {
        req: Req,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Zero {
        req: Req,
        offset: u64,
        len: u64,
        fua: bool,
    },
    Flush {
        req: Req,
    },
    /// Seal the current log and open the next (the caller holds the VM's barrier).
    Rotate {
        done: oneshot::Sender<Result<SealedLog, TrackerError>>,
    },
    /// Seal the log, close the image and stop the thread.
    Close {
        done: oneshot::Sender<Result<Option<SealedLog>, TrackerError>>,
    },
}

impl Op {
    fn reject(self, error: u32) {
        match self {
            Op::Write { req, .. } | Op::Zero { req, .. } | Op::Flush { req } => {
                answer(req, error, None)
            }
            Op::Rotate { done } => {
                let _ = done.send(Err(TrackerError::Stopped));
            }
            Op::Close { done } => {
                let _ = done.send(Ok(None));
            }
        }
    }
}

pub(crate) fn answer(req: Req, error: u32, data: Option<Vec<u8>>) {
    // The connection may be gone; then nobody waits for the answer.
    let _ = req.reply.send(Reply {
        handle: req.handle,
        error,
        data,
        permit: req.permit,
    });
    drop(req.gate);
}

/// Recycled request buffers: a fresh 64 KiB allocation per write, freed on another thread,
/// cost page faults and unmaps that showed in profiles.
pub(crate) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// Buffers larger than this are not kept.
const POOL_MAX_BUF: usize = 1 << 20;
const POOL_MAX_BUFS: usize = 64;

impl BufPool {
    fn new() -> Self {
        BufPool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer with room for `len` bytes.
    pub(crate) fn get(&self, len: usize) -> Vec<u8> {
        if len <= POOL_MAX_BUF
            && let Ok(mut free) = self.free.lock()
            && let Some(mut b) = free.pop()
        {
            b.clear();
            b.reserve(len);
            return b;
        }
        Vec::with_capacity(len)
    }

    pub(crate) fn put(&self, b: Vec<u8>) {
        if b.capacity() <= POOL_MAX_BUF
            && let Ok(mut free) = self.free.lock()
            && free.len() < POOL_MAX_BUFS
        {
            free.push(b);
        }
    }
}

/// What connections see of a disk.
pub(crate) struct Export {
    pub name: String,
    /// The VM's barrier and fence, shared by its disks.
    pub vm: Arc<VmShared>,
    pub path: PathBuf,
    pub size: u64,
    pub image: Arc<RwLock<Option<Box<dyn DiskRw>>>>,
    pub ops: mpsc::UnboundedSender<Op>,
    /// Size of the current log file.
    pub pending: Arc<AtomicU64>,
    /// Sequence number of the open log; 0 when none is open.
    pub current: Arc<AtomicU64>,
    pub pool: Arc<BufPool>,
    /// Set when the disk's thread has ended (after its close, or when it gave up).
    pub closed: Arc<AtomicBool>,
    /// Fired when the export is removed: its connections end (they hold the export itself,
    /// not the registry, so they would otherwise live on).
    pub detached: CancellationToken,
    /// Instant recovery: the disk is being filled from its point (set before it is served).
    pub fill: OnceLock<Arc<Fill>>,
}

/// The log stage: owns the current log.
struct LogStage {
    name: String,
    vm: Arc<VmShared>,
    path: PathBuf,
    image: Arc<RwLock<Option<Box<dyn DiskRw>>>>,
    log: Option<LogAppender>,
    /// Sequence number and UniqueId the next log gets and chains to.
    next: (u64, Uuid),
    vhd2: Uuid,
    pending: Arc<AtomicU64>,
    current: Arc<AtomicU64>,
    apply: std::sync::mpsc::Sender<Stage2>,
    /// Whether the apply stage may still have work queued (zero checks must not run ahead).
    apply_busy: bool,
    closed: Arc<AtomicBool>,
}

/// The apply stage: writes logged batches to the image and answers.
struct ApplyStage {
    name: String,
    image: Arc<RwLock<Option<Box<dyn DiskRw>>>>,
    pool: Arc<BufPool>,
}

/// A request of the current segment and what the image gets once the log block is written.
struct Item {
    req: Req,
    apply: Apply,
    sync: bool,
    error: Option<u32>,
}

enum Apply {
    Data(u64, Vec<u8>),
    Zeros(Vec<(u64, usize)>),
    None,
}

enum Stage2 {
    /// Logged requests: apply (unless they carry an error), flush the image if `sync`, answer.
    Segment { items: Vec<Item>, sync: bool },
    /// Answers once everything before it is applied (and, with `flush`, the image flushed).
    Barrier {
        flush: bool,
        done: std::sync::mpsc::SyncSender<Result<(), DiskError>>,
    },
    /// Finishes the image (clean close) and ends the stage.
    Close {
        done: std::sync::mpsc::SyncSender<Result<(), DiskError>>,
    },
}

static ZEROS: [u8; ZERO_PIECE] = [0u8; ZERO_PIECE];

impl Export {
    /// Starts the disk thread with `log` as the current log.
    pub(crate) fn start(
        name: String,
        vm: Arc<VmShared>,
        path: PathBuf,
        image: Box<dyn DiskRw>,
        log: LogAppender,
        vhd2: Uuid,
    ) -> Result<Arc<Export>, TrackerError> {
        let size = image.virtual_size();
        let image = Arc::new(RwLock::new(Some(image)));
        let pending = Arc::new(AtomicU64::new(log.bytes()));
        let (tx, rx) = mpsc::unbounded_channel();
        let next = (log.seq() + 1, log.unique_id());
        let (atx, arx) = std::sync::mpsc::channel();
        let current = Arc::new(AtomicU64::new(log.seq()));
        let closed = Arc::new(AtomicBool::new(false));
        let log_stage = LogStage {
            name: name.clone(),
            vm: vm.clone(),
            path: path.clone(),
            image: image.clone(),
            log: Some(log),
            next,
            vhd2,
            pending: pending.clone(),
            current: current.clone(),
            apply: atx,
            apply_busy: false,
            closed: closed.clone(),
        };
        let pool = Arc::new(BufPool::new());
        let apply_stage = ApplyStage {
            name: name.clone(),
            image: image.clone(),
            pool: pool.clone(),
        };
        let spawn_err = |e| TrackerError::Io {
            path: path.clone(),
            what: "disk thread",
            source: e,
        };
        std::thread::Builder::new()
            .name(format!("ferry-apply-{name}"))
            .spawn(move || apply_stage.run(arx))
            .map_err(spawn_err)?;
        std::thread::Builder::new()
            .name(format!("ferry-log-{name}"))
            .spawn(move || log_stage.run(rx))
            .map_err(spawn_err)?;
        Ok(Arc::new(Export {
            name,
            vm,
            path,
            size,
            image,
            ops: tx,
            pending,
            current,
            pool,
            closed,
            detached: CancellationToken::new(),
            fill: OnceLock::new(),
        }))
    }

    /// Queues an op; a stopped disk answers ESHUTDOWN at once.
    pub(crate) fn submit(&self, op: Op) {
        if let Err(mpsc::error::SendError(op)) = self.ops.send(op) {
            op.reject(NBD_ESHUTDOWN);
        }
    }

    /// The disk's fill while blocks are still missing (None once it is an ordinary file).
    pub(crate) fn pending_fill(&self) -> Option<&Arc<Fill>> {
        self.fill.get().filter(|f| !f.is_complete())
    }

    /// Reads on the calling (blocking) thread.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), u32> {
        let guard = self.image.read().unwrap_or_else(|e| e.into_inner());
        let Some(img) = guard.as_ref() else {
            return Err(NBD_ESHUTDOWN);
        };
        img.read_at(offset, buf).map_err(|e| {
            warn!(export = %self.name, offset, len = buf.len(), error = %e, "disk read failed");
            NBD_EIO
        })
    }
}

impl LogStage {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(op) = rx.blocking_recv() {
            batch.push(op);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if self.run_batch(&mut batch) {
                break;
            }
        }
        // Stopped: whatever is still queued gets ESHUTDOWN.
        rx.close();
        self.closed.store(true, Ordering::Release);
        while let Ok(op) = rx.try_recv() {
            op.reject(NBD_ESHUTDOWN);
        }
    }

    /// Runs the batch in segments ending at a flush, rotate or close; true when closed.
    fn run_batch(&mut self, batch: &mut Vec<Op>) -> bool {
        let mut seg: Vec<Item> = Vec::new();
        let mut closed = false;
        let item = |req, apply, sync| Item {
            req,
            apply,
            sync,
            error: None,
        };
        for op in batch.drain(..) {
            if closed {
                op.reject(NBD_ESHUTDOWN);
                continue;
            }
            match op {
                // Refused here too, not only by the connection: a write queued before the
                // fence went up must not reach the log or the image after it.
                Op::Write { req, .. } | Op::Zero { req, .. }
                    if self.vm.fence.refuses(&self.vm.name, &self.name) =>
                {
                    answer(req, NBD_EPERM, None)
                }
                Op::Write {
                    req,
                    offset,
                    data,
                    fua,
                } => seg.push(item(req, Apply::Data(offset, data), fua)),
                Op::Zero {
                    req,
                    offset,
                    len,
                    fua,
                } => seg.push(item(req, Apply::Zeros(vec![(offset, len as usize)]), fua)),
                Op::Flush { req } => {
                    seg.push(item(req, Apply::None, true));
                    self.run_segment(&mut seg);
                }
                Op::Rotate { done } => {
                    self.run_segment(&mut seg);
                    let _ = done.send(self.rotate());
                }
                Op::Close { done } => {
                    self.run_segment(&mut seg);
                    let r = self.close();
                    self.closed.store(true, Ordering::Release);
                    let _ = done.send(r);
                    closed = true;
                }
            }
        }
        self.run_segment(&mut seg);
        closed
    }

    /// Logs the segment (and syncs the log if asked), then hands it to the apply stage.
    fn run_segment(&mut self, seg: &mut Vec<Item>) {
        if seg.is_empty() {
            return;
        }
        let sync = seg.iter().any(|i| i.sync);
        let mut err = self.log_segment(seg).err();
        if err.is_none()
            && sync
            && let Some(log) = &self.log
            && let Err(e) = log.sync()
        {
            warn!(export = %self.name, error = %e, "log sync failed");
            for i in seg.iter_mut().filter(|i| i.sync) {
                i.error = Some(NBD_EIO);
            }
        }
        if let Some(e) = err.take() {
            for i in seg.iter_mut() {
                i.error = Some(e);
            }
        }
        let items = std::mem::take(seg);
        match self.apply.send(Stage2::Segment { items, sync }) {
            Ok(()) => self.apply_busy = true,
            Err(std::sync::mpsc::SendError(Stage2::Segment { items, .. })) => {
                for i in items {
                    answer(i.req, NBD_ESHUTDOWN, None);
                }
            }
            Err(_) => {}
        }
    }

    /// Waits until the apply stage has applied everything sent so far.
    fn drain(&mut self, flush: bool) -> Result<(), DiskError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.apply
            .send(Stage2::Barrier { flush, done: tx })
            .map_err(|_| DiskError::InvalidArgument("the apply stage has stopped".into()))?;
        let r = rx.recv().unwrap_or_else(|_| {
            Err(DiskError::InvalidArgument(
                "the apply stage has stopped".into(),
            ))
        });
        self.apply_busy = false;
        r
    }

    /// Appends every write of the segment to the log and writes its block. Zero ranges become
    /// pieces; a piece that already reads as zero (and no earlier write of this segment
    /// touches) needs neither a record nor a write: the replica, which equals the image once the
    /// log is applied, reads zero there too.
    fn log_segment(&mut self, seg: &mut [Item]) -> Result<(), u32> {
        if self.log.is_none() {
            self.reopen_log()?;
        }
        if self.apply_busy && seg.iter().any(|i| matches!(i.apply, Apply::Zeros(_))) {
            // Zero checks read the image: it must hold every earlier write first.
            self.drain(false).map_err(|_| NBD_ESHUTDOWN)?;
        }
        let image = self.image.clone();
        let guard = image.read().unwrap_or_else(|e| e.into_inner());
        let Some(img) = guard.as_ref() else {
            return Err(NBD_ESHUTDOWN);
        };
        let Some(log) = self.log.as_mut() else {
            return Err(NBD_EIO);
        };
        let mut touched: Vec<(u64, u64)> = Vec::new();
        let mut scratch = Vec::new();
        let mut run = || -> Result<(), String> {
            for item in seg.iter_mut() {
                match &mut item.apply {
                    Apply::Data(off, data) => {
                        log.append(*off, data).map_err(|e| e.to_string())?;
                        touched.push((*off, *off + data.len() as u64));
                    }
                    Apply::Zeros(ranges) => {
                        let (start, len) = ranges.first().copied().unwrap_or((0, 0));
                        let end = start + len as u64;
                        let mut pieces = Vec::new();
                        let mut at = start;
                        while at < end {
                            let n = ((end - at) as usize).min(ZERO_PIECE);
                            let overlaps =
                                touched.iter().any(|&(a, b)| a < at + n as u64 && at < b);
                            scratch.resize(n, 0);
                            let already_zero = !overlaps
                                && img.read_at(at, &mut scratch[..n]).is_ok()
                                && scratch[..n].iter().all(|&b| b == 0);
                            if !already_zero {
                                log.append(at, &ZEROS[..n]).map_err(|e| e.to_string())?;
                                pieces.push((at, n));
                            }
                            at += n as u64;
                        }
                        touched.push((start, end));
                        *ranges = pieces;
                    }
                    Apply::None => {}
                }
            }
            log.commit().map_err(|e| e.to_string())
        };
        if let Err(e) = run() {
            warn!(export = %self.name, log = %log.path().display(), error = %e, "log append failed; the writes are refused");
            log.rollback();
            return Err(NBD_EIO);
        }
        self.pending.store(log.bytes(), Ordering::Relaxed);
        Ok(())
    }

    /// Opens the next log (at start of a cycle, or after a failure left none).
    fn reopen_log(&mut self) -> Result<(), u32> {
        let (seq, prev) = self.next;
        let p = log_path(&self.path, seq);
        match LogAppender::create(&p, seq, prev, self.vhd2) {
            Ok(l) => {
                info!(export = %self.name, log = %p.display(), "log opened");
                self.pending.store(l.bytes(), Ordering::Relaxed);
                self.current.store(seq, Ordering::Relaxed);
                self.log = Some(l);
                Ok(())
            }
            Err(e) => {
                warn!(export = %self.name, log = %p.display(), error = %e, "cannot open the next log; writes are refused");
                Err(NBD_EIO)
            }
        }
    }

    /// Seals the current log and opens the next.
    fn rotate(&mut self) -> Result<SealedLog, TrackerError> {
        let sealed = self.seal()?;
        // A failure here is retried by the next write (reopen_log); the sealed log stands.
        let _ = self.reopen_log();
        Ok(sealed)
    }

    /// Flushes the image once everything is applied, then closes the log (synced).
    fn seal(&mut self) -> Result<SealedLog, TrackerError> {
        self.drain(true).map_err(|e| TrackerError::Disk {
            path: self.path.clone(),
            source: e,
        })?;
        if self.log.is_none() {
            self.reopen_log().map_err(|_| TrackerError::Io {
                path: log_path(&self.path, self.next.0),
                what: "open log",
                source: std::io::Error::other("cannot create the log"),
            })?;
        }
        let Some(log) = self.log.take() else {
            return Err(TrackerError::Stopped);
        };
        let lp = log.path().to_path_buf();
        self.next = (log.seq() + 1, log.unique_id());
        self.current.store(0, Ordering::Relaxed);
        let sealed = log.close(&self.path).map_err(|e| TrackerError::Io {
            path: lp,
            what: "seal log",
            source: e,
        })?;
        self.pending.store(0, Ordering::Relaxed);
        info!(export = %self.name, log = %sealed.log.display(), records = sealed.records, bytes = sealed.bytes, "log sealed");
        Ok(sealed)
    }

    fn close(&mut self) -> Result<Option<SealedLog>, TrackerError> {
        let sealed = match self.log.is_some() {
            true => Some(self.seal()?),
            false => None,
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self.apply.send(Stage2::Close { done: tx }).is_ok()
            && let Ok(Err(e)) = rx.recv()
        {
            return Err(TrackerError::Disk {
                path: self.path.clone(),
                source: e,
            });
        }
        info!(export = %self.name, disk = %self.path.display(), "disk closed");
        Ok(sealed)
    }
}

impl ApplyStage {
    fn run(self, rx: std::sync::mpsc::Receiver<Stage2>) {
        while let Ok(msg) = rx.recv() {
            match msg {
                Stage2::Segment { items, sync } => self.apply(items, sync),
                Stage2::Barrier { flush, done } => {
                    let r = match flush {
                        true => self.flush(),
                        false => Ok(()),
                    };
                    let _ = done.send(r);
                }
                Stage2::Close { done } => {
                    let img = self.image.write().unwrap_or_else(|e| e.into_inner()).take();
                    let _ = done.send(img.map_or(Ok(()), |i| i.finish()));
                    break;
                }
            }
        }
    }

    fn flush(&self) -> Result<(), DiskError> {
        let mut guard = self.image.write().unwrap_or_else(|e| e.into_inner());
        guard.as_mut().map_or(Ok(()), |img| img.flush())
    }

    fn apply(&self, mut items: Vec<Item>, sync: bool) {
        {
            let mut guard = self.image.write().unwrap_or_else(|e| e.into_inner());
            match guard.as_mut() {
                None => items.iter_mut().for_each(|i| i.error = Some(NBD_ESHUTDOWN)),
                Some(img) => {
                    for i in items.iter_mut().filter(|i| i.error.is_none()) {
                        let r = match &i.apply {
                            Apply::Data(off, data) => img.write_at(*off, data),
                            Apply::Zeros(pieces) => pieces
                                .iter()
                                .try_for_each(|&(off, n)| img.write_at(off, &ZEROS[..n])),
                            Apply::None => Ok(()),
                        };
                        if let Err(e) = r {
                            warn!(export = %self.name, handle = i.req.handle, error = %e, "disk write failed after it was logged");
                            i.error = Some(NBD_EIO);
                        }
                    }
                    if sync && let Err(e) = img.flush() {
                        warn!(export = %self.name, error = %e, "disk flush failed");
                        for i in items.iter_mut().filter(|i| i.sync) {
                            i.error = Some(NBD_EIO);
                        }
                    }
                }
            }
        }
        for i in items {
            answer(i.req, i.error.unwrap_or(0), None);
            if let Apply::Data(_, data) = i.apply {
                self.pool.put(data);
            }
        }
    }
}
