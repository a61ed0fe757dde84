//! A lease kept alive in the background: renewed every third of its ttl, and reported lost
//! (a cancelled token) as soon as the holder can no longer be sure it still has it.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{Coord, CoordError, Lease};

/// A lease renewed by a background task until it is released, dropped or lost.
///
/// [`KeptLease::lost`] is cancelled when a renewal finds the lease gone or taken over, or
/// when renewals have failed (Redis unreachable) for two thirds of the ttl: by then another
/// holder may get it soon, so the work it guards must stop. Writes it guards still present
/// [`KeptLease::token`] where they are committed; the token is the real guard, `lost` only
/// stops work early.
#[derive(Debug)]
pub struct KeptLease {
    lease: Lease,
    lost: CancellationToken,
    stop: CancellationToken,
    coord: Coord,
}

impl KeptLease {
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn token(&self) -> u64 {
        self.lease.token
    }

    /// Cancelled when the lease is lost (never cancelled by [`KeptLease::release`]).
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Stops renewing and releases the lease if it is still ours, so another holder can take
    /// it at once instead of after the ttl.
    pub async fn release(self) -> Result<(), CoordError> {
        self.stop.cancel();
        self.coord.release_lease(&self.lease).await
    }
}

impl Drop for KeptLease {
    /// Stops renewing; the lease then expires after its ttl.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Coord {
    /// Acquires the lease on `resource` for `holder` (see [`Coord::acquire_lease`]) and keeps
    /// renewing it in the background.
    pub async fn acquire_kept(
        &self,
        resource: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<KeptLease, CoordError> {
        let started = Instant::now();
        let lease = self.acquire_lease(resource, holder, ttl).await?;
        let kept = KeptLease {
            lease: lease.clone(),
            lost: CancellationToken::new(),
            stop: CancellationToken::new(),
            coord: self.clone(),
        };
        tokio::spawn(renew_loop(
            self.clone(),
            lease,
            ttl,
            started,
            kept.lost.clone(),
            kept.stop.clone(),
        ));
        Ok(kept)
    }
}

async fn renew_loop(
    coord: Coord,
    lease: Lease,
    ttl: Duration,
    mut last_ok: Instant,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let every = (ttl / 3).max(Duration::from_millis(1));
    // Counted from when the last successful renewal was sent: the lease lasts at least `ttl`
    // from then, so giving up after two thirds of it leaves a margin for clock rates.
    let give_up = ttl * 2 / 3;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let sent = Instant::now();
        // A renewal still unanswered when the lease may be expiring counts as failed.
        let res = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout_at(last_ok + give_up, coord.renew_lease(&lease, ttl)) => {
                r.unwrap_or_else(|_| Err(CoordError::Timeout { what: format!("renewing the lease on {}", lease.resource) }))
            }
        };
        match res {
            Ok(()) => last_ok = sent,
            Err(e) if e.is_transient() && last_ok.elapsed() < give_up => {
                debug!(resource = %lease.resource, error = %e, "lease renewal failed; trying again");
            }
            Err(e) => {
                if e.is_transient() {
                    warn!(resource = %lease.resource, token = lease.token, error = %e, "lease not renewed in time; giving it up");
                } else {
                    info!(resource = %lease.resource, token = lease.token, error = %e, "lease lost");
                }
                lost.cancel();
                return;
            }
        }
    }
}
