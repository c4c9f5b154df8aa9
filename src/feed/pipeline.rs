//! The publishing pipeline: downloaded batches in, Kafka transactions out.
//!
//! Two threads per pipeline. The decode thread takes jobs in order and
//! decodes each batch file on all cores ([`ParallelDecoder`]), passing
//! decoded chunks on through a bounded channel. The publish thread splits
//! them into lines, classifies each line and produces it, then commits.
//! While one batch commits, the next is already being decoded; the channel
//! bound (a few MB) is all the read-ahead there is.
//!
//! Delivery semantics (exactly-once): one Kafka transaction per job holds
//! every record and dead letter of the batch *and* the new state record
//! (position and gaps). A crash at any point before the commit leaves an
//! open transaction that the next `init_transactions` aborts, so the batch is
//! published again from the saved position and read_committed consumers see
//! it once. A crash after the commit resumes after the batch. At-least-once:
//! records are flushed and every delivery checked before the state record is
//! written; a crash in between publishes the batch again.
//!
//! Any failure ends the pipeline: the publish thread aborts the open
//! transaction, reports the failure and exits; jobs queued behind it are
//! dropped. The worker then restarts from its last committed state, so a
//! state computed on the assumption that an earlier job succeeded is never
//! committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, info};

use super::classify::{
    CONTENT_TYPE_JSON, DlqReason, HEADER_BATCH, HEADER_CONTENT_TYPE, HEADER_ID, HEADER_LINE,
    HEADER_SANDBOX, LineClassifier, RecordId, Verdict,
};
use super::decode::{BufferPool, DecodeError, ParallelDecoder};
use super::lines::{Line, LineSplitter};
use super::spool::Spool;
use super::state::FeedState;
use crate::kafka::producer::TxProducer;
use crate::metrics::{FeedMetrics, observe_stage};
use crate::minute::Minute;

/// Decoded chunks waiting between the decode and publish threads.
const CHUNK_QUEUE: usize = 8;
/// Serve delivery reports every this many records.
const SERVE_EVERY: u32 = 256;

/// Why a batch is being published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The next minute in order.
    Walk,
    /// A minute from a recorded gap that has appeared since.
    GapRecovery,
}

/// One unit of work; each is committed on its own.
#[derive(Debug)]
pub enum Job {
    Batch(BatchJob),
    /// Only the state changes (a gap recorded, a position moved past missing minutes).
    State {
        state: FeedState,
        why: &'static str,
    },
}

#[derive(Debug)]
pub struct BatchJob {
    pub minute: Minute,
    pub spool: Spool,
    /// The state to commit with this batch.
    pub state: FeedState,
    pub origin: Origin,
    pub download_seconds: f64,
}

/// What one committed batch held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchStats {
    pub lines: u64,
    pub records: u64,
    pub skipped: u64,
    pub dead: u64,
    pub dead_by_reason: Vec<(DlqReason, u64)>,
    pub compressed_bytes: u64,
    pub decoded_bytes: u64,
}

#[derive(Debug)]
pub enum Report {
    Committed {
        minute: Option<Minute>,
        origin: Option<Origin>,
        state: FeedState,
        stats: BatchStats,
    },
    Failed {
        minute: Option<Minute>,
        error: PipelineError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("batch file is not valid bzip2: {0}")]
    Corrupt(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("{0} record(s) were not delivered")]
    Undelivered(u64),
}

/// Settings the publish thread needs.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub topic: String,
    pub dlq_topic: String,
    pub state_topic: String,
    /// Key of this worker's state record.
    pub state_key: String,
    pub max_message_bytes: usize,
    pub decode_threads: usize,
    pub commit_timeout: Duration,
}

