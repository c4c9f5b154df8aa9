//! `sandbox-bridge check` as a process: a real broker, the VirusTotal and
//! KTIP simulators on port 0. Each test reads the report (stdout) and the
//! exit status; none of them may find a secret in the output, and the
//! transaction probe must never fence a running worker.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::kafka::create_topic;
use common::process::BIN;
use common::rescan::{KTIP_PASSWORD, RescanNames, rescan_config_text, start_ktip};
use common::*;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use sandbox_bridge::clock::{SharedClock, SystemClock};
use sandbox_bridge::sim::ktip::{KtipSimHandle, KtipSimSettings};
use sandbox_bridge::sim::vt::{BatchSettings, FeedSimHandle, FeedSimSettings, FeedSimulator};

const SASL_PASSWORD: &str = "kafka-sasl-password-5d1e";
const KEY_PASSWORD: &str = "ssl-key-password-8b07";

async fn start_vt() -> FeedSimHandle {
    let clock: SharedClock = Arc::new(SystemClock);
    let settings = FeedSimSettings {
        api_key: API_KEY.to_string(),
        batches: BatchSettings::exact(7, 3),
        ..FeedSimSettings::default()
    };
    let any = "127.0.0.1:0".parse().unwrap();
    FeedSimulator::start(settings, clock, any, any)
        .await
        .unwrap()
}

/// A feed-only configuration (the harness's), with `extra_kafka` added to `[kafka]`.
fn feed_config(bootstrap: &str, vt: &FeedSimHandle, names: &Names, extra_kafka: &str) -> String {
    let start = newest_at(test_now()).plus(-3);
    config_text(bootstrap, &vt.base_url(), names, start, "").replace(
        "[kafka.properties]",
        &format!("{extra_kafka}\n[kafka.properties]"),
    )
}

/// A rescan-only configuration (the harness's).
fn rescan_config(ktip: &KtipSimHandle, names: &RescanNames) -> String {
    rescan_config_text(&bootstrap(), ktip, names, "check", "", "")
}

