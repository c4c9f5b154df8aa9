//! Outcomes by `request_id`, so a repeated request is answered without a
//! second API call.
//!
//! Every API outcome (accepted or rejected) is written to a compacted topic,
//! keyed by `request_id`, in the same transaction as its result; so the store
//! survives restarts exactly as the results do. Each instance tails the topic
//! (`read_committed`) into memory, and after a rebalance catches up with it
//! before taking requests from newly assigned partitions, so a request
//! repeated on a partition that moved between instances is still recognised.
//! Entries older than `dedup_window` are ignored and dropped (the topic also
//! deletes them by retention). A request that failed after retries is not
//! stored: sending it again tries again.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One stored outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredOutcome {
    /// `<topic>-<partition>-<offset>` of the request that was called.
    pub origin: String,
    /// Unix milliseconds when it completed.
    pub completed_at_ms: i64,
    /// The result message as published.
    pub result: Value,
}

impl StoredOutcome {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<StoredOutcome> {
        serde_json::from_slice(bytes).ok()
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The outcomes known to this instance.
#[derive(Debug)]
pub struct OutcomeStore {
    window: Duration,
    entries: HashMap<String, StoredOutcome>,
    /// Outcome time (ms) of the last pruning.
    pruned_at_ms: i64,
}

/// Entries older than the window are dropped when one is inserted at least
/// this long (in outcome time) after the last drop: memory holds at most the
/// outcomes of the window plus this much, however long the consumer runs.
const PRUNE_EVERY_MS: i64 = 60_000;

impl OutcomeStore {
    pub fn new(window: Duration) -> OutcomeStore {
        OutcomeStore {
            window,
            entries: HashMap::new(),
            pruned_at_ms: i64::MIN,
        }
    }

    /// The outcome stored for `request_id`, if it is inside the window at `now`.
    pub fn get(&self, request_id: &str, now: SystemTime) -> Option<&StoredOutcome> {
        let oldest = unix_ms(now) - self.window.as_millis() as i64;
        self.entries
            .get(request_id)
            .filter(|o| o.completed_at_ms >= oldest)
    }

    pub fn insert(&mut self, request_id: String, outcome: StoredOutcome) {
        let t = outcome.completed_at_ms;
        self.entries.insert(request_id, outcome);
        if t.saturating_sub(self.pruned_at_ms) >= PRUNE_EVERY_MS {
            self.pruned_at_ms = t;
            self.prune_before(t - self.window.as_millis() as i64);
        }
    }

    pub fn remove(&mut self, request_id: &str) {
        self.entries.remove(request_id);
    }

    /// Drops entries completed before `oldest_ms`.
    fn prune_before(&mut self, oldest_ms: i64) {
        self.entries.retain(|_, o| o.completed_at_ms >= oldest_ms);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Follows the outcomes topic into an [`OutcomeStore`].
pub struct OutcomeTail {
    consumer: BaseConsumer,
    topic: String,
    partitions: Vec<i32>,
    pub store: OutcomeStore,
}

impl OutcomeTail {
    /// Assigns every partition of `topic` from the beginning.
    pub fn open(
        mut config: ClientConfig,
        topic: &str,
        window: Duration,
        timeout: Duration,
    ) -> Result<OutcomeTail, KafkaError> {
        config
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set(
                "group.id",
                format!("sandbox-bridge-outcomes-{}", std::process::id()),
            );
        let consumer: BaseConsumer = config.create()?;
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        Ok(OutcomeTail {
            consumer,
            topic: topic.to_string(),
            partitions,
            store: OutcomeStore::new(window),
        })
    }

    /// Applies whatever has arrived, without waiting.
    pub fn poll(&mut self) -> Result<usize, KafkaError> {
        let mut n = 0;
        while let Some(m) = self.consumer.poll(Duration::ZERO) {
            apply(&mut self.store, &m?);
            n += 1;
        }
        Ok(n)
    }

    /// Reads until every partition has reached the end it had when called.
    pub fn catch_up(&mut self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        let mut ends = HashMap::new();
        for p in &self.partitions {
            let (_, high) = self.consumer.fetch_watermarks(&self.topic, *p, timeout)?;
            ends.insert(*p, high);
        }
        loop {
            let position = self.consumer.position()?;
            ends.retain(|p, end| {
                let at = match position.find_partition(&self.topic, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => 0,
                };
                at < *end
            });
            if ends.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(KafkaError::Canceled);
            }
            if let Some(m) = self.consumer.poll(Duration::from_millis(100)) {
                apply(&mut self.store, &m?);
            }
        }
    }
}

/// A value replaces the stored outcome; a tombstone (or garbage) removes it.
fn apply(store: &mut OutcomeStore, m: &rdkafka::message::BorrowedMessage<'_>) {
    let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
        return;
    };
    match m.payload().and_then(StoredOutcome::decode) {
        Some(o) => store.insert(key.to_string(), o),
        None => store.remove(key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(ms: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
    }

    #[test]
    fn outcomes_expire_with_the_window() {
        let mut s = OutcomeStore::new(Duration::from_secs(60));
        let o = StoredOutcome {
            origin: "req-0-5".into(),
            completed_at_ms: 1_000_000,
            result: json!({"status": "accepted"}),
        };
        s.insert("r1".into(), o.clone());
        assert_eq!(s.get("r1", at(1_000_000 + 59_000)), Some(&o));
        assert_eq!(s.get("r1", at(1_000_000 + 61_000)), None);
        assert_eq!(s.get("r2", at(1_000_000)), None);
        s.prune_before(unix_ms(at(1_000_000 + 61_000)) - 60_000);
        assert!(s.is_empty());
    }

    #[test]
    fn memory_stays_bounded_by_the_window() {
        // One outcome per second for three hours, a ten-minute window.
        let mut s = OutcomeStore::new(Duration::from_secs(600));
        let mut most = 0;
        for i in 0..3 * 3600i64 {
            let o = StoredOutcome {
                origin: format!("req-0-{i}"),
                completed_at_ms: 1_000_000 + i * 1000,
                result: json!({"status": "accepted"}),
            };
            s.insert(format!("r{i}"), o);
            most = most.max(s.len());
        }
        assert!(most <= 600 + 60 + 1, "held {most} outcomes");
        let now = at(1_000_000 + (3 * 3600 - 1) * 1000);
        assert!(s.get("r10799", now).is_some());
        assert!(s.get("r10300", now).is_some());
        assert!(s.get("r100", now).is_none());
    }

    #[test]
    fn stored_outcomes_round_trip() {
        let o = StoredOutcome {
            origin: "req-1-7".into(),
            completed_at_ms: 5,
            result: json!({"status": "rejected", "http_status": 400}),
        };
        assert_eq!(StoredOutcome::decode(&o.encode()), Some(o));
        assert_eq!(StoredOutcome::decode(b"garbage"), None);
    }
}
