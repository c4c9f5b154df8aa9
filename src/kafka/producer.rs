//! The producer both pipelines write with.
//!
//! Transactional (exactly-once): `init_transactions` at creation fences any
//! older instance with the same `transactional.id` and aborts its open
//! transaction. Without a transactional id: an idempotent producer, for
//! clusters that do not allow transactions (at-least-once).
//! Records are partitioned with `murmur2_random`, so keys land where Java
//! clients would put them. The local queue is capped so memory stays bounded
//! whatever the batch size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext, PurgeConfig};
use rdkafka::statistics::Statistics;
use tracing::{error, warn};

use prometheus::IntCounter;

use crate::config::KafkaConfig;
use crate::kafka::client_config;
use crate::metrics::KafkaClientMetrics;

/// How often librdkafka reports its statistics (queue depth, broker errors).
const STATISTICS_INTERVAL_MS: &str = "5000";

/// Counts delivery failures; transactions catch them at commit, at-least-once checks the count.
pub struct DeliveryCounter {
    delivery_errors: AtomicU64,
    metric: IntCounter,
    stats: OnceLock<StatsSink>,
}

/// Where librdkafka statistics go, and the broker totals last seen (they are
/// cumulative per client; the metrics get the increase).
struct StatsSink {
    client: &'static str,
    metrics: KafkaClientMetrics,
    last: Mutex<[u64; 3]>,
}

impl ClientContext for DeliveryCounter {
    fn stats(&self, s: Statistics) {
        let Some(sink) = self.stats.get() else { return };
        let m = &sink.metrics;
        let c = [sink.client];
        m.queue_messages.with_label_values(&c).set(s.msg_cnt as i64);
        m.queue_bytes.with_label_values(&c).set(s.msg_size as i64);
        let mut totals = [0u64; 3];
        for b in s.brokers.values() {
            totals[0] += b.txerrs;
            totals[1] += b.txretries;
            totals[2] += b.req_timeouts;
        }
        let mut last = sink.last.lock().expect("stats lock");
        let counters = [&m.tx_errors, &m.tx_retries, &m.request_timeouts];
        for ((total, seen), counter) in totals.iter().zip(last.iter()).zip(counters) {
            counter
                .with_label_values(&c)
                .inc_by(total.saturating_sub(*seen));
        }
        *last = totals;
    }
}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let first = self.delivery_errors.fetch_add(1, Ordering::Relaxed) == 0;
            self.metric.inc();
            if first {
                warn!(error = %e, "a record could not be delivered to Kafka");
            }
        }
    }
}

pub type RawProducer = BaseProducer<DeliveryCounter>;

/// Classifies a Kafka error for the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaFailure {
    /// Another instance with the same transactional id took over: stop.
    Fenced,
    /// The producer is unusable: create a new one.
    Fatal,
    /// Abort (if needed) and retry the batch.
    Retryable,
}

fn is_fencing(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
    )
}

/// Classifies an error returned by a call; `fatal_cause` is the producer's
/// underlying fatal error, if any (a call on a failed producer returns only
/// a generic "fatal" code).
pub fn classify_kafka_error(e: &KafkaError, fatal_cause: Option<RDKafkaErrorCode>) -> KafkaFailure {
    let code = e.rdkafka_error_code();
    if code.is_some_and(is_fencing) || fatal_cause.is_some_and(is_fencing) {
        return KafkaFailure::Fenced;
    }
    if let KafkaError::Transaction(t) = e {
        if t.is_fatal() {
            return KafkaFailure::Fatal;
        }
        return KafkaFailure::Retryable;
    }
    match code {
        Some(RDKafkaErrorCode::Fatal) => KafkaFailure::Fatal,
        _ => KafkaFailure::Retryable,
    }
}

/// What a producer is for.
#[derive(Debug, Clone)]
pub struct ProducerSettings {
    /// `Some`: transactional (exactly-once); `None`: idempotent only.
    pub transactional_id: Option<String>,
    pub max_message_bytes: usize,
    pub transaction_timeout: Duration,
}

/// A ready producer.
pub struct TxProducer {
    pub inner: RawProducer,
    transactional: bool,
}

