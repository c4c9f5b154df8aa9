//! The Kafka side of the rescan consumer: take requests, commit results.
//!
//! One thread owns the group consumer and the transactional producer. Each
//! request message is taken in (validated, deduplicated) and either finished
//! at once or handed to the executor; outcomes come back in any order and
//! are recorded in the [`Ledger`].
//!
//! Delivery semantics: every `commit_interval`, one Kafka transaction holds,
//! per partition, exactly the contiguous run of finished requests — their
//! results (and dead letters and stored outcomes) — and the consumer offsets
//! just past them (`send_offsets_to_transaction`, so the group's offsets and
//! the results commit or abort together). A crash at any point leaves either
//! a committed transaction or none: the uncommitted requests are consumed
//! again and their results are published once. The API call itself is
//! at-least-once: a crash between a call and its commit repeats the call
//! (the window is one `commit_interval` plus the call).
//!
//! Rebalances: before partitions are revoked, whatever is finished is
//! committed and the revoked partitions are forgotten, so an outcome that
//! arrives later is dropped instead of being committed by an instance that no
//! longer owns the partition. Newly assigned partitions are taken only after
//! the outcome store has caught up with the outcomes topic.
//!
//! Backpressure: when `max_buffered` requests are taken and not committed,
//! the thread stops taking requests and only waits for outcomes, leaving the
//! rest in librdkafka's fetch queue. If that lasts [`HOLD_LIMIT`], or while
//! the credentials gate is closed, the assigned partitions are paused and the
//! thread polls again, so the group never evicts it for exceeding
//! `max.poll.interval.ms` however slow the API is. (Pausing at once would be
//! simpler but slow: librdkafka drops a paused partition's fetched messages
//! and fetches them again on resume, after the broker has answered the
//! previous long-poll fetch — up to `fetch.wait.max.ms` without requests at
//! every pause, which at full speed is several times a second.)

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc as tmpsc, watch};
use tracing::{debug, error, info, warn};

use super::intake::{Intake, IntakeRules, OutRecord, RequestMessage, ResultRoute, intake};
use super::ledger::Ledger;
use super::outcomes::{OutcomeTail, StoredOutcome};
use super::request::{AllowedValues, RescanRequest, RescanUrl};
use super::result::{MessageOrigin, RescanResult, Status, Timing};
use crate::kafka::producer::TxProducer;
use crate::metrics::RescanMetrics;

/// How long the thread may stop taking requests (the buffer is full) without
/// polling the group consumer; rebalances wait at most this long. Beyond it
/// the partitions are paused, and polled again.
const HOLD_LIMIT: Duration = Duration::from_secs(1);

/// A call for the executor.
#[derive(Debug)]
pub struct CallJob {
    pub origin: MessageOrigin,
    pub epoch: u64,
    pub request: Box<RescanRequest>,
    pub url: RescanUrl,
    pub received_at: SystemTime,
}

/// The executor's answer to a [`CallJob`].
#[derive(Debug)]
pub struct Completion {
    pub origin: MessageOrigin,
    pub epoch: u64,
    pub result: RescanResult,
}

/// What a finished request adds to the transaction that commits it.
#[derive(Debug)]
struct Finished {
    records: Vec<OutRecord>,
    /// `(request_id, outcome)` for the outcomes topic.
    outcome: Option<(String, StoredOutcome)>,
    status: Status,
    kind: Option<&'static str>,
    duplicate: bool,
}

/// A request waiting for another with the same `request_id` to finish.
#[derive(Debug)]
struct Waiter {
    origin: MessageOrigin,
    epoch: u64,
    received_at: SystemTime,
    request: Box<RescanRequest>,
    url: RescanUrl,
    route: ResultRoute,
}

/// A request whose call is under way, and the duplicates waiting for it.
#[derive(Debug)]
struct InFlight {
    origin: MessageOrigin,
    waiters: Vec<Waiter>,
}

#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub requests_topic: String,
    pub outcomes_topic: String,
    pub rules: IntakeRules,
    pub commit_interval: Duration,
    pub max_buffered: usize,
    pub operation_timeout: Duration,
}

