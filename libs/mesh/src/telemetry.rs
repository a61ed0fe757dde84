//! Tracing setup for binaries and tests.

use tracing_subscriber::EnvFilter;

/// Installs a fmt subscriber filtered by `RUST_LOG`, else `FERRY_LOG`, else `info`.
/// `FERRY_LOG_FORMAT=json` switches to JSON lines. Safe to call more than once: later calls
/// (and calls after another subscriber was installed) do nothing.
pub fn init_tracing(component: &str) {
    let filter = ["RUST_LOG", "FERRY_LOG"]
        .iter()
        .find_map(|var| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .and_then(|v| EnvFilter::try_new(v).ok())
        })
        .unwrap_or_else(|| EnvFilter::new("info"));
    let json = std::env::var("FERRY_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = if json {
        builder.json().try_init().is_ok()
    } else {
        builder.try_init().is_ok()
    };
    if installed {
        tracing::debug!(component, "tracing initialised");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_is_idempotent() {
        super::init_tracing("test");
        super::init_tracing("test");
        tracing::info!(component = "test", "still logging");
    }
}
