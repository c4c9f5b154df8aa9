//! The rescan consumer, assembled: topics, the KTIP client, the executor on
//! tokio, the consumer thread, and restarts.
//!
//! One incarnation = one transactional producer (`<prefix>-<instance_id>`:
//! each instance has its own, so instances in one group never fence each
//! other, and a restarted instance fences its own predecessor), one group
//! consumer, and the outcome store read back from its topic. A Kafka error
//! that needs a new producer or consumer ends the incarnation; the next one
//! starts from the committed offsets, so nothing committed is repeated and
//! nothing uncommitted is lost. Bad configuration (an unreadable certificate)
//! stops the consumer with a clear error.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, SystemTime};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::mpsc as tmpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::api::{ClientError, KtipClient, certificate_not_after};
use super::consumer::{CallJob, Completion, ConsumerError, ConsumerSettings, Core, RescanContext};
use super::executor::{CallOutcome, CallPolicy, Executor, LastFailure};
use super::gate::AuthGate;
use super::intake::IntakeRules;
use super::outcomes::OutcomeTail;
use super::request::AllowedValues;
use super::result::{ApiReply, Failure, RescanResult, Timing};
use crate::config::{Config, RescanConfig};
use crate::feed::fetch::RetryPolicy;
use crate::http::Readiness;
use crate::kafka::producer::{ProducerSettings, TxProducer};
use crate::kafka::{TopicError, TopicSpec, client_config, ensure_topics};
use crate::metrics::{KafkaClientMetrics, RescanMetrics};

#[derive(Debug, thiserror::Error)]
pub enum RescanError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

impl RescanError {
    pub fn is_permanent(&self) -> bool {
        match self {
            RescanError::Client(_) => true,
            RescanError::Topics(t) => !matches!(t, TopicError::Unreachable { .. }),
            _ => false,
        }
    }
}

#[derive(Clone)]
pub struct RescanWorker {
    config: Arc<Config>,
    metrics: RescanMetrics,
    readiness: Readiness,
    kafka_metrics: Option<KafkaClientMetrics>,
}

impl RescanWorker {
    pub fn new(config: Arc<Config>, metrics: RescanMetrics) -> RescanWorker {
        RescanWorker {
            config,
            metrics,
            readiness: Readiness::default(),
            kafka_metrics: None,
        }
    }

    /// Reports the producer's librdkafka statistics under `client="rescan"`.
    pub fn with_kafka_metrics(mut self, metrics: KafkaClientMetrics) -> RescanWorker {
        self.kafka_metrics = Some(metrics);
        self
    }

    /// Reports readiness (`/readyz`) under the name `rescan`.
    pub fn with_readiness(mut self, readiness: Readiness) -> RescanWorker {
        self.readiness = readiness;
        self
    }

    fn cfg(&self) -> &RescanConfig {
        &self.config.rescan
    }

    fn topic_specs(&self) -> Vec<TopicSpec> {
        let c = self.cfg();
        let plain = |name: &str| TopicSpec {
            name: name.to_string(),
            partitions: c.partitions,
            config: vec![("cleanup.policy", "delete".into())],
            must_not_compact: false,
            expect_compacted: false,
        };
        vec![
            plain(&c.requests_topic),
            plain(&c.results_topic),
            plain(&c.dlq_topic),
            TopicSpec {
                name: c.dedup_topic.clone(),
                partitions: c.partitions,
                config: vec![
                    ("cleanup.policy", "compact,delete".into()),
                    ("retention.ms", c.dedup_window.as_millis().to_string()),
                ],
                must_not_compact: false,
                expect_compacted: true,
            },
        ]
    }

