//! The `[rescan]` section: the KTIP sandbox rescan consumer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::RawRescan;
use super::{
    ConfigError, Environment, Secret, SecretSources, check_base_url, check_duration, check_range,
    check_topic, invalid,
};

#[derive(Debug, Clone)]
pub struct RescanConfig {
    pub enabled: bool,
    pub base_url: String,
    pub username: Secret,
    pub password: Secret,
    /// PEM holding the client certificate and its key.
    pub client_cert: Option<PathBuf>,
    /// PEM of extra roots to trust.
    pub ca_cert: Option<PathBuf>,
    pub requests_topic: String,
    pub results_topic: String,
    pub dlq_topic: String,
    /// Compacted topic of outcomes by `request_id`, written with the results.
    pub dedup_topic: String,
    pub group_id: String,
    pub reply_topic_allowlist: Vec<String>,
    pub max_in_flight: usize,
    pub max_requests_per_minute: u32,
    /// `<transactional_id_prefix>-<instance_id>`: one transactional id per instance.
    pub transactional_id_prefix: String,
    pub instance_id: String,
    pub dedup_window: Duration,
    pub exec_env_path: String,
    pub channels_path: String,
    pub fallback_exec_envs: Vec<String>,
    pub fallback_channels: Vec<String>,
    pub max_attempts: u32,
    pub retry_deadline: Duration,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub request_timeout: Duration,
    pub auth_failures_to_pause: u32,
    pub probe_interval: Duration,
    pub commit_interval: Duration,
    /// Requests taken from Kafka but not yet committed, at most.
    pub max_buffered: usize,
    pub partitions: i32,
    pub transaction_timeout: Duration,
}

impl RescanConfig {
    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.transactional_id_prefix, self.instance_id)
    }
}

fn default_instance_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "instance".to_string())
}

fn check_id(key: &str, value: String) -> Result<String, ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 200
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(value)
    } else {
        Err(invalid(
            key,
            format!("`{value}` must be 1-200 of [a-zA-Z0-9._-]"),
        ))
    }
}