/// Everything but the consumer itself; shared with the rebalance callbacks.
pub struct Core {
    settings: ConsumerSettings,
    producer: Arc<TxProducer>,
    ledger: Ledger<Finished>,
    /// Per partition, which assignment a request belongs to.
    epochs: HashMap<i32, u64>,
    next_epoch: u64,
    outcomes: OutcomeTail,
    in_flight: HashMap<String, InFlight>,
    routes: HashMap<(i32, i64), ResultRoute>,
    allowed: AllowedValues,
    jobs: tmpsc::UnboundedSender<CallJob>,
    metrics: RescanMetrics,
    last_commit: Instant,
    /// Set by a callback that failed; the thread stops with it.
    failure: Option<KafkaError>,
    /// Newly assigned partitions must get the current pause state.
    pause_stale: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("the executor has stopped")]
    ExecutorGone,
}

impl Core {
    pub fn new(
        settings: ConsumerSettings,
        producer: Arc<TxProducer>,
        outcomes: OutcomeTail,
        allowed: AllowedValues,
        jobs: tmpsc::UnboundedSender<CallJob>,
        metrics: RescanMetrics,
    ) -> Core {
        Core {
            settings,
            producer,
            ledger: Ledger::default(),
            epochs: HashMap::new(),
            next_epoch: 1,
            outcomes,
            in_flight: HashMap::new(),
            routes: HashMap::new(),
            allowed,
            jobs,
            metrics,
            last_commit: Instant::now(),
            failure: None,
            pause_stale: true,
        }
    }

