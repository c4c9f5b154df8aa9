//! The `sandbox-bridge rescan` binary as processes: kill -9 at random points
//! while requests are in flight (two instances in one group), and secrets in
//! TRACE logs. The KTIP simulator runs in the test process; Kafka is a real
//! broker. Every read of a topic is read_committed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::bootstrap;
use common::process::Proc;
use common::rescan::*;
use rand::Rng;
use sandbox_bridge::sim::ktip::KtipSimSettings;
use serde_json::json;

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Credentials come from the environment in these tests.
fn without_credentials(text: &str) -> String {
    text.lines()
        .filter(|l| !l.starts_with("username =") && !l.starts_with("password ="))
        .collect::<Vec<_>>()
        .join("\n")
}

const ENV: [(&str, &str); 2] = [
    ("KTIP_USERNAME", KTIP_USER),
    ("KTIP_PASSWORD", KTIP_PASSWORD),
];

/// Two instances share the partitions; each is killed with SIGKILL at random
/// moments and restarted while calls are in flight. In the end every request
/// message has exactly one result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_requests_are_in_flight_loses_and_duplicates_nothing() {
    let sim = start_ktip(KtipSimSettings {
        latency: Duration::from_millis(60),
        ..KtipSimSettings::default()
    })
    .await;
    let names = RescanNames::new("rescan-kill");
    let boot = bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let kafka_extra = "\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 500";
    let configs: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|i| {
            let text = rescan_config_text(&boot, &sim, &names, i, "max_in_flight = 4", kafka_extra);
            write_config(
                dir.path(),
                &format!("{i}.toml"),
                &without_credentials(&text),
            )
        })
        .collect();
    // Some requests carry a request_id (deduplicated through the outcomes
    // topic, written in the same transactions); every id is used once.
    let total = 400;
    let reqs: Vec<Req> = (0..total)
        .map(|i| {
            let mut v = valid(&format!("k-{i}"));
            if i % 3 == 0 {
                v["request_id"] = json!(format!("rid-{i}"));
            }
            Req::json(&format!("key-{i}"), v)
        })
        .collect();
    publish(&boot, &names.requests, &reqs).await;

    let log = |i: usize| dir.path().join(format!("{i}.log"));
    let spawn = |i: usize| Proc::spawn("rescan", &configs[i], &log(i), &ENV);
    let mut procs = [spawn(0), spawn(1)];
    let mut rng = rand::rng();
    let mut kills = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1500..4000))).await;
        let victim = rng.random_range(0..2);
        procs[victim].signal("-KILL");
        procs[victim].wait(Duration::from_secs(10));
        kills += 1;
        if read_results(&boot, &names.results).len() >= total {
            break;
        }
        procs[victim] = spawn(victim);
    }
    // Make sure both run to the end.
    for (i, p) in procs.iter_mut().enumerate() {
        if p.child.try_wait().unwrap().is_some() {
            *p = spawn(i);
        }
    }
    let results = wait_results(&boot, &names.results, total, Duration::from_secs(180)).await;
    // Let any straggler commit land, then count again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let results_after = read_results(&boot, &names.results);
    assert_eq!(results_after.len(), results.len(), "no late duplicate");
    let mut per_message: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results_after {
        assert_eq!(r.status(), "accepted", "{}", r.json);
        *per_message
            .entry(r.record.key_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        per_message.len(),
        total,
        "every request message has a result"
    );
    assert!(
        per_message.values().all(|n| *n == 1),
        "duplicates: {:?}",
        per_message
            .iter()
            .filter(|(_, n)| **n > 1)
            .collect::<Vec<_>>()
    );
    // The call is at-least-once: a few may have been repeated after a kill.
    let calls: u64 = sim
        .stats()
        .rescans_by_task
        .values()
        .map(|n| u64::from(*n))
        .sum();
    assert!(calls >= total as u64, "{calls} calls");
    eprintln!("{kills} kills; {total} requests; {calls} API calls");
    for mut p in procs {
        p.signal("-TERM");
        let status = p.wait(Duration::from_secs(60));
        assert!(status.success(), "clean stop: {status}\n{}", p.log_text());
    }
    sim.shutdown().await;
}

