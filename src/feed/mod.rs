//! The feed worker: the VirusTotal file-behaviour feed onto Kafka, exactly once.
//!
//! Stages, one module each: `fetch`/`api` (download minutes ahead, retrying),
//! `spool` (hold a download), `decode` (bzip2 on all cores), `lines` and
//! `classify` (pure line handling), `pipeline` (Kafka transactions), `state`/`state_store` (the durable position), `missing`
//! (runs of 404s) and `worker` (the walk over the minutes).

pub mod api;
pub mod bzblock;
pub mod classify;
pub mod decode;
pub mod fetch;
pub mod lines;
pub mod missing;
pub mod pipeline;
pub mod spool;
pub mod state;
pub mod state_store;
#[cfg(test)]
mod test_support;
pub mod worker;

pub use worker::{FeedError, FeedWorker};
