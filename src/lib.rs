//! sandbox-bridge: connects malware-sandbox services to Apache Kafka.
//!
//! The feed worker ([`feed`]) publishes the VirusTotal file-behaviour feed
//! onto Kafka exactly once; the simulators ([`sim`]) serve faithful fakes of
//! the upstream APIs for tests, the demo and the benchmarks.

pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod feed;
pub mod http;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod minute;
pub mod rescan;
pub mod sim;
