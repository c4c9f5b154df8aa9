//! Simulator of the Kaspersky Threat Intelligence Portal (KTIP) sandbox API
//! the rescan consumer calls: HTTPS with a required client certificate and
//! Basic auth, the rescan method with the portal's documented parameter
//! checks, the two lookup methods, and per-task failure rules. Used by the
//! tests, the demo and the benchmarks, since the real portal cannot be
//! reached from here.
//!
//! ```text
//!  client ──TLS: client cert of certs.rs' CA, else handshake refused──► server.rs
//!                                                                          │
//!  api.rs: latency ─► Basic auth (401/403) ─► route
//!     ├─ GET /api/sandbox/exec_env, GET /api/sandbox/channels ─► lists
//!     └─ PUT /api/sandbox/tasks/file_from_url/{id}
//!          empty body, params.rs checks (400) ─► settings.rs rules
//!          (4xx/5xx/delay, per task id, first K attempts) ─► 200 task JSON
//!  every answer ─► state.rs (records, counters)
//!                     ▲ KtipSimHandle (tests), /_sim/ (subprocess tests)
//! ```
//!
//! Pure parts (`params`, `auth`, `settings`, `certs`) are unit-tested without
//! a server; `tests.rs` drives the HTTPS side with reqwest on port 0.

mod api;
mod args;
mod auth;
mod certs;
mod params;
mod server;
mod settings;
mod state;
#[cfg(test)]
mod tests;

pub use api::{CHANNELS_PATH, EXEC_ENV_PATH, RESCAN_PATH_PREFIX};
pub use args::KtipArgs;
pub use certs::{CLIENT_COMMON_NAME, ClientIdentity, PkiError, PkiFiles, TestPki};
pub use params::{
    EXEC_TIME_SECS, MAX_CMD_LINE_CHARS, MAX_FILE_EXT_CHARS, PARAM_NAMES, PROCESSING_TYPES,
    SECRET_PARAMS,
};
pub use server::{KtipSimError, KtipSimHandle, KtipSimulator};
pub use settings::{
    DEFAULT_CHANNELS, DEFAULT_EXEC_ENVS, DEFAULT_PASSWORD, DEFAULT_USERNAME, KtipSimSettings,
    RuleError, TaskAction, TaskPattern, TaskRule,
};
pub use state::{AuthOutcome, KtipSimStats, RecordedRequest};