    fn assigned(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.epochs.insert(*p, self.next_epoch);
            self.next_epoch += 1;
        }
        self.pause_stale = true;
        // A request moved here from another instance may repeat one that
        // instance answered: know its outcomes before taking requests.
        if let Err(e) = self.outcomes.catch_up(self.settings.operation_timeout) {
            warn!(error = %e, "outcome store did not catch up; duplicates from other instances may be called again");
        }
    }

    fn revoked(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.epochs.remove(p);
            let dropped = self.ledger.forget(*p);
            self.routes.retain(|(rp, _), _| rp != p);
            if dropped > 0 {
                info!(
                    partition = p,
                    dropped, "partition revoked; its unfinished requests go to the new owner"
                );
            }
        }
        // Duplicates waiting on a request of a revoked partition: call them themselves.
        let orphaned: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, f)| partitions.contains(&f.origin.partition))
            .map(|(id, _)| id.clone())
            .collect();
        for id in orphaned {
            if let Some(f) = self.in_flight.remove(&id) {
                for w in f
                    .waiters
                    .into_iter()
                    .filter(|w| !partitions.contains(&w.origin.partition))
                {
                    self.dispatch(w);
                }
            }
        }
        self.metrics.buffered.set(self.ledger.len() as i64);
    }

    /// Takes one request message in.
    fn take(&mut self, msg: RequestMessage) -> Result<(), ConsumerError> {
        let p = msg.origin.partition;
        let Some(&epoch) = self.epochs.get(&p) else {
            return Ok(()); // a message of a partition no longer ours
        };
        let now = SystemTime::now();
        match intake(&msg, &self.allowed, &self.settings.rules, now) {
            Intake::Done { result, records } => {
                let finished = finished(result, records, None, false);
                self.ledger.finished(p, msg.origin.offset, finished);
            }
            Intake::Call {
                request,
                url,
                delivery,
            } => {
                let waiter = Waiter {
                    origin: msg.origin.clone(),
                    epoch,
                    received_at: msg.received_at,
                    request,
                    url,
                    route: delivery,
                };
                self.ledger.pending(p, msg.origin.offset);
                self.admit(waiter, now)?;
            }
        }
        self.metrics.buffered.set(self.ledger.len() as i64);
        Ok(())
    }

    /// Answers a repeated `request_id` from the store, waits for an identical
    /// call under way, or makes the call.
    fn admit(&mut self, w: Waiter, now: SystemTime) -> Result<(), ConsumerError> {
        if let Some(id) = w.request.request_id().map(str::to_string) {
            if let Some(stored) = self.outcomes.store.get(&id, now) {
                let result = replay(stored, w.received_at, now);
                let records = vec![w.route.record(&result)];
                let finished = finished(result, records, None, true);
                self.ledger
                    .finish(w.origin.partition, w.origin.offset, finished);
                return Ok(());
            }
            if let Some(f) = self.in_flight.get_mut(&id) {
                f.waiters.push(w);
                return Ok(());
            }
            self.in_flight.insert(
                id,
                InFlight {
                    origin: w.origin.clone(),

                    waiters: Vec::new(),
                },
            );
        }
        self.dispatch(w);
        if self.jobs.is_closed() {
            return Err(ConsumerError::ExecutorGone);
        }
        Ok(())
    }

    fn dispatch(&mut self, w: Waiter) {
        self.routes
            .insert((w.origin.partition, w.origin.offset), w.route);
        let _ = self.jobs.send(CallJob {
            origin: w.origin,
            epoch: w.epoch,
            request: w.request,
            url: w.url,
            received_at: w.received_at,
        });
    }

    /// Records an outcome from the executor.
    fn complete(&mut self, c: Completion) {
        let (p, o) = (c.origin.partition, c.origin.offset);
        let Some(route) = self.routes.remove(&(p, o)) else {
            return;
        };
        if self.epochs.get(&p) != Some(&c.epoch) {
            return; // revoked (and maybe re-assigned) meanwhile
        }
        let id = c.result.request_id().to_string();
        // Only requests that carried a request_id are tracked in flight and
        // remembered: an id made up from the message position never repeats.
        let explicit_id = self.in_flight.contains_key(&id);
        let stores =
            explicit_id && matches!(c.result.status(), Status::Accepted | Status::Rejected);
        let waiters = match self.in_flight.remove(&id) {
            Some(f) if f.origin == c.origin => f.waiters,
            Some(other) => {
                self.in_flight.insert(id.clone(), other);
                Vec::new()
            }
            None => Vec::new(),
        };
        let stored = stores.then(|| StoredOutcome {
            origin: c.origin.to_string(),
            completed_at_ms: unix_ms(SystemTime::now()),
            result: serde_json::from_slice(&c.result.to_bytes()).unwrap_or_default(),
        });
        let records = vec![route.record(&c.result)];
        let outcome = stored.clone().map(|s| (id.clone(), s));
        self.ledger
            .finish(p, o, finished(c.result, records, outcome, false));
        let now = SystemTime::now();
        match stored {
            Some(s) => {
                for w in waiters {
                    let result = replay(&s, w.received_at, now);
                    let records = vec![w.route.record(&result)];
                    self.ledger.finish(
                        w.origin.partition,
                        w.origin.offset,
                        finished(result, records, None, true),
                    );
                }
            }
            None => {
                // The original failed after retries: the duplicates try again themselves.
                let mut waiters = waiters.into_iter();
                if let Some(first) = waiters.next() {
                    self.in_flight.insert(
                        id,
                        InFlight {
                            origin: first.origin.clone(),

                            waiters: waiters.collect(),
                        },
                    );
                    self.dispatch(first);
                }
            }
        }
    }

    fn commit_due(&self) -> bool {
        self.ledger.finished_count() > 0
            && (self.last_commit.elapsed() >= self.settings.commit_interval
                || self.ledger.finished_count() >= 1000)
    }

    /// Commits every partition's finished run with its offsets, in one transaction.
    fn commit(&mut self, group: &ConsumerGroupMetadata) -> Result<usize, KafkaError> {
        self.last_commit = Instant::now();
        let runs = self.ledger.committable();
        if runs.is_empty() {
            return Ok(0);
        }
        let timeout = self.settings.operation_timeout;
        let producer = &self.producer;
        producer.begin()?;
        let mut offsets = TopicPartitionList::new();
        let mut done: Vec<(i32, i64)> = Vec::new();
        let mut count = 0;
        let sent = (|| -> Result<(), KafkaError> {
            for (p, run) in &runs {
                for (_, f) in run {
                    for r in &f.records {
                        send(producer, r)?;
                    }
                    if let Some((id, stored)) = &f.outcome {
                        let value = stored.encode();
                        let record = BaseRecord::<[u8], [u8]>::to(&self.settings.outcomes_topic)
                            .key(id.as_bytes())
                            .payload(&value[..]);
                        producer.send(record)?;
                    }
                    count += 1;
                }
                let last = run.last().map_or(0, |(o, _)| *o);
                offsets.add_partition_offset(
                    &self.settings.requests_topic,
                    *p,
                    Offset::Offset(last + 1),
                )?;
                done.push((*p, last));
            }
            producer
                .inner
                .send_offsets_to_transaction(&offsets, group, timeout)?;
            producer.commit(timeout)
        })();
        if let Err(e) = sent {
            producer.abort(timeout);
            self.metrics.transaction_aborts.inc();
            return Err(e);
        }
        for (p, run) in &runs {
            for (_, f) in run {
                self.metrics.count_result(f.status.as_str(), f.kind);
                if f.duplicate {
                    self.metrics.duplicates.inc();
                }
                if f.records
                    .iter()
                    .any(|r| r.topic == self.settings.rules.dlq_topic)
                {
                    self.metrics.dlq_records.inc();
                }
                if let Some((id, stored)) = &f.outcome {
                    self.outcomes.store.insert(id.clone(), stored.clone());
                }
            }
            debug!(partition = p, results = run.len(), "results committed");
        }
        drop(runs);
        for (p, last) in done {
            self.ledger.committed(p, last);
        }
        self.metrics.buffered.set(self.ledger.len() as i64);
        Ok(count)
    }
}

