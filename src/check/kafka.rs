//! The Kafka checks: reachability, the configured topics and their cleanup
//! policy, and whether transactions are allowed, with a probe transactional
//! id of the check's own (the live one would fence a running worker).

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer};

use super::{Level, Report, plural};
use crate::config::{Config, Delivery, FeedConfig, KafkaConfig};
use crate::kafka::{client_config, existing_topics};

/// What a pipeline needs of a topic's cleanup policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compaction {
    /// Records share keys: compaction would delete them (the worker refuses to start).
    Forbidden,
    /// Only the newest value per key matters; without compaction it grows.
    Expected,
    Any,
}

#[derive(Debug, Clone)]
struct TopicRole {
    key: &'static str,
    name: String,
    compaction: Compaction,
}

/// The topics of the enabled pipelines, with the cleanup policy each needs
/// (as the workers' own topic specs create and check them).
fn topic_roles(config: &Config) -> Vec<TopicRole> {
    let role = |key, name: &String, compaction| TopicRole {
        key,
        name: name.clone(),
        compaction,
    };
    let mut roles = Vec::new();
    if config.feed.enabled {
        let f = &config.feed;
        roles.push(role("feed.topic", &f.topic, Compaction::Forbidden));
        roles.push(role("feed.dlq_topic", &f.dlq_topic, Compaction::Forbidden));
        roles.push(role(
            "feed.state_topic",
            &f.state_topic,
            Compaction::Expected,
        ));
    }
    if config.rescan.enabled {
        let c = &config.rescan;
        roles.push(role(
            "rescan.requests_topic",
            &c.requests_topic,
            Compaction::Any,
        ));
        roles.push(role(
            "rescan.results_topic",
            &c.results_topic,
            Compaction::Any,
        ));
        roles.push(role("rescan.dlq_topic", &c.dlq_topic, Compaction::Any));
        roles.push(role(
            "rescan.dedup_topic",
            &c.dedup_topic,
            Compaction::Expected,
        ));
    }
    roles
}

/// Judges one topic: `partitions` when it exists, `policy` as described (or why not).
fn judge_topic(
    role: &TopicRole,
    partitions: Option<usize>,
    policy: Option<&Result<String, String>>,
    create_topics: bool,
) -> (Level, String) {
    let Some(partitions) = partitions else {
        return if create_topics {
            (Level::Ok, "missing; will be created at start".into())
        } else {
            (
                Level::Fail,
                "does not exist and kafka.create_topics is false: create it or enable creation"
                    .into(),
            )
        };
    };
    let exists = format!("exists ({partitions} {})", plural(partitions, "partition"));
    let policy = match policy {
        None => return (Level::Ok, exists),
        Some(Err(why)) => {
            return (
                Level::Fail,
                format!("{exists}, but its configuration cannot be read: {why}"),
            );
        }
        Some(Ok(p)) => p,
    };
    let compacted = policy.split(',').any(|p| p.trim() == "compact");
    match role.compaction {
        Compaction::Forbidden if compacted => (
            Level::Fail,
            format!(
                "{exists}, cleanup.policy={policy}: its records share keys, so compaction would delete them; the worker refuses to start (use cleanup.policy=delete)"
            ),
        ),
        Compaction::Expected if !compacted => (
            Level::Warn,
            format!(
                "{exists}, cleanup.policy={policy}: expected compact; it grows until retention deletes records that may still be needed"
            ),
        ),
        _ => (Level::Ok, format!("{exists}, cleanup.policy={policy}")),
    }
}

