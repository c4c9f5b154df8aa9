//! The metrics catalogue: every Prometheus series the service exports.
//!
//! Names follow `sandbox_bridge_<noun>_<unit>[_total]`, in base units
//! (seconds, bytes), with bounded labels. Every labelled series that can
//! appear is created at zero at start, so `increase()` sees the first event
//! and dashboards never show "no data" for a healthy service. Timestamps are
//! gauges holding Unix seconds, so `time() - x` works.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const PREFIX: &str = "sandbox_bridge";

/// Why a line went to the dead-letter topic (the `dlq.reason` header).
pub const DLQ_REASONS: &[&str] = &["not_utf8", "not_json_object", "bad_id", "too_large"];
/// How a batch attempt ended.
pub const BATCH_OUTCOMES: &[&str] = &["published", "missing", "recovered", "retried", "failed"];
/// The stages of one batch, timed separately.
pub const STAGES: &[&str] = &["download", "decode", "publish", "commit"];

/// All series of the feed worker.
#[derive(Clone)]
pub struct FeedMetrics {
    pub committed_minute_timestamp: IntGauge,
    pub lag_seconds: IntGauge,
    pub pending_minutes: IntGauge,
    pub batches: IntCounterVec,
    pub missing_run_minutes: IntGauge,
    pub missing_run_alert: IntGauge,
    pub gaps_open: IntGauge,
    pub gap_minutes_open: IntGauge,
    pub gap_minutes_lost: IntCounter,
    pub records: IntCounter,
    pub dlq_records: IntCounterVec,
    pub downloaded_bytes: IntCounter,
    pub decoded_bytes: IntCounter,
    pub stage_seconds: HistogramVec,
    pub transaction_aborts: IntCounter,
    pub fetch_retries: IntCounterVec,
    pub delivery_errors: IntCounter,
    pub pipeline_restarts: IntCounter,
}

/// Result statuses of rescan requests.
pub const RESCAN_STATUSES: &[&str] = &["accepted", "rejected", "invalid", "failed"];
/// Error kinds in rescan results (`none` for results without an error).
pub const RESCAN_ERROR_KINDS: &[&str] = &[
    "none",
    "validation",
    "not_json",
    "bad_request",
    "unauthorized",
    "forbidden",
    "legal",
    "retries_exhausted",
    "tls",
    "reply_topic_not_allowed",
    "unexpected_status",
    "internal",
];
/// Classes of API responses, for the latency histogram.
pub const RESPONSE_CLASSES: &[&str] = &["2xx", "4xx", "5xx", "timeout", "tls", "network"];

/// All series of the rescan consumer.
#[derive(Clone)]
pub struct RescanMetrics {
    pub requests: IntCounterVec,
    pub api_seconds: HistogramVec,
    pub retries: IntCounter,
    pub in_flight: IntGauge,
    pub buffered: IntGauge,
    pub duplicates: IntCounter,
    pub paused: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub consumer_lag_sum: IntGauge,
    pub certificate_expiry_seconds: IntGauge,
    pub transaction_aborts: IntCounter,
    pub dlq_records: IntCounter,
    pub delivery_errors: IntCounter,
}

impl RescanMetrics {
    /// Counts a result by status and error kind (`none` when there is no error).
    pub fn count_result(&self, status: &str, kind: Option<&str>) {
        self.requests
            .with_label_values(&[status, kind.unwrap_or("none")])
            .inc();
    }

    /// Times an API call by response class.
    pub fn observe_call(
        &self,
        r: &Result<crate::rescan::api::ApiAnswer, crate::rescan::api::CallError>,
        secs: f64,
    ) {
        use crate::rescan::api::CallError;
        let class = match r {
            Ok(a) if a.status < 300 => "2xx",
            Ok(a) if a.status < 500 => "4xx",
            Ok(_) => "5xx",
            Err(CallError::Timeout) => "timeout",
            Err(CallError::Tls(_)) => "tls",
            Err(_) => "network",
        };
        self.api_seconds.with_label_values(&[class]).observe(secs);
    }
}

/// Kafka producers' own figures, from librdkafka statistics, by `client`
/// (`feed`, `rescan`).
#[derive(Clone)]
pub struct KafkaClientMetrics {
    /// Messages waiting in the producer's local queue.
    pub queue_messages: IntGaugeVec,
    /// Bytes waiting in the producer's local queue.
    pub queue_bytes: IntGaugeVec,
    /// Transmission errors towards brokers.
    pub tx_errors: IntCounterVec,
    /// Requests sent again after an error.
    pub tx_retries: IntCounterVec,
    /// Requests that timed out.
    pub request_timeouts: IntCounterVec,
}

/// Kafka clients reported in `client` labels.
pub const KAFKA_CLIENTS: &[&str] = &["feed", "rescan"];

