//! The feed worker in-process against a real Kafka broker and the simulator
//! (port 0, with a manual clock shared by both). Every read of a topic is
//! read_committed.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sandbox_bridge::clock::{ManualClock, SharedClock};
use sandbox_bridge::feed::FeedError;
use sandbox_bridge::feed::api::FetchError;
use sandbox_bridge::feed::state::GapReason;
use sandbox_bridge::minute::{Minute, MinuteRange};
use sandbox_bridge::sim::vt::{
    BatchSettings, FaultKind, FaultRule, FeedSimHandle, FeedSimSettings, FeedSimulator, MinuteSet,
};
use sha2::{Digest, Sha256};

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start_sim(settings: FeedSimSettings, clock: SharedClock) -> FeedSimHandle {
    FeedSimulator::start(settings, clock, any_port(), any_port())
        .await
        .expect("simulator starts")
}

fn sim_settings(batches: BatchSettings) -> FeedSimSettings {
    FeedSimSettings {
        api_key: API_KEY.to_string(),
        batches,
        ..FeedSimSettings::default()
    }
}

struct Setup {
    clock: ManualClock,
    sim: FeedSimHandle,
    names: Names,
    start: Minute,
    newest: Minute,
}

async fn setup(test: &str, settings: FeedSimSettings, backlog_minutes: i64) -> Setup {
    let now = test_now();
    let clock = ManualClock::new(now);
    let sim = start_sim(settings, Arc::new(clock.clone())).await;
    let newest = newest_at(now);
    Setup {
        clock,
        sim,
        names: Names::new(test),
        start: newest.plus(1 - backlog_minutes),
        newest,
    }
}

impl Setup {
    fn config(&self, extra: &str) -> sandbox_bridge::config::Config {
        parse_config(&config_text(
            &bootstrap(),
            &self.sim.base_url(),
            &self.names,
            self.start,
            extra,
        ))
    }

    fn worker(&self, extra: &str) -> RunningWorker {
        spawn_worker(self.config(extra), Arc::new(self.clock.clone()))
    }
}

