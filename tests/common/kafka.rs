//! Kafka helpers for integration tests: the broker, unique topics, and
//! read_committed reads of everything a topic holds.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A record as a read_committed consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Option<i64>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared test broker: `SANDBOX_BRIDGE_TEST_BOOTSTRAP`, or one started on demand.
pub fn bootstrap() -> String {
    static ADDR: OnceLock<String> = OnceLock::new();
    ADDR.get_or_init(|| {
        if let Ok(addr) = std::env::var("SANDBOX_BRIDGE_TEST_BOOTSTRAP")
            && !addr.is_empty()
        {
            return addr;
        }
        Broker::start("cargo-test-shared", 39092).bootstrap
    })
    .clone()
}

/// A broker started through scripts/kafka.sh (for tests that stop or restart one).
#[derive(Clone)]
pub struct Broker {
    pub name: String,
    pub port: u16,
    pub bootstrap: String,
}

impl Broker {
    pub fn start(name: &str, port: u16) -> Broker {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/kafka.sh"))
            .args(["start", "--name", name, "--port", &port.to_string()])
            .output()
            .expect("run scripts/kafka.sh");
        assert!(
            out.status.success(),
            "starting broker {name} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Broker {
            name: name.to_string(),
            port,
            bootstrap: format!("127.0.0.1:{port}"),
        }
    }

    fn script(&self, verb: &str) {
        let status = Command::new("bash")
            .arg(repo_root().join("scripts/kafka.sh"))
            .args([verb, "--name", &self.name])
            .status()
            .expect("run scripts/kafka.sh");
        assert!(status.success(), "kafka.sh {verb} {} failed", self.name);
    }

    pub fn stop(&self) {
        self.script("stop");
    }

    pub fn restart(&self) {
        self.stop();
        Broker::start(&self.name, self.port);
    }

    pub fn clean(&self) {
        self.script("clean");
    }
}

/// Removes a test's own broker when the test ends, passed or failed.
pub struct BrokerGuard(pub Broker);

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_root().join("scripts/kafka.sh"))
            .args(["clean", "--name", &self.0.name])
            .output();
    }
}

/// A topic name no other test uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

/// Everything in `topic` visible to read_committed, up to the end of each partition.
pub fn read_all(bootstrap: &str, topic: &str) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("test-reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let timeout = Duration::from_secs(30);
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .expect("metadata");
    let partitions: Vec<i32> = md.topics()[0].partitions().iter().map(|p| p.id()).collect();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        // Leadership may still be settling on a young topic: ask again.
        let mut attempts = 0;
        let (low, high) = loop {
            match consumer.fetch_watermarks(topic, p, timeout) {
                Ok(w) => break w,
                Err(e) if attempts < 40 => {
                    attempts += 1;
                    eprintln!("watermarks of {topic}/{p}: {e}; asking again");
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(e) => panic!("watermarks of {topic}/{p}: {e}"),
            }
        };
        if high > low {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ends.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reading {topic} did not reach its end"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("consume");
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
                timestamp: m.timestamp().to_millis(),
            });
        }
        let pos = consumer.position().unwrap();
        ends.retain(|p, end| {
            let at = match pos.find_partition(topic, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => 0,
            };
            at < *end
        });
    }
    out
}

/// Creates `topic` (idempotent) with the broker's default replication.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topics");
    for r in results {
        if let Err((name, code)) = r {
            assert_eq!(
                code,
                rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "creating {name}"
            );
        }
    }
}
