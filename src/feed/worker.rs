//! The feed worker: walks the minutes in order and feeds the pipeline.
//!
//! One incarnation = one producer (`init_transactions` fences older
//! instances), the state read back from the state topic, and a pipeline. The
//! walker plans the state each job will commit (`planned`); the pipeline
//! reports what was committed (`committed`). Any pipeline or Kafka failure
//! ends the incarnation, and the next starts again from the state topic, so
//! the only position ever trusted is a committed one. Permanent problems
//! (bad API key, no licence, fenced by a newer instance, a compacted feed
//! topic, an unreadable state record) stop the worker with a clear error.
//!
//! The walker never asks for a minute newer than now − 60 min; when caught
//! up it sleeps until the next minute becomes available. A position older
//! than the 7-day window skips forward and records the lost range. Missing
//! minutes are handled by [`MissingRuns`] and the configured policy; gaps are
//! re-checked every `gap_recheck_interval` while inside the window.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::api::{FeedClient, FetchError, Fetched};
use super::fetch::{Prefetcher, RetryPolicy, fetch_with_retry};
use super::missing::{MissingRuns, OnMissing};
use super::pipeline::{BatchJob, Job, Origin, Pipeline, PipelineError, PipelineSettings, Report};
use super::state::{FeedState, GapReason};
use super::state_store::{StateLoadError, load_state};
use crate::clock::SharedClock;
use crate::config::{Config, Delivery, FeedConfig, MissingPolicy};
use crate::http::Readiness;
use crate::kafka::producer::{KafkaFailure, ProducerSettings, TxProducer, classify_kafka_error};
use crate::kafka::{TopicError, TopicSpec, client_config, ensure_topics};
use crate::metrics::{FeedMetrics, KafkaClientMetrics};
use crate::minute::{FeedWindow, Minute, MinuteRange};

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(
        "fenced: a newer sandbox-bridge instance with transactional id `{0}` took over; this one stops (never run two with the same feed.transactional_id)"
    )]
    Fenced(String),
    #[error(transparent)]
    Topics(#[from] TopicError),
    #[error(transparent)]
    State(#[from] StateLoadError),
    #[error("Kafka producer: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("the publishing pipeline stopped unexpectedly")]
    PipelineGone,
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl FeedError {
    /// Errors that restarting cannot fix.
    pub fn is_permanent(&self) -> bool {
        match self {
            FeedError::Fetch(e) => e.is_permanent(),
            FeedError::Fenced(_) | FeedError::Http(_) => true,
            FeedError::Topics(t) => !matches!(t, TopicError::Unreachable { .. }),
            FeedError::State(s) => matches!(s, StateLoadError::Corrupt { .. }),
            _ => false,
        }
    }
}

enum Stop {
    Shutdown,
    Error(FeedError),
}

impl<E: Into<FeedError>> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Error(e.into())
    }
}

/// Everything a worker needs; cheap to clone.
#[derive(Clone)]
pub struct FeedWorker {
    config: Arc<Config>,
    clock: SharedClock,
    metrics: FeedMetrics,
    readiness: Readiness,
    kafka_metrics: Option<KafkaClientMetrics>,
}

impl FeedWorker {
    pub fn new(config: Arc<Config>, clock: SharedClock, metrics: FeedMetrics) -> FeedWorker {
        FeedWorker {
            config,
            clock,
            metrics,
            readiness: Readiness::default(),
            kafka_metrics: None,
        }
    }

    /// Reports the producer's librdkafka statistics as client `feed`.
    pub fn with_kafka_metrics(mut self, metrics: KafkaClientMetrics) -> FeedWorker {
        self.kafka_metrics = Some(metrics);
        self
    }

    /// Reports readiness (`/readyz`) under the name `feed`.
    pub fn with_readiness(mut self, readiness: Readiness) -> FeedWorker {
        self.readiness = readiness;
        self
    }

    fn feed(&self) -> &FeedConfig {
        &self.config.feed
    }

    fn topic_specs(&self) -> Vec<TopicSpec> {
        let f = self.feed();
        let max_bytes = (f.max_message_bytes + 1024).to_string();
        vec![
            TopicSpec {
                name: f.topic.clone(),
                partitions: f.partitions,
                config: vec![
                    ("cleanup.policy", "delete".into()),
                    ("max.message.bytes", max_bytes.clone()),
                ],
                must_not_compact: true,
                expect_compacted: false,
            },
            TopicSpec {
                name: f.dlq_topic.clone(),
                partitions: f.partitions,
                config: vec![
                    ("cleanup.policy", "delete".into()),
                    ("max.message.bytes", max_bytes),
                ],
                must_not_compact: true,
                expect_compacted: false,
            },
            TopicSpec {
                name: f.state_topic.clone(),
                partitions: 1,
                config: vec![
                    ("cleanup.policy", "compact".into()),
                    ("min.cleanable.dirty.ratio", "0.1".into()),
                ],
                must_not_compact: false,
                expect_compacted: true,
            },
        ]
    }

