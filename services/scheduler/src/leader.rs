//! Leadership among scheduler replicas. Every replica serves the work streams, completions
//! and dispatches (all in Redis); only the leader runs the timing loops (delta cycles,
//! retries, retention). The leader holds the `scheduler-leader` lease, renewed in the
//! background; when it is lost (expired, Redis lost its data, Redis out of reach) the term
//! ends at once and the replica campaigns again. A replica that stops releases the lease, so
//! another takes over without waiting for the ttl; one that dies is replaced within a ttl.
//!
//! Stopping the loops is not what keeps a deposed leader harmless: every scheduled cycle is
//! queued with the term's fencing token through [`ferry_coord::Coord::push_slot`], which
//! refuses a token that is no longer the lease's and queues each slot of a VM at most once.

use std::time::Duration;

use ferry_coord::{Coord, CoordError, Lease};
use tokio_util::sync::CancellationToken;

/// The lease the leader holds.
pub const LEADER_RESOURCE: &str = "scheduler-leader";
/// Its ttl: a dead leader is replaced within this.
pub const LEADER_TTL: Duration = Duration::from_secs(3);

/// One replica's term as leader.
#[derive(Clone, Debug)]
pub struct Term {
    /// The leader lease; its token fences what the term queues.
    pub lease: Lease,
    stop: CancellationToken,
}

impl Term {
    /// Resolves when the term is over (lease lost, or the replica shuts down).
    pub async fn ended(&self) {
        self.stop.cancelled().await;
    }

    pub fn is_over(&self) -> bool {
        self.stop.is_cancelled()
    }
}

/// A name for this replica's lease: its address (for operators) and a unique suffix.
pub fn replica_id(addr: Option<std::net::SocketAddr>) -> String {
    let addr = addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
    format!("scheduler@{addr}/{}", uuid::Uuid::new_v4())
}

/// Campaigns for leadership until `shutdown`: for each term won calls `start(term)` (which
/// spawns the loops; they stop when the term ends), waits for the term to end, then
/// campaigns again.
pub async fn campaign(
    coord: Coord,
    holder: String,
    shutdown: CancellationToken,
    mut start: impl FnMut(Term),
) {
    let poll = LEADER_TTL / 6;
    loop {
        let kept = tokio::select! {
            () = shutdown.cancelled() => return,
            k = coord.acquire_kept(LEADER_RESOURCE, &holder, LEADER_TTL) => k,
        };
        match kept {
            Ok(kept) => {
                let term = Term {
                    lease: kept.lease().clone(),
                    stop: shutdown.child_token(),
                };
                tracing::info!(holder = %holder, token = kept.token(), "scheduler leader: term begins");
                start(term.clone());
                let lost = kept.lost();
                tokio::select! {
                    () = lost.cancelled() => {}
                    () = shutdown.cancelled() => {}
                }
                term.stop.cancel();
                tracing::info!(holder = %holder, token = kept.token(), lost = lost.is_cancelled(), "scheduler leader: term ends");
                if shutdown.is_cancelled() {
                    if let Err(e) = kept.release().await {
                        tracing::debug!(error = %e, "releasing the leader lease failed; it expires");
                    }
                    return;
                }
            }
            Err(CoordError::LeaseHeld { .. }) => {}
            Err(e) => {
                tracing::warn!(holder = %holder, error = %e, "campaigning for scheduler leader failed")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Two replicas: exactly one term at a time; the other takes over when the leader stops.
    #[tokio::test]
    async fn one_leader_at_a_time_and_takeover() {
        if !ferry_coord::redis_server_available() {
            panic!("redis-server is required (deploy/test.sh installs it)");
        }
        let dir = tempfile::tempdir().unwrap();
        let server = ferry_coord::RedisServer::start(dir.path()).unwrap();
        let coord = Coord::connect(&server.url()).await.unwrap();
        let terms: Arc<Mutex<Vec<(usize, Term)>>> = Arc::default();
        let mut stops = Vec::new();
        for i in 0..2 {
            let stop = CancellationToken::new();
            let terms = terms.clone();
            tokio::spawn(campaign(
                coord.clone(),
                format!("r{i}"),
                stop.clone(),
                move |t| terms.lock().unwrap().push((i, t)),
            ));
            stops.push(stop);
        }
        let wait_terms = |n: usize| {
            let terms = terms.clone();
            async move {
                for _ in 0..200 {
                    if terms.lock().unwrap().len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("no term {n}");
            }
        };
        wait_terms(1).await;
        tokio::time::sleep(LEADER_TTL).await;
        let (first, t1) = {
            let t = terms.lock().unwrap();
            assert_eq!(t.len(), 1, "one term while the leader lives");
            t[0].clone()
        };
        assert!(!t1.is_over());
        stops[first].cancel();
        wait_terms(2).await;
        let (second, t2) = terms.lock().unwrap()[1].clone();
        assert!(t1.is_over());
        assert_ne!(first, second);
        assert!(t2.lease.token > t1.lease.token);
        coord
            .check_fence(LEADER_RESOURCE, t2.lease.token)
            .await
            .unwrap();
        stops[second].cancel();
    }
}