fn finished(
    result: RescanResult,
    records: Vec<OutRecord>,
    outcome: Option<(String, StoredOutcome)>,
    duplicate: bool,
) -> Finished {
    Finished {
        status: result.status(),
        kind: result.error().map(|e| e.kind.as_str()),
        records,
        outcome,
        duplicate,
    }
}

/// A stored outcome answered again for a repeated request.
fn replay(stored: &StoredOutcome, received_at: SystemTime, now: SystemTime) -> RescanResult {
    RescanResult::replayed(
        &stored.result,
        &stored.origin,
        Timing {
            received_at,
            completed_at: now,
        },
    )
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn send(producer: &TxProducer, r: &OutRecord) -> Result<(), KafkaError> {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(v.as_slice()),
        });
    }
    let mut record = BaseRecord::<[u8], [u8]>::to(&r.topic)
        .payload(&r.value[..])
        .headers(headers);
    if let Some(k) = &r.key {
        record = record.key(&k[..]);
    }
    producer.send(record)
}

/// Rebalance callbacks: commit what is finished, forget revoked partitions.
pub struct RescanContext {
    pub core: Arc<Mutex<Core>>,
    pub topic: String,
}

impl ClientContext for RescanContext {}

impl ConsumerContext for RescanContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let partitions = partitions_of(tpl, &self.topic);
        let mut core = self.core.lock().expect("core lock");
        if let Some(group) = consumer.group_metadata()
            && let Err(e) = core.commit(&group)
        {
            warn!(error = %e, "could not commit before giving partitions up; their requests are taken again by the new owner");
            if crate::kafka::producer::classify_kafka_error(&e, core.producer.fatal_cause())
                != crate::kafka::producer::KafkaFailure::Retryable
            {
                core.failure = Some(e);
            }
        }
        core.revoked(&partitions);
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions = partitions_of(tpl, &self.topic);
            info!(?partitions, "partitions assigned");
            self.core.lock().expect("core lock").assigned(&partitions);
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect()
}

