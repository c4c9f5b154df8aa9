//! Configuration: the TOML file, checked once at load into typed settings.
//!
//! `raw` mirrors the file (every key optional, unknown keys refused); this
//! module turns it into [`Config`], where every value has been validated and
//! defaulted. Nothing downstream sees an unchecked value. Errors name the key
//! and the reason. Secrets (API keys, passthrough passwords) are wrapped so
//! they cannot be printed.

mod raw;
mod rescan;
mod secret;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use rescan::RescanConfig;
pub use secret::{KafkaProperties, Secret, is_sensitive_property};

use crate::minute::Minute;

/// A configuration problem: which key, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub feed: FeedConfig,
    pub rescan: RescanConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// librdkafka properties passed through as given (secrets redacted when printed).
    pub properties: KafkaProperties,
    /// Create missing topics at start.
    pub create_topics: bool,
    /// How long admin and metadata operations may take.
    pub operation_timeout: Duration,
}

/// What the feed worker guarantees to consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Records and position in one Kafka transaction.
    ExactlyOnce,
    /// Position committed after every record is acknowledged; duplicates after a crash.
    AtLeastOnce,
}

/// What to do when `missing_threshold` consecutive minutes are missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingPolicy {
    /// Re-check the run with backoff for `missing_recheck_for`, then record it as a gap and move on.
    RecheckThenGap,
    /// Record the run as a gap at once and move on.
    Gap,
    /// Never move past a missing run: re-check it until its batches appear.
    Halt,
}

#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub enabled: bool,
    pub base_url: String,
    pub api_key: Secret,
    pub topic: String,
    pub dlq_topic: String,
    pub state_topic: String,
    pub transactional_id: String,
    /// First minute when no saved position exists; `None` means now − 70 min.
    pub start: Option<Minute>,
    pub max_message_bytes: usize,
    pub missing_threshold: u32,
    pub delivery: Delivery,
    pub missing_policy: MissingPolicy,
    pub missing_recheck_for: Duration,
    pub missing_recheck_backoff: Duration,
    pub gap_recheck_interval: Duration,
    pub not_available_backoff: Duration,
    pub partitions: i32,
    pub prefetch: usize,
    pub decode_threads: usize,
    pub spool_memory_bytes: usize,
    pub spool_dir: Option<PathBuf>,
    pub request_timeout: Duration,
    pub download_timeout: Duration,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub transaction_timeout: Duration,
    /// Minutes kept clear of the 7-day edge, so a batch about to expire is not asked for.
    pub window_edge_margin_minutes: i64,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// `None` switches the HTTP endpoint off.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `sandbox_bridge=debug,rdkafka=info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// Where secrets not present in the file come from (the process environment in production).
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Environment for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Config {
    /// Reads and checks the file at `path`, taking secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base, &ProcessEnvironment).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Checks TOML text; relative file paths are resolved against `base_dir`.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        env: &dyn Environment,
    ) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::new(),
            message: syntax_message(text, &e),
        })?;
        let kafka = check_kafka(raw.kafka)?;
        // A file without [feed] and [rescan] runs the feed worker; a section
        // present means that pipeline is enabled unless it says otherwise.
        let feed_by_default = raw.feed.is_some() || raw.rescan.is_none();
        let mut raw_feed = raw.feed.unwrap_or_default();
        raw_feed.enabled = raw_feed.enabled.or(Some(feed_by_default));
        let feed = check_feed(raw_feed, base_dir, env)?;
        let rescan = rescan::check_rescan(raw.rescan, base_dir, env)?;
        let metrics = check_metrics(raw.metrics.unwrap_or_default())?;
        let log = check_log(raw.log.unwrap_or_default())?;
        Ok(Config {
            kafka,
            feed,
            rescan,
            metrics,
            log,
        })
    }
}

/// Properties the worker sets itself; configuring them through
/// `[kafka.properties]` would break a guarantee, so they are refused.
const RESERVED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "use kafka.bootstrap_servers"),
    ("transactional.id", "use feed.transactional_id"),
    ("enable.idempotence", "set by feed.delivery"),
    (
        "isolation.level",
        "the worker always reads its state read_committed",
    ),
    (
        "partitioner",
        "records are partitioned with murmur2_random, like Java clients",
    ),
    ("group.id", "set per pipeline"),
    ("enable.auto.commit", "offsets are committed by the worker"),
];

