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
    pub rescan: Option<RawRescan>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRescan {
    pub enabled: Option<bool>,
    pub base_url: Option<String>,
    pub username: Option<String>,
    pub username_file: Option<PathBuf>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub ca_cert: Option<PathBuf>,
    pub requests_topic: Option<String>,
    pub results_topic: Option<String>,
    pub dlq_topic: Option<String>,
    pub dedup_topic: Option<String>,
    pub group_id: Option<String>,
    pub reply_topic_allowlist: Option<Vec<String>>,
    pub max_in_flight: Option<usize>,
    pub max_requests_per_minute: Option<u32>,
    pub transactional_id_prefix: Option<String>,
    pub instance_id: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub dedup_window: Option<Duration>,
    pub exec_env_path: Option<String>,
    pub channels_path: Option<String>,
    pub fallback_exec_envs: Option<Vec<String>>,
    pub fallback_channels: Option<Vec<String>>,
    pub max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub retry_deadline: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub retry_initial_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub retry_max_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    pub auth_failures_to_pause: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub probe_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub commit_interval: Option<Duration>,
    pub max_buffered: Option<usize>,
    pub partitions: Option<i32>,
    #[serde(default, with = "humantime_serde")]
    pub transaction_timeout: Option<Duration>,
}