/// A running pipeline. Its reports come out of the receiver `start` returns.
pub struct Pipeline {
    pub jobs: mpsc::Sender<Job>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

enum Work {
    Begin(Box<BatchJob>, Instant),
    Chunk(Vec<u8>),
    End(Result<(), String>, Instant),
    State(FeedState, &'static str),
}

impl Pipeline {
    pub fn start(
        settings: PipelineSettings,
        producer: Arc<TxProducer>,
        metrics: FeedMetrics,
    ) -> (Pipeline, mpsc::UnboundedReceiver<Report>) {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(1);
        let (work_tx, work_rx) = bounded::<Work>(CHUNK_QUEUE);
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let decoder = ParallelDecoder::new(settings.decode_threads);
        let buffers = decoder.buffers();
        let decode = std::thread::Builder::new()
            .name("feed-decode".into())
            .spawn(move || decode_loop(decoder, jobs_rx, work_tx))
            .expect("spawn decode thread");
        let publisher = Publisher {
            classifier: LineClassifier::new(settings.max_message_bytes),
            buffers,
            settings,
            producer,
            metrics,
            reports: reports_tx,
            stop: stop.clone(),
            in_transaction: std::cell::Cell::new(false),
        };
        let publish = std::thread::Builder::new()
            .name("feed-publish".into())
            .spawn(move || publisher.run(work_rx))
            .expect("spawn publish thread");
        let pipeline = Pipeline {
            jobs: jobs_tx,
            stop,
            threads: vec![decode, publish],
        };
        (pipeline, reports_rx)
    }

    /// Stops the pipeline: an open transaction is aborted, queued jobs dropped.
    /// Blocks until both threads have exited.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.jobs);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn decode_loop(decoder: ParallelDecoder, mut jobs: mpsc::Receiver<Job>, work: Sender<Work>) {
    while let Some(job) = jobs.blocking_recv() {
        let sent = match job {
            Job::State { state, why } => work.send(Work::State(state, why)).is_ok(),
            Job::Batch(b) => {
                let reader = b.spool.reader();
                if work.send(Work::Begin(Box::new(b), Instant::now())).is_err() {
                    return;
                }
                let result = decoder.decode(reader, |chunk| work.send(Work::Chunk(chunk)));
                let end = match result {
                    Ok(_) => Ok(()),
                    Err(DecodeError::Stopped(_)) => return,
                    Err(e) => Err(e.to_string()),
                };
                work.send(Work::End(end, Instant::now())).is_ok()
            }
        };
        if !sent {
            return;
        }
    }
}

struct Publisher {
    settings: PipelineSettings,
    classifier: LineClassifier,
    /// Where published chunks go back to the decoder.
    buffers: Arc<BufferPool>,
    producer: Arc<TxProducer>,
    metrics: FeedMetrics,
    reports: mpsc::UnboundedSender<Report>,
    stop: Arc<AtomicBool>,
    /// A transaction is open (exactly-once only).
    in_transaction: std::cell::Cell<bool>,
}

/// The batch being published.
struct Open {
    job: Box<BatchJob>,
    splitter: LineSplitter,
    stats: BatchStats,
    decode_started: Instant,
    publish_seconds: f64,
    unserved: u32,
}

impl Publisher {
    fn run(self, work: Receiver<Work>) {
        let mut open: Option<Open> = None;
        for item in work {
            let stopping = self.stop.load(Ordering::SeqCst);
            let result = if stopping {
                Err(Halt::Quiet)
            } else {
                self.handle(item, &mut open)
            };
            if let Err(error) = result {
                self.abort();
                if let Halt::Failed(error) = error {
                    let minute = open.as_ref().map(|o| o.job.minute);
                    let _ = self.reports.send(Report::Failed { minute, error });
                }
                return;
            }
        }
        self.abort();
    }

    /// Aborts the open transaction, if any.
    fn abort(&self) {
        if self.in_transaction.replace(false) {
            self.producer.abort(self.settings.commit_timeout);
            self.metrics.transaction_aborts.inc();
        }
    }

