//! The gateway's gRPC link to storage-writer for the read path: which chunks a host may fetch
//! from a recovery point (`PointChunks`), and the per-connection cache of those answers. The
//! channel connects on first use and reconnects after failures, like the ingest link.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_proto::storage::v1::PointChunksRequest;
use ferry_proto::storage::v1::storage_writer_client::StorageWriterClient;
use tokio::sync::OnceCell;
use tonic::Code;
use tonic::transport::Channel;

use crate::frame::ChunkId;

/// How long a PointChunks call may take: storage-writer may merge a point's logs first.
/// Below the client's 120 s wait for an answer, so the client hears why.
const POINT_CHUNKS_TIMEOUT: Duration = Duration::from_secs(90);
/// Points whose chunk sets one connection remembers. A recovery host reads a point at a
/// time; a few more cover concurrent restores without holding many large sets.
pub(crate) const ENTITLED_POINTS: usize = 8;
/// How long a remembered set is used: a host that is no longer the VM's host or recovery
/// host loses access within this, even on a connection it keeps open.
const ENTITLEMENT_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot reach storage-writer: {0}")]
    Connect(#[from] ferry_mesh::MeshError),
    #[error("storage-writer PointChunks failed: {0}")]
    Call(tonic::Status),
    #[error("storage-writer PointChunks timed out")]
    Timeout,
    #[error("storage-writer sent a chunk id of {0} bytes")]
    Malformed(usize),
}

impl StorageError {
    /// Whether asking again later may give an answer.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Timeout => true,
            Self::Call(status) => matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::Unknown
            ),
            Self::Malformed(_) => false,
        }
    }
}

/// Status codes by which storage-writer refuses a read for good: the host may not read the
/// VM, no such point, a bad name.
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::NotFound
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
    )
}

/// Storage-writer's answer to "which chunks of this point may this host fetch".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entitlement {
    Allowed(HashSet<ChunkId>),
    Denied(String),
}

/// A lazily connecting storage-writer client authenticated with the service certificate.
pub struct StorageLink {
    client: StorageWriterClient<Channel>,
}

impl StorageLink {
    pub fn new(endpoint: &str, tls: &ferry_mesh::ClientTls) -> Result<Self, StorageError> {
        let channel = ferry_mesh::connect_lazy(endpoint, tls)?;
        Ok(Self {
            client: StorageWriterClient::new(channel),
        })
    }

    /// Asks storage-writer for every chunk id `host_name` may fetch from `point` of `vm`. A
    /// refusal by status is a definitive [`Entitlement::Denied`] with storage-writer's
    /// message; an unreachable or failing storage-writer is an error.
    pub async fn point_chunks(
        &self,
        vm: &str,
        point: &str,
        host_name: &str,
    ) -> Result<Entitlement, StorageError> {
        let req = PointChunksRequest {
            vm: vm.to_owned(),
            point: point.to_owned(),
            host_name: host_name.to_owned(),
        };
        let mut client = self.client.clone();
        let call = async move {
            let mut pages = client
                .point_chunks(req)
                .await
                .map_err(StorageError::Call)?
                .into_inner();
            let mut ids = HashSet::new();
            while let Some(page) = pages.message().await.map_err(StorageError::Call)? {
                for id in page.chunk_ids {
                    let id = ChunkId::try_from(id.as_slice())
                        .map_err(|_| StorageError::Malformed(id.len()))?;
                    ids.insert(id);
                }
            }
            Ok(ids)
        };
        match tokio::time::timeout(POINT_CHUNKS_TIMEOUT, call).await {
            Err(_) => Err(StorageError::Timeout),
            Ok(Ok(ids)) => Ok(Entitlement::Allowed(ids)),
            Ok(Err(StorageError::Call(status))) if is_refusal(status.code()) => {
                Ok(Entitlement::Denied(status.message().to_owned()))
            }
            Ok(Err(e)) => Err(e),
        }
    }
}

/// Why a FETCH is not entitled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntitlementError {
    #[error("{0}")]
    Denied(String),
    #[error("chunk {} is not in point {point} of vm {vm}", short_hex(.chunk))]
    NotEntitled {
        chunk: ChunkId,
        vm: String,
        point: String,
    },
    #[error("storage-writer: {0}")]
    Storage(#[from] StorageError),
}

/// The first 16 hex digits of a chunk id: enough to find it, short enough for a message.
pub(crate) fn short_hex(id: &ChunkId) -> String {
    format!("{}...", hex::encode(&id[..8]))
}