/// The registry plus every catalogue section.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub feed: FeedMetrics,
    pub rescan: RescanMetrics,
    pub kafka: KafkaClientMetrics,
}

fn name(n: &str) -> String {
    format!("{PREFIX}_{n}")
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Registration only fails on a duplicate name, which is a catalogue bug.
    r.register(Box::new(c.clone()))
        .expect("metric catalogue has a duplicate name");
    c
}

fn gauge(r: &Registry, n: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name(n), help).expect("valid metric"))
}

fn counter(r: &Registry, n: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name(n), help).expect("valid metric"))
}

fn counter_vec(r: &Registry, n: &str, help: &str, label: &str, values: &[&str]) -> IntCounterVec {
    let c = register(
        r,
        IntCounterVec::new(Opts::new(name(n), help), &[label]).expect("valid metric"),
    );
    for v in values {
        c.with_label_values(&[*v]);
    }
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let build = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    name("build_info"),
                    "Build information; the value is always 1.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let stage_buckets = vec![
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0,
        ];
        let stage_seconds = register(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    name("feed_stage_duration_seconds"),
                    "Time spent per batch in each stage.",
                )
                .buckets(stage_buckets),
                &["stage"],
            )
            .expect("valid metric"),
        );
        for s in STAGES {
            stage_seconds.with_label_values(&[*s]);
        }
        let feed = FeedMetrics {
            committed_minute_timestamp: gauge(
                &r,
                "feed_committed_minute_timestamp_seconds",
                "Start of the newest minute whose batch is committed (Unix seconds).",
            ),
            lag_seconds: gauge(
                &r,
                "feed_lag_seconds",
                "(now - 60 min) - start of the next minute to publish; about 0 when caught up.",
            ),
            pending_minutes: gauge(
                &r,
                "feed_pending_minutes",
                "Available minutes not yet published.",
            ),
            batches: counter_vec(
                &r,
                "feed_batches_total",
                "Batch attempts by outcome: published, missing (404), recovered (gap filled later), retried, failed.",
                "outcome",
                BATCH_OUTCOMES,
            ),
            missing_run_minutes: gauge(
                &r,
                "feed_missing_run_minutes",
                "Length of the current run of consecutive missing minutes.",
            ),
            missing_run_alert: gauge(
                &r,
                "feed_missing_run_alert",
                "1 while a run of missing minutes at or over missing_threshold is open.",
            ),
            gaps_open: gauge(
                &r,
                "feed_gaps_open",
                "Recorded gaps still inside the 7-day window.",
            ),
            gap_minutes_open: gauge(
                &r,
                "feed_gap_minutes_open",
                "Minutes in recorded gaps still re-checked.",
            ),
            gap_minutes_lost: counter(
                &r,
                "feed_gap_minutes_lost_total",
                "Minutes given up as lost (fell out of the 7-day window unrecovered).",
            ),
            records: counter(
                &r,
                "feed_records_total",
                "Records published to the feed topic.",
            ),
            dlq_records: counter_vec(
                &r,
                "feed_dlq_records_total",
                "Lines sent to the dead-letter topic, by dlq.reason.",
                "reason",
                DLQ_REASONS,
            ),
            downloaded_bytes: counter(
                &r,
                "feed_downloaded_bytes_total",
                "Compressed bytes downloaded.",
            ),
            decoded_bytes: counter(
                &r,
                "feed_decoded_bytes_total",
                "Decoded bytes of committed batches.",
            ),
            stage_seconds,
            transaction_aborts: counter(
                &r,
                "feed_transaction_aborts_total",
                "Kafka transactions aborted.",
            ),
            fetch_retries: counter_vec(
                &r,
                "feed_fetch_retries_total",
                "Upstream requests retried, by cause.",
                "cause",
                &[
                    "rate_limited",
                    "server_error",
                    "network",
                    "corrupt",
                    "not_available_yet",
                    "other",
                ],
            ),
            delivery_errors: counter(
                &r,
                "feed_delivery_errors_total",
                "Kafka records whose delivery failed.",
            ),
            pipeline_restarts: counter(
                &r,
                "feed_pipeline_restarts_total",
                "Times the publishing pipeline restarted from the committed position after an error.",
            ),
        };
        let rescan = rescan_metrics(&r);
        let kafka = kafka_client_metrics(&r);
        Metrics {
            registry: r,
            feed,
            rescan,
            kafka,
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = encoder.encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn kafka_client_metrics(r: &Registry) -> KafkaClientMetrics {
    let gauges = |n: &str, help: &str| {
        let g = register(
            r,
            IntGaugeVec::new(Opts::new(name(n), help), &["client"]).expect("valid metric"),
        );
        for c in KAFKA_CLIENTS {
            g.with_label_values(&[*c]);
        }
        g
    };
    let counters = |n: &str, help: &str| counter_vec(r, n, help, "client", KAFKA_CLIENTS);
    KafkaClientMetrics {
        queue_messages: gauges(
            "kafka_producer_queue_messages",
            "Messages waiting in the Kafka producer's local queue (librdkafka statistics).",
        ),
        queue_bytes: gauges(
            "kafka_producer_queue_bytes",
            "Bytes waiting in the Kafka producer's local queue (librdkafka statistics).",
        ),
        tx_errors: counters(
            "kafka_producer_broker_tx_errors_total",
            "Transmission errors from the producer to brokers (librdkafka statistics).",
        ),
        tx_retries: counters(
            "kafka_producer_broker_tx_retries_total",
            "Producer requests sent again after an error (librdkafka statistics).",
        ),
        request_timeouts: counters(
            "kafka_producer_broker_request_timeouts_total",
            "Producer requests to brokers that timed out (librdkafka statistics).",
        ),
    }
}

fn rescan_metrics(r: &Registry) -> RescanMetrics {
    let requests = register(
        r,
        IntCounterVec::new(
            Opts::new(
                name("rescan_requests_total"),
                "Rescan requests by result status and error kind.",
            ),
            &["status", "kind"],
        )
        .expect("valid metric"),
    );
    for status in RESCAN_STATUSES {
        for kind in RESCAN_ERROR_KINDS {
            requests.with_label_values(&[*status, *kind]);
        }
    }
    let api_seconds = register(
        r,
        HistogramVec::new(
            HistogramOpts::new(
                name("rescan_api_duration_seconds"),
                "KTIP API call latency by response class.",
            )
            .buckets(vec![
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["class"],
        )
        .expect("valid metric"),
    );
    for c in RESPONSE_CLASSES {
        api_seconds.with_label_values(&[*c]);
    }
    let consumer_lag = register(
        r,
        IntGaugeVec::new(
            Opts::new(
                name("rescan_consumer_lag_records"),
                "Records of the requests topic behind its high watermark, per partition owned.",
            ),
            &["partition"],
        )
        .expect("valid metric"),
    );
    RescanMetrics {
        requests,
        api_seconds,
        retries: counter(
            r,
            "rescan_api_retries_total",
            "KTIP API calls repeated after a retryable failure.",
        ),
        in_flight: gauge(
            r,
            "rescan_requests_in_flight",
            "KTIP API calls in progress.",
        ),
        buffered: gauge(
            r,
            "rescan_requests_buffered",
            "Requests taken from Kafka and not yet committed.",
        ),
        duplicates: counter(
            r,
            "rescan_duplicates_total",
            "Requests answered from an earlier request_id.",
        ),
        paused: gauge(
            r,
            "rescan_paused",
            "1 while rescan requests are paused after repeated authentication failures.",
        ),
        consumer_lag,
        consumer_lag_sum: gauge(
            r,
            "rescan_consumer_lag_records_sum",
            "Records of the requests topic behind the high watermark, all partitions owned.",
        ),
        certificate_expiry_seconds: gauge(
            r,
            "rescan_client_certificate_expiry_timestamp_seconds",
            "When the KTIP client certificate expires (Unix seconds; 0 when none is configured).",
        ),
        transaction_aborts: counter(
            r,
            "rescan_transaction_aborts_total",
            "Kafka transactions aborted.",
        ),
        dlq_records: counter(
            r,
            "rescan_dlq_records_total",
            "Requests sent to the dead-letter topic.",
        ),
        delivery_errors: counter(
            r,
            "rescan_delivery_errors_total",
            "Kafka records whose delivery failed.",
        ),
    }
}

/// Observes how long a stage took.
pub fn observe_stage(h: &HistogramVec, stage: &str, seconds: f64) {
    let hist: Histogram = h.with_label_values(&[stage]);
    hist.observe(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_exist_at_zero_from_the_start() {
        let m = Metrics::new();
        let text = m.render();
        for reason in DLQ_REASONS {
            assert!(
                text.contains(&format!(
                    "sandbox_bridge_feed_dlq_records_total{{reason=\"{reason}\"}} 0"
                )),
                "{reason} missing"
            );
        }
        for outcome in BATCH_OUTCOMES {
            assert!(text.contains(&format!(
                "sandbox_bridge_feed_batches_total{{outcome=\"{outcome}\"}} 0"
            )));
        }
        assert!(text.contains("sandbox_bridge_build_info{version="));
        assert!(
            text.contains("sandbox_bridge_feed_stage_duration_seconds_bucket{stage=\"commit\"")
        );
    }

    #[test]
    fn names_follow_the_convention() {
        let m = Metrics::new();
        for family in m.registry.gather() {
            let n = family.name();
            assert!(n.starts_with("sandbox_bridge_"), "{n}");
            if family.get_field_type() == prometheus::proto::MetricType::COUNTER {
                assert!(n.ends_with("_total"), "counter {n} must end in _total");
            }
        }
    }
}