pub(super) async fn check_kafka<W: Write>(config: &Config, r: &mut Report<W>) {
    let kafka = &config.kafka;
    let timeout = kafka.operation_timeout;
    let servers = &kafka.bootstrap_servers;
    let existing = match existing_topics(client_config(kafka, &[]), timeout).await {
        Ok(topics) => {
            r.add(Level::Ok, "kafka", format!("reachable at {servers}"));
            topics
        }
        Err(e) => {
            r.add(
                Level::Fail,
                "kafka",
                format!(
                    "cannot reach Kafka at {servers} within {} (kafka.operation_timeout): {e}; topics and transactions not checked",
                    humantime::format_duration(timeout)
                ),
            );
            return;
        }
    };

    let roles = topic_roles(config);
    let to_describe: Vec<&str> = roles
        .iter()
        .filter(|t| t.compaction != Compaction::Any && existing.contains_key(&t.name))
        .map(|t| t.name.as_str())
        .collect();
    let policies = cleanup_policies(kafka, &to_describe).await;
    for role in &roles {
        let (level, detail) = judge_topic(
            role,
            existing.get(&role.name).copied(),
            policies.get(&role.name),
            kafka.create_topics,
        );
        r.add(
            level,
            &format!("kafka topic {} ({})", role.name, role.key),
            detail,
        );
    }

    for (pipeline, live_id, tx_timeout) in transactional_ids(config) {
        let check = format!("kafka transactions ({pipeline})");
        let Some(live_id) = live_id else {
            r.add(
                Level::Ok,
                &check,
                "not used (feed.delivery = \"at-least-once\")",
            );
            continue;
        };
        let probe = probe_id(&live_id, rand::random());
        let (level, detail) = match probe_transactions(kafka, &probe, tx_timeout).await {
            Ok(()) => (
                Level::Ok,
                format!("allowed (init, begin, abort with the probe id {probe})"),
            ),
            Err(e) => (
                Level::Fail,
                format!(
                    "with the probe id {probe}: {e}{}",
                    transaction_hint(e.rdkafka_error_code(), &live_id)
                ),
            ),
        };
        r.add(level, &check, detail);
    }
}

/// `cleanup.policy` of each topic (or why it cannot be read), in one request.
async fn cleanup_policies(
    kafka: &KafkaConfig,
    topics: &[&str],
) -> HashMap<String, Result<String, String>> {
    let mut out = HashMap::new();
    if topics.is_empty() {
        return out;
    }
    let admin: AdminClient<DefaultClientContext> = match client_config(kafka, &[]).create() {
        Ok(a) => a,
        Err(e) => {
            for t in topics {
                out.insert(t.to_string(), Err(e.to_string()));
            }
            return out;
        }
    };
    let specifiers: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(kafka.operation_timeout));
    match admin.describe_configs(&specifiers, &opts).await {
        Ok(results) => {
            for (topic, result) in topics.iter().zip(results) {
                let policy = result
                    .map(|resource| {
                        resource
                            .entries
                            .into_iter()
                            .find(|e| e.name == "cleanup.policy")
                            .and_then(|e| e.value)
                            .unwrap_or_else(|| "delete".to_string())
                    })
                    .map_err(|code| code.to_string());
                out.insert(topic.to_string(), policy);
            }
        }
        Err(e) => {
            for t in topics {
                out.insert(t.to_string(), Err(e.to_string()));
            }
        }
    }
    out
}

/// (pipeline, live transactional id when transactions are used, transaction timeout).
fn transactional_ids(config: &Config) -> Vec<(&'static str, Option<String>, Duration)> {
    let mut ids = Vec::new();
    let FeedConfig {
        enabled,
        delivery,
        transactional_id,
        transaction_timeout,
        ..
    } = &config.feed;
    if *enabled {
        let id = (*delivery == Delivery::ExactlyOnce).then(|| transactional_id.clone());
        ids.push(("feed", id, *transaction_timeout));
    }
    let rescan = &config.rescan;
    if rescan.enabled {
        ids.push((
            "rescan",
            Some(rescan.transactional_id()),
            rescan.transaction_timeout,
        ));
    }
    ids
}

/// A transactional id of the check's own: never the live one, which it would fence.
fn probe_id(live_id: &str, nonce: u64) -> String {
    format!("{live_id}-check-{nonce:016x}")
}