    /// Runs until `shutdown` is cancelled (Ok) or a permanent error (Err).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), FeedError> {
        let client = Arc::new(FeedClient::new(self.feed())?);
        let retry = RetryPolicy {
            initial: self.feed().retry_initial_backoff,
            max: self.feed().retry_max_backoff,
        };
        let mut delays = retry.delays();
        loop {
            let progress = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let outcome = match ensure_topics(&self.config.kafka, &self.topic_specs()).await {
                Err(e) => Err(Stop::Error(e.into())),
                Ok(()) => {
                    self.incarnation(client.clone(), &shutdown, progress.clone())
                        .await
                }
            };
            let error = match outcome {
                Ok(()) | Err(Stop::Shutdown) => return Ok(()),
                Err(Stop::Error(e)) if e.is_permanent() => return Err(e),
                Err(Stop::Error(e)) => e,
            };
            if progress.load(std::sync::atomic::Ordering::Relaxed) {
                delays = retry.delays();
            }
            let delay = delays.next().unwrap_or(retry.max);
            self.readiness
                .set_unready("feed", format!("restarting after: {error}"));
            self.metrics.pipeline_restarts.inc();
            warn!(error = %error, retry_in = ?delay, "feed pipeline failed; restarting from the last committed position");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn incarnation(
        &self,
        client: Arc<FeedClient>,
        shutdown: &CancellationToken,
        progress: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<(), Stop> {
        let kafka = self.config.kafka.clone();
        let settings = ProducerSettings {
            transactional_id: (self.feed().delivery == Delivery::ExactlyOnce)
                .then(|| self.feed().transactional_id.clone()),
            max_message_bytes: self.feed().max_message_bytes,
            transaction_timeout: self.feed().transaction_timeout,
        };
        let delivery_errors = self.metrics.delivery_errors.clone();
        let producer =
            blocking(move || TxProducer::create(&kafka, &settings, delivery_errors)).await?;
        if let Some(m) = &self.kafka_metrics {
            producer.report_statistics("feed", m.clone());
        }
        let producer = Arc::new(producer);
        let (config, f) = (client_config(&self.config.kafka, &[]), self.feed().clone());
        let timeout = self
            .config
            .kafka
            .operation_timeout
            .max(Duration::from_secs(60));
        let saved =
            blocking(move || load_state(config, &f.state_topic, &f.transactional_id, timeout))
                .await?;
        let state = match saved {
            Some(s) => {
                info!(next = %s.next, gaps = s.gaps.len(), "resuming from the saved position");
                s
            }
            None => {
                let start = self
                    .feed()
                    .start
                    .unwrap_or_else(|| Minute::containing(self.clock.now()).plus(-70));
                info!(start = %start, "no saved position; starting at feed.start");
                FeedState::starting_at(start)
            }
        };
        let settings = PipelineSettings {
            topic: self.feed().topic.clone(),
            dlq_topic: self.feed().dlq_topic.clone(),
            state_topic: self.feed().state_topic.clone(),
            state_key: self.feed().transactional_id.clone(),
            max_message_bytes: self.feed().max_message_bytes,
            decode_threads: self.feed().decode_threads,
            // A commit that cannot finish in a minute is failed; the restart
            // re-reads the state topic, which tells whether it landed.
            commit_timeout: self.feed().transaction_timeout.min(Duration::from_secs(60)),
        };
        let (pipeline, reports) = Pipeline::start(settings, producer.clone(), self.metrics.clone());
        let mut walker = Walker {
            cfg: self.feed().clone(),
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
            runs: MissingRuns::new(self.feed().missing_threshold),
            prefetch: Prefetcher::new(
                client.clone(),
                RetryPolicy {
                    initial: self.feed().retry_initial_backoff,
                    max: self.feed().retry_max_backoff,
                },
                self.metrics.clone(),
                self.feed().prefetch,
            ),
            client,
            jobs: pipeline.jobs.clone(),
            events: Events {
                shutdown: shutdown.clone(),
                reports,
                committed: state.clone(),
                metrics: self.metrics.clone(),
                clock: self.clock.clone(),
                progress,
                margin: self.feed().window_edge_margin_minutes,
            },
            next_gap_check: self.clock.now(),
            planned: state,
            readiness: self.readiness.clone(),
        };
        walker.events.publish_gauges();
        self.readiness.set_ready("feed");
        let result = walker.run().await;
        drop(walker);
        let flush_timeout = self.feed().transaction_timeout.min(Duration::from_secs(30));
        let fatal_cause = blocking(move || {
            pipeline.stop();
            let fatal_cause = producer.fatal_cause();
            if fatal_cause.is_none() {
                // Dropping a producer discards what it still holds: flush first.
                let _ = producer.flush(flush_timeout);
            }
            Ok::<_, FeedError>(fatal_cause)
        })
        .await?;
        match result {
            Err(Stop::Error(FeedError::Pipeline(PipelineError::Kafka(e))))
                if classify_kafka_error(&e, fatal_cause) == KafkaFailure::Fenced =>
            {
                Err(Stop::Error(FeedError::Fenced(
                    self.feed().transactional_id.clone(),
                )))
            }
            other => other,
        }
    }
}

/// Runs blocking Kafka calls off the async threads.
async fn blocking<T: Send + 'static, E: Into<FeedError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Stop> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| Stop::Error(e.into())),
        Err(_) => Err(Stop::Error(FeedError::PipelineGone)),
    }
}

