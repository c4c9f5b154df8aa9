//! Reading the saved position back from the state topic.
//!
//! Called after `init_transactions` (which fences an older instance and
//! aborts its open transaction), so everything committed is final. The whole
//! topic is read from the beginning to its end with `read_committed`, and the
//! newest value under this worker's key wins. A record that cannot be read is
//! an error, never silently replaced by a fresh start.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::state::{FeedState, StateDecodeError};

#[derive(Debug, thiserror::Error)]
pub enum StateLoadError {
    #[error("cannot read the state topic {topic}: {source}")]
    Kafka { topic: String, source: KafkaError },
    #[error("state topic {0} does not exist")]
    NoTopic(String),
    #[error(
        "state topic {topic} did not reach its end within {seconds} s (is a transaction stuck open?)"
    )]
    Timeout { topic: String, seconds: u64 },
    #[error(
        "the saved position in {topic} (partition {partition}, offset {offset}) is unreadable: {source}"
    )]
    Corrupt {
        topic: String,
        partition: i32,
        offset: i64,
        source: StateDecodeError,
    },
}

/// Reads `topic` to its end and returns the newest state saved under `key`.
pub fn load_state(
    mut config: ClientConfig,
    topic: &str,
    key: &str,
    timeout: Duration,
) -> Result<Option<FeedState>, StateLoadError> {
    let kafka = |source| StateLoadError::Kafka {
        topic: topic.to_string(),
        source,
    };
    config
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("group.id", format!("sandbox-bridge-state-reader-{key}"));
    let consumer: BaseConsumer = config.create().map_err(kafka)?;
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(kafka)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(StateLoadError::NoTopic(topic.to_string()));
    }

    // The end of each partition: with read_committed a consumer's position
    // passes aborted records and transaction markers, so it reaches the high
    // watermark once every transaction below it is resolved.
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(kafka)?;
        if high > low {
            ends.insert(*p, high);
            assignment
                .add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(kafka)?;
        }
    }
    if ends.is_empty() {
        return Ok(None);
    }
    consumer.assign(&assignment).map_err(kafka)?;

    let deadline = Instant::now() + timeout;
    let mut newest: Option<(i32, i64, Option<Vec<u8>>)> = None;
    let mut newest_offsets: HashMap<i32, i64> = HashMap::new();
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err(StateLoadError::Timeout {
                topic: topic.to_string(),
                seconds: timeout.as_secs(),
            });
        }
        if let Some(result) = consumer.poll(Duration::from_millis(200)) {
            let msg = result.map_err(kafka)?;
            if msg.key() == Some(key.as_bytes()) {
                // One key lives in one partition, so offsets order its values.
                let newer = newest_offsets
                    .get(&msg.partition())
                    .is_none_or(|o| msg.offset() > *o);
                if newer {
                    newest_offsets.insert(msg.partition(), msg.offset());
                    newest = Some((
                        msg.partition(),
                        msg.offset(),
                        msg.payload().map(<[u8]>::to_vec),
                    ));
                }
            }
        }
        let position = consumer.position().map_err(kafka)?;
        ends.retain(|p, end| {
            let at = position
                .find_partition(topic, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(0);
            at < *end
        });
    }
    match newest {
        None | Some((_, _, None)) => Ok(None),
        Some((partition, offset, Some(bytes))) => {
            FeedState::decode(&bytes)
                .map(Some)
                .map_err(|source| StateLoadError::Corrupt {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    source,
                })
        }
    }
}
