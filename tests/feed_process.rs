//! The `sandbox-bridge feed` binary as a process: kill -9 at random points,
//! SIGTERM, fencing, secrets in logs, configuration errors. The simulator
//! runs in the test process (real clock, port 0); Kafka is a real broker.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{BIN, Proc};
use common::*;
use rand::Rng;
use sandbox_bridge::clock::{Clock, SharedClock, SystemClock};
use sandbox_bridge::minute::{FeedWindow, Minute};
use sandbox_bridge::sim::vt::{
    BatchSettings, FeedSimHandle, FeedSimSettings, FeedSimulator, MinuteSet,
};

async fn start_sim(batches: BatchSettings) -> FeedSimHandle {
    let clock: SharedClock = Arc::new(SystemClock);
    let settings = FeedSimSettings {
        api_key: API_KEY.to_string(),
        batches,
        ..FeedSimSettings::default()
    };
    let any = "127.0.0.1:0".parse().unwrap();
    FeedSimulator::start(settings, clock, any, any)
        .await
        .unwrap()
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("feed.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Waits until the saved position is past `last`.
async fn wait_saved_through(names: &Names, last: Minute, p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(s) = saved_state(&bootstrap(), names)
            && s.next > last
        {
            return;
        }
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!("worker exited with {status}; log:\n{}", p.log_text());
        }
        assert!(
            Instant::now() < deadline,
            "worker did not catch up; log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_exactly_once(names: &Names, batches: &BatchSettings, start: Minute, next: Minute) {
    let want = expected(batches, minutes(start, next.prev()));
    let got = read_all(&bootstrap(), &names.topic);
    assert_eq!(
        got.len(),
        want.records.len(),
        "records on the feed topic (duplicates or losses)"
    );
    assert_eq!(actual_records(&got), want.records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_and_duplicates_nothing() {
    let batches = BatchSettings::exact(21, 25);
    let sim = start_sim(batches.clone()).await;
    let names = Names::new("kill9");
    let newest = FeedWindow::at(SystemClock.now(), 0).newest;
    let start = newest.plus(-40);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &config_text(&bootstrap(), &sim.base_url(), &names, start, ""),
    );
    let log = dir.path().join("worker.log");

    let mut rng = rand::rng();
    let mut killed_with_progress = 0;
    for round in 0..6 {
        let before = saved_state(&bootstrap(), &names).map(|s| s.next);
        let mut p = Proc::spawn("feed", &config, &log, &[]);
        let wait_ms = rng.random_range(300..2500);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        p.signal("-KILL");
        p.wait(Duration::from_secs(10));
        let after = saved_state(&bootstrap(), &names).map(|s| s.next);
        if after != before {
            killed_with_progress += 1;
        }
        eprintln!("round {round}: killed after {wait_ms} ms; position {before:?} -> {after:?}");
    }

    let mut p = Proc::spawn("feed", &config, &log, &[]);
    let last = FeedWindow::at(SystemClock.now(), 0).newest;
    wait_saved_through(&names, last, &mut p).await;
    p.signal("-TERM");
    assert!(
        p.wait(Duration::from_secs(60)).success(),
        "clean exit after SIGTERM"
    );
    let next = saved_state(&bootstrap(), &names).unwrap().next;
    assert_exactly_once(&names, &batches, start, next);
    assert!(killed_with_progress >= 1, "no kill landed while publishing");
    assert_eq!(sim.stats().download_requests_with_credentials, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_batch_exits_zero_and_the_next_run_completes_the_feed() {
    let batches = BatchSettings::exact(22, 120);
    let sim = start_sim(batches.clone()).await;
    let names = Names::new("sigterm");
    let newest = FeedWindow::at(SystemClock.now(), 0).newest;
    let start = newest.plus(-8);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &config_text(&bootstrap(), &sim.base_url(), &names, start, ""),
    );
    let log = dir.path().join("worker.log");

    let mut p = Proc::spawn("feed", &config, &log, &[]);
    // Wait for the first batch to be under way, then ask it to stop.
    wait_until(Duration::from_secs(60), || {
        p.log_text().contains("batch published")
    })
    .await;
    p.signal("-TERM");
    let status = p.wait(Duration::from_secs(40));
    assert_eq!(status.code(), Some(0), "log:\n{}", p.log_text());
    assert!(p.log_text().contains("feed worker stopped"));

    let mut p = Proc::spawn("feed", &config, &log, &[]);
    let last = FeedWindow::at(SystemClock.now(), 0).newest;
    wait_saved_through(&names, last, &mut p).await;
    p.signal("-INT");
    assert_eq!(p.wait(Duration::from_secs(40)).code(), Some(0));
    let next = saved_state(&bootstrap(), &names).unwrap().next;
    assert_exactly_once(&names, &batches, start, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_even_at_trace_level() {
    let mut batches = BatchSettings::exact(23, 3);
    let newest = FeedWindow::at(SystemClock.now(), 0).newest;
    batches.bad_lines = MinuteSet::minute(newest.plus(-1));
    let sim = start_sim(batches).await;
    let names = Names::new("secrets");
    let dir = tempfile::tempdir().unwrap();
    let sasl_password = "kafka-sasl-password-7f3a";
    let key_password = "ssl-key-password-19c2";
    let text = config_text(&bootstrap(), &sim.base_url(), &names, newest.plus(-3), "")
        .replace(
            "[kafka.properties]",
            &format!(
                "[kafka.properties]\n\"debug\" = \"all\"\n\"sasl.password\" = \"{sasl_password}\"\n\"sasl.username\" = \"alice\"\n\"ssl.key.password\" = \"{key_password}\""
            ),
        );
    let config = write_config(dir.path(), &text);
    let log = dir.path().join("worker.log");
    let mut p = Proc::spawn("feed", &config, &log, &[("RUST_LOG", "trace")]);
    wait_saved_through(&names, newest, &mut p).await;
    p.signal("-TERM");
    p.wait(Duration::from_secs(40));

    let text = p.log_text();
    assert!(
        text.len() > 100_000,
        "expected a chatty TRACE log, got {} bytes",
        text.len()
    );
    assert!(
        text.contains("librdkafka") || text.contains("rdkafka"),
        "librdkafka debug output captured"
    );
    for secret in [API_KEY, sasl_password, key_password] {
        assert!(!text.contains(secret), "secret {secret:?} found in the log");
    }
    for signed in ["token=", "expires="] {
        assert!(
            !text.contains(signed),
            "signed download URL ({signed}) found in the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_refused_with_the_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[kafka]\nbootstrap_servers = \"b:9092\"\n[feed]\napi_key = \"k\"\nmissing_threshold = 0\n",
            "feed.missing_threshold",
        ),
        (
            "[kafka]\nbootstrap_servers = \"b:9092\"\n[feed]\napi_key = \"k\"\ndelivery = \"maybe\"\n",
            "feed.delivery",
        ),
        ("[kafka]\nbootstrap_servers = \"b:9092\"\n", "VT_API_KEY"),
        ("[kafka\n", "invalid configuration file"),
    ];
    for (text, needle) in cases {
        let config = write_config(dir.path(), text);
        let out = Command::new(BIN)
            .args(["feed", "--config"])
            .arg(&config)
            .env_remove("VT_API_KEY")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr:?}");
    }
}