fn check_path(
    key: &str,
    path: Option<PathBuf>,
    base_dir: &Path,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(path) = path else { return Ok(None) };
    let path = base_dir.join(path);
    std::fs::metadata(&path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    Ok(Some(path))
}

/// `None` when the section is absent: the consumer is then disabled.
pub(super) fn check_rescan(
    raw: Option<RawRescan>,
    base_dir: &Path,
    env: &dyn Environment,
) -> Result<RescanConfig, ConfigError> {
    let present = raw.is_some();
    let raw = raw.unwrap_or_default();
    let enabled = raw.enabled.unwrap_or(present);
    let secret = |key, value, file, env_var| {
        SecretSources {
            key,
            value,
            file,
            env_var,
        }
        .resolve(base_dir, env)
    };
    let username = secret(
        "rescan.username",
        raw.username,
        raw.username_file,
        "KTIP_USERNAME",
    )?;
    let password = secret(
        "rescan.password",
        raw.password,
        raw.password_file,
        "KTIP_PASSWORD",
    )?;
    let (username, password) = match (username, password) {
        (Some(u), Some(p)) => (u, p),
        _ if !enabled => (Secret::new(String::new()), Secret::new(String::new())),
        (None, _) => {
            return Err(invalid(
                "rescan.username",
                "no KTIP user name: set rescan.username, rescan.username_file or KTIP_USERNAME",
            ));
        }
        (_, None) => {
            return Err(invalid(
                "rescan.password",
                "no KTIP password: set rescan.password, rescan.password_file or KTIP_PASSWORD",
            ));
        }
    };
    let max_in_flight = check_range(
        "rescan.max_in_flight",
        raw.max_in_flight.unwrap_or(8),
        1,
        1024,
    )?;
    let retry_initial_backoff = check_duration(
        "rescan.retry_initial_backoff",
        raw.retry_initial_backoff.unwrap_or(Duration::from_secs(1)),
        Duration::from_millis(1),
        Duration::from_secs(60),
    )?;
    let allowlist = raw.reply_topic_allowlist.unwrap_or_default();
    for t in &allowlist {
        check_topic("rescan.reply_topic_allowlist", t.clone())?;
    }
    let list = |v: Option<Vec<String>>, default: &[&str]| {
        v.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect())
    };
    Ok(RescanConfig {
        enabled,
        base_url: check_base_url("rescan.base_url", raw.base_url, "https://tip.kaspersky.com")?,
        username,
        password,
        client_cert: check_path("rescan.client_cert", raw.client_cert, base_dir)?,
        ca_cert: check_path("rescan.ca_cert", raw.ca_cert, base_dir)?,
        requests_topic: check_topic(
            "rescan.requests_topic",
            raw.requests_topic
                .unwrap_or_else(|| "ktip.rescan.requests".into()),
        )?,
        results_topic: check_topic(
            "rescan.results_topic",
            raw.results_topic
                .unwrap_or_else(|| "ktip.rescan.results".into()),
        )?,
        dlq_topic: check_topic(
            "rescan.dlq_topic",
            raw.dlq_topic
                .unwrap_or_else(|| "ktip.rescan.requests.dlq".into()),
        )?,
        dedup_topic: check_topic(
            "rescan.dedup_topic",
            raw.dedup_topic
                .unwrap_or_else(|| "sandbox-bridge.rescan-outcomes".into()),
        )?,
        group_id: check_id(
            "rescan.group_id",
            raw.group_id
                .unwrap_or_else(|| "sandbox-bridge-rescan".into()),
        )?,
        reply_topic_allowlist: allowlist,
        max_in_flight,
        max_requests_per_minute: check_range(
            "rescan.max_requests_per_minute",
            raw.max_requests_per_minute.unwrap_or(120),
            1,
            1_000_000,
        )?,
        transactional_id_prefix: check_id(
            "rescan.transactional_id_prefix",
            raw.transactional_id_prefix
                .unwrap_or_else(|| "sandbox-bridge-rescan".into()),
        )?,
        instance_id: check_id(
            "rescan.instance_id",
            raw.instance_id.unwrap_or_else(default_instance_id),
        )?,
        dedup_window: check_duration(
            "rescan.dedup_window",
            raw.dedup_window.unwrap_or(Duration::from_secs(24 * 3600)),
            Duration::from_secs(1),
            Duration::from_secs(90 * 24 * 3600),
        )?,
        exec_env_path: raw
            .exec_env_path
            .unwrap_or_else(|| "api/sandbox/exec_env".into()),
        channels_path: raw
            .channels_path
            .unwrap_or_else(|| "api/sandbox/channels".into()),
        fallback_exec_envs: list(raw.fallback_exec_envs, &[]),
        fallback_channels: list(raw.fallback_channels, &[]),
        max_attempts: check_range("rescan.max_attempts", raw.max_attempts.unwrap_or(6), 1, 100)?,
        retry_deadline: check_duration(
            "rescan.retry_deadline",
            raw.retry_deadline.unwrap_or(Duration::from_secs(50)),
            Duration::from_millis(10),
            Duration::from_secs(3600),
        )?,
        retry_initial_backoff,
        retry_max_backoff: check_duration(
            "rescan.retry_max_backoff",
            raw.retry_max_backoff.unwrap_or(Duration::from_secs(15)),
            retry_initial_backoff,
            Duration::from_secs(600),
        )?,
        request_timeout: check_duration(
            "rescan.request_timeout",
            raw.request_timeout.unwrap_or(Duration::from_secs(20)),
            Duration::from_millis(10),
            Duration::from_secs(600),
        )?,
        auth_failures_to_pause: check_range(
            "rescan.auth_failures_to_pause",
            raw.auth_failures_to_pause.unwrap_or(3),
            1,
            1000,
        )?,
        probe_interval: check_duration(
            "rescan.probe_interval",
            raw.probe_interval.unwrap_or(Duration::from_secs(30)),
            Duration::from_millis(10),
            Duration::from_secs(3600),
        )?,
        commit_interval: check_duration(
            "rescan.commit_interval",
            raw.commit_interval.unwrap_or(Duration::from_millis(100)),
            Duration::from_millis(1),
            Duration::from_secs(60),
        )?,
        max_buffered: check_range(
            "rescan.max_buffered",
            raw.max_buffered.unwrap_or(max_in_flight * 8),
            max_in_flight,
            1_000_000,
        )?,
        partitions: check_range("rescan.partitions", raw.partitions.unwrap_or(6), 1, 10_000)?,
        transaction_timeout: check_duration(
            "rescan.transaction_timeout",
            raw.transaction_timeout.unwrap_or(Duration::from_secs(60)),
            Duration::from_secs(1),
            Duration::from_secs(900),
        )?,
    })
}
