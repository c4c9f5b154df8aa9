//! Shared integration-test harness: a real Kafka broker (see `kafka`), the
//! feed simulator on port 0, and the worker run in-process or as a process.
#![allow(dead_code)]

pub mod kafka;
pub mod process;
pub mod prom;
pub mod rescan;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sandbox_bridge::clock::SharedClock;
use sandbox_bridge::config::Config;
use sandbox_bridge::feed::state::FeedState;
use sandbox_bridge::feed::state_store::{StateLoadError, load_state};
use sandbox_bridge::feed::{FeedError, FeedWorker};
use sandbox_bridge::metrics::Metrics;
use sandbox_bridge::minute::{FeedWindow, Minute};
use sandbox_bridge::sim::vt::{BatchSettings, LineKind, batch_lines};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)]
pub use kafka::{Record, bootstrap, read_all, unique};

pub const API_KEY: &str = "test-api-key-0123456789";

/// Topic names and transactional id of one test.
#[derive(Debug, Clone)]
pub struct Names {
    pub topic: String,
    pub dlq: String,
    pub state: String,
    pub txid: String,
}

impl Names {
    pub fn new(test: &str) -> Names {
        let base = unique(test);
        Names {
            topic: format!("{base}.feed"),
            dlq: format!("{base}.dlq"),
            state: format!("{base}.state"),
            txid: format!("{base}.tx"),
        }
    }
}

/// A worker configuration for tests: fast retries, `extra` TOML appended to `[feed]`.
pub fn config_text(
    bootstrap: &str,
    base_url: &str,
    names: &Names,
    start: Minute,
    extra_feed: &str,
) -> String {
    format!(
        r#"
[kafka]
bootstrap_servers = "{bootstrap}"
[kafka.properties]
"linger.ms" = 5
[feed]
base_url = "{base_url}"
api_key = "{API_KEY}"
topic = "{topic}"
dlq_topic = "{dlq}"
state_topic = "{state}"
transactional_id = "{txid}"
start = "{start}"
partitions = 3
retry_initial_backoff = "20ms"
retry_max_backoff = "300ms"
missing_recheck_backoff = "50ms"
missing_recheck_for = "300ms"
not_available_backoff = "50ms"
{extra_feed}
[metrics]
listen = "off"
"#,
        topic = names.topic,
        dlq = names.dlq,
        state = names.state,
        txid = names.txid,
    )
}

pub fn parse_config(text: &str) -> Config {
    let env = std::collections::BTreeMap::<String, String>::new();
    Config::parse(text, Path::new("."), &env).expect("test configuration is valid")
}

/// A worker running in this process.
pub struct RunningWorker {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), FeedError>>,
    pub metrics: Metrics,
    pub readiness: sandbox_bridge::http::Readiness,
}

pub fn spawn_worker(config: Config, clock: SharedClock) -> RunningWorker {
    init_logs();
    let metrics = Metrics::new();
    let readiness = sandbox_bridge::http::Readiness::default();
    let worker = FeedWorker::new(Arc::new(config), clock, metrics.feed.clone())
        .with_readiness(readiness.clone());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let handle = tokio::spawn(async move { worker.run(token).await });
    RunningWorker {
        shutdown,
        handle,
        metrics,
        readiness,
    }
}

impl RunningWorker {
    /// The first minute not yet committed, from the worker's gauge.
    pub fn committed_next(&self) -> Minute {
        Minute::from_unix_minutes(self.metrics.feed.committed_minute_timestamp.get() / 60).next()
    }

    /// Waits until every minute up to `last` is committed.
    pub async fn wait_committed_through(&self, last: Minute) {
        wait_until(Duration::from_secs(120), || {
            assert!(!self.handle.is_finished(), "worker stopped early");
            self.committed_next() > last
        })
        .await;
    }

    pub async fn stop(self) -> Result<(), FeedError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("worker did not stop within 60 s")
            .expect("worker task panicked")
    }
}

/// Polls `cond` until it holds; panics after `limit` (a hang guard, not a timing assertion).
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The worker's saved state, read like the worker reads it.
pub fn saved_state(bootstrap: &str, names: &Names) -> Option<FeedState> {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    match load_state(c, &names.state, &names.txid, Duration::from_secs(30)) {
        Err(StateLoadError::NoTopic(_)) => None,
        other => other.expect("state topic readable"),
    }
}

/// What the feed topic and DLQ must hold after publishing `minutes`.
#[derive(Debug, Default)]
pub struct Expected {
    /// (key, value, vt.id, vt.sandbox_name, vt.batch, vt.line)
    pub records: Vec<(String, Vec<u8>, String, String, String, String)>,
    /// (dlq.reason, vt.batch, vt.line, full line)
    pub dead: Vec<(String, String, String, Vec<u8>)>,
}

pub fn expected(batches: &BatchSettings, minutes: impl IntoIterator<Item = Minute>) -> Expected {
    let mut e = Expected::default();
    for m in minutes {
        for line in batch_lines(batches, m) {
            let (batch, number) = (m.to_string(), line.number.to_string());
            let reason = match &line.kind {
                LineKind::Valid {
                    id,
                    sha256,
                    sandbox,
                } => {
                    e.records.push((
                        sha256.clone(),
                        line.bytes.clone(),
                        id.clone(),
                        sandbox.clone(),
                        batch,
                        number,
                    ));
                    continue;
                }
                LineKind::Empty => continue,
                LineKind::NotUtf8 => "not_utf8",
                LineKind::NotJsonObject => "not_json_object",
                LineKind::BadId => "bad_id",
                LineKind::TooLarge => "too_large",
            };
            e.dead
                .push((reason.to_string(), batch, number, line.bytes.clone()));
        }
    }
    e.records.sort();
    e.dead.sort();
    e
}

/// The feed topic's records in the same shape as [`Expected::records`].
pub fn actual_records(
    records: &[Record],
) -> Vec<(String, Vec<u8>, String, String, String, String)> {
    let mut v: Vec<_> = records
        .iter()
        .map(|r| {
            assert_eq!(r.header("content-type"), Some("application/json"));
            (
                r.key_str().expect("key").to_string(),
                r.value.clone(),
                r.header("vt.id").expect("vt.id").to_string(),
                r.header("vt.sandbox_name")
                    .expect("vt.sandbox_name")
                    .to_string(),
                r.header("vt.batch").expect("vt.batch").to_string(),
                r.header("vt.line").expect("vt.line").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Minutes `first..=last`.
pub fn minutes(first: Minute, last: Minute) -> impl Iterator<Item = Minute> {
    (0..=first.minutes_until(last)).map(move |i| first.plus(i))
}

/// A fixed instant well inside a minute, so window arithmetic is predictable.
pub fn test_now() -> SystemTime {
    let now = SystemTime::now();
    let m = Minute::containing(now);
    m.start() + Duration::from_secs(30)
}

pub fn newest_at(now: SystemTime) -> Minute {
    FeedWindow::at(now, 0).newest
}

/// Test logs: `RUST_LOG` (default warn), captured per test.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