fn assert_topic_holds(
    s: &Setup,
    batches: &BatchSettings,
    published: impl IntoIterator<Item = Minute>,
) {
    let want = expected(batches, published);
    let got = read_all(&bootstrap(), &s.names.topic);
    assert_eq!(
        got.len(),
        want.records.len(),
        "record count on the feed topic"
    );
    assert_eq!(actual_records(&got), want.records, "feed topic content");
    for r in &got {
        let batch = Minute::parse(r.header("vt.batch").unwrap()).unwrap();
        assert_eq!(
            r.timestamp,
            Some(batch.unix_millis()),
            "record timestamp is the batch minute"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_exactly_the_valid_records_and_dead_letters_the_rest() {
    let now_newest = newest_at(test_now());
    let missing_single = now_newest.plus(-5);
    let bad = MinuteSet::ranges([MinuteRange::new(now_newest.plus(-7), now_newest.plus(-6))]);
    let mut batches = BatchSettings::exact(11, 6);
    batches.bad_lines = bad;
    batches.empty_lines = MinuteSet::minute(now_newest.plus(-3));
    batches.multi_stream = MinuteSet::minute(now_newest.plus(-2));
    batches.oversize_line_bytes = 300 * 1024;
    let mut settings = sim_settings(batches.clone());
    settings.missing = MinuteSet::minute(missing_single);
    let s = setup("exact-set", settings, 10).await;
    assert_eq!(
        s.newest, now_newest,
        "test straddled a minute boundary; rerun"
    );

    let w = s.worker("max_message_bytes = 262144");
    w.wait_committed_through(s.newest).await;
    w.stop().await.unwrap();

    let published: Vec<Minute> = minutes(s.start, s.newest)
        .filter(|m| *m != missing_single)
        .collect();
    assert_topic_holds(&s, &batches, published.iter().copied());

    // The DLQ holds exactly the bad lines, with their headers.
    let want = expected(&batches, published.iter().copied()).dead;
    assert_eq!(want.len(), 2 * 9, "one of each bad kind in two minutes");
    let got = read_all(&bootstrap(), &s.names.dlq);
    let mut seen: Vec<(String, String, String, Vec<u8>)> = Vec::new();
    for r in &got {
        let reason = r.header("dlq.reason").unwrap().to_string();
        let batch = r.header("vt.batch").unwrap().to_string();
        let line = r.header("vt.line").unwrap().to_string();
        let (_, _, _, full) = want
            .iter()
            .find(|(_, b, l, _)| *b == batch && *l == line)
            .unwrap_or_else(|| panic!("unexpected dead letter {batch}:{line}"));
        assert_eq!(r.header("dlq.size").unwrap(), full.len().to_string());
        assert_eq!(
            r.header("dlq.sha256").unwrap(),
            hex::encode(Sha256::digest(full))
        );
        assert!(
            full.starts_with(&r.value),
            "DLQ value is the line or its start"
        );
        if reason == "too_large" {
            assert!(
                r.value.len() < 262_144 && r.value.len() < full.len(),
                "too large line cut to fit"
            );
        } else {
            assert_eq!(&r.value, full);
        }
        seen.push((reason, batch, line, full.clone()));
    }
    seen.sort();
    assert_eq!(seen, want, "DLQ content");

    let state = saved_state(&bootstrap(), &s.names).expect("position saved");
    assert_eq!(state.next, s.newest.next());
    assert!(
        state.gaps.is_empty(),
        "a single missing minute is not a gap"
    );
    let stats = s.sim.stats();
    assert_eq!(
        stats.download_requests_with_credentials, 0,
        "{:?}",
        stats.credential_leaks
    );
    assert!(stats.downloads as usize >= published.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_where_it_stopped_without_duplicates() {
    let batches = BatchSettings::exact(12, 4);
    let s = setup("restart", sim_settings(batches.clone()), 4).await;
    let w = s.worker("");
    w.wait_committed_through(s.newest).await;
    w.stop().await.unwrap();
    let first_run = s.sim.stats().downloads;

    // Time passes; the second run publishes only the new minutes.
    s.clock.advance(Duration::from_secs(180));
    let newest = newest_at(s.clock_now());
    let w = s.worker("");
    w.wait_committed_through(newest).await;
    w.stop().await.unwrap();

    assert_topic_holds(&s, &batches, minutes(s.start, newest));
    assert_eq!(
        s.sim.stats().downloads - first_run,
        3,
        "only the three new minutes are fetched again"
    );
}

impl Setup {
    fn clock_now(&self) -> std::time::SystemTime {
        use sandbox_bridge::clock::Clock;
        self.clock.now()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_the_next_minute_when_caught_up() {
    let batches = BatchSettings::exact(13, 3);
    let s = setup("caught-up", sim_settings(batches.clone()), 2).await;
    let w = s.worker("");
    w.wait_committed_through(s.newest).await;

    // Caught up: nothing newer than now - 60 min is asked for.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.sim.attempts(s.newest.next()).api,
        0,
        "asked for a minute inside the lag"
    );
    assert_eq!(w.committed_next(), s.newest.next());

    // One minute later, the next batch is published without real waiting.
    s.clock.advance(Duration::from_secs(60));
    w.wait_committed_through(s.newest.next()).await;
    s.clock.advance(Duration::from_secs(120));
    w.wait_committed_through(s.newest.plus(3)).await;
    w.stop().await.unwrap();
    assert_topic_holds(&s, &batches, minutes(s.start, s.newest.plus(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_available_yet_means_wait_and_ask_again() {
    // The simulator's clock runs 2 minutes behind the worker's: the worker's
    // newest minutes answer 400 NotAvailableYet until the simulator catches up.
    let batches = BatchSettings::exact(14, 2);
    let now = test_now();
    let worker_clock = ManualClock::new(now);
    let sim_clock = ManualClock::new(now - Duration::from_secs(120));
    let sim = start_sim(sim_settings(batches.clone()), Arc::new(sim_clock.clone())).await;
    let names = Names::new("nay");
    let newest = newest_at(now);
    let start = newest.plus(-3);
    let config = parse_config(&config_text(
        &bootstrap(),
        &sim.base_url(),
        &names,
        start,
        "",
    ));
    let w = spawn_worker(config, Arc::new(worker_clock.clone()));
    w.wait_committed_through(newest.plus(-2)).await;
    wait_until(Duration::from_secs(30), || {
        sim.stats().api_requests(400) >= 2
    })
    .await;
    assert_eq!(
        w.committed_next(),
        newest.plus(-1),
        "must not skip a minute that is not available yet"
    );
    sim_clock.set(now);
    w.wait_committed_through(newest).await;
    w.stop().await.unwrap();
    let got = read_all(&bootstrap(), &names.topic);
    assert_eq!(
        actual_records(&got),
        expected(&batches, minutes(start, newest)).records
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_until_the_batch_is_whole() {
    let batches = BatchSettings::exact(15, 5);
    let mut settings = sim_settings(batches.clone());
    let newest = newest_at(test_now());
    let at = |i: i64| MinuteSet::minute(newest.plus(-i));
    settings.faults.rules = vec![
        FaultRule {
            kind: FaultKind::Unavailable,
            minutes: at(6),
        },
        FaultRule {
            kind: FaultKind::DeadlineExceeded,
            minutes: at(5),
        },
        FaultRule {
            kind: FaultKind::QuotaExceeded,
            minutes: at(4),
        },
        FaultRule {
            kind: FaultKind::Truncated,
            minutes: at(3),
        },
        FaultRule {
            kind: FaultKind::Corrupt,
            minutes: at(2),
        },
        FaultRule {
            kind: FaultKind::Interrupted,
            minutes: at(1),
        },
    ];
    settings.faults.attempts = 2;
    settings.faults.retry_after = Duration::from_millis(200);
    let s = setup("faults", settings, 8).await;
    let w = s.worker("");
    w.wait_committed_through(s.newest).await;
    let retries = w.metrics.feed.batches.with_label_values(&["retried"]).get();
    w.stop().await.unwrap();
    assert_topic_holds(&s, &batches, minutes(s.start, s.newest));
    let stats = s.sim.stats();
    for kind in FaultKind::ALL.iter().filter(|k| **k != FaultKind::Slow) {
        assert!(
            stats.faults(*kind) >= 1,
            "fault {} was not exercised",
            kind.name()
        );
    }
    assert!(retries >= 8, "retries counted: {retries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_and_missing_licence_stop_with_a_clear_error() {
    let s = setup("auth", sim_settings(BatchSettings::exact(16, 1)), 3).await;
    for (key, expect) in [
        ("wrong-key", "refused the API key"),
        ("unlicensed-key", "Sandbox feeds"),
    ] {
        let text = config_text(&bootstrap(), &s.sim.base_url(), &s.names, s.start, "")
            .replace(API_KEY, key);
        let w = spawn_worker(parse_config(&text), Arc::new(s.clock.clone()));
        let result = tokio::time::timeout(Duration::from_secs(60), w.handle)
            .await
            .expect("worker stops by itself")
            .unwrap();
        let e = result.expect_err("worker must refuse to run");
        assert!(
            matches!(
                e,
                FeedError::Fetch(FetchError::Unauthorized { .. } | FetchError::Forbidden { .. })
            ),
            "{e}"
        );
        assert!(e.to_string().contains(expect), "{e}");
        assert!(
            !e.to_string().contains(key),
            "the key itself is not printed: {e}"
        );
    }
    let stats = s.sim.stats();
    let refused = stats.api_requests(401) + stats.api_requests(403);
    assert!(
        refused <= 2 * 4,
        "no retry storm: {refused} refused requests (prefetch depth 4)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_run_becomes_a_gap_and_is_published_when_it_appears() {
    let batches = BatchSettings::exact(17, 3);
    let newest = newest_at(test_now());
    let run = MinuteRange::new(newest.plus(-4), newest.plus(-2));
    let mut settings = sim_settings(batches.clone());
    settings.missing = MinuteSet::ranges([run]);
    let s = setup("gap", settings, 7).await;
    let w = s.worker("gap_recheck_interval = \"5m\"");
    w.wait_committed_through(s.newest).await;
    assert_eq!(w.metrics.feed.gaps_open.get(), 1);
    assert_eq!(w.metrics.feed.gap_minutes_open.get(), 3);
    let state = saved_state(&bootstrap(), &s.names).unwrap();
    assert_eq!(state.gaps.len(), 1);
    assert_eq!(
        (state.gaps[0].first, state.gaps[0].last),
        (run.first, run.last)
    );
    assert_eq!(state.gaps[0].reason, GapReason::MissingRun);

    // Two of the three minutes appear; the next gap re-check publishes them.
    s.sim
        .set_missing(MinuteRange::new(run.first, run.first.next()), false);
    s.clock.advance(Duration::from_secs(5 * 60));
    let newest = newest_at(s.clock_now());
    w.wait_committed_through(newest).await;
    wait_until(Duration::from_secs(60), || {
        w.metrics.feed.gap_minutes_open.get() == 1
    })
    .await;
    let recovered = w
        .metrics
        .feed
        .batches
        .with_label_values(&["recovered"])
        .get();
    w.stop().await.unwrap();
    assert_eq!(recovered, 2);

    let state = saved_state(&bootstrap(), &s.names).unwrap();
    assert_eq!(state.gap_minutes().collect::<Vec<_>>(), vec![run.last]);
    let published: BTreeSet<Minute> = minutes(s.start, newest)
        .filter(|m| *m != run.last)
        .collect();
    assert_topic_holds(&s, &batches, published);
}

/// A missing run at the threshold is an error condition: the alert gauge is
/// raised and `/readyz` says why until the run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_run_raises_the_alert_and_readiness_says_why() {
    let batches = BatchSettings::exact(9, 2);
    let newest = newest_at(test_now());
    let run = MinuteRange::new(newest.plus(-3), newest.plus(-1));
    let mut settings = sim_settings(batches);
    settings.missing = MinuteSet::ranges([run]);
    let s = setup("halt", settings, 6).await;
    let w = s.worker("missing_policy = \"halt\"");
    wait_until(Duration::from_secs(60), || {
        w.metrics.feed.missing_run_alert.get() == 1
    })
    .await;
    let reasons = w.readiness.check().expect_err("unready in a missing run");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("feed-missing-run") && r.contains("missing")),
        "{reasons:?}"
    );
    s.sim.set_missing(run, false);
    w.wait_committed_through(newest).await;
    wait_until(Duration::from_secs(30), || w.readiness.check().is_ok()).await;
    assert_eq!(w.metrics.feed.missing_run_alert.get(), 0);
    w.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_older_than_seven_days_skips_forward_and_records_the_loss() {
    let batches = BatchSettings::exact(18, 1);
    let s = setup("window", sim_settings(batches.clone()), 3).await;
    let too_old = Minute::containing(s.clock_now()).plus(-(7 * 24 * 60) - 30);
    let text = config_text(
        &bootstrap(),
        &s.sim.base_url(),
        &s.names,
        too_old,
        "prefetch = 16",
    );
    let w = spawn_worker(parse_config(&text), Arc::new(s.clock.clone()));
    wait_until(Duration::from_secs(60), || {
        w.committed_next() > too_old.plus(30)
    })
    .await;
    let lost = w.metrics.feed.gap_minutes_lost.get();
    w.stop().await.unwrap();
    assert!(lost >= 30, "lost {lost} minutes");
    let state = saved_state(&bootstrap(), &s.names).unwrap();
    assert_eq!(state.lost.len(), 1);
    assert_eq!(state.lost[0].first, too_old);
    assert_eq!(state.lost[0].reason, GapReason::WindowExpired);
    assert!(state.next > too_old.plus(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_with_the_same_id_fences_the_first() {
    let batches = BatchSettings::exact(19, 3);
    let s = setup("fence", sim_settings(batches.clone()), 3).await;
    let first = s.worker("");
    first.wait_committed_through(s.newest).await;

    let second = s.worker("");
    second.wait_committed_through(s.newest).await;
    // Both try to publish the next minute; only the newer may.
    s.clock.advance(Duration::from_secs(60));
    let result = tokio::time::timeout(Duration::from_secs(60), first.handle)
        .await
        .expect("the fenced worker stops by itself")
        .unwrap();
    let e = result.expect_err("the older worker must stop");
    assert!(matches!(e, FeedError::Fenced(_)), "{e}");
    assert!(e.to_string().contains("fenced"), "{e}");

    second.wait_committed_through(s.newest.plus(1)).await;
    s.clock.advance(Duration::from_secs(60));
    second.wait_committed_through(s.newest.plus(2)).await;
    second.stop().await.unwrap();
    assert_topic_holds(&s, &batches, minutes(s.start, s.newest.plus(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_mode_publishes_everything_and_saves_its_position() {
    let batches = BatchSettings::exact(20, 4);
    let s = setup("alo", sim_settings(batches.clone()), 5).await;
    let w = s.worker("delivery = \"at-least-once\"");
    w.wait_committed_through(s.newest).await;
    w.stop().await.unwrap();
    assert_topic_holds(&s, &batches, minutes(s.start, s.newest));
    assert_eq!(
        saved_state(&bootstrap(), &s.names).unwrap().next,
        s.newest.next()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_caps_hold_with_everything_spooled_to_disk() {
    // Every download goes to disk, lines larger than the limit stream through
    // the splitter's cap, and the result is still exact.
    let newest = newest_at(test_now());
    let mut batches = BatchSettings::exact(24, 30);
    batches.bad_lines = MinuteSet::minute(newest.plus(-1));
    batches.multi_stream = MinuteSet::minute(newest);
    batches.oversize_line_bytes = 600 * 1024;
    let s = setup("caps", sim_settings(batches.clone()), 3).await;
    let w = s.worker("spool_memory_bytes = 0\nmax_message_bytes = 131072\ndecode_threads = 2");
    w.wait_committed_through(s.newest).await;
    w.stop().await.unwrap();
    let want = expected(&batches, minutes(s.start, s.newest));
    let got = read_all(&bootstrap(), &s.names.topic);
    // Valid records over the 128 KiB limit are dead letters here, the rest published.
    let fits: Vec<_> = want
        .records
        .iter()
        .filter(|r| r.1.len() < 120_000)
        .cloned()
        .collect();
    let published = actual_records(&got);
    assert!(published.len() >= fits.len() && published.len() <= want.records.len());
    for r in &fits {
        assert!(published.contains(r), "record {} missing", r.2);
    }
    let dead = read_all(&bootstrap(), &s.names.dlq);
    assert_eq!(
        published.len() + dead.len(),
        want.records.len() + want.dead.len(),
        "every line accounted for"
    );
    for d in &dead {
        assert!(
            d.value.len() <= 131_072 - 512,
            "dead letter cut to the limit"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_feed_topic_is_refused() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let s = setup("compacted", sim_settings(BatchSettings::exact(25, 1)), 2).await;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let topic = NewTopic::new(&s.names.topic, 1, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
    admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap();
    let w = s.worker("");
    let result = tokio::time::timeout(Duration::from_secs(60), w.handle)
        .await
        .unwrap()
        .unwrap();
    let e = result.expect_err("a compacted feed topic must be refused");
    assert!(e.to_string().contains("cleanup.policy=compact"), "{e}");
}
