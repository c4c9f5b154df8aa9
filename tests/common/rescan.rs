//! Rescan harness: the KTIP simulator on port 0, topic names of one test, the
//! consumer in-process, and helpers to publish requests and read results.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sandbox_bridge::config::Config;
use sandbox_bridge::http::Readiness;
use sandbox_bridge::metrics::Metrics;
use sandbox_bridge::rescan::worker::{RescanError, RescanWorker};
use sandbox_bridge::sim::ktip::{KtipSimHandle, KtipSimSettings, KtipSimulator};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::kafka::{Record, read_all, unique};

pub const KTIP_USER: &str = "demo";
pub const KTIP_PASSWORD: &str = "demo-password";

pub async fn start_ktip(settings: KtipSimSettings) -> KtipSimHandle {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    KtipSimulator::start(settings, addr)
        .await
        .expect("KTIP simulator starts")
}

/// Topic names, group and transactional-id prefix of one test.
#[derive(Debug, Clone)]
pub struct RescanNames {
    pub requests: String,
    pub results: String,
    pub dlq: String,
    pub outcomes: String,
    pub group: String,
    pub tx_prefix: String,
}

impl RescanNames {
    pub fn new(test: &str) -> RescanNames {
        let base = unique(test);
        RescanNames {
            requests: format!("{base}.requests"),
            results: format!("{base}.results"),
            dlq: format!("{base}.dlq"),
            outcomes: format!("{base}.outcomes"),
            group: format!("{base}.group"),
            tx_prefix: format!("{base}.tx"),
        }
    }
}

/// A consumer configuration for tests: fast retries and commits; `extra` is
/// appended to `[rescan]`, `kafka_extra` to `[kafka.properties]`.
pub fn rescan_config_text(
    bootstrap: &str,
    sim: &KtipSimHandle,
    names: &RescanNames,
    instance: &str,
    extra: &str,
    kafka_extra: &str,
) -> String {
    format!(
        r#"
[kafka]
bootstrap_servers = "{bootstrap}"
[kafka.properties]
"linger.ms" = 5
{kafka_extra}
[rescan]
base_url = "{base_url}"
username = "{KTIP_USER}"
password = "{KTIP_PASSWORD}"
client_cert = "{client_cert}"
ca_cert = "{ca_cert}"
requests_topic = "{requests}"
results_topic = "{results}"
dlq_topic = "{dlq}"
dedup_topic = "{outcomes}"
group_id = "{group}"
transactional_id_prefix = "{tx}"
instance_id = "{instance}"
partitions = 3
max_attempts = 4
retry_initial_backoff = "20ms"
retry_max_backoff = "200ms"
retry_deadline = "10s"
probe_interval = "200ms"
commit_interval = "100ms"
max_requests_per_minute = 60000
{extra}
[metrics]
listen = "off"
"#,
        base_url = sim.base_url(),
        client_cert = sim.client_cert_path().display(),
        ca_cert = sim.ca_cert_path().display(),
        requests = names.requests,
        results = names.results,
        dlq = names.dlq,
        outcomes = names.outcomes,
        group = names.group,
        tx = names.tx_prefix,
    )
}

pub fn parse_rescan_config(text: &str) -> Config {
    let env = BTreeMap::<String, String>::new();
    Config::parse(text, std::path::Path::new("."), &env).expect("test configuration is valid")
}

/// A consumer running in this process.
pub struct RunningRescan {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), RescanError>>,
    pub metrics: Metrics,
    pub readiness: Readiness,
}

pub fn spawn_rescan(config: Config) -> RunningRescan {
    super::init_logs();
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let worker = RescanWorker::new(Arc::new(config), metrics.rescan.clone())
        .with_readiness(readiness.clone());
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let handle = tokio::spawn(async move { worker.run(token).await });
    RunningRescan {
        shutdown,
        handle,
        metrics,
        readiness,
    }
}

impl RunningRescan {
    /// Results counted by the consumer (committed), all statuses.
    pub fn committed_results(&self) -> u64 {
        let mut n = 0;
        for status in ["accepted", "rejected", "invalid", "failed"] {
            for kind in sandbox_bridge::metrics::RESCAN_ERROR_KINDS {
                n += self
                    .metrics
                    .rescan
                    .requests
                    .get_metric_with_label_values(&[status, kind])
                    .map_or(0, |c| c.get());
            }
        }
        n
    }

    pub async fn stop(self) -> Result<(), RescanError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("rescan consumer did not stop within 60 s")
            .expect("rescan task panicked")
    }
}

/// A request message to publish.
#[derive(Debug, Clone)]
pub struct Req {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Req {
    pub fn json(key: &str, value: Value) -> Req {
        Req {
            key: Some(key.as_bytes().to_vec()),
            value: serde_json::to_vec(&value).unwrap(),
            headers: Vec::new(),
        }
    }

    pub fn raw(key: &str, value: &[u8]) -> Req {
        Req {
            key: Some(key.as_bytes().to_vec()),
            value: value.to_vec(),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, k: &str, v: &[u8]) -> Req {
        self.headers.push((k.to_string(), v.to_vec()));
        self
    }
}

/// Publishes requests (acks=all, in order) and waits for every
/// acknowledgement; creates the topic (3 partitions) if needed.
pub async fn publish(bootstrap: &str, topic: &str, reqs: &[Req]) {
    super::kafka::create_topic(bootstrap, topic, 3).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::new();
    for r in reqs {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut rec = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&r.value)
            .headers(headers);
        if let Some(k) = &r.key {
            rec = rec.key(k);
        }
        pending.push(producer.send(rec, Duration::from_secs(30)));
    }
    for p in pending {
        p.await.expect("request published");
    }
}

/// A result record, parsed.
#[derive(Debug, Clone)]
pub struct ResultMsg {
    pub record: Record,
    pub json: Value,
}

impl ResultMsg {
    pub fn status(&self) -> &str {
        self.json["status"].as_str().unwrap_or("")
    }
    pub fn kind(&self) -> Option<&str> {
        self.json["error"]["kind"].as_str()
    }
    pub fn task_id(&self) -> &str {
        self.json["task_id"].as_str().unwrap_or("")
    }
    pub fn request_id(&self) -> &str {
        self.json["request_id"].as_str().unwrap_or("")
    }
}

pub fn read_results(bootstrap: &str, topic: &str) -> Vec<ResultMsg> {
    read_all(bootstrap, topic)
        .into_iter()
        .map(|record| {
            let json = serde_json::from_slice(&record.value).unwrap_or_else(|e| {
                panic!(
                    "result is not JSON ({e}): {}",
                    String::from_utf8_lossy(&record.value)
                )
            });
            ResultMsg { record, json }
        })
        .collect()
}

/// Waits until `topic` holds at least `n` committed results; returns them.
pub async fn wait_results(
    bootstrap: &str,
    topic: &str,
    n: usize,
    limit: Duration,
) -> Vec<ResultMsg> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let got = read_results(bootstrap, topic);
        if got.len() >= n {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{topic}: {} of {n} results after {limit:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A valid request for `task_id`.
pub fn valid(task_id: &str) -> Value {
    serde_json::json!({
        "task_id": task_id,
        "url": format!("https://samples.example.com/{task_id}.exe"),
    })
}