fn check_kafka(raw: Option<raw::RawKafka>) -> Result<KafkaConfig, ConfigError> {
    let raw = raw.ok_or_else(|| {
        invalid(
            "kafka",
            "missing section: kafka.bootstrap_servers is required",
        )
    })?;
    let bootstrap_servers = raw
        .bootstrap_servers
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            invalid(
                "kafka.bootstrap_servers",
                "required, e.g. \"localhost:9092\"",
            )
        })?;
    let mut properties = BTreeMap::new();
    for (name, value) in raw.properties.unwrap_or_default() {
        let key = format!("kafka.properties.\"{name}\"");
        if let Some((_, why)) = RESERVED_PROPERTIES.iter().find(|(p, _)| *p == name) {
            return Err(invalid(&key, format!("cannot be set here: {why}")));
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            _ => return Err(invalid(&key, "must be a string, number or boolean")),
        };
        properties.insert(name, value);
    }
    Ok(KafkaConfig {
        bootstrap_servers,
        properties: KafkaProperties::new(properties),
        create_topics: raw.create_topics.unwrap_or(true),
        operation_timeout: raw.operation_timeout.unwrap_or(Duration::from_secs(30)),
    })
}

pub(crate) fn check_topic(key: &str, name: String) -> Result<String, ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if valid {
        Ok(name)
    } else {
        Err(invalid(
            key,
            format!("`{name}` is not a valid Kafka topic name (1-249 of [a-zA-Z0-9._-])"),
        ))
    }
}

pub(crate) fn check_range<T: PartialOrd + std::fmt::Display + Copy>(
    key: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        Err(invalid(
            key,
            format!("must be between {lo} and {hi} (got {v})"),
        ))
    } else {
        Ok(v)
    }
}

pub(crate) fn check_duration(
    key: &str,
    v: Duration,
    lo: Duration,
    hi: Duration,
) -> Result<Duration, ConfigError> {
    if v < lo || v > hi {
        Err(invalid(
            key,
            format!(
                "must be between {} and {} (got {})",
                humantime::format_duration(lo),
                humantime::format_duration(hi),
                humantime::format_duration(v)
            ),
        ))
    } else {
        Ok(v)
    }
}

pub(crate) fn read_secret_file(
    key: &str,
    path: &Path,
    base_dir: &Path,
) -> Result<Secret, ConfigError> {
    let path = base_dir.join(path);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(Secret::new(value))
}

