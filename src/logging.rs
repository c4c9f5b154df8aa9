//! Logging: `tracing` to stderr, as text or JSON lines.
//!
//! The filter comes from `RUST_LOG` when set, else from `[log] level`.
//! librdkafka's own log lines arrive through the `log` bridge under the
//! `librdkafka` target. Nothing logged may contain a secret: secrets are
//! wrapped in types that print `[redacted]`, and download URLs are logged
//! by origin only.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber (once per process; later calls are ignored).
pub fn init(cfg: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(true);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
