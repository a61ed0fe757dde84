//! Calling until it works: one loop for every "retry while the peer is out of reach" in the
//! mesh. Delays come from [`ferry_model::Backoff`]; an error the caller classes as permanent
//! ends the loop at once, so nothing retries a refusal in vain.
use std::fmt::Display;
use std::future::Future;

use ferry_model::Backoff;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::ErrorCode;

/// Why [`retry`] gave up.
#[derive(Debug)]
pub enum GaveUp<E> {
    /// `cancel` fired (shutdown) before a call succeeded.
    Cancelled,
    /// A permanent error, or the last transient one after `attempts` calls.
    Failed(E),
}

/// Calls `op` until it succeeds, waiting `backoff`'s delays between calls: at most `attempts`
/// calls (`None`: until `cancel`), and none after an error `transient` says is permanent.
/// Each failure is logged with `what`.
pub async fn retry<T, E, Fut>(
    what: &str,
    mut backoff: Backoff,
    attempts: Option<u32>,
    cancel: &CancellationToken,
    transient: impl Fn(&E) -> bool,
    mut op: impl FnMut() -> Fut,
) -> Result<T, GaveUp<E>>
where
    E: Display,
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let e = match op().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let attempt = backoff.failures() + 1;
        if !transient(&e) || attempts.is_some_and(|n| attempt >= n) {
            tracing::warn!(what, attempt, error = %e, "giving up");
            return Err(GaveUp::Failed(e));
        }
        let delay = backoff.next_delay();
        tracing::warn!(what, attempt, retry_ms = delay.as_millis() as u64, error = %e, "failed; retrying");
        tokio::select! {
            _ = cancel.cancelled() => return Err(GaveUp::Cancelled),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whether a call that failed with `s` may work later (the peer unreachable, busy, or a
/// race lost); refusals and bad requests do not heal by retrying.
pub fn transient_status(s: &Status) -> bool {
    ErrorCode::from_grpc(s.code()).is_transient()
}

/// [`transient_status`] for an error that may wrap a status; anything else (a connection
/// that could not be made) counts as transient.
pub fn transient_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Status>().is_none_or(transient_status)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    fn quick() -> Backoff {
        Backoff::new(Duration::from_millis(1), Duration::from_millis(4))
    }

    #[tokio::test]
    async fn retries_transient_errors_until_it_works() {
        let calls = AtomicU32::new(0);
        let got = retry(
            "t",
            quick(),
            None,
            &CancellationToken::new(),
            transient_status,
            || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(Status::unavailable("down")),
                    _ => Ok(7),
                }
            },
        )
        .await;
        assert_eq!(got.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_permanent_error_stops_at_once_and_attempts_are_bounded() {
        let calls = AtomicU32::new(0);
        let got: Result<(), _> = retry(
            "t",
            quick(),
            None,
            &CancellationToken::new(),
            transient_status,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Status::permission_denied("no"))
            },
        )
        .await;
        assert!(matches!(got, Err(GaveUp::Failed(s)) if s.code() == tonic::Code::PermissionDenied));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = AtomicU32::new(0);
        let got: Result<(), _> = retry(
            "t",
            quick(),
            Some(3),
            &CancellationToken::new(),
            transient_status,
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Status::unavailable("down"))
            },
        )
        .await;
        assert!(matches!(got, Err(GaveUp::Failed(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn cancel_ends_the_wait() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let slow = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let got: Result<(), _> = retry(
            "t",
            slow,
            None,
            &cancel,
            |_: &Status| true,
            || async { Err(Status::unavailable("down")) },
        )
        .await;
        assert!(matches!(got, Err(GaveUp::Cancelled)));
    }
}
