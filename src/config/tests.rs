use std::collections::BTreeMap;
use std::path::Path;

use super::*;

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("."), &env(&[]))
}

fn error_of(text: &str) -> String {
    parse(text)
        .expect_err("configuration should be refused")
        .to_string()
}

const MINIMAL: &str = r#"
[kafka]
bootstrap_servers = "localhost:9092"
[feed]
api_key = "k"
"#;

#[test]
fn minimal_file_gets_working_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.kafka.bootstrap_servers, "localhost:9092");
    assert!(c.kafka.create_topics);
    let f = &c.feed;
    assert_eq!(f.base_url, "https://www.virustotal.com");
    assert_eq!(f.topic, "vt.file-behaviours");
    assert_eq!(f.dlq_topic, "vt.file-behaviours.dlq");
    assert_eq!(f.state_topic, "sandbox-bridge.feed-state");
    assert_eq!(f.transactional_id, "sandbox-bridge-feed");
    assert_eq!(f.start, None);
    assert_eq!(f.max_message_bytes, 1 << 20);
    assert_eq!(f.missing_threshold, 2);
    assert_eq!(f.delivery, Delivery::ExactlyOnce);
    assert_eq!(f.missing_policy, MissingPolicy::RecheckThenGap);
    assert_eq!(f.api_key.expose(), "k");
    assert_eq!(c.metrics.listen, Some("0.0.0.0:9464".parse().unwrap()));
    assert_eq!(c.log.format, LogFormat::Text);
}

#[test]
fn fixed_contract_keys_are_read() {
    let c = parse(
        r#"
[kafka]
bootstrap_servers = "b1:9092,b2:9092"
[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.password" = "hunter2"
"socket.timeout.ms" = 10000
[feed]
base_url = "http://127.0.0.1:8080/"
api_key = "k"
topic = "t"
dlq_topic = "t.dlq"
state_topic = "t.state"
transactional_id = "tx-1"
start = "2026-11-20T10:15:30Z"
max_message_bytes = 2097152
missing_threshold = 3
delivery = "at-least-once"
[metrics]
listen = "127.0.0.1:9999"
"#,
    )
    .unwrap();
    assert_eq!(
        c.kafka.properties.get("security.protocol"),
        Some("SASL_SSL")
    );
    assert_eq!(c.kafka.properties.get("socket.timeout.ms"), Some("10000"));
    let f = &c.feed;
    assert_eq!(f.base_url, "http://127.0.0.1:8080");
    assert_eq!(
        (
            f.topic.as_str(),
            f.dlq_topic.as_str(),
            f.state_topic.as_str()
        ),
        ("t", "t.dlq", "t.state")
    );
    assert_eq!(f.transactional_id, "tx-1");
    assert_eq!(f.start.unwrap().to_string(), "202611201015");
    assert_eq!(f.max_message_bytes, 2 << 20);
    assert_eq!(f.missing_threshold, 3);
    assert_eq!(f.delivery, Delivery::AtLeastOnce);
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9999".parse().unwrap()));
}

#[test]
fn secrets_never_print() {
    let c = parse(
        r#"
[kafka]
bootstrap_servers = "b:9092"
[kafka.properties]
"sasl.password" = "hunter2"
"ssl.key.password" = "keypass"
"sasl.jaas.config" = "jaas-secret"
"sasl.oauthbearer.client.secret" = "oidc-secret"
"sasl.username" = "alice"
[feed]
api_key = "vt-secret-key"
"#,
    )
    .unwrap();
    let printed = format!("{c:?} {}", c.feed.api_key);
    for secret in [
        "hunter2",
        "keypass",
        "jaas-secret",
        "oidc-secret",
        "vt-secret-key",
    ] {
        assert!(!printed.contains(secret), "{secret} printed in {printed}");
    }
    assert!(
        printed.contains("alice"),
        "non-secret properties stay readable"
    );
    assert!(printed.contains("[redacted]"));
}

#[test]
fn api_key_comes_from_file_or_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vt.key"), "from-file\n").unwrap();
    let text = "[kafka]\nbootstrap_servers = \"b:9092\"\n[feed]\napi_key_file = \"vt.key\"\n";
    let c = Config::parse(text, dir.path(), &env(&[("VT_API_KEY", "from-env")])).unwrap();
    assert_eq!(c.feed.api_key.expose(), "from-file");

    let text = "[kafka]\nbootstrap_servers = \"b:9092\"\n";
    let c = Config::parse(text, dir.path(), &env(&[("VT_API_KEY", "from-env")])).unwrap();
    assert_eq!(c.feed.api_key.expose(), "from-env");

    let e = Config::parse(text, dir.path(), &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("feed.api_key:") && e.contains("VT_API_KEY"),
        "{e}"
    );

    let text = "[kafka]\nbootstrap_servers = \"b:9092\"\n[feed]\napi_key_file = \"nope.key\"\n";
    let e = Config::parse(text, dir.path(), &env(&[]))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("feed.api_key_file: cannot read"), "{e}");
}