/// How often the lag gauges are recomputed while the worker waits.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);

/// Pipeline reports, shutdown, and the gauges derived from committed state.
struct Events {
    shutdown: CancellationToken,
    reports: mpsc::UnboundedReceiver<Report>,
    committed: FeedState,
    metrics: FeedMetrics,
    clock: SharedClock,
    progress: Arc<std::sync::atomic::AtomicBool>,
    margin: i64,
}

impl Events {
    /// Awaits `fut` while handling pipeline reports; stops on shutdown or a pipeline failure.
    /// The lag gauges are refreshed while waiting too, so a stalled worker shows its growing lag.
    async fn wait<F: Future>(&mut self, fut: F) -> Result<F::Output, Stop> {
        tokio::pin!(fut);
        let mut refresh = tokio::time::interval(GAUGE_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(Stop::Shutdown),
                report = self.reports.recv() => self.on_report(report)?,
                out = &mut fut => return Ok(out),
                _ = refresh.tick() => self.publish_gauges(),
            }
        }
    }

    fn on_report(&mut self, report: Option<Report>) -> Result<(), Stop> {
        match report {
            None => Err(Stop::Error(FeedError::PipelineGone)),
            Some(Report::Failed { minute, error }) => {
                self.metrics.batches.with_label_values(&["failed"]).inc();
                if let Some(m) = minute {
                    warn!(batch = %m, error = %error, "batch failed; nothing of it is committed");
                }
                Err(Stop::Error(error.into()))
            }
            Some(Report::Committed { state, .. }) => {
                self.committed = state;
                self.progress
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.publish_gauges();
                Ok(())
            }
        }
    }

    fn publish_gauges(&self) {
        let m = &self.metrics;
        let now = self.clock.now();
        let window = FeedWindow::at(now, self.margin);
        let next = self.committed.next;
        m.committed_minute_timestamp.set(next.prev().unix_seconds());
        let horizon = unix_seconds(now) - 3600;
        m.lag_seconds.set((horizon - next.unix_seconds()).max(0));
        m.pending_minutes.set(window.pending_from(next));
        m.gaps_open.set(self.committed.gaps.len() as i64);
        m.gap_minutes_open.set(self.committed.gap_minute_count());
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Decides, minute by minute, what the pipeline publishes.
struct Walker {
    cfg: FeedConfig,
    clock: SharedClock,
    metrics: FeedMetrics,
    runs: MissingRuns,
    prefetch: Prefetcher,
    client: Arc<FeedClient>,
    jobs: mpsc::Sender<Job>,
    events: Events,
    /// The state after every job handed to the pipeline so far.
    planned: FeedState,
    next_gap_check: SystemTime,
    readiness: Readiness,
}

impl Walker {
    async fn run(&mut self) -> Result<(), Stop> {
        let mut not_available_delay = self.cfg.not_available_backoff;
        loop {
            let now = self.clock.now();
            let window = FeedWindow::at(now, self.cfg.window_edge_margin_minutes);
            self.events.publish_gauges();
            self.keep_inside_window(window).await?;

            if now >= self.next_gap_check {
                self.next_gap_check = now + self.cfg.gap_recheck_interval;
                self.recheck_gaps(window).await?;
                continue;
            }

            let minute = self.planned.next;
            if minute > window.newest {
                let mut wake = minute.available_at();
                if !self.planned.gaps.is_empty() {
                    wake = wake.min(self.next_gap_check);
                }
                let sleep = self.clock.sleep_until(wake);
                self.events.wait(sleep).await?;
                continue;
            }

            self.prefetch.fill(minute, window.newest);
            let fetched = self.events.wait(self.prefetch.take(minute)).await??;
            match fetched {
                Fetched::Batch {
                    spool,
                    download_seconds,
                } => {
                    not_available_delay = self.cfg.not_available_backoff;
                    if let Some(run) = self.runs.on_present() {
                        info!(run = %run, batch = %minute, "missing run ended: a batch is available again");
                    }
                    self.planned.next = minute.next();
                    self.update_run_gauges();
                    self.send(Job::Batch(BatchJob {
                        minute,
                        spool,
                        state: self.planned.clone(),
                        origin: Origin::Walk,
                        download_seconds,
                    }))
                    .await?;
                }
                Fetched::NotAvailableYet => {
                    self.prefetch.clear();
                    self.metrics
                        .fetch_retries
                        .with_label_values(&["not_available_yet"])
                        .inc();
                    info!(batch = %minute, retry_in = ?not_available_delay, "batch not available yet; waiting");
                    self.events
                        .wait(tokio::time::sleep(not_available_delay))
                        .await?;
                    not_available_delay = (not_available_delay * 2).min(Duration::from_secs(60));
                }
                Fetched::Missing => self.on_missing(minute).await?,
            }
        }
    }

    async fn send(&mut self, job: Job) -> Result<(), Stop> {
        match self.events.wait(self.jobs.send(job)).await? {
            Ok(()) => Ok(()),
            Err(_) => {
                // The pipeline has gone: its report says why.
                let report = self.events.reports.recv().await;
                self.events.on_report(report)?;
                Err(Stop::Error(FeedError::PipelineGone))
            }
        }
    }

    async fn send_state(&mut self, why: &'static str) -> Result<(), Stop> {
        self.update_run_gauges();
        self.send(Job::State {
            state: self.planned.clone(),
            why,
        })
        .await
    }

    /// Missing-run gauges, and readiness: a raised missing run is an error
    /// condition, so `/readyz` names it until the run ends.
    fn update_run_gauges(&self) {
        self.metrics.missing_run_minutes.set(self.runs.run_len());
        let raised = self.runs.raised();
        self.metrics.missing_run_alert.set(i64::from(raised));
        if raised {
            self.readiness.set_unready(
                "feed-missing-run",
                format!(
                    "{} consecutive minutes missing (threshold {})",
                    self.runs.run_len(),
                    self.cfg.missing_threshold
                ),
            );
        } else {
            self.readiness.set_ready("feed-missing-run");
        }
    }

    /// Skips forward when the position falls out of the 7-day window; expires old gaps.
    async fn keep_inside_window(&mut self, window: FeedWindow) -> Result<(), Stop> {
        let mut changed = false;
        if self.planned.next < window.oldest {
            let lost = MinuteRange::new(self.planned.next, window.oldest.prev());
            error!(
                lost = %lost,
                "the saved position is older than the 7-day window: these minutes can no longer be fetched and are lost; skipping to the oldest available minute"
            );
            self.metrics.gap_minutes_lost.inc_by(lost.len() as u64);
            self.planned.add_lost(lost, GapReason::WindowExpired);
            self.planned.next = window.oldest;
            self.runs.reset();
            self.prefetch.clear();
            changed = true;
        }
        for range in self.planned.expire_gaps(window.oldest) {
            error!(gap = %range, "gap left the 7-day window unrecovered; its minutes are lost");
            self.metrics.gap_minutes_lost.inc_by(range.len() as u64);
            changed = true;
        }
        if changed {
            self.send_state("window").await?;
        }
        Ok(())
    }

    async fn on_missing(&mut self, minute: Minute) -> Result<(), Stop> {
        self.metrics.batches.with_label_values(&["missing"]).inc();
        match self.runs.on_missing(minute) {
            OnMissing::Skip => {
                info!(batch = %minute, "no batch for this minute (404); skipped");
                self.planned.next = minute.next();
                self.update_run_gauges();
                Ok(())
            }
            OnMissing::ExtendGap(m) => {
                warn!(batch = %m, run = ?self.runs.run(), "still missing (404); added to the recorded gap");
                self.planned
                    .add_gap(MinuteRange::single(m), GapReason::MissingRun);
                self.planned.next = m.next();
                self.send_state("gap extended").await
            }
            OnMissing::ThresholdReached(run) => {
                self.update_run_gauges();
                error!(
                    run = %run,
                    threshold = self.cfg.missing_threshold,
                    policy = ?self.cfg.missing_policy,
                    "consecutive minutes missing (404): error condition raised"
                );
                self.prefetch.clear();
                self.apply_missing_policy(run).await
            }
        }
    }

    async fn apply_missing_policy(&mut self, run: MinuteRange) -> Result<(), Stop> {
        let deadline = match self.cfg.missing_policy {
            MissingPolicy::Gap => return self.record_gap(run).await,
            MissingPolicy::RecheckThenGap => Some(Instant::now() + self.cfg.missing_recheck_for),
            MissingPolicy::Halt => None,
        };
        let mut delay = self.cfg.missing_recheck_backoff;
        loop {
            if deadline.is_some_and(|d| Instant::now() + delay > d) {
                let left = deadline.map_or(Duration::ZERO, |d| {
                    d.saturating_duration_since(Instant::now())
                });
                if left.is_zero() {
                    return self.record_gap(run).await;
                }
                delay = left;
            }
            self.events.wait(tokio::time::sleep(delay)).await?;
            for m in run.iter() {
                let policy = RetryPolicy {
                    initial: self.cfg.retry_initial_backoff,
                    max: self.cfg.retry_max_backoff,
                };
                let fetch = fetch_with_retry(&self.client, m, policy, &self.metrics);
                if let Fetched::Batch {
                    spool,
                    download_seconds,
                } = self.events.wait(fetch).await??
                {
                    return self.resolve_run(run, m, spool, download_seconds).await;
                }
            }
            info!(run = %run, retry_in = ?delay, "missing run re-checked: still missing");
            delay = (delay * 2).min(
                self.cfg
                    .retry_max_backoff
                    .max(self.cfg.missing_recheck_backoff),
            );
        }
    }

    /// A batch of a missing run appeared: earlier minutes of the run become a gap.
    async fn resolve_run(
        &mut self,
        run: MinuteRange,
        found: Minute,
        spool: super::spool::Spool,
        download_seconds: f64,
    ) -> Result<(), Stop> {
        if found > run.first {
            let still_missing = MinuteRange::new(run.first, found.prev());
            warn!(gap = %still_missing, "recorded as a gap (re-checked later)");
            self.planned.add_gap(still_missing, GapReason::MissingRun);
        }
        info!(run = %run, batch = %found, "missing run resolved: a batch appeared");
        self.runs.reset();
        self.planned.next = found.next();
        self.update_run_gauges();
        self.send(Job::Batch(BatchJob {
            minute: found,
            spool,
            state: self.planned.clone(),
            origin: Origin::Walk,
            download_seconds,
        }))
        .await
    }

    async fn record_gap(&mut self, run: MinuteRange) -> Result<(), Stop> {
        error!(gap = %run, "missing run recorded as a gap; moving on (gaps are re-checked while inside the 7-day window)");
        self.planned.add_gap(run, GapReason::MissingRun);
        self.planned.next = run.last.next();
        self.runs.mark_recorded();
        self.send_state("gap recorded").await
    }

    /// Asks again for every gap minute still inside the window; publishes any that appeared.
    async fn recheck_gaps(&mut self, window: FeedWindow) -> Result<(), Stop> {
        let minutes: Vec<Minute> = self
            .planned
            .gap_minutes()
            .filter(|m| window.contains(*m))
            .collect();
        if minutes.is_empty() {
            return Ok(());
        }
        info!(minutes = minutes.len(), "re-checking recorded gaps");
        let policy = RetryPolicy {
            initial: self.cfg.retry_initial_backoff,
            max: self.cfg.retry_max_backoff,
        };
        for m in minutes {
            let fetch = fetch_with_retry(&self.client, m, policy, &self.metrics);
            if let Fetched::Batch {
                spool,
                download_seconds,
            } = self.events.wait(fetch).await??
            {
                info!(batch = %m, "a gap minute appeared; publishing it");
                self.planned.remove_gap_minute(m);
                self.send(Job::Batch(BatchJob {
                    minute: m,
                    spool,
                    state: self.planned.clone(),
                    origin: Origin::GapRecovery,
                    download_seconds,
                }))
                .await?;
            }
        }
        Ok(())
    }
}
