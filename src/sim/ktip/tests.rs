//! HTTPS behaviour of the KTIP simulator, driven with reqwest on port 0,
//! with the certificates the simulator writes.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use secrecy::SecretString;

use super::*;

const USER: &str = "analyst";
const PASSWORD: &str = "s3cret-pw";
const URL: &str = "https://files.example.test/sample.zip";

struct Sim {
    handle: KtipSimHandle,
    http: reqwest::Client,
}

fn settings() -> KtipSimSettings {
    KtipSimSettings {
        username: USER.to_string(),
        password: SecretString::from(PASSWORD),
        forbidden_usernames: vec!["quota-user".to_string()],
        ..KtipSimSettings::default()
    }
}

async fn start(settings: KtipSimSettings) -> Sim {
    let handle = KtipSimulator::start(settings, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let client_pem = std::fs::read(handle.client_cert_path()).unwrap();
    let http = client(&handle, Some(&client_pem));
    Sim { handle, http }
}

/// A client trusting only the simulator's CA, presenting `identity` (cert + key PEM).
fn client(handle: &KtipSimHandle, identity: Option<&[u8]>) -> reqwest::Client {
    let ca = std::fs::read(handle.ca_cert_path()).unwrap();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
    if let Some(pem) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(pem).unwrap());
    }
    builder.build().unwrap()
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.handle.base_url())
    }

    async fn rescan(&self, task_id: &str, query: &[(&str, &str)]) -> reqwest::Response {
        self.rescan_as(task_id, query, USER, PASSWORD).await
    }

    async fn rescan_as(
        &self,
        task_id: &str,
        query: &[(&str, &str)],
        user: &str,
        password: &str,
    ) -> reqwest::Response {
        self.http
            .put(self.url(&format!("{RESCAN_PATH_PREFIX}{task_id}")))
            .basic_auth(user, Some(password))
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .query(query)
            .send()
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap()
    }
}

async fn json(response: reqwest::Response) -> serde_json::Value {
    let text = response.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn assert_error(response: reqwest::Response, status: StatusCode, error: &str) {
    assert_eq!(response.status(), status);
    let body = json(response).await;
    assert_eq!(body["error"], error, "{body}");
    assert!(body["description"].is_string(), "{body}");
}

/// Whether a `rustls::Error` is somewhere in `e`'s source chain. (`io::Error`
/// hides its payload from `source()`, hence `get_ref`.)
fn is_tls_error(e: &reqwest::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        next = err.source();
    }
    false
}

fn chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(err) = next {
        out.push_str(&format!(": {err}"));
        next = err.source();
    }
    out
}

