//! The configuration file as written: every key optional, unknown keys refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub kafka: Option<RawKafka>,
    pub feed: Option<RawFeed>,
    pub metrics: Option<RawMetrics>,
    pub log: Option<RawLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    pub bootstrap_servers: Option<String>,
    pub properties: Option<BTreeMap<String, toml::Value>>,
    pub create_topics: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub operation_timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeed {
    pub enabled: Option<bool>,
    pub base_url: Option<String>,
    pub api_key: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub topic: Option<String>,
    pub dlq_topic: Option<String>,
    pub state_topic: Option<String>,
    pub transactional_id: Option<String>,
    pub start: Option<String>,
    pub max_message_bytes: Option<usize>,
    pub missing_threshold: Option<u32>,
    pub delivery: Option<String>,
    pub missing_policy: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub missing_recheck_for: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub missing_recheck_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub gap_recheck_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub not_available_backoff: Option<Duration>,
    pub partitions: Option<i32>,
    pub prefetch: Option<usize>,
    pub decode_threads: Option<usize>,
    pub spool_memory_bytes: Option<usize>,
    pub spool_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub download_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub retry_initial_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub retry_max_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub transaction_timeout: Option<Duration>,
    pub window_edge_margin_minutes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}