impl TxProducer {
    /// Creates the producer; with transactions, fences older instances (blocking).
    pub fn create(
        kafka: &KafkaConfig,
        settings: &ProducerSettings,
        delivery_errors: IntCounter,
    ) -> Result<TxProducer, KafkaError> {
        let mut defaults: Vec<(&str, String)> = vec![
            ("partitioner", "murmur2_random".into()),
            ("acks", "all".into()),
            ("enable.idempotence", "true".into()),
            ("linger.ms", "20".into()),
            ("compression.type", "lz4".into()),
            ("message.max.bytes", settings.max_message_bytes.to_string()),
            // Bounded local queue: at most this much waits in librdkafka.
            ("queue.buffering.max.kbytes", "32768".into()),
            ("queue.buffering.max.messages", "50000".into()),
            ("statistics.interval.ms", STATISTICS_INTERVAL_MS.into()),
        ];
        if let Some(id) = &settings.transactional_id {
            defaults.push(("transactional.id", id.clone()));
            defaults.push((
                "transaction.timeout.ms",
                settings.transaction_timeout.as_millis().to_string(),
            ));
        }
        let context = DeliveryCounter {
            delivery_errors: AtomicU64::new(0),
            metric: delivery_errors,
            stats: OnceLock::new(),
        };
        let inner: RawProducer = client_config(kafka, &defaults).create_with_context(context)?;
        let transactional = settings.transactional_id.is_some();
        if transactional {
            inner.init_transactions(kafka.operation_timeout.max(Duration::from_secs(30)))?;
        }
        Ok(TxProducer {
            inner,
            transactional,
        })
    }

    /// Reports this producer's librdkafka statistics as `client` from now on.
    pub fn report_statistics(&self, client: &'static str, metrics: KafkaClientMetrics) {
        let _ = self.inner.context().stats.set(StatsSink {
            client,
            metrics,
            last: Mutex::new([0; 3]),
        });
    }

    pub fn is_transactional(&self) -> bool {
        self.transactional
    }

    /// The error that made the producer unusable, if one did.
    pub fn fatal_cause(&self) -> Option<RDKafkaErrorCode> {
        self.inner.client().fatal_error().map(|(code, _)| code)
    }

    pub fn delivery_errors(&self) -> u64 {
        self.inner.context().delivery_errors.load(Ordering::Relaxed)
    }

    /// Queues one record, waiting while the local queue is full.
    pub fn send(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        loop {
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.inner.poll(Duration::from_millis(2));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Serves delivery reports without waiting (call regularly).
    pub fn serve(&self) {
        self.inner.poll(Duration::ZERO);
    }

    /// Waits until everything queued is acknowledged (or fails), serving
    /// delivery reports as they arrive. (`BaseProducer::flush` polls in
    /// 100 ms slices, which would add up to 100 ms to every commit.)
    ///
    /// Serves delivery reports as they come and sleeps 1 ms when none is
    /// ready (a short `poll` timeout is rounded down to 0, which would spin a
    /// whole core for as long as the flush lasts).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut left = self.inner.in_flight_count();
        while left > 0 {
            if std::time::Instant::now() >= deadline {
                return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
            }
            self.inner.poll(Duration::ZERO);
            let now_left = self.inner.in_flight_count();
            if now_left == left {
                std::thread::sleep(Duration::from_millis(1));
            }
            left = now_left;
        }
        Ok(())
    }

    pub fn begin(&self) -> Result<(), KafkaError> {
        self.inner.begin_transaction()
    }

    /// Commits the open transaction (flushing first).
    pub fn commit(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.flush(timeout)?;
        self.inner.commit_transaction(timeout)
    }

    /// Aborts the open transaction, logging (not returning) a failure: the
    /// next `init_transactions` aborts it anyway.
    pub fn abort(&self, timeout: Duration) {
        if !self.transactional {
            return;
        }
        // abort_transaction waits until every outstanding record is purged or
        // delivered, which takes serving their delivery reports; nothing else
        // polls this producer, so purge and drain first.
        self.inner.purge(PurgeConfig::default().queue().inflight());
        let _ = self.flush(timeout);
        if let Err(e) = self.inner.abort_transaction(timeout) {
            error!(error = %e, "could not abort the Kafka transaction; it is aborted when the worker restarts");
        }
    }
}