    fn handle(&self, item: Work, open: &mut Option<Open>) -> Result<(), Halt> {
        match item {
            Work::Begin(job, started) => {
                self.begin()?;
                *open = Some(Open {
                    stats: BatchStats {
                        compressed_bytes: job.spool.len(),
                        ..BatchStats::default()
                    },
                    job,
                    splitter: LineSplitter::new(self.classifier.line_limit()),
                    decode_started: started,
                    publish_seconds: 0.0,
                    unserved: 0,
                });
                Ok(())
            }
            Work::Chunk(chunk) => {
                let o = open.as_mut().ok_or(Halt::Quiet)?;
                let t = Instant::now();
                o.stats.decoded_bytes += chunk.len() as u64;
                let job = &o.job;
                let stats = &mut o.stats;
                let unserved = &mut o.unserved;
                o.splitter.push(&chunk, |line| {
                    self.publish_line(job.minute, &line, stats, unserved)
                })?;
                o.publish_seconds += t.elapsed().as_secs_f64();
                self.buffers.give(chunk);
                Ok(())
            }
            Work::End(result, decoded_at) => {
                let o = open.as_mut().ok_or(Halt::Quiet)?;
                result.map_err(|e| Halt::Failed(PipelineError::Corrupt(e)))?;
                let minute = o.job.minute;
                let (stats, unserved) = (&mut o.stats, &mut o.unserved);
                o.splitter
                    .finish(|line| self.publish_line(minute, &line, stats, unserved))?;
                let stage =
                    |name, seconds| observe_stage(&self.metrics.stage_seconds, name, seconds);
                stage("download", o.job.download_seconds);
                stage(
                    "decode",
                    decoded_at.duration_since(o.decode_started).as_secs_f64(),
                );
                stage("publish", o.publish_seconds);
                let commit_started = Instant::now();
                self.commit(&o.job.state)?;
                let commit_seconds = commit_started.elapsed().as_secs_f64();
                stage("commit", commit_seconds);
                let Some(o) = open.take() else {
                    return Err(Halt::Quiet);
                };
                self.account(&o.stats, o.job.origin);
                info!(
                    batch = %minute,
                    origin = ?o.job.origin,
                    records = o.stats.records,
                    dlq = o.stats.dead,
                    skipped = o.stats.skipped,
                    compressed_bytes = o.stats.compressed_bytes,
                    decoded_bytes = o.stats.decoded_bytes,
                    duration_ms = ((o.job.download_seconds + o.decode_started.elapsed().as_secs_f64()) * 1000.0) as u64,
                    commit_ms = (commit_seconds * 1000.0) as u64,
                    "batch published"
                );
                let _ = self.reports.send(Report::Committed {
                    minute: Some(minute),
                    origin: Some(o.job.origin),
                    state: o.job.state,
                    stats: o.stats,
                });
                Ok(())
            }
            Work::State(state, why) => {
                self.begin()?;
                self.commit(&state)?;
                debug!(next = %state.next, why, "state committed");
                let _ = self.reports.send(Report::Committed {
                    minute: None,
                    origin: None,
                    state,
                    stats: BatchStats::default(),
                });
                Ok(())
            }
        }
    }

    fn begin(&self) -> Result<(), Halt> {
        if self.producer.is_transactional() {
            self.producer.begin()?;
            self.in_transaction.set(true);
        }
        Ok(())
    }

    /// Writes the state record and makes the whole job durable.
    fn commit(&self, state: &FeedState) -> Result<(), PipelineError> {
        let timeout = self.settings.commit_timeout;
        match self.producer.is_transactional() {
            true => {
                self.send_state(state)?;
                self.producer.commit(timeout)?;
                self.in_transaction.set(false);
            }
            false => {
                let before = self.producer.delivery_errors();
                self.producer.flush(timeout)?;
                self.check_delivered(before)?;
                self.send_state(state)?;
                self.producer.flush(timeout)?;
                self.check_delivered(before)?;
            }
        }
        Ok(())
    }

    fn check_delivered(&self, errors_before: u64) -> Result<(), PipelineError> {
        match self.producer.delivery_errors() - errors_before {
            0 => Ok(()),
            n => Err(PipelineError::Undelivered(n)),
        }
    }

    fn send_state(&self, state: &FeedState) -> Result<(), PipelineError> {
        let value = state.encode();
        let record = BaseRecord::to(&self.settings.state_topic)
            .key(self.settings.state_key.as_bytes())
            .payload(&value[..]);
        Ok(self.producer.send(record)?)
    }