#[tokio::test]
async fn handshake_is_refused_without_a_certificate_of_the_simulators_ca() {
    let sim = start(settings()).await;
    let expired = std::fs::read(&sim.handle.pki_files().expired_client_cert).unwrap();
    let foreign = std::fs::read(&sim.handle.pki_files().foreign_client_cert).unwrap();
    for (what, identity) in [
        ("no certificate", None),
        ("expired certificate", Some(&expired[..])),
        ("certificate of another CA", Some(&foreign[..])),
    ] {
        let err = client(&sim.handle, identity)
            .get(sim.url(EXEC_ENV_PATH))
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect_err(what);
        assert!(is_tls_error(&err), "{what}: {}", chain(&err));
    }
    assert!(sim.handle.requests().is_empty());
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.handle.stats().tls_handshakes_refused < 3 {
        assert!(Instant::now() < deadline, "{:?}", sim.handle.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn basic_auth_gives_401_for_bad_credentials_and_403_for_forbidden_users() {
    let sim = start(settings()).await;
    let q = [("url", URL)];
    let r = sim.rescan_as("t-1", &q, USER, "wrong").await;
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    assert_error(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    let r = sim.rescan_as("t-1", &q, "nobody", PASSWORD).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = sim.http.get(sim.url(CHANNELS_PATH)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no header at all");
    let r = sim.rescan_as("t-1", &q, "quota-user", PASSWORD).await;
    assert_error(r, StatusCode::FORBIDDEN, "forbidden").await;
    let r = sim.rescan_as("t-1", &q, "quota-user", "wrong").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    let auths: Vec<_> = sim
        .handle
        .requests()
        .iter()
        .map(|r| (r.auth, r.username.clone(), r.status))
        .collect();
    assert_eq!(
        auths,
        [
            (AuthOutcome::Invalid, Some(USER.to_string()), 401),
            (AuthOutcome::Invalid, Some("nobody".to_string()), 401),
            (AuthOutcome::Missing, None, 401),
            (AuthOutcome::Forbidden, Some("quota-user".to_string()), 403),
            (AuthOutcome::Invalid, Some("quota-user".to_string()), 401),
        ]
    );
    assert_eq!(sim.handle.calls_for("t-1"), 4);
}

#[tokio::test]
async fn a_valid_rescan_gets_a_task_body_and_is_recorded_with_its_query() {
    let sim = start(settings()).await;
    let query = [
        ("url", URL),
        ("exec_env", "Windows 10 x64"),
        ("exec_time", "120"),
        ("file_ext", "zip"),
        ("processing_type", "unzip-and-exec"),
        ("unzip_password", "infected"),
        ("decrypt_https", "false"),
        ("click_on_links", "true"),
        ("channel", "Tarpit"),
        ("doc_password", "doc-pw"),
        ("cmd_line", "%%SYSTEMROOT%%\\notepad.exe /A $sample"),
    ];
    let r = sim.rescan("task-42", &query).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body = json(r).await;
    assert_eq!(body["task_id"], "task-42");
    assert_eq!(body["status"], "created");
    assert_eq!(body["file_url"], URL);
    assert_eq!(body["exec_env"], "Windows 10 x64");
    assert_eq!(body["exec_time"], 120);
    assert!(
        body["created_at"].as_str().unwrap().ends_with('Z'),
        "{body}"
    );

    let records = sim.handle.requests_for("task-42");
    assert_eq!(records.len(), 1);
    let record = &records[0];
    let expected: Vec<(String, String)> = query
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    assert_eq!(record.query, expected);
    assert_eq!(record.param("unzip_password"), Some("infected"));
    assert_eq!((record.method.as_str(), record.status), ("PUT", 200));
    assert_eq!(record.path, "/api/sandbox/tasks/file_from_url/task-42");
    assert!(record.auth.is_ok());
    assert_eq!(
        record.client_subject.as_deref(),
        Some("CN=sandbox-bridge-sim-client, O=KTIP sandbox simulator")
    );
    let shown = format!("{record:?}");
    assert!(
        !shown.contains("infected") && !shown.contains("doc-pw"),
        "{shown}"
    );
    let seen = sim.handle.stats().param_names_seen;
    assert_eq!(seen.len(), PARAM_NAMES.len());

    // Only what was set is sent: the simulator picks the rest.
    let r = sim.rescan("task-43", &[("url", URL)]).await;
    let body = json(r).await;
    assert_eq!(body["exec_env"], DEFAULT_EXEC_ENVS[0]);
    assert_eq!(sim.handle.requests_for("task-43")[0].param_names(), ["url"]);
    assert_eq!(sim.handle.calls_for("task-42"), 1);
}

#[tokio::test]
async fn invalid_parameters_and_bodies_get_400_invalid_params() {
    let sim = start(settings()).await;
    let long_cmd = "x".repeat(MAX_CMD_LINE_CHARS + 1);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("exec_env", "Windows 10 x64")],
        vec![("url", "file:///etc/passwd")],
        vec![("url", URL), ("exec_env", "windows 10 x64")],
        vec![("url", URL), ("exec_time", "10")],
        vec![("url", URL), ("exec_time", "600")],
        vec![("url", URL), ("file_ext", ".zip")],
        vec![("url", URL), ("file_ext", "abcdefghijk")],
        vec![("url", URL), ("processing_type", "unzip")],
        vec![("url", URL), ("unzip_password", "pw")],
        vec![("url", URL), ("decrypt_https", "yes")],
        vec![("url", URL), ("click_on_links", "TRUE")],
        vec![("url", URL), ("channel", "tor")],
        vec![("url", URL), ("cmd_line", &long_cmd)],
        vec![("url", URL), ("priority", "high")],
        vec![("url", URL), ("channel", "")],
    ];
    for query in &cases {
        let r = sim.rescan("t-1", query).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query:?}");
        assert_error(r, StatusCode::BAD_REQUEST, "invalid-params").await;
    }
    let r = sim
        .http
        .put(sim.url(&format!("{RESCAN_PATH_PREFIX}t-1")))
        .basic_auth(USER, Some(PASSWORD))
        .query(&[("url", URL)])
        .body("url=https://x.test")
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::BAD_REQUEST, "invalid-params").await;
    assert_eq!(sim.handle.calls_for("t-1"), cases.len() as u32 + 1);

    let r = sim.get(&format!("{RESCAN_PATH_PREFIX}t-1")).await;
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let r = sim.get("/api/sandbox/tasks/file_from_url/a/b").await;
    assert_error(r, StatusCode::NOT_FOUND, "not-found").await;
}

#[tokio::test]
async fn rules_inject_each_failure() {
    let cases = [
        ("big", TaskAction::TooLargeFile, 400, "too-large-file"),
        ("unauth", TaskAction::Unauthorized, 401, "unauthorized"),
        ("forbid", TaskAction::Forbidden, 403, "forbidden"),
        ("hung", TaskAction::TaskFailed, 404, "not-found"),
        (
            "legal",
            TaskAction::LegalReasons,
            451,
            "unavailable-for-legal-reasons",
        ),
        ("boom", TaskAction::Internal, 500, "internal-error"),
    ];
    let mut s = settings();
    s.rules = cases
        .iter()
        .map(|(id, action, _, _)| TaskRule::task(id, *action))
        .collect();
    s.rules.push("quota-*=429:2500ms".parse().unwrap());
    s.rules
        .push(TaskRule::prefix("down-", TaskAction::Unavailable));
    let sim = start(s).await;
    for (id, _, status, error) in cases {
        let r = sim.rescan(id, &[("url", URL)]).await;
        assert_error(r, StatusCode::from_u16(status).unwrap(), error).await;
    }
    let r = sim.rescan("quota-1", &[("url", URL)]).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "3");
    let r = sim.rescan("down-1", &[("url", URL)]).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("Service Unavailable"));
    // A rule never hides a bad request.
    let r = sim.rescan("boom", &[("exec_time", "5")]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = sim.rescan("other", &[("url", URL)]).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn failing_the_first_k_attempts_then_succeeding() {
    let mut s = settings();
    s.rules = vec!["flaky-*=503/2".parse().unwrap()];
    let sim = start(s).await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(
            sim.rescan("flaky-1", &[("url", URL)])
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [503, 503, 200]);
    assert_eq!(sim.handle.calls_for("flaky-1"), 3);
    // Attempts are counted per task id.
    let r = sim.rescan("flaky-2", &[("url", URL)]).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    // Set at run time, checked before the configured rules.
    sim.handle
        .set_rule(TaskRule::task("flaky-2", TaskAction::LegalReasons).first(2));
    let r = sim.rescan("flaky-2", &[("url", URL)]).await;
    assert_eq!(r.status().as_u16(), 451, "attempt 2");
    let r = sim.rescan("flaky-2", &[("url", URL)]).await;
    assert_eq!(r.status(), StatusCode::OK, "attempt 3 is past both rules");
    sim.handle.clear_rules();
    let r = sim.rescan("flaky-3", &[("url", URL)]).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn latency_and_delay_rules_are_honoured() {
    let mut s = settings();
    s.latency = Duration::from_millis(100);
    s.rules = vec![TaskRule::task(
        "slow",
        TaskAction::Delay(Duration::from_millis(150)),
    )];
    let sim = start(s).await;
    let started = Instant::now();
    let r = sim.get(EXEC_ENV_PATH).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(100));
    let started = Instant::now();
    let r = sim.rescan("slow", &[("url", URL)]).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    // Latency applies to failures too.
    let started = Instant::now();
    let r = sim.rescan_as("fast", &[("url", URL)], USER, "wrong").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn serves_the_lookup_lists_in_both_shapes() {
    let sim = start(settings()).await;
    let envs = json(sim.get(EXEC_ENV_PATH).await).await;
    assert_eq!(envs, serde_json::json!(DEFAULT_EXEC_ENVS));
    let channels = json(sim.get(CHANNELS_PATH).await).await;
    assert_eq!(channels, serde_json::json!(DEFAULT_CHANNELS));
    assert!(sim.handle.requests().iter().all(|r| r.task_id.is_none()));
    assert_eq!(sim.handle.calls_for("channels"), 0);

    let mut s = settings();
    s.exec_envs = vec!["Windows 10 x64".to_string()];
    s.channels = vec!["TOR".to_string(), "US".to_string()];
    s.channels_as_objects = true;
    let sim = start(s).await;
    let channels = json(sim.get(CHANNELS_PATH).await).await;
    assert_eq!(
        channels,
        serde_json::json!([{"name": "TOR"}, {"name": "US"}])
    );
    let r = sim.rescan("t-1", &[("url", URL), ("channel", "US")]).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = sim.rescan("t-1", &[("url", URL), ("channel", "RU")]).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "RU is not served here");
}

#[tokio::test]
async fn credentials_can_be_switched_off_and_back_at_run_time() {
    let sim = start(settings()).await;
    assert_eq!(sim.rescan("t-1", &[("url", URL)]).await.status(), 200);
    sim.handle.set_credentials_valid(false);
    assert_eq!(sim.rescan("t-1", &[("url", URL)]).await.status(), 401);
    assert_eq!(sim.get(EXEC_ENV_PATH).await.status(), 401);
    sim.handle.set_credentials_valid(true);
    assert_eq!(sim.rescan("t-1", &[("url", URL)]).await.status(), 200);

    sim.handle.set_password(SecretString::from("rotated"));
    assert_eq!(sim.rescan("t-1", &[("url", URL)]).await.status(), 401);
    let r = sim.rescan_as("t-1", &[("url", URL)], USER, "rotated").await;
    assert_eq!(r.status(), 200);

    // The same switch for subprocess tests, over HTTPS (client certificate, no Basic auth).
    let control = |path: &str| sim.http.put(sim.url(&format!("/_sim/{path}"))).send();
    assert_eq!(control("credentials/rotated").await.unwrap().status(), 204);
    let r = sim.rescan_as("t-1", &[("url", URL)], USER, "rotated").await;
    assert_eq!(r.status(), 401);
    assert_eq!(control("credentials/valid").await.unwrap().status(), 204);
    let r = sim
        .http
        .post(sim.url("/_sim/rules"))
        .body("t-1=451")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = sim.rescan_as("t-1", &[("url", URL)], USER, "rotated").await;
    assert_eq!(r.status(), 451);
    let stats = json(sim.http.get(sim.url("/_sim/stats")).send().await.unwrap()).await;
    assert_eq!(stats["rescans_by_task"]["t-1"], 7);
    assert_eq!(stats["requests_by_status"]["401"], 4);
    assert_eq!(sim.handle.calls_for("t-1"), 7);
    sim.handle.shutdown().await;
}

#[tokio::test]
async fn the_record_limit_bounds_memory_but_not_the_counters() {
    let mut s = settings();
    s.max_recorded_requests = 2;
    let sim = start(s).await;
    for id in ["a", "b", "c"] {
        assert_eq!(sim.rescan(id, &[("url", URL)]).await.status(), 200);
    }
    let kept: Vec<_> = sim
        .handle
        .requests()
        .iter()
        .map(|r| (r.seq, r.task_id.clone().unwrap()))
        .collect();
    assert_eq!(kept, [(2, "b".to_string()), (3, "c".to_string())]);
    assert_eq!(sim.handle.calls_for("a"), 1);
    assert_eq!(sim.handle.stats().requests(200), 3);
}

#[tokio::test]
async fn the_simulate_command_starts_it_with_ktip() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: crate::sim::SimulateArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let cli = Cli::parse_from([
        "simulate",
        "--api-listen",
        "127.0.0.1:0",
        "--download-listen",
        "127.0.0.1:0",
        "--records-per-minute",
        "3",
        "--ktip",
        "--ktip-listen",
        "127.0.0.1:0",
        "--ktip-pki-dir",
        pki.to_str().unwrap(),
    ]);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(crate::sim::run(cli.sim, shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pki.join("client.pem").exists() {
        assert!(Instant::now() < deadline && !task.is_finished());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(pki.join("ca.pem").exists());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