/// Both pipelines, with secrets among the Kafka properties.
fn both_config(vt: &FeedSimHandle, ktip: &KtipSimHandle, f: &Names, r: &RescanNames) -> String {
    let kafka_extra = format!(
        "\"sasl.username\" = \"alice\"\n\"sasl.password\" = \"{SASL_PASSWORD}\"\n\"ssl.key.password\" = \"{KEY_PASSWORD}\""
    );
    let rescan = rescan_config_text(&bootstrap(), ktip, r, "check", "", &kafka_extra);
    format!(
        "{rescan}\n[feed]\nbase_url = \"{}\"\napi_key = \"{API_KEY}\"\ntopic = \"{}\"\ndlq_topic = \"{}\"\nstate_topic = \"{}\"\ntransactional_id = \"{}\"\n",
        vt.base_url(),
        f.topic,
        f.dlq,
        f.state,
        f.txid
    )
}

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Checked {
    fn lines_starting(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// The one report line for `check` (e.g. `feed api`), whatever its level.
    fn line(&self, check: &str) -> &str {
        let found: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| l.get(5..).is_some_and(|rest| rest.starts_with(check)))
            .collect();
        assert_eq!(found.len(), 1, "one `{check}` line in:\n{}", self.stdout);
        found[0]
    }

    fn assert_no_secret(&self, secrets: &[&str]) {
        for s in secrets {
            assert!(
                !self.stdout.contains(s) && !self.stderr.contains(s),
                "secret {s:?} printed:\n{}\n{}",
                self.stdout,
                self.stderr
            );
        }
    }
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Writes `text` and runs `sandbox-bridge check` on it (off the async threads:
/// the simulators answer on them).
async fn check(dir: &Path, text: &str) -> Checked {
    let path = dir.join("check.toml");
    std::fs::write(&path, text).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("VT_API_KEY")
            .env_remove("KTIP_USERNAME")
            .env_remove("KTIP_PASSWORD")
            .output()
            .expect("run sandbox-bridge check")
    })
    .await
    .unwrap();
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn create_topic_with_policy(bootstrap: &str, topic: &str, policy: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", policy);
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .unwrap();
    for r in results {
        r.expect("topic created");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_configuration_passes_every_check_and_prints_no_secret() {
    let vt = start_vt().await;
    let ktip = start_ktip(KtipSimSettings::default()).await;
    let (f, r) = (Names::new("check-ok"), RescanNames::new("check-ok"));
    // One topic that exists (the others are missing and would be created).
    create_topic(&bootstrap(), &f.topic, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let c = check(dir.path(), &both_config(&vt, &ktip, &f, &r)).await;

    assert_eq!(c.code, Some(0), "{c:?}");
    assert!(c.lines_starting("FAIL").is_empty(), "{c:?}");
    assert!(
        c.line("config").contains("checking feed and rescan"),
        "{c:?}"
    );
    assert!(
        c.line("kafka:").starts_with("ok   kafka: reachable"),
        "{c:?}"
    );
    assert!(
        c.line(&format!("kafka topic {}", f.topic))
            .contains("exists (3 partitions), cleanup.policy=delete"),
        "{c:?}"
    );
    for topic in [
        &f.dlq,
        &f.state,
        &r.requests,
        &r.results,
        &r.dlq,
        &r.outcomes,
    ] {
        let line = c.line(&format!("kafka topic {topic}"));
        assert!(line.starts_with("ok   ") && line.contains("will be created at start"));
    }
    for pipeline in ["feed", "rescan"] {
        let line = c.line(&format!("kafka transactions ({pipeline})"));
        assert!(
            line.starts_with("ok   ") && line.contains("-check-"),
            "{c:?}"
        );
    }
    let feed = c.line("feed api");
    assert!(
        feed.starts_with("ok   ") && feed.contains("key accepted"),
        "{c:?}"
    );
    let cert = c.line("ktip client certificate");
    assert!(
        cert.starts_with("ok   ") && cert.contains("days left"),
        "{c:?}"
    );
    let api = c.line("ktip api");
    assert!(
        api.starts_with("ok   ") && api.contains("HTTP 200"),
        "{c:?}"
    );
    assert!(c.stdout.contains("summary: ") && c.stdout.contains(": ready"));
    c.assert_no_secret(&[API_KEY, KTIP_PASSWORD, SASL_PASSWORD, KEY_PASSWORD]);

    // Nothing was changed: no batch downloaded, no rescan requested, no topic created.
    let stats = vt.stats();
    assert_eq!(stats.downloads, 0, "{stats:?}");
    assert!(stats.download_requests_by_status.is_empty(), "{stats:?}");
    assert!(
        ktip.requests().iter().all(|q| q.method == "GET"),
        "{:?}",
        ktip.requests()
    );
    let topics = sandbox_bridge::kafka::existing_topics(
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .clone(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert!(!topics.contains_key(&f.state) && !topics.contains_key(&r.results));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_unlicensed_feed_key_fails() {
    let vt = start_vt().await;
    let names = Names::new("check-vt-key");
    let dir = tempfile::tempdir().unwrap();
    let good = feed_config(&bootstrap(), &vt, &names, "");

    let wrong = "wrong-vt-key-3141";
    let c = check(dir.path(), &good.replace(API_KEY, wrong)).await;
    assert_eq!(c.code, Some(1), "{c:?}");
    let line = c.line("feed api");
    assert!(
        line.starts_with("FAIL ") && line.contains("refused the API key"),
        "{c:?}"
    );
    c.assert_no_secret(&[wrong]);

    let unlicensed = "unlicensed-key";
    let c = check(dir.path(), &good.replace(API_KEY, unlicensed)).await;
    assert_eq!(c.code, Some(1), "{c:?}");
    let line = c.line("feed api");
    assert!(
        line.starts_with("FAIL ") && line.contains("\"Sandbox feeds\" licence"),
        "{c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ktip_password_fails() {
    let ktip = start_ktip(KtipSimSettings::default()).await;
    let names = RescanNames::new("check-ktip-pw");
    let dir = tempfile::tempdir().unwrap();
    let wrong = "wrong-ktip-password-2718";
    let text = rescan_config(&ktip, &names).replace(
        &format!("password = \"{KTIP_PASSWORD}\""),
        &format!("password = \"{wrong}\""),
    );
    let c = check(dir.path(), &text).await;
    assert_eq!(c.code, Some(1), "{c:?}");
    let line = c.line("ktip api");
    assert!(
        line.starts_with("FAIL ") && line.contains("credentials refused"),
        "{c:?}"
    );
    assert!(c.line("config").contains("checking rescan"), "{c:?}");
    c.assert_no_secret(&[wrong, KTIP_PASSWORD]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_fails_the_tls_handshake_and_says_so() {
    let ktip = start_ktip(KtipSimSettings::default()).await;
    let names = RescanNames::new("check-no-cert");
    let dir = tempfile::tempdir().unwrap();
    let text: String = rescan_config(&ktip, &names)
        .lines()
        .filter(|l| !l.starts_with("client_cert ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let c = check(dir.path(), &text).await;
    assert_eq!(c.code, Some(1), "{c:?}");
    let line = c.line("ktip api");
    assert!(
        line.starts_with("FAIL ")
            && line.contains("TLS handshake")
            && line.contains("rescan.client_cert is not set"),
        "{c:?}"
    );
    let cert = c.line("ktip client certificate");
    assert!(
        cert.starts_with("warn ") && cert.contains("rescan.client_cert is not set"),
        "{c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_never_fences_a_running_worker() {
    let vt = start_vt().await;
    let names = Names::new("check-fence");
    create_topic(&bootstrap(), &names.topic, 1).await;
    // A live producer with the worker's transactional id, as a running worker holds it.
    let live: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("transactional.id", &names.txid)
        .create()
        .unwrap();
    let live = tokio::task::spawn_blocking(move || {
        live.init_transactions(Duration::from_secs(30)).unwrap();
        live
    })
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let c = check(dir.path(), &feed_config(&bootstrap(), &vt, &names, "")).await;
    assert_eq!(c.code, Some(0), "{c:?}");
    let line = c.line("kafka transactions (feed)");
    assert!(
        line.contains(&format!("{}-check-", names.txid)),
        "probe id derived from the live one: {c:?}"
    );

    // Had check used the live id, this commit would fail with ProducerFenced.
    let topic = names.topic.clone();
    tokio::task::spawn_blocking(move || {
        live.begin_transaction().unwrap();
        live.send(BaseRecord::<[u8], [u8]>::to(&topic).payload(b"still alive".as_slice()))
            .map_err(|(e, _)| e)
            .unwrap();
        live.commit_transaction(Duration::from_secs(30))
            .expect("check fenced the live producer");
    })
    .await
    .unwrap();
    let records = read_all(&bootstrap(), &names.topic);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, b"still alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_within_the_operation_timeout() {
    let vt = start_vt().await;
    let names = Names::new("check-unreachable");
    let dir = tempfile::tempdir().unwrap();
    let text = feed_config("127.0.0.1:1", &vt, &names, "operation_timeout = \"3s\"");
    let c = check(dir.path(), &text).await;
    assert_eq!(c.code, Some(1), "{c:?}");
    let line = c.line("kafka:");
    assert!(
        line.starts_with("FAIL kafka: cannot reach Kafka at 127.0.0.1:1 within 3s"),
        "{c:?}"
    );
    assert!(c.lines_starting("ok   kafka topic").is_empty(), "{c:?}");
    assert!(c.line("feed api").starts_with("ok   "), "{c:?}");
    assert!(c.stdout.contains("NOT ready"), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_that_would_lose_data_or_are_missing_are_reported() {
    let vt = start_vt().await;
    let names = Names::new("check-topics");
    create_topic_with_policy(&bootstrap(), &names.topic, "compact").await;
    create_topic_with_policy(&bootstrap(), &names.state, "delete").await;
    let dir = tempfile::tempdir().unwrap();
    let text = feed_config(&bootstrap(), &vt, &names, "create_topics = false");
    let c = check(dir.path(), &text).await;
    assert_eq!(c.code, Some(1), "{c:?}");
    let feed = c.line(&format!("kafka topic {}", names.topic));
    assert!(
        feed.starts_with("FAIL ") && feed.contains("cleanup.policy=compact"),
        "{c:?}"
    );
    let dlq = c.line(&format!("kafka topic {}", names.dlq));
    assert!(
        dlq.starts_with("FAIL ") && dlq.contains("kafka.create_topics is false"),
        "{c:?}"
    );
    let state = c.line(&format!("kafka topic {}", names.state));
    assert!(
        state.starts_with("warn ") && state.contains("expected compact"),
        "{c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let c = check(
        dir.path(),
        "[kafka]\nbootstrap_servers = \"b:9092\"\n[feed]\napi_key = \"k-secret-1\"\nmissing_threshold = 0\n",
    )
    .await;
    assert_eq!(c.code, Some(2), "{c:?}");
    assert!(c.stderr.contains("feed.missing_threshold"), "{c:?}");
    assert!(c.stdout.is_empty(), "{c:?}");
    c.assert_no_secret(&["k-secret-1"]);
}