/// No secret — the KTIP password (also as the Basic-auth header), archive
/// and document passwords, SASL and key passwords — appears in a log at
/// TRACE level (librdkafka debug included) or in a result, though the API
/// received the request passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_or_results_even_at_trace_level() {
    let password = "ktip-Pa55word-0c41";
    let sim = start_ktip(KtipSimSettings {
        password: password.to_string().into(),
        ..KtipSimSettings::default()
    })
    .await;
    let names = RescanNames::new("rescan-secrets");
    let boot = bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let (sasl, key_pw) = ("kafka-sasl-pw-5e21", "ssl-key-pw-77d0");
    let (unzip, doc) = ("unzip-S3cret-a1b2", "doc-S3cret-c3d4");
    let kafka_extra = format!(
        "\"debug\" = \"all\"\n\"sasl.password\" = \"{sasl}\"\n\"ssl.key.password\" = \"{key_pw}\""
    );
    let text = rescan_config_text(&boot, &sim, &names, "a", "", &kafka_extra);
    let config = write_config(dir.path(), "c.toml", &without_credentials(&text));
    let log = dir.path().join("rescan.log");
    let mut p = Proc::spawn(
        "rescan",
        &config,
        &log,
        &[
            ("RUST_LOG", "trace"),
            ("KTIP_USERNAME", KTIP_USER),
            ("KTIP_PASSWORD", password),
        ],
    );
    let url = "https://samples.example.com/a.zip";
    publish(
        &boot,
        &names.requests,
        &[
            Req::json(
                "ok",
                json!({"task_id": "s-1", "url": url, "processing_type": "unzip-and-exec",
                       "unzip_password": unzip, "doc_password": doc}),
            ),
            // Invalid: the password may not be sent with exec-only, and is not echoed.
            Req::json(
                "bad",
                json!({"task_id": "s-2", "url": url, "processing_type": "exec-only",
                       "unzip_password": unzip, "doc_password": doc}),
            ),
        ],
    )
    .await;
    let results = wait_results(&boot, &names.results, 2, Duration::from_secs(90)).await;
    p.signal("-TERM");
    assert!(p.wait(Duration::from_secs(60)).success());

    let sent = sim.requests_for("s-1");
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].param("unzip_password"), Some(unzip));
    let statuses: Vec<&str> = results.iter().map(ResultMsg::status).collect();
    assert!(
        statuses.contains(&"accepted") && statuses.contains(&"invalid"),
        "{statuses:?}"
    );

    let logs = p.log_text();
    assert!(
        logs.len() > 50_000,
        "a chatty TRACE log: {} bytes",
        logs.len()
    );
    assert!(logs.contains("rdkafka"), "librdkafka debug output captured");
    let basic = base64(format!("{KTIP_USER}:{password}").as_bytes());
    for secret in [password, sasl, key_pw, unzip, doc, basic.as_str()] {
        assert!(!logs.contains(secret), "secret {secret:?} found in the log");
        for r in &results {
            let value = String::from_utf8_lossy(&r.record.value);
            assert!(
                !value.contains(secret),
                "secret {secret:?} in a result: {value}"
            );
        }
    }
    sim.shutdown().await;
}

/// Bad rescan configuration is refused at start, naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rescan_configuration_is_refused_with_the_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let base = "[kafka]\nbootstrap_servers = \"b:9092\"\n[rescan]\nusername = \"u\"\npassword = \"p-secret-1\"\n";
    let cases = [
        (format!("{base}max_in_flight = 0\n"), "rescan.max_in_flight"),
        (format!("{base}base_url = \"ftp://x\"\n"), "rescan.base_url"),
        (
            format!("{base}client_cert = \"/nonexistent/c.pem\"\n"),
            "rescan.client_cert",
        ),
        (
            format!("{base}instance_id = \"a b\"\n"),
            "rescan.instance_id",
        ),
        (
            "[kafka]\nbootstrap_servers = \"b:9092\"\n[rescan]\nusername = \"u\"\n".to_string(),
            "KTIP_PASSWORD",
        ),
    ];
    for (text, needle) in cases {
        let config = write_config(dir.path(), "bad.toml", &text);
        let out = std::process::Command::new(common::process::BIN)
            .args(["rescan", "--config"])
            .arg(&config)
            .env_remove("KTIP_USERNAME")
            .env_remove("KTIP_PASSWORD")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{needle}: {stderr}");
        assert!(stderr.contains(needle), "expected {needle:?} in {stderr:?}");
        assert!(!stderr.contains("p-secret-1"), "{stderr}");
    }
}

/// Standard base64 with padding (the Basic-auth header's encoding).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