/// Runs the consumer until `stop` is set (Ok) or a Kafka error needs a restart (Err).
pub fn run(
    consumer: BaseConsumer<RescanContext>,
    completions: mpsc::Receiver<Completion>,
    gate: watch::Receiver<Option<String>>,
    stop: Arc<AtomicBool>,
) -> Result<(), ConsumerError> {
    let core = consumer.context().core.clone();
    let topic = consumer.context().topic.clone();
    let mut paused = false;
    // Since when `max_buffered` requests are taken and not committed.
    let mut full_since: Option<Instant> = None;
    let mut last_lag = Instant::now();
    let result = (|| -> Result<(), ConsumerError> {
        while !stop.load(Ordering::SeqCst) {
            let hold = {
                let mut c = core.lock().expect("core lock");
                if let Some(e) = c.failure.take() {
                    return Err(e.into());
                }
                while let Ok(done) = completions.try_recv() {
                    c.complete(done);
                }
                if c.commit_due()
                    && let Some(group) = consumer.group_metadata()
                {
                    c.commit(&group)?;
                }
                c.outcomes.poll()?;
                let buffered = c.ledger.len();
                let full = buffered >= c.settings.max_buffered;
                full_since = if full {
                    full_since.or_else(|| Some(Instant::now()))
                } else {
                    None
                };
                let want_pause = gate.borrow().is_some()
                    || full_since.is_some_and(|t| t.elapsed() >= HOLD_LIMIT);
                let resume_ok = gate.borrow().is_none() && buffered <= c.settings.max_buffered / 2;
                if (want_pause && (!paused || c.pause_stale)) || (paused && resume_ok) {
                    let assignment = consumer.assignment()?;
                    if want_pause {
                        consumer.pause(&assignment)?;
                        paused = true;
                    } else {
                        consumer.resume(&assignment)?;
                        paused = false;
                    }
                    c.pause_stale = false;
                }
                c.metrics.paused.set(i64::from(gate.borrow().is_some()));
                full && !paused
            };
            if last_lag.elapsed() >= Duration::from_secs(5) {
                last_lag = Instant::now();
                let (metrics, producer) = {
                    let c = core.lock().expect("core lock");
                    (c.metrics.clone(), c.producer.clone())
                };
                report_lag(&consumer, &producer, &topic, &metrics);
            }
            if hold {
                // The buffer is full: wait for an outcome, not for a request.
                match completions.recv_timeout(Duration::from_millis(10)) {
                    Ok(done) => core.lock().expect("core lock").complete(done),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    // Every call has ended and the dispatcher is gone: do not spin.
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                continue;
            }
            let timeout = Duration::from_millis(if paused { 50 } else { 10 });
            if let Some(m) = consumer.poll(timeout) {
                let m = m?;
                let msg = RequestMessage {
                    origin: MessageOrigin {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                    },
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or_default().to_vec(),
                    headers: m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    received_at: SystemTime::now(),
                };
                core.lock().expect("core lock").take(msg)?;
            }
        }
        // Stopping: commit what is finished; the rest is taken again after a restart.
        let mut c = core.lock().expect("core lock");
        while let Ok(done) = completions.try_recv() {
            c.complete(done);
        }
        if let Some(group) = consumer.group_metadata() {
            c.commit(&group)?;
        }
        Ok(())
    })();
    if let Err(e) = &result {
        error!(error = %e, "rescan consumer stopped");
    }
    consumer.unsubscribe();
    result
}

/// Records behind the high watermark, per partition owned.
///
/// The watermarks are asked through the producer's connection: on the group
/// consumer's, the broker answers them only after the long-poll fetch ahead
/// of them (up to `fetch.wait.max.ms` each), which stalled this thread for
/// seconds.
fn report_lag(
    consumer: &BaseConsumer<RescanContext>,
    producer: &TxProducer,
    topic: &str,
    metrics: &RescanMetrics,
) {
    let (Ok(assignment), Ok(position)) = (consumer.assignment(), consumer.position()) else {
        return;
    };
    let mut sum = 0;
    metrics.consumer_lag.reset();
    for e in assignment.elements_for_topic(topic) {
        let p = e.partition();
        let Ok((_, high)) =
            producer
                .inner
                .client()
                .fetch_watermarks(topic, p, Duration::from_secs(1))
        else {
            continue;
        };
        let at = match position.find_partition(topic, p).map(|x| x.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => continue,
        };
        let lag = (high - at).max(0);
        sum += lag;
        metrics
            .consumer_lag
            .with_label_values(&[&p.to_string()])
            .set(lag);
    }
    metrics.consumer_lag_sum.set(sum);
}

/// The partitions as a set (for tests and logs).
pub fn partition_set(tpl: &TopicPartitionList, topic: &str) -> HashSet<i32> {
    partitions_of(tpl, topic).into_iter().collect()
}
