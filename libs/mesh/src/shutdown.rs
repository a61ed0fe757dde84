//! Graceful shutdown on SIGINT / SIGTERM.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGINT or SIGTERM. Must be called inside a Tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        cancel.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};

    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for sigterm; only ctrl-c stops the process");
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!(signal = "sigint", "shutting down");
            }
            return;
        }
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => {
            if r.is_ok() {
                tracing::info!(signal = "sigint", "shutting down");
            } else {
                // Without a ctrl-c handler, wait for sigterm alone.
                term.recv().await;
                tracing::info!(signal = "sigterm", "shutting down");
            }
        }
        _ = term.recv() => tracing::info!(signal = "sigterm", "shutting down"),
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    if tokio::signal::ctrl_c().await.is_ok() {
        tracing::info!(signal = "ctrl-c", "shutting down");
    }
}