#[test]
fn invalid_values_name_the_key_and_reason() {
    let cases: &[(&str, &str)] = &[
        (
            "[feed]\napi_key='k'\nmax_message_bytes = 12",
            "feed.max_message_bytes: must be between",
        ),
        (
            "[feed]\napi_key='k'\nmissing_threshold = 0",
            "feed.missing_threshold: must be between",
        ),
        (
            "[feed]\napi_key='k'\ndelivery = 'twice'",
            "feed.delivery: `twice` is not one of",
        ),
        (
            "[feed]\napi_key='k'\nstart = 'yesterday'",
            "feed.start: `yesterday` is not a minute",
        ),
        (
            "[feed]\napi_key='k'\ntopic = 'bad topic'",
            "feed.topic: `bad topic` is not a valid Kafka topic",
        ),
        (
            "[feed]\napi_key='k'\nbase_url = 'ftp://x'",
            "feed.base_url: must be an http(s) URL",
        ),
        (
            "[feed]\napi_key='k'\nmissing_policy = 'ignore'",
            "feed.missing_policy:",
        ),
        (
            "[feed]\napi_key='k'\nretry_initial_backoff = 'soon'",
            "retry_initial_backoff",
        ),
        (
            "[feed]\napi_key='k'\n[metrics]\nlisten = '0.0.0.0:9090'",
            "metrics.listen: port 9090 belongs to Prometheus",
        ),
        (
            "[feed]\napi_key='k'\n[metrics]\nlisten = '0.0.0.0:3000'",
            "metrics.listen: port 3000 belongs to Grafana",
        ),
        (
            "[feed]\napi_key='k'\n[metrics]\nlisten = 'localhost'",
            "metrics.listen: `localhost` is not an address",
        ),
        ("[feed]\napi_key='k'\n[log]\nformat = 'xml'", "log.format:"),
        ("[feed]\napi_key='k'\ntopik = 'x'", "unknown field `topik`"),
        (
            "[feed]\napi_key='k'\napi_key_file='f'",
            "feed.api_key: set either",
        ),
        (
            "[feed]\napi_key='k'\n[kafka.properties]\n'transactional.id' = 'x'",
            "kafka.properties.\"transactional.id\": cannot be set here",
        ),
    ];
    for (body, expected) in cases {
        let text = format!("[kafka]\nbootstrap_servers = 'b:9092'\n{body}\n");
        let e = error_of(&text);
        assert!(
            e.contains(expected),
            "for {body:?}: got {e:?}, expected {expected:?}"
        );
    }
    assert!(error_of("[feed]\napi_key='k'\n").contains("kafka"));
}

#[test]
fn metrics_can_be_switched_off() {
    let c = parse(&format!("{MINIMAL}\n[metrics]\nlisten = \"off\"\n")).unwrap();
    assert_eq!(c.metrics.listen, None);
}

#[test]
fn every_shipped_example_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            Config::parse(
                &text,
                &dir,
                &env(&[
                    ("VT_API_KEY", "example-key"),
                    ("KTIP_USERNAME", "example-user"),
                    ("KTIP_PASSWORD", "example-password"),
                ]),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen > 0, "no example configuration under config/");
}

const RESCAN_ONLY: &str = r#"
[kafka]
bootstrap_servers = "localhost:9092"
[rescan]
username = "alice"
password = "ktip-secret-pw"
"#;

#[test]
fn a_rescan_section_alone_runs_only_the_consumer_with_working_defaults() {
    let c = parse(RESCAN_ONLY).unwrap();
    assert!(!c.feed.enabled, "no [feed] section: the feed worker is off");
    let r = &c.rescan;
    assert!(r.enabled);
    assert_eq!(r.base_url, "https://tip.kaspersky.com");
    assert_eq!(r.requests_topic, "ktip.rescan.requests");
    assert_eq!(r.results_topic, "ktip.rescan.results");
    assert_eq!(r.dlq_topic, "ktip.rescan.requests.dlq");
    assert_eq!(r.group_id, "sandbox-bridge-rescan");
    assert!(r.reply_topic_allowlist.is_empty());
    assert_eq!((r.max_in_flight, r.max_requests_per_minute), (8, 120));
    assert_eq!(r.client_cert, None);
    assert_eq!(r.username.expose(), "alice");
    assert_eq!(r.password.expose(), "ktip-secret-pw");
    // Each instance its own transactional id: prefix plus instance.
    assert!(
        r.transactional_id()
            .ends_with(&format!("-{}", r.instance_id))
    );
    // Without [rescan] the consumer is off and needs no credentials.
    assert!(!parse(MINIMAL).unwrap().rescan.enabled);
}

