//! The rescan consumer in-process against a real Kafka broker and the KTIP
//! simulator (HTTPS, port 0). Every read of a topic is read_committed.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::rescan::*;
use common::{bootstrap, wait_until};
use sandbox_bridge::sim::ktip::{KtipSimSettings, TaskAction, TaskRule};
use serde_json::json;

fn by_task(results: &[ResultMsg]) -> BTreeMap<String, ResultMsg> {
    let mut out = BTreeMap::new();
    for r in results {
        let prev = out.insert(r.task_id().to_string(), r.clone());
        assert!(prev.is_none(), "two results for task {}", r.task_id());
    }
    out
}

fn rules(rules: Vec<TaskRule>) -> KtipSimSettings {
    KtipSimSettings {
        rules,
        ..KtipSimSettings::default()
    }
}

/// Every response class of the API gets the documented status and error kind;
/// retryable answers are retried, then `failed`.
#[tokio::test(flavor = "multi_thread")]
async fn every_response_class_gets_its_result() {
    let sim = start_ktip(rules(vec![
        TaskRule::task("r400", TaskAction::TooLargeFile),
        TaskRule::task("r401", TaskAction::Unauthorized),
        TaskRule::task("r403", TaskAction::Forbidden),
        TaskRule::task("r451", TaskAction::LegalReasons),
        TaskRule::task("r404-then-ok", TaskAction::TaskFailed).first(2),
        TaskRule::task(
            "r429-then-ok",
            TaskAction::TooManyRequests {
                retry_after: Duration::from_secs(1),
            },
        )
        .first(1),
        TaskRule::task("r500-then-ok", TaskAction::Internal).first(1),
        TaskRule::task("r503-always", TaskAction::Unavailable),
        TaskRule::task("r404-always", TaskAction::TaskFailed),
    ]))
    .await;
    let names = RescanNames::new("rescan-classes");
    let boot = bootstrap();
    let config = parse_rescan_config(&rescan_config_text(
        &boot,
        &sim,
        &names,
        "a",
        "auth_failures_to_pause = 100",
        "",
    ));
    let worker = spawn_rescan(config);
    let tasks = [
        "ok-1",
        "r400",
        "r401",
        "r403",
        "r451",
        "r404-then-ok",
        "r429-then-ok",
        "r500-then-ok",
        "r503-always",
        "r404-always",
    ];
    let reqs: Vec<Req> = tasks
        .iter()
        .map(|t| Req::json(&format!("key-{t}"), valid(t)))
        .collect();
    publish(&boot, &names.requests, &reqs).await;
    let results =
        by_task(&wait_results(&boot, &names.results, tasks.len(), Duration::from_secs(90)).await);
    assert_eq!(results.len(), tasks.len());

    let expect =
        |task: &str, status: &str, http: Option<u64>, kind: Option<&str>, attempts: u64| {
            let r = &results[task];
            assert_eq!(r.status(), status, "{task}: {}", r.json);
            assert_eq!(r.json["http_status"].as_u64(), http, "{task}: {}", r.json);
            assert_eq!(r.kind(), kind, "{task}: {}", r.json);
            assert_eq!(
                r.json["attempts"].as_u64(),
                Some(attempts),
                "{task}: {}",
                r.json
            );
            assert_eq!(r.record.key_str(), Some(format!("key-{task}").as_str()));
            assert_eq!(sim.calls_for(task) as u64, attempts, "{task}: calls made");
        };
    expect("ok-1", "accepted", Some(200), None, 1);
    expect("r400", "rejected", Some(400), Some("bad_request"), 1);
    expect("r401", "rejected", Some(401), Some("unauthorized"), 1);
    expect("r403", "rejected", Some(403), Some("forbidden"), 1);
    expect("r451", "rejected", Some(451), Some("legal"), 1);
    expect("r404-then-ok", "accepted", Some(200), None, 3);
    expect("r429-then-ok", "accepted", Some(200), None, 2);
    expect("r500-then-ok", "accepted", Some(200), None, 2);
    expect(
        "r503-always",
        "failed",
        Some(503),
        Some("retries_exhausted"),
        4,
    );
    expect(
        "r404-always",
        "failed",
        Some(404),
        Some("retries_exhausted"),
        4,
    );

    // The API's JSON body is embedded as JSON; 400 explains itself.
    let ok = &results["ok-1"].json;
    assert!(ok["response"].is_object(), "{ok}");
    assert!(
        ok["error"].is_null() && ok["duplicate_of"].is_null(),
        "{ok}"
    );
    assert!(
        ok["validation_errors"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{ok}"
    );
    for t in ["received_at", "completed_at"] {
        let s = ok[t].as_str().unwrap();
        assert!(s.ends_with('Z') && chrono_like(s), "{t} = {s}");
    }
    assert!(
        results["r400"].json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too-large-file")
    );
    // 429 honoured Retry-After (1 s) between the two calls.
    let calls = sim.requests_for("r429-then-ok");
    let gap = calls[1].at.duration_since(calls[0].at).unwrap();
    assert!(
        gap >= Duration::from_millis(950),
        "429 retried after {gap:?}"
    );
    // No request id in the message: the result names the message's position.
    let rid = results["ok-1"].request_id();
    assert!(rid.starts_with(&format!("{}-", names.requests)), "{rid}");
    // The consumer counted what it committed.
    assert_eq!(worker.committed_results(), tasks.len() as u64);
    // Requests without a request_id are never looked up again: nothing stored.
    assert!(common::read_all(&boot, &names.outcomes).is_empty());
    worker.stop().await.expect("clean stop");
    sim.shutdown().await;
}

fn chrono_like(s: &str) -> bool {
    // 2026-11-23T17:37:19.123Z
    s.len() == 24 && s.as_bytes()[10] == b'T' && s.as_bytes()[19] == b'.'
}

/// Each broken rule gives an `invalid` result naming the field, before any
/// call; several broken rules are all reported.
#[tokio::test(flavor = "multi_thread")]
async fn each_validation_rule_gives_invalid_without_a_call() {
    let sim = start_ktip(KtipSimSettings::default()).await;
    let names = RescanNames::new("rescan-validation");
    let boot = bootstrap();
    let config = parse_rescan_config(&rescan_config_text(&boot, &sim, &names, "a", "", ""));
    let worker = spawn_rescan(config);
    let url = "https://samples.example.com/x.exe";
    // (rule, request, fields named in validation_errors)
    let cases: Vec<(&str, serde_json::Value, Vec<&str>)> = vec![
        ("url required", json!({"task_id": "v-1"}), vec!["url"]),
        (
            "url http(s)",
            json!({"task_id": "v-2", "url": "ftp://x/y"}),
            vec!["url"],
        ),
        (
            "url a string",
            json!({"task_id": "v-3", "url": 7}),
            vec!["url"],
        ),
        ("task_id required", json!({"url": url}), vec!["task_id"]),
        (
            "task_id charset",
            json!({"task_id": "a b", "url": url}),
            vec!["task_id"],
        ),
        (
            "task_id length",
            json!({"task_id": "t".repeat(129), "url": url}),
            vec!["task_id"],
        ),
        (
            "exec_time low",
            json!({"task_id": "v-4", "url": url, "exec_time": 29}),
            vec!["exec_time"],
        ),
        (
            "exec_time high",
            json!({"task_id": "v-5", "url": url, "exec_time": 501}),
            vec!["exec_time"],
        ),
        (
            "exec_time integer",
            json!({"task_id": "v-6", "url": url, "exec_time": "60"}),
            vec!["exec_time"],
        ),
        (
            "file_ext dot",
            json!({"task_id": "v-7", "url": url, "file_ext": ".exe"}),
            vec!["file_ext"],
        ),
        (
            "file_ext length",
            json!({"task_id": "v-8", "url": url, "file_ext": "abcdefghijk"}),
            vec!["file_ext"],
        ),
        (
            "processing_type",
            json!({"task_id": "v-9", "url": url, "processing_type": "run"}),
            vec!["processing_type"],
        ),
        (
            "unzip_password needs unzip-and-exec",
            json!({"task_id": "v-10", "url": url, "processing_type": "exec-only", "unzip_password": "pw-secret-1"}),
            vec!["unzip_password"],
        ),
        (
            "decrypt_https boolean",
            json!({"task_id": "v-11", "url": url, "decrypt_https": "true"}),
            vec!["decrypt_https"],
        ),
        (
            "click_on_links boolean",
            json!({"task_id": "v-12", "url": url, "click_on_links": 1}),
            vec!["click_on_links"],
        ),
        (
            "channel case",
            json!({"task_id": "v-13", "url": url, "channel": "tor"}),
            vec!["channel"],
        ),
        (
            "channel offered",
            json!({"task_id": "v-14", "url": url, "channel": "ZZ"}),
            vec!["channel"],
        ),
        (
            "exec_env offered",
            json!({"task_id": "v-15", "url": url, "exec_env": "Amiga"}),
            vec!["exec_env"],
        ),
        (
            "cmd_line length",
            json!({"task_id": "v-16", "url": url, "cmd_line": "x".repeat(1025)}),
            vec!["cmd_line"],
        ),
        (
            "request_id a string",
            json!({"task_id": "v-17", "url": url, "request_id": 5}),
            vec!["request_id"],
        ),
        (
            "unknown field",
            json!({"task_id": "v-18", "url": url, "priority": "high"}),
            vec!["priority"],
        ),
        (
            "every broken rule",
            json!({"task_id": "v-19", "url": "mailto:x", "exec_time": 1, "file_ext": ".a", "decrypt_https": 0}),
            vec!["url", "exec_time", "file_ext", "decrypt_https"],
        ),
    ];
    let reqs: Vec<Req> = cases
        .iter()
        .enumerate()
        .map(|(i, (_, v, _))| Req::json(&format!("case-{i}"), v.clone()))
        .collect();
    publish(&boot, &names.requests, &reqs).await;
    let results = wait_results(&boot, &names.results, cases.len(), Duration::from_secs(60)).await;
    assert_eq!(results.len(), cases.len());
    for r in &results {
        let i: usize = r.record.key_str().unwrap()["case-".len()..]
            .parse()
            .unwrap();
        let (rule, _, fields) = &cases[i];
        assert_eq!(r.status(), "invalid", "{rule}: {}", r.json);
        assert_eq!(r.kind(), Some("validation"), "{rule}: {}", r.json);
        assert!(r.json["http_status"].is_null() && r.json["response"].is_null());
        assert_eq!(r.json["attempts"], 0, "{rule}");
        let named: BTreeSet<&str> = r.json["validation_errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert!(!e["message"].as_str().unwrap().is_empty());
                e["field"].as_str().unwrap()
            })
            .collect();
        let want: BTreeSet<&str> = fields.iter().copied().collect();
        assert_eq!(named, want, "{rule}: {}", r.json);
    }
    assert!(
        sim.requests().iter().all(|r| r.task_id.is_none()),
        "no rescan call for an invalid request"
    );
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

/// A task id that would change the URL path is refused before any call.
#[tokio::test(flavor = "multi_thread")]
async fn path_injection_in_task_id_is_refused_before_any_call() {
    let sim = start_ktip(KtipSimSettings::default()).await;
    let names = RescanNames::new("rescan-injection");
    let boot = bootstrap();
    let worker = spawn_rescan(parse_rescan_config(&rescan_config_text(
        &boot, &sim, &names, "a", "", "",
    )));
    let evil = [
        "../../api/sandbox/channels",
        "x/../../y",
        "a%2F..%2Fb",
        "a?exec_time=500",
        "a#frag",
        "..",
        "a\\b",
        "a\u{0000}b",
        "ok-but-then/",
    ];
    let reqs: Vec<Req> = evil
        .iter()
        .map(|t| Req::json("k", json!({"task_id": t, "url": "https://e.example/x"})))
        .chain([Req::json("k", valid("legit-1"))])
        .collect();
    publish(&boot, &names.requests, &reqs).await;
    let results = wait_results(&boot, &names.results, reqs.len(), Duration::from_secs(60)).await;
    let invalid = results.iter().filter(|r| r.status() == "invalid").count();
    assert_eq!(invalid, evil.len());
    for r in results.iter().filter(|r| r.status() == "invalid") {
        let fields: Vec<&str> = r.json["validation_errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, ["task_id"], "{}", r.json);
    }
    let calls = sim.requests();
    let puts: Vec<_> = calls.iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(
        puts.len(),
        1,
        "only the legitimate request was sent: {calls:?}"
    );
    assert_eq!(puts[0].path, "/api/sandbox/tasks/file_from_url/legit-1");
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

/// Headers: the correlation id is copied byte for byte; a reply topic is
/// honoured only when allowed. A message that is not JSON gets an `invalid`
/// result and its bytes go to the DLQ with the reason and its origin.
#[tokio::test(flavor = "multi_thread")]
async fn correlation_reply_topics_and_non_json() {
    let sim = start_ktip(KtipSimSettings::default()).await;
    let names = RescanNames::new("rescan-headers");
    let allowed = format!("{}.replies", names.requests);
    let refused = format!("{}.elsewhere", names.requests);
    let boot = bootstrap();
    let extra = format!("reply_topic_allowlist = [\"{allowed}\"]");
    let worker = spawn_rescan(parse_rescan_config(&rescan_config_text(
        &boot, &sim, &names, "a", &extra, "",
    )));
    // The allowed reply topic must exist (the requester owns it).
    common::kafka::create_topic(&boot, &allowed, 1).await;
    let corr: &[u8] = &[0x00, 0xff, b'c', 0x80, 0x7f];
    let reqs = vec![
        Req::json("k1", valid("h-plain")).header("kafka_correlationId", corr),
        Req::json("k2", valid("h-allowed"))
            .header("kafka_replyTopic", allowed.as_bytes())
            .header("kafka_correlationId", b"corr-2"),
        Req::json("k3", valid("h-refused")).header("kafka_replyTopic", refused.as_bytes()),
        Req::raw("k4", b"\xff\xfe not json at all"),
        Req::raw("k5", b"[1, 2, 3]"),
    ];
    publish(&boot, &names.requests, &reqs).await;
    let results = wait_results(&boot, &names.results, 4, Duration::from_secs(60)).await;
    let replies = wait_results(&boot, &allowed, 1, Duration::from_secs(30)).await;
    assert_eq!(
        results.len(),
        4,
        "one result per request not sent elsewhere"
    );
    assert_eq!(replies.len(), 1);
    let key = |k: &str| {
        results
            .iter()
            .find(|r| r.record.key_str() == Some(k))
            .unwrap()
    };

    let plain = key("k1");
    assert_eq!(plain.status(), "accepted");
    let got = plain
        .record
        .headers
        .iter()
        .find(|(k, _)| k == "kafka_correlationId")
        .map(|(_, v)| v.as_slice());
    assert_eq!(got, Some(corr), "correlation id copied byte for byte");

    assert_eq!(replies[0].task_id(), "h-allowed");
    assert_eq!(replies[0].status(), "accepted");
    assert_eq!(
        replies[0].record.header("kafka_correlationId"),
        Some("corr-2")
    );

    let r = key("k3");
    assert_eq!(r.kind(), Some("reply_topic_not_allowed"), "{}", r.json);
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&refused)
    );
    assert_eq!(sim.calls_for("h-refused"), 0);

    for k in ["k4", "k5"] {
        let r = key(k);
        assert_eq!(r.status(), "invalid", "{}", r.json);
        assert_eq!(r.kind(), Some("not_json"), "{}", r.json);
    }
    let dlq = common::read_all(&boot, &names.dlq);
    assert_eq!(dlq.len(), 2);
    let values: BTreeSet<Vec<u8>> = dlq.iter().map(|d| d.value.clone()).collect();
    assert_eq!(
        values,
        BTreeSet::from([b"\xff\xfe not json at all".to_vec(), b"[1, 2, 3]".to_vec()])
    );
    for d in &dlq {
        assert!(
            d.header("dlq.reason").is_some_and(|r| !r.is_empty()),
            "{d:?}"
        );
        assert_eq!(
            d.header("source.topic"),
            Some(names.requests.as_str()),
            "{d:?}"
        );
        assert!(d.header("source.partition").is_some() && d.header("source.offset").is_some());
    }
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

/// A repeated request_id is answered from the stored outcome, without a
/// second call, also after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn duplicate_request_id_makes_one_call() {
    let sim = start_ktip(KtipSimSettings {
        latency: Duration::from_millis(300),
        ..KtipSimSettings::default()
    })
    .await;
    let names = RescanNames::new("rescan-dedup");
    let boot = bootstrap();
    let text = rescan_config_text(&boot, &sim, &names, "a", "", "");
    let worker = spawn_rescan(parse_rescan_config(&text));
    let mut req = valid("dup-task");
    req["request_id"] = json!("req-42");
    // Two at once (the second waits for the first's call), then one later.
    publish(
        &boot,
        &names.requests,
        &[
            Req::json("req-42", req.clone()),
            Req::json("req-42", req.clone()),
        ],
    )
    .await;
    let first = wait_results(&boot, &names.results, 2, Duration::from_secs(60)).await;
    worker.stop().await.unwrap();
    let worker = spawn_rescan(parse_rescan_config(&text));
    publish(&boot, &names.requests, &[Req::json("req-42", req)]).await;
    let all = wait_results(&boot, &names.results, 3, Duration::from_secs(60)).await;
    assert_eq!(all.len(), 3);
    assert_eq!(
        sim.calls_for("dup-task"),
        1,
        "one API call for one request_id"
    );
    let originals: Vec<_> = all
        .iter()
        .filter(|r| r.json["duplicate_of"].is_null())
        .collect();
    assert_eq!(originals.len(), 1);
    let original = originals[0];
    assert_eq!(original.status(), "accepted");
    for d in all.iter().filter(|r| !r.json["duplicate_of"].is_null()) {
        assert_eq!(d.request_id(), "req-42");
        assert_eq!(d.status(), "accepted");
        assert_eq!(d.json["response"], original.json["response"]);
        assert_eq!(d.json["attempts"], 0);
        let of = d.json["duplicate_of"].as_str().unwrap();
        assert!(
            of.starts_with(&names.requests),
            "duplicate_of names the original message: {of}"
        );
    }
    assert!(first.iter().any(|r| !r.json["duplicate_of"].is_null()));
    assert_eq!(worker.metrics.rescan.duplicates.get(), 1);
    let stored = common::read_all(&boot, &names.outcomes);
    assert_eq!(stored.len(), 1, "one outcome remembered, for req-42");
    assert_eq!(stored[0].key_str(), Some("req-42"));
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

/// Wrong password: the API's 401 is the request's answer (below the pause threshold).
#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_is_rejected() {
    let sim = start_ktip(KtipSimSettings::default()).await;
    let names = RescanNames::new("rescan-badpw");
    let boot = bootstrap();
    let text = rescan_config_text(&boot, &sim, &names, "a", "", "").replace(
        &format!("password = \"{KTIP_PASSWORD}\""),
        "password = \"wrong-password-9\"",
    );
    let worker = spawn_rescan(parse_rescan_config(&text));
    publish(&boot, &names.requests, &[Req::json("k", valid("pw-1"))]).await;
    let r = wait_results(&boot, &names.results, 1, Duration::from_secs(60)).await;
    assert_eq!(r[0].status(), "rejected", "{}", r[0].json);
    assert_eq!(r[0].kind(), Some("unauthorized"));
    assert_eq!(r[0].json["http_status"], 401);
    assert!(
        !r[0]
            .record
            .value
            .windows(16)
            .any(|w| w == b"wrong-password-9")
    );
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

/// Without a client certificate the handshake is refused: a `tls` error that says so.
#[tokio::test(flavor = "multi_thread")]
async fn no_client_certificate_is_a_clear_tls_error() {
    let sim = start_ktip(KtipSimSettings::default()).await;
    let names = RescanNames::new("rescan-nocert");
    let boot = bootstrap();
    let text = rescan_config_text(&boot, &sim, &names, "a", "", "");
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("client_cert"))
        .collect::<Vec<_>>()
        .join("\n");
    let worker = spawn_rescan(parse_rescan_config(&text));
    publish(&boot, &names.requests, &[Req::json("k", valid("tls-1"))]).await;
    let r = wait_results(&boot, &names.results, 1, Duration::from_secs(60)).await;
    assert_eq!(r[0].status(), "failed", "{}", r[0].json);
    assert_eq!(r[0].kind(), Some("tls"), "{}", r[0].json);
    let msg = r[0].json["error"]["message"]
        .as_str()
        .unwrap()
        .to_lowercase();
    assert!(msg.contains("certificate"), "{msg}");
    assert!(r[0].json["http_status"].is_null());
    assert_eq!(sim.calls_for("tls-1"), 0, "the request never reached HTTP");
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

/// Persistent 401: after `auth_failures_to_pause` the consumer pauses (no
/// rejected backlog, unready, metric), probes, and resumes by itself.
#[tokio::test(flavor = "multi_thread")]
async fn persistent_401_pauses_then_resumes() {
    let sim = start_ktip(KtipSimSettings::default()).await;
    sim.set_credentials_valid(false);
    let names = RescanNames::new("rescan-pause");
    let boot = bootstrap();
    let worker = spawn_rescan(parse_rescan_config(&rescan_config_text(
        &boot,
        &sim,
        &names,
        "a",
        "auth_failures_to_pause = 3\nmax_in_flight = 1",
        "",
    )));
    let reqs: Vec<Req> = (0..20)
        .map(|i| Req::json("k", valid(&format!("p-{i}"))))
        .collect();
    publish(&boot, &names.requests, &reqs).await;
    wait_until(Duration::from_secs(60), || {
        worker.metrics.rescan.paused.get() == 1
    })
    .await;
    let reason = worker.readiness.check().expect_err("unready while paused");
    assert!(
        reason
            .iter()
            .any(|r| r.contains("401") || r.contains("credentials")),
        "{reason:?}"
    );
    // Paused: nothing more is rejected however long it lasts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = read_results(&boot, &names.results);
    assert!(during.len() <= 3, "{} results while paused", during.len());
    assert!(during.iter().all(|r| r.kind() == Some("unauthorized")));
    let probes = sim.requests().iter().filter(|r| r.method == "GET").count();
    assert!(probes >= 2, "the consumer probes while paused ({probes})");

    sim.set_credentials_valid(true);
    let all = wait_results(&boot, &names.results, 20, Duration::from_secs(60)).await;
    assert_eq!(all.len(), 20, "exactly one result per request");
    let accepted = all.iter().filter(|r| r.status() == "accepted").count();
    let rejected: Vec<_> = all.iter().filter(|r| r.status() == "rejected").collect();
    assert!(rejected.len() <= 3, "at most the threshold is rejected");
    assert!(rejected.iter().all(|r| r.kind() == Some("unauthorized")));
    assert_eq!(accepted + rejected.len(), 20);
    wait_until(Duration::from_secs(10), || {
        worker.metrics.rescan.paused.get() == 0
    })
    .await;
    assert!(worker.readiness.check().is_ok());
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

/// Instances join and leave the group while calls are in flight: every
/// request message still gets exactly one result.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_added_and_one_removed_mid_flight() {
    let sim = start_ktip(KtipSimSettings {
        latency: Duration::from_millis(50),
        ..KtipSimSettings::default()
    })
    .await;
    let names = RescanNames::new("rescan-group");
    let boot = bootstrap();
    let kafka_extra = "\"session.timeout.ms\" = 6000\n\"heartbeat.interval.ms\" = 500";
    let config = |instance: &str| {
        parse_rescan_config(&rescan_config_text(
            &boot,
            &sim,
            &names,
            instance,
            "max_in_flight = 4",
            kafka_extra,
        ))
    };
    let total = 600;
    let reqs: Vec<Req> = (0..total)
        .map(|i| Req::json(&format!("key-{i}"), valid(&format!("g-{i}"))))
        .collect();
    publish(&boot, &names.requests, &reqs).await;
    let a = spawn_rescan(config("a"));
    wait_until(Duration::from_secs(60), || a.committed_results() >= 50).await;
    let b = spawn_rescan(config("b"));
    wait_until(Duration::from_secs(60), || b.committed_results() >= 50).await;
    assert!(
        sim.stats().requests(200) < total as u64,
        "A leaves with work left"
    );
    a.stop().await.expect("A stops cleanly");
    let c = spawn_rescan(config("c"));
    let results = wait_results(&boot, &names.results, total, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let late = read_results(&boot, &names.results);
    assert_eq!(late.len(), results.len(), "no late duplicate");
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for r in &results {
        assert_eq!(r.status(), "accepted", "{}", r.json);
        *per_key
            .entry(r.record.key_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_key.len(), total, "every request message has a result");
    assert!(per_key.values().all(|n| *n == 1), "no duplicate result");
    assert!(c.committed_results() + b.committed_results() > 0);
    b.stop().await.unwrap();
    c.stop().await.unwrap();
    sim.shutdown().await;
}

/// An API slower than `max.poll.interval.ms` never gets the consumer evicted
/// from its group: every call is made once and every request answered once.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_api_never_gets_the_consumer_evicted() {
    let sim = start_ktip(rules(vec![TaskRule::prefix(
        "slow-",
        TaskAction::Delay(Duration::from_secs(8)),
    )]))
    .await;
    let names = RescanNames::new("rescan-slow");
    let boot = bootstrap();
    let kafka_extra = "\"session.timeout.ms\" = 6000\n\"max.poll.interval.ms\" = 6000\n\"heartbeat.interval.ms\" = 500";
    let worker = spawn_rescan(parse_rescan_config(&rescan_config_text(
        &boot,
        &sim,
        &names,
        "a",
        "max_in_flight = 1\nrequest_timeout = \"30s\"",
        kafka_extra,
    )));
    let tasks = ["slow-1", "fast-1", "slow-2", "fast-2", "fast-3"];
    let reqs: Vec<Req> = tasks.iter().map(|t| Req::json(t, valid(t))).collect();
    publish(&boot, &names.requests, &reqs).await;
    let results = wait_results(&boot, &names.results, tasks.len(), Duration::from_secs(120)).await;
    let results = by_task(&results);
    for t in tasks {
        assert_eq!(results[t].status(), "accepted", "{}", results[t].json);
        assert_eq!(
            sim.calls_for(t),
            1,
            "{t} called once: no eviction, no restart"
        );
    }
    worker.stop().await.unwrap();
    sim.shutdown().await;
}

/// `max_requests_per_minute` bounds the calls started: at 60 per minute,
/// calls are at least about a second apart however many could run at once.
#[tokio::test(flavor = "multi_thread")]
async fn max_requests_per_minute_spaces_the_calls() {
    let sim = start_ktip(KtipSimSettings::default()).await;
    let names = RescanNames::new("rescan-rate");
    let boot = bootstrap();
    let text = rescan_config_text(&boot, &sim, &names, "a", "max_in_flight = 8", "").replace(
        "max_requests_per_minute = 60000",
        "max_requests_per_minute = 60",
    );
    let worker = spawn_rescan(parse_rescan_config(&text));
    let reqs: Vec<Req> = (0..4)
        .map(|i| Req::json("k", valid(&format!("rate-{i}"))))
        .collect();
    publish(&boot, &names.requests, &reqs).await;
    wait_results(&boot, &names.results, 4, Duration::from_secs(60)).await;
    let mut times: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.at)
        .collect();
    times.sort();
    assert_eq!(times.len(), 4);
    let spread = times[3].duration_since(times[0]).unwrap();
    assert!(
        spread >= Duration::from_millis(2800),
        "4 calls within {spread:?} at 60/min"
    );
    worker.stop().await.unwrap();
    sim.shutdown().await;
}