/// One remembered answer. The cell is filled once; concurrent FETCHes of the same point wait
/// for the one call instead of each asking storage-writer (a restore runs many at once).
struct Slot {
    vm: String,
    point: String,
    at: Instant,
    set: OnceCell<Arc<HashSet<ChunkId>>>,
}

/// The chunk sets one connection (one host) was entitled to, per (vm, point), least recently
/// used dropped first. Refusals are not remembered: they are cheap to ask again, and a
/// point that was missing may have been committed since.
#[derive(Default)]
pub(crate) struct Entitlements {
    slots: Mutex<VecDeque<Arc<Slot>>>,
}

/// Whether a point name moves: `latest` (or empty) resolves to a newer point after a commit.
fn moves(point: &str) -> bool {
    point.is_empty() || point == "latest"
}

impl Entitlements {
    /// Passes when every id in `ids` is a chunk of `point` of `vm` that `host` may fetch.
    /// Asks storage-writer on a miss; a remembered `latest` that lacks an id is asked again
    /// once, since the VM may have a newer point now.
    pub(crate) async fn check(
        &self,
        link: &StorageLink,
        host: &str,
        vm: &str,
        point: &str,
        ids: &[ChunkId],
    ) -> Result<(), EntitlementError> {
        let mut refreshed = false;
        loop {
            let slot = self.slot(vm, point);
            let asked = std::sync::atomic::AtomicBool::new(false);
            let set = slot
                .set
                .get_or_try_init(|| async {
                    asked.store(true, std::sync::atomic::Ordering::Relaxed);
                    match link.point_chunks(vm, point, host).await? {
                        Entitlement::Allowed(set) => Ok(Arc::new(set)),
                        Entitlement::Denied(reason) => Err(EntitlementError::Denied(reason)),
                    }
                })
                .await?;
            let Some(missing) = ids.iter().find(|id| !set.contains(*id)) else {
                return Ok(());
            };
            let fresh = asked.load(std::sync::atomic::Ordering::Relaxed);
            if moves(point) && !fresh && !refreshed {
                self.forget(&slot);
                refreshed = true;
                continue;
            }
            return Err(EntitlementError::NotEntitled {
                chunk: *missing,
                vm: vm.to_owned(),
                point: point.to_owned(),
            });
        }
    }

    /// The slot for (vm, point): the remembered one if still fresh (now most recently used),
    /// else a new empty one, dropping the least recently used beyond [`ENTITLED_POINTS`].
    fn slot(&self, vm: &str, point: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // An expired slot is removed here and replaced below.
        if let Some(i) = slots.iter().position(|s| s.vm == vm && s.point == point)
            && let Some(slot) = slots.remove(i)
            && slot.at.elapsed() < ENTITLEMENT_TTL
        {
            slots.push_back(slot.clone());
            return slot;
        }
        let slot = Arc::new(Slot {
            vm: vm.to_owned(),
            point: point.to_owned(),
            at: Instant::now(),
            set: OnceCell::new(),
        });
        slots.push_back(slot.clone());
        while slots.len() > ENTITLED_POINTS {
            slots.pop_front();
        }
        slot
    }

    /// Drops `slot` if it is still the remembered one (another stream may have replaced it).
    fn forget(&self, slot: &Arc<Slot>) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// How many points are remembered (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_bounded() {
        let e = Entitlements::default();
        let first = e.slot("vm", "p0");
        assert!(Arc::ptr_eq(&first, &e.slot("vm", "p0")));
        for i in 1..=ENTITLED_POINTS {
            e.slot("vm", &format!("p{i}"));
        }
        assert_eq!(e.len(), ENTITLED_POINTS);
        // p0 was the least recently used and went
        assert!(!Arc::ptr_eq(&first, &e.slot("vm", "p0")));
        let again = e.slot("vm", "p0");
        e.forget(&again);
        assert!(!Arc::ptr_eq(&again, &e.slot("vm", "p0")));
        // another vm's point of the same name is another slot
        assert!(!Arc::ptr_eq(&e.slot("vm", "p0"), &e.slot("other", "p0")));
    }

    #[test]
    fn messages_name_a_short_chunk() {
        let err = EntitlementError::NotEntitled {
            chunk: [0xab; 32],
            vm: "web".into(),
            point: "latest".into(),
        };
        assert_eq!(
            err.to_string(),
            "chunk abababababababab... is not in point latest of vm web"
        );
        assert!(moves("latest") && moves("") && !moves("0001"));
    }
}
