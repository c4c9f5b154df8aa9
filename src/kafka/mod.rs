//! Kafka plumbing shared by the pipelines: client settings and topics.
//!
//! Client settings are built in one place: the worker's defaults first, then
//! the operator's `[kafka.properties]` (which may override any default but
//! not the properties guarantees depend on; config refuses those). Topics
//! that do not exist are created at start with the broker's default
//! replication factor; existing topics are checked for a cleanup policy that
//! would lose data.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, Producer};
use tracing::{info, warn};

use crate::config::KafkaConfig;

pub mod producer;

/// A client configuration: bootstrap servers, `defaults`, then the operator's properties.
pub fn client_config(kafka: &KafkaConfig, defaults: &[(&str, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.bootstrap_servers);
    c.set(
        "client.id",
        concat!("sandbox-bridge/", env!("CARGO_PKG_VERSION")),
    );
    for (k, v) in defaults {
        c.set(*k, v);
    }
    for (k, v) in kafka.properties.expose() {
        c.set(k, v);
    }
    let level = if kafka.properties.get("debug").is_some() {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Info
    };
    c.set_log_level(level);
    c
}

/// What a topic must look like.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    /// Topic configuration used at creation.
    pub config: Vec<(&'static str, String)>,
    /// The topic must never be compacted (records share keys).
    pub must_not_compact: bool,
    /// The topic is expected to be compacted (only the newest value per key matters).
    pub expect_compacted: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("cannot reach Kafka at {servers}: {source}")]
    Unreachable { servers: String, source: KafkaError },
    #[error(
        "topic {0} does not exist and kafka.create_topics is false; create it or enable creation"
    )]
    Missing(String),
    #[error("cannot create topic {name}: {reason}")]
    Create { name: String, reason: String },
    #[error(
        "topic {name} has cleanup.policy={policy}: its records share keys (many records per SHA-256), so compaction would delete them; use cleanup.policy=delete"
    )]
    Compacted { name: String, policy: String },
    #[error("cannot read the configuration of topic {name}: {source}")]
    Describe { name: String, source: KafkaError },
}

/// Creates missing topics (when allowed) and checks the cleanup policy of all of them.
pub async fn ensure_topics(kafka: &KafkaConfig, specs: &[TopicSpec]) -> Result<(), TopicError> {
    let unreachable = |source| TopicError::Unreachable {
        servers: kafka.bootstrap_servers.clone(),
        source,
    };
    let admin: AdminClient<DefaultClientContext> =
        client_config(kafka, &[]).create().map_err(unreachable)?;
    let timeout = kafka.operation_timeout;
    let existing = existing_topics(client_config(kafka, &[]), timeout)
        .await
        .map_err(unreachable)?;

    let to_create: Vec<&TopicSpec> = specs
        .iter()
        .filter(|s| !existing.contains_key(&s.name))
        .collect();
    if !to_create.is_empty() {
        if !kafka.create_topics {
            return Err(TopicError::Missing(to_create[0].name.clone()));
        }
        let new_topics: Vec<NewTopic<'_>> = to_create
            .iter()
            .map(|s| {
                let mut t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(-1));
                for (k, v) in &s.config {
                    t = t.set(k, v);
                }
                t
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(timeout));
        let results = admin
            .create_topics(&new_topics, &opts)
            .await
            .map_err(unreachable)?;
        for r in results {
            match r {
                Ok(name) => info!(topic = %name, "created topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(TopicError::Create {
                        name,
                        reason: code.to_string(),
                    });
                }
            }
        }
    }

    let opts = AdminOptions::new().request_timeout(Some(timeout));
    // Topics created just now have the configuration given above; a
    // describe may not see it yet. Check the ones that existed before.
    for spec in specs
        .iter()
        .filter(|s| existing.contains_key(&s.name))
        .filter(|s| s.must_not_compact || s.expect_compacted)
    {
        let described = admin
            .describe_configs(&[ResourceSpecifier::Topic(&spec.name)], &opts)
            .await
            .map_err(|source| TopicError::Describe {
                name: spec.name.clone(),
                source,
            })?;
        let policy = described
            .into_iter()
            .flatten()
            .flat_map(|r| r.entries)
            .find(|e| e.name == "cleanup.policy")
            .and_then(|e| e.value)
            .unwrap_or_else(|| "delete".to_string());
        let compacted = policy.split(',').any(|p| p.trim() == "compact");
        if spec.must_not_compact && compacted {
            return Err(TopicError::Compacted {
                name: spec.name.clone(),
                policy,
            });
        }
        if spec.expect_compacted && !compacted {
            warn!(topic = %spec.name, %policy, "topic is not compacted; it grows until retention deletes old records, which may delete ones still needed: set cleanup.policy=compact");
        }
    }
    Ok(())
}

/// Topic name → partition count, from a metadata request on a blocking thread.
pub async fn existing_topics(
    config: ClientConfig,
    timeout: Duration,
) -> Result<HashMap<String, usize>, KafkaError> {
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = config.create()?;
        let md = producer.client().fetch_metadata(None, timeout)?;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| (t.name().to_string(), t.partitions().len()))
            .collect())
    })
    .await
    .unwrap_or_else(|e| {
        Err(KafkaError::Canceled).inspect_err(|_| warn!("metadata task failed: {e}"))
    })
}

/// How often [`watch_reachability`] asks the cluster for metadata.
const REACHABILITY_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps readiness entry `kafka` up to date until `shutdown`: ready while a
/// metadata request to the cluster succeeds, unready (with the error) when
/// it fails. A pipeline idle between batches would not notice a lost broker
/// by itself; operators and orchestrators should.
pub async fn watch_reachability(
    kafka: KafkaConfig,
    readiness: crate::http::Readiness,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = match client_config(&kafka, &[]).create() {
        Ok(c) => c,
        Err(e) => {
            readiness.set_unready("kafka", format!("cannot create a Kafka client: {e}"));
            return;
        }
    };
    let client = std::sync::Arc::new(client);
    let timeout = kafka.operation_timeout.min(REACHABILITY_INTERVAL);
    let mut was_ok = true;
    loop {
        let c = client.clone();
        let probe = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(None, timeout).map(|m| m.brokers().len())
        });
        match probe.await {
            Ok(Ok(brokers)) if brokers > 0 => {
                if !was_ok {
                    info!("Kafka reachable again");
                }
                was_ok = true;
                readiness.set_ready("kafka");
            }
            Ok(Ok(_)) => {
                was_ok = false;
                readiness.set_unready("kafka", "the cluster reports no brokers");
            }
            Ok(Err(e)) => {
                if was_ok {
                    warn!(error = %e, "Kafka unreachable");
                }
                was_ok = false;
                readiness.set_unready("kafka", format!("cannot reach Kafka: {e}"));
            }
            Err(_) => return,
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(REACHABILITY_INTERVAL) => {}
        }
    }
}