    /// Runs until `shutdown` (Ok) or a permanent error (Err).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), RescanError> {
        let cfg = self.cfg().clone();
        let client = Arc::new(KtipClient::new(&cfg)?);
        self.report_certificate();
        let allowed = self.allowed_values(&client).await;
        let gate = Arc::new(AuthGate::new(cfg.auth_failures_to_pause));
        let policy = CallPolicy {
            max_attempts: cfg.max_attempts,
            deadline: cfg.retry_deadline,
            backoff: RetryPolicy {
                initial: cfg.retry_initial_backoff,
                max: cfg.retry_max_backoff,
            },
        };
        let executor = Arc::new(Executor::new(
            client.clone(),
            gate.clone(),
            cfg.max_in_flight,
            cfg.max_requests_per_minute,
            policy,
            self.metrics.clone(),
        ));
        let probe = tokio::spawn({
            let (executor, interval) = (executor.clone(), cfg.probe_interval);
            async move { executor.probe_until_open(interval).await }
        });
        let watcher = tokio::spawn(watch_gate(
            gate.clone(),
            self.readiness.clone(),
            self.metrics.clone(),
        ));
        let restart = RetryPolicy {
            initial: cfg.retry_initial_backoff,
            max: cfg.retry_max_backoff.max(Duration::from_secs(30)),
        };
        let mut delays = restart.delays();
        let outcome = loop {
            let result = match ensure_topics(&self.config.kafka, &self.topic_specs()).await {
                Ok(()) => {
                    self.incarnation(&executor, &allowed, &shutdown, client.base_url().clone())
                        .await
                }
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(()) => break Ok(()),
                Err(e) if e.is_permanent() => break Err(e),
                Err(e) => {
                    let delay = delays.next().unwrap_or(restart.max);
                    self.readiness
                        .set_unready("rescan", format!("restarting after: {e}"));
                    warn!(error = %e, retry_in = ?delay, "rescan consumer failed; restarting from the committed offsets");
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        probe.abort();
        watcher.abort();
        outcome
    }

    fn report_certificate(&self) {
        let Some(path) = &self.cfg().client_cert else {
            warn!(
                "rescan.client_cert is not set: the KTIP sandbox requires a client certificate, so calls will fail"
            );
            return;
        };
        let expiry = std::fs::read(path)
            .ok()
            .and_then(|pem| certificate_not_after(&pem));
        match expiry {
            Some(t) => {
                let secs = t
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                self.metrics.certificate_expiry_seconds.set(secs);
                let days = t
                    .duration_since(SystemTime::now())
                    .map_or(0, |d| d.as_secs() / 86_400);
                if days < 14 {
                    warn!(
                        days,
                        "the KTIP client certificate expires soon (or has expired): renew it"
                    );
                }
            }
            None => warn!("cannot read the expiry date of the KTIP client certificate"),
        }
    }

    /// The API's exec_env and channel lists, or the configured fallbacks.
    async fn allowed_values(&self, client: &KtipClient) -> AllowedValues {
        let cfg = self.cfg();
        let pick = |what: &str,
                    fetched: Result<std::collections::BTreeSet<String>, String>,
                    fallback: &[String]| {
            match fetched {
                Ok(set) => {
                    info!(
                        what,
                        values = set.len(),
                        "allowed values fetched from the KTIP API"
                    );
                    Some(set)
                }
                Err(e) if fallback.is_empty() => {
                    warn!(what, error = %e, "allowed values unknown and no fallback configured: only the static rules apply");
                    None
                }
                Err(e) => {
                    warn!(what, error = %e, "allowed values unknown: using the configured fallback list");
                    Some(fallback.iter().cloned().collect())
                }
            }
        };
        AllowedValues {
            exec_envs: pick(
                "exec_env",
                client.exec_envs().await,
                &cfg.fallback_exec_envs,
            ),
            channels: pick("channel", client.channels().await, &cfg.fallback_channels),
        }
    }

    async fn incarnation(
        &self,
        executor: &Arc<Executor>,
        allowed: &AllowedValues,
        shutdown: &CancellationToken,
        base_url: reqwest::Url,
    ) -> Result<(), RescanError> {
        let cfg = self.cfg().clone();
        let kafka = self.config.kafka.clone();
        let settings = ProducerSettings {
            transactional_id: Some(cfg.transactional_id()),
            max_message_bytes: 1 << 20,
            transaction_timeout: cfg.transaction_timeout,
        };
        let (jobs_tx, jobs_rx) = tmpsc::unbounded_channel::<CallJob>();
        let (done_tx, done_rx) = mpsc::channel::<Completion>();
        let consumer_settings = ConsumerSettings {
            requests_topic: cfg.requests_topic.clone(),
            outcomes_topic: cfg.dedup_topic.clone(),
            rules: IntakeRules {
                results_topic: cfg.results_topic.clone(),
                dlq_topic: cfg.dlq_topic.clone(),
                reply_topic_allowlist: cfg
                    .reply_topic_allowlist
                    .iter()
                    .cloned()
                    .collect::<HashSet<_>>(),
                base_url,
            },
            commit_interval: cfg.commit_interval,
            max_buffered: cfg.max_buffered,
            operation_timeout: kafka.operation_timeout,
        };
        let (metrics, allowed) = (self.metrics.clone(), allowed.clone());
        let kafka_metrics = self.kafka_metrics.clone();
        let consumer = tokio::task::spawn_blocking(
            move || -> Result<BaseConsumer<RescanContext>, RescanError> {
                let producer = Arc::new(TxProducer::create(
                    &kafka,
                    &settings,
                    metrics.delivery_errors.clone(),
                )?);
                if let Some(m) = kafka_metrics {
                    producer.report_statistics("rescan", m);
                }
                // Catching up asks the watermark of every partition on the
                // tail's connection, where the broker answers each only after
                // the long-poll fetch ahead of it: 100 ms instead of the
                // default 500 ms bounds that wait (start-up, every rebalance).
                let mut outcomes = OutcomeTail::open(
                    client_config(&kafka, &[("fetch.wait.max.ms", "100".into())]),
                    &cfg.dedup_topic,
                    cfg.dedup_window,
                    kafka.operation_timeout,
                )?;
                outcomes.catch_up(kafka.operation_timeout.max(Duration::from_secs(60)))?;
                info!(outcomes = outcomes.store.len(), "outcome store loaded");
                let core = Core::new(
                    consumer_settings,
                    producer,
                    outcomes,
                    allowed,
                    jobs_tx,
                    metrics,
                );
                let context = RescanContext {
                    core: Arc::new(Mutex::new(core)),
                    topic: cfg.requests_topic.clone(),
                };
                let consumer: BaseConsumer<RescanContext> = client_config(
                    &kafka,
                    &[
                        ("group.id", cfg.group_id.clone()),
                        ("isolation.level", "read_committed".into()),
                        ("enable.auto.commit", "false".into()),
                        ("auto.offset.reset", "earliest".into()),
                        ("partition.assignment.strategy", "cooperative-sticky".into()),
                    ],
                )
                .create_with_context(context)?;
                consumer.subscribe(&[&cfg.requests_topic])?;
                Ok(consumer)
            },
        )
        .await
        .map_err(|_| ConsumerError::ExecutorGone)??;

        let dispatcher = tokio::spawn(dispatch(jobs_rx, executor.clone(), done_tx));
        let stop = Arc::new(AtomicBool::new(false));
        // Dropped with this future (a cancelled task, a runtime shutting
        // down): the consumer thread stops too instead of running on.
        let _stop_on_drop = StopOnDrop(stop.clone());
        let gate_rx = executor.gate().watch();
        let mut thread = tokio::task::spawn_blocking({
            let stop = stop.clone();
            move || super::consumer::run(consumer, done_rx, gate_rx, stop)
        });
        self.readiness.set_ready("rescan");
        let result = tokio::select! {
            r = &mut thread => r,
            _ = shutdown.cancelled() => {
                stop.store(true, Ordering::SeqCst);
                (&mut thread).await
            }
        };
        dispatcher.abort();
        match result {
            Ok(r) => r.map_err(RescanError::from),
            Err(_) => Err(ConsumerError::ExecutorGone.into()),
        }
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs every call on its own task; the executor bounds concurrency.
async fn dispatch(
    mut jobs: tmpsc::UnboundedReceiver<CallJob>,
    executor: Arc<Executor>,
    done: mpsc::Sender<Completion>,
) {
    while let Some(job) = jobs.recv().await {
        let (executor, done) = (executor.clone(), done.clone());
        tokio::spawn(async move {
            let outcome = executor.call(&job.url).await;
            let timing = Timing {
                received_at: job.received_at,
                completed_at: SystemTime::now(),
            };
            let result = result_of(&job, outcome, timing);
            let _ = done.send(Completion {
                origin: job.origin,
                epoch: job.epoch,
                result,
            });
        });
    }
}

fn result_of(job: &CallJob, outcome: CallOutcome, timing: Timing) -> RescanResult {
    let (origin, request) = (&job.origin, &job.request);
    match outcome {
        CallOutcome::Answered { answer, attempts } => {
            let reply = ApiReply {
                status: answer.status,
                body: &answer.body,
            };
            RescanResult::from_api(origin, request, reply, attempts, timing)
        }
        CallOutcome::Tls { error, attempts } => RescanResult::failed(
            origin,
            request,
            Failure::tls(error.to_string()),
            attempts,
            timing,
        ),
        CallOutcome::GaveUp { last, attempts } => match &last {
            LastFailure::Status(answer) => {
                let reply = ApiReply {
                    status: answer.status,
                    body: &answer.body,
                };
                RescanResult::from_api(origin, request, reply, attempts, timing)
            }
            LastFailure::Transport(e) => {
                let failure =
                    Failure::retries_exhausted(format!("{e} (after {attempts} attempt(s))"));
                RescanResult::failed(origin, request, failure, attempts, timing)
            }
        },
    }
}

/// Mirrors the credentials gate into `/readyz`, the `paused` metric and the log.
async fn watch_gate(gate: Arc<AuthGate>, readiness: Readiness, metrics: RescanMetrics) {
    let mut rx = gate.watch();
    let mut was_paused = false;
    loop {
        let state = rx.borrow_and_update().clone();
        match state {
            Some(reason) => {
                error!(%reason, "KTIP credentials refused: rescan requests are paused (not rejected) until a probe succeeds");
                readiness.set_unready("rescan", format!("paused: {reason}"));
                metrics.paused.set(1);
                was_paused = true;
            }
            None if was_paused => {
                metrics.paused.set(0);
                readiness.set_ready("rescan");
                was_paused = false;
            }
            None => {}
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