/// Creates a transactional producer with `probe_id` and runs
/// init + begin + abort (no record is written). Blocking, so on its own thread.
async fn probe_transactions(
    kafka: &KafkaConfig,
    probe_id: &str,
    transaction_timeout: Duration,
) -> Result<(), KafkaError> {
    let config = client_config(
        kafka,
        &[
            ("transactional.id", probe_id.to_string()),
            // The pipeline's own timeout: the broker refuses one above its
            // transaction.max.timeout.ms, which the worker would meet at start.
            (
                "transaction.timeout.ms",
                transaction_timeout.as_millis().to_string(),
            ),
        ],
    );
    // As long as the worker gives init_transactions: a coordinator's first load takes a while.
    let timeout = kafka.operation_timeout.max(Duration::from_secs(30));
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = config.create()?;
        producer.init_transactions(timeout)?;
        producer.begin_transaction()?;
        producer.abort_transaction(timeout)
    })
    .await
    .unwrap_or(Err(KafkaError::Canceled))
}

fn transaction_hint(code: Option<RDKafkaErrorCode>, live_id: &str) -> String {
    match code {
        Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed) => format!(
            "; the principal needs WRITE on TransactionalId `{live_id}` (a prefixed ACL also covers the probe id; a literal one does not)"
        ),
        Some(RDKafkaErrorCode::ClusterAuthorizationFailed) => {
            "; the principal needs IDEMPOTENT_WRITE on the cluster".into()
        }
        Some(RDKafkaErrorCode::InvalidTransactionTimeout) => {
            "; the transaction_timeout is above the broker's transaction.max.timeout.ms".into()
        }
        Some(RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::CoordinatorNotAvailable) => {
            "; no transaction coordinator answered: are transactions available (transaction.state.log.replication.factor <= brokers)? Without them use feed.delivery = \"at-least-once\"".into()
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(compaction: Compaction) -> TopicRole {
        TopicRole {
            key: "feed.topic",
            name: "t".into(),
            compaction,
        }
    }

    #[test]
    fn missing_topics_are_a_note_only_when_they_will_be_created() {
        let (l, d) = judge_topic(&role(Compaction::Any), None, None, true);
        assert_eq!(
            (l, d.as_str()),
            (Level::Ok, "missing; will be created at start")
        );
        let (l, d) = judge_topic(&role(Compaction::Any), None, None, false);
        assert_eq!(l, Level::Fail);
        assert!(d.contains("kafka.create_topics is false"));
    }

    #[test]
    fn compaction_is_judged_by_what_the_topic_is_for() {
        let compact = Ok("compact".to_string());
        let delete = Ok("delete".to_string());
        let both = Ok("compact,delete".to_string());
        let judge = |c, p| judge_topic(&role(c), Some(3), Some(p), true).0;
        assert_eq!(judge(Compaction::Forbidden, &compact), Level::Fail);
        assert_eq!(judge(Compaction::Forbidden, &both), Level::Fail);
        assert_eq!(judge(Compaction::Forbidden, &delete), Level::Ok);
        assert_eq!(judge(Compaction::Expected, &delete), Level::Warn);
        assert_eq!(judge(Compaction::Expected, &both), Level::Ok);
        let unreadable = Err("TopicAuthorizationFailed".to_string());
        assert_eq!(judge(Compaction::Expected, &unreadable), Level::Fail);
        let (l, d) = judge_topic(&role(Compaction::Any), Some(1), None, false);
        assert_eq!((l, d.as_str()), (Level::Ok, "exists (1 partition)"));
    }

    #[test]
    fn the_probe_id_is_never_the_live_one() {
        let id = probe_id("sandbox-bridge-feed", 0xab);
        assert_eq!(id, "sandbox-bridge-feed-check-00000000000000ab");
        assert_ne!(probe_id("x", 1), probe_id("x", 2));
        let hint = transaction_hint(
            Some(RDKafkaErrorCode::TransactionalIdAuthorizationFailed),
            "live",
        );
        assert!(hint.contains("TransactionalId `live`") && hint.contains("prefixed"));
        assert!(transaction_hint(None, "live").is_empty());
    }
}