    fn account(&self, stats: &BatchStats, origin: Origin) {
        let m = &self.metrics;
        m.records.inc_by(stats.records);
        for (reason, n) in &stats.dead_by_reason {
            m.dlq_records
                .with_label_values(&[reason.as_str()])
                .inc_by(*n);
        }
        m.decoded_bytes.inc_by(stats.decoded_bytes);
        let outcome = match origin {
            Origin::Walk => "published",
            Origin::GapRecovery => "recovered",
        };
        m.batches.with_label_values(&[outcome]).inc();
    }

    fn publish_line(
        &self,
        minute: Minute,
        line: &Line<'_>,
        stats: &mut BatchStats,
        unserved: &mut u32,
    ) -> Result<(), Halt> {
        stats.lines += 1;
        match self.classifier.classify(line) {
            Verdict::Skip => stats.skipped += 1,
            Verdict::Record(id) => {
                let Line::Whole { number, bytes } = *line else {
                    return Err(Halt::Quiet);
                };
                self.send_record(minute, number, bytes, &id)?;
                stats.records += 1;
            }
            Verdict::Dead(reason) => {
                self.send_dead_letter(minute, line, reason)?;
                stats.dead += 1;
                match stats.dead_by_reason.iter_mut().find(|(r, _)| *r == reason) {
                    Some((_, n)) => *n += 1,
                    None => stats.dead_by_reason.push((reason, 1)),
                }
            }
        }
        *unserved += 1;
        if *unserved >= SERVE_EVERY {
            *unserved = 0;
            self.producer.serve();
        }
        Ok(())
    }

    fn send_record(
        &self,
        minute: Minute,
        number: u64,
        value: &[u8],
        id: &RecordId<'_>,
    ) -> Result<(), Halt> {
        let batch = minute.to_string();
        let line_no = number.to_string();
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(header(HEADER_ID, id.id.as_bytes()))
            .insert(header(HEADER_SANDBOX, id.sandbox_name().as_bytes()))
            .insert(header(HEADER_BATCH, batch.as_bytes()))
            .insert(header(HEADER_LINE, line_no.as_bytes()))
            .insert(header(HEADER_CONTENT_TYPE, CONTENT_TYPE_JSON.as_bytes()));
        let record = BaseRecord::to(&self.settings.topic)
            .key(id.sha256().as_bytes())
            .payload(value)
            .headers(headers)
            .timestamp(minute.unix_millis());
        Ok(self.producer.send(record)?)
    }

    fn send_dead_letter(
        &self,
        minute: Minute,
        line: &Line<'_>,
        reason: DlqReason,
    ) -> Result<(), Halt> {
        let (number, size, digest, kept) = match *line {
            Line::Whole { number, bytes } => (
                number,
                bytes.len() as u64,
                Sha256::digest(bytes).into(),
                bytes,
            ),
            Line::Oversize {
                number,
                size,
                sha256,
                prefix,
            } => (number, size, sha256, prefix),
        };
        let digest: [u8; 32] = digest;
        let value = &kept[..kept.len().min(self.classifier.dlq_value_limit())];
        let batch = minute.to_string();
        let line_no = number.to_string();
        let size = size.to_string();
        let sha = hex::encode(digest);
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(header("dlq.reason", reason.as_str().as_bytes()))
            .insert(header(HEADER_BATCH, batch.as_bytes()))
            .insert(header(HEADER_LINE, line_no.as_bytes()))
            .insert(header("dlq.size", size.as_bytes()))
            .insert(header("dlq.sha256", sha.as_bytes()));
        let record = BaseRecord::<[u8], [u8]>::to(&self.settings.dlq_topic)
            .payload(value)
            .headers(headers)
            .timestamp(minute.unix_millis());
        Ok(self.producer.send(record)?)
    }
}

fn header<'a>(key: &'a str, value: &'a [u8]) -> Header<'a, &'a [u8]> {
    Header {
        key,
        value: Some(value),
    }
}

/// Why the publish thread stops.
enum Halt {
    /// The pipeline is being stopped: abort quietly.
    Quiet,
    /// A failure to report.
    Failed(PipelineError),
}

impl From<PipelineError> for Halt {
    fn from(e: PipelineError) -> Self {
        Halt::Failed(e)
    }
}

impl From<KafkaError> for Halt {
    fn from(e: KafkaError) -> Self {
        Halt::Failed(PipelineError::Kafka(e))
    }
}