#[test]
fn rescan_contract_keys_and_enabled_switches_are_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client.pem"), "pem").unwrap();
    std::fs::write(dir.path().join("pw"), "from-file-pw\n").unwrap();
    let text = r#"
[kafka]
bootstrap_servers = "localhost:9092"
[feed]
enabled = false
api_key = "k"
[rescan]
base_url = "https://tip.example.net/"
username = "bob"
password_file = "pw"
client_cert = "client.pem"
ca_cert = "client.pem"
requests_topic = "rq"
results_topic = "rs"
dlq_topic = "rd"
group_id = "g1"
reply_topic_allowlist = ["team-a.replies", "team-b.replies"]
max_in_flight = 32
max_requests_per_minute = 600
instance_id = "pod-7"
transactional_id_prefix = "rescan-tx"
"#;
    let c = Config::parse(text, dir.path(), &env(&[])).unwrap();
    assert!(!c.feed.enabled && c.rescan.enabled);
    let r = &c.rescan;
    assert_eq!(r.password.expose(), "from-file-pw");
    assert_eq!(r.client_cert, Some(dir.path().join("client.pem")));
    assert_eq!(
        (
            r.requests_topic.as_str(),
            r.results_topic.as_str(),
            r.dlq_topic.as_str()
        ),
        ("rq", "rs", "rd")
    );
    assert_eq!(r.group_id, "g1");
    assert_eq!(
        r.reply_topic_allowlist,
        ["team-a.replies", "team-b.replies"]
    );
    assert_eq!((r.max_in_flight, r.max_requests_per_minute), (32, 600));
    assert_eq!(r.transactional_id(), "rescan-tx-pod-7");
    // Credentials from the environment.
    let from_env = Config::parse(
        "[kafka]\nbootstrap_servers = \"b:9092\"\n[rescan]\n",
        dir.path(),
        &env(&[("KTIP_USERNAME", "carol"), ("KTIP_PASSWORD", "env-pw")]),
    )
    .unwrap();
    assert_eq!(from_env.rescan.username.expose(), "carol");
    assert_eq!(from_env.rescan.password.expose(), "env-pw");
    assert!(
        format!("{from_env:?}").find("env-pw").is_none(),
        "Debug hides the password"
    );
}

#[test]
fn invalid_rescan_values_name_the_key_and_never_the_password() {
    for (extra, key) in [
        ("max_in_flight = 0", "rescan.max_in_flight"),
        (
            "max_requests_per_minute = 0",
            "rescan.max_requests_per_minute",
        ),
        ("base_url = \"tip.example\"", "rescan.base_url"),
        ("client_cert = \"/no/such/file.pem\"", "rescan.client_cert"),
        ("group_id = \"\"", "rescan.group_id"),
        ("instance_id = \"a/b\"", "rescan.instance_id"),
        (
            "reply_topic_allowlist = [\"bad topic\"]",
            "rescan.reply_topic_allowlist",
        ),
        ("results_topic = \"\"", "rescan.results_topic"),
        ("colour = \"blue\"", "colour"),
    ] {
        let e = error_of(&format!("{RESCAN_ONLY}{extra}\n"));
        assert!(e.contains(key), "{extra}: {e}");
        assert!(!e.contains("ktip-secret-pw"), "{e}");
    }
    let e = error_of("[kafka]\nbootstrap_servers = \"b:9092\"\n[rescan]\nusername = \"u\"\n");
    assert!(
        e.contains("rescan.password") && e.contains("KTIP_PASSWORD"),
        "{e}"
    );
}

#[test]
fn syntax_errors_name_the_place_but_never_quote_a_value() {
    for (text, key) in [
        ("[feed]\napi_key = \"s3cret-key-9f2\nx = 1\n", "api_key"),
        ("[rescan]\npassword = 4711999\n", "password"),
        (
            "[kafka]\nbootstrap_servers = \"b:9092\"\n[kafka.properties]\n\"sasl.password\" = [\"pw-in-a-list-77\"\n",
            "",
        ),
    ] {
        let e = error_of(text);
        assert!(e.contains("line "), "{e}");
        assert!(e.contains(key), "{e}");
        for secret in ["s3cret-key-9f2", "4711999", "pw-in-a-list-77"] {
            assert!(!e.contains(secret), "{e}");
        }
    }
}
