//! Simulator of the VirusTotal file-behaviour feed: the per-minute batch API
//! and the storage host it redirects to, with deterministic batches and
//! configurable faults. Used by the integration tests, the demo and the
//! benchmarks, since the real API cannot be reached from here.
//!
//! ```text
//!  client ──GET /api/v3/feeds/file-behaviours/{minute}──► api.rs ──302──┐
//!    │          (x-apikey, window, faults, missing)                      │
//!    └──GET {Location} (no key!)──► download.rs ◄────────────────────────┘
//!                  (signed token, faults)   │
//!                                           ▼
//!                    store.rs (LRU, disk cache, spawn_blocking)
//!                                           ▼
//!                 batch.rs (lines, bzip2) ◄── records.rs (templates) ◄── fixtures
//! ```
//!
//! Pure parts (`records`, `batch`, `faults`, `settings`) are unit-tested
//! without I/O; `tests.rs` drives the HTTP side with reqwest on port 0 and a
//! [`crate::clock::ManualClock`].

mod api;
mod args;
mod batch;
mod download;
mod faults;
mod json;
mod records;
mod rng;
mod server;
mod settings;
mod state;
mod store;
#[cfg(test)]
mod tests;

pub use args::{PregenerateSpec, VtFeedArgs};
pub use batch::{
    GeneratedLine, LineKind, batch_file, batch_lines, batch_text, join_lines, record_count,
};
pub use faults::{FaultKind, FaultRule, FaultSettings};
pub use records::{SANDBOXES, UNDERSCORE_SANDBOX};
pub use server::{FeedSimHandle, FeedSimulator, SimError};
pub use settings::{
    BatchSettings, CacheSettings, DEFAULT_OVERSIZE_LINE_BYTES, FeedSimSettings, Fraction,
    MinuteSet, MinuteSpec, SettingsError,
};
pub use state::{CredentialLeak, FeedSimStats, MinuteAttempts};
pub use store::{PregenerateReport, StoreError};