/// An http(s) URL with a host, without a trailing slash.
pub(crate) fn check_base_url(
    key: &str,
    value: Option<String>,
    default: &str,
) -> Result<String, ConfigError> {
    let url = value.unwrap_or_else(|| default.to_string());
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| invalid(key, format!("`{url}` is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(invalid(key, "must be an http(s) URL with a host"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// Where a secret may come from: the file itself, a file it names, or the environment.
pub(crate) struct SecretSources {
    key: &'static str,
    value: Option<String>,
    file: Option<PathBuf>,
    env_var: &'static str,
}

impl SecretSources {
    pub(crate) fn resolve(
        self,
        base_dir: &Path,
        env: &dyn Environment,
    ) -> Result<Option<Secret>, ConfigError> {
        let key = self.key;
        match (self.value, self.file) {
            (Some(_), Some(_)) => Err(invalid(
                key,
                format!("set either {key} or {key}_file, not both"),
            )),
            (Some(v), None) if v.is_empty() => Err(invalid(key, "is empty")),
            (Some(v), None) => Ok(Some(Secret::new(v))),
            (None, Some(path)) => {
                read_secret_file(&format!("{key}_file"), &path, base_dir).map(Some)
            }
            (None, None) => Ok(env.var(self.env_var).map(Secret::new)),
        }
    }
}

fn check_feed(
    raw: raw::RawFeed,
    base_dir: &Path,
    env: &dyn Environment,
) -> Result<FeedConfig, ConfigError> {
    let enabled = raw.enabled.unwrap_or(true);
    let base_url = check_base_url("feed.base_url", raw.base_url, "https://www.virustotal.com")?;
    let sources = SecretSources {
        key: "feed.api_key",
        value: raw.api_key,
        file: raw.api_key_file,
        env_var: "VT_API_KEY",
    };
    let api_key = match sources.resolve(base_dir, env)? {
        Some(k) => k,
        None if !enabled => Secret::new(String::new()),
        None => {
            return Err(invalid(
                "feed.api_key",
                "no VirusTotal API key: set feed.api_key, feed.api_key_file or the VT_API_KEY environment variable",
            ));
        }
    };

    let start = raw
        .start
        .map(|s| Minute::parse(&s).map_err(|e| invalid("feed.start", e.to_string())))
        .transpose()?;

    let delivery = match raw.delivery.as_deref().unwrap_or("exactly-once") {
        "exactly-once" => Delivery::ExactlyOnce,
        "at-least-once" => Delivery::AtLeastOnce,
        other => {
            return Err(invalid(
                "feed.delivery",
                format!("`{other}` is not one of \"exactly-once\", \"at-least-once\""),
            ));
        }
    };
    let missing_policy = match raw.missing_policy.as_deref().unwrap_or("recheck-then-gap") {
        "recheck-then-gap" => MissingPolicy::RecheckThenGap,
        "gap" => MissingPolicy::Gap,
        "halt" => MissingPolicy::Halt,
        other => {
            return Err(invalid(
                "feed.missing_policy",
                format!("`{other}` is not one of \"recheck-then-gap\", \"gap\", \"halt\""),
            ));
        }
    };

    let transactional_id = raw
        .transactional_id
        .unwrap_or_else(|| "sandbox-bridge-feed".to_string());
    if transactional_id.trim().is_empty() {
        return Err(invalid("feed.transactional_id", "is empty"));
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let retry_initial_backoff = check_duration(
        "feed.retry_initial_backoff",
        raw.retry_initial_backoff.unwrap_or(Duration::from_secs(1)),
        Duration::from_millis(1),
        Duration::from_secs(600),
    )?;
    let retry_max_backoff = check_duration(
        "feed.retry_max_backoff",
        raw.retry_max_backoff.unwrap_or(Duration::from_secs(300)),
        retry_initial_backoff,
        Duration::from_secs(3600),
    )?;

    Ok(FeedConfig {
        enabled,
        base_url,
        api_key,
        topic: check_topic(
            "feed.topic",
            raw.topic.unwrap_or_else(|| "vt.file-behaviours".into()),
        )?,
        dlq_topic: check_topic(
            "feed.dlq_topic",
            raw.dlq_topic
                .unwrap_or_else(|| "vt.file-behaviours.dlq".into()),
        )?,
        state_topic: check_topic(
            "feed.state_topic",
            raw.state_topic
                .unwrap_or_else(|| "sandbox-bridge.feed-state".into()),
        )?,
        transactional_id,
        start,
        max_message_bytes: check_range(
            "feed.max_message_bytes",
            raw.max_message_bytes.unwrap_or(1 << 20),
            4096,
            100 << 20,
        )?,
        missing_threshold: check_range(
            "feed.missing_threshold",
            raw.missing_threshold.unwrap_or(2),
            1,
            10_080,
        )?,
        delivery,
        missing_policy,
        missing_recheck_for: check_duration(
            "feed.missing_recheck_for",
            raw.missing_recheck_for
                .unwrap_or(Duration::from_secs(15 * 60)),
            Duration::ZERO,
            Duration::from_secs(7 * 24 * 3600),
        )?,
        missing_recheck_backoff: check_duration(
            "feed.missing_recheck_backoff",
            raw.missing_recheck_backoff
                .unwrap_or(Duration::from_secs(30)),
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?,
        gap_recheck_interval: check_duration(
            "feed.gap_recheck_interval",
            raw.gap_recheck_interval
                .unwrap_or(Duration::from_secs(30 * 60)),
            Duration::from_millis(1),
            Duration::from_secs(24 * 3600),
        )?,
        not_available_backoff: check_duration(
            "feed.not_available_backoff",
            raw.not_available_backoff.unwrap_or(Duration::from_secs(20)),
            Duration::from_millis(1),
            Duration::from_secs(600),
        )?,
        partitions: check_range("feed.partitions", raw.partitions.unwrap_or(6), 1, 10_000)?,
        prefetch: check_range("feed.prefetch", raw.prefetch.unwrap_or(4), 1, 64)?,
        decode_threads: check_range(
            "feed.decode_threads",
            raw.decode_threads.unwrap_or(threads),
            1,
            256,
        )?,
        spool_memory_bytes: check_range(
            "feed.spool_memory_bytes",
            raw.spool_memory_bytes.unwrap_or(8 << 20),
            0,
            1 << 30,
        )?,
        spool_dir: raw.spool_dir.map(|p| base_dir.join(p)),
        request_timeout: check_duration(
            "feed.request_timeout",
            raw.request_timeout.unwrap_or(Duration::from_secs(30)),
            Duration::from_millis(10),
            Duration::from_secs(600),
        )?,
        download_timeout: check_duration(
            "feed.download_timeout",
            raw.download_timeout.unwrap_or(Duration::from_secs(600)),
            Duration::from_millis(10),
            Duration::from_secs(6 * 3600),
        )?,
        retry_initial_backoff,
        retry_max_backoff,
        transaction_timeout: check_duration(
            "feed.transaction_timeout",
            raw.transaction_timeout.unwrap_or(Duration::from_secs(300)),
            Duration::from_secs(1),
            Duration::from_secs(900),
        )?,
        window_edge_margin_minutes: check_range(
            "feed.window_edge_margin_minutes",
            raw.window_edge_margin_minutes.unwrap_or(1),
            0,
            24 * 60,
        )?,
    })
}

fn check_metrics(raw: raw::RawMetrics) -> Result<MetricsConfig, ConfigError> {
    let listen = raw.listen.unwrap_or_else(|| "0.0.0.0:9464".to_string());
    if listen.is_empty() || listen == "off" {
        return Ok(MetricsConfig { listen: None });
    }
    let addr: SocketAddr = listen.parse().map_err(|_| {
        invalid(
            "metrics.listen",
            format!("`{listen}` is not an address such as \"0.0.0.0:9464\" (or \"off\")"),
        )
    })?;
    match addr.port() {
        9090 => Err(invalid(
            "metrics.listen",
            "port 9090 belongs to Prometheus; choose another",
        )),
        3000 => Err(invalid(
            "metrics.listen",
            "port 3000 belongs to Grafana; choose another",
        )),
        _ => Ok(MetricsConfig { listen: Some(addr) }),
    }
}

fn check_log(raw: raw::RawLog) -> Result<LogConfig, ConfigError> {
    let format = match raw.format.as_deref().unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            return Err(invalid(
                "log.format",
                format!("`{other}` is not one of \"text\", \"json\""),
            ));
        }
    };
    let level = raw.level.unwrap_or_else(|| "info".to_string());
    tracing_subscriber::EnvFilter::try_new(&level)
        .map_err(|e| invalid("log.level", format!("`{level}` is not a log filter: {e}")))?;
    Ok(LogConfig { format, level })
}

#[cfg(test)]
mod tests;

/// A TOML error as line, column, the key on that line, and the parser's
/// reason with any quoted value masked: the parser's own message quotes the
/// offending line or value, which may be a secret (`api_key = "...`).
fn syntax_message(text: &str, e: &toml::de::Error) -> String {
    let mut out = String::new();
    if let Some(span) = e.span() {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        out.push_str(&format!("line {line}, column {column}"));
        let source_line = text.lines().nth(line - 1).unwrap_or("");
        if let Some((key, _)) = source_line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.len() <= 100 && !key.contains(['"', '\'']) {
                out.push_str(&format!(" (key `{key}`)"));
            }
        }
        out.push_str(": ");
    }
    let message = e.message().trim_end();
    // These quote key names only, which help; everything else may quote a value.
    if ["unknown field", "missing field", "duplicate key"]
        .iter()
        .any(|p| message.starts_with(p))
    {
        out.push_str(message);
    } else {
        out.push_str(&mask_quoted(message));
    }
    out
}

/// Replaces whatever stands between quotes or backticks with `...`.
fn mask_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut open: Option<char> = None;
    for c in message.chars() {
        match open {
            Some(q) if c == q => {
                out.push_str("...");
                out.push(c);
                open = None;
            }
            Some(_) => {}
            None if matches!(c, '"' | '`' | '\'') => {
                out.push(c);
                open = Some(c);
            }
            None => out.push(c),
        }
    }
    out
}
