//! HTTP behaviour of the feed simulator, driven with reqwest on port 0 and a
//! `ManualClock` set to 2026-11-23 10:00 UTC (newest available batch: 09:00).

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bzip2::read::MultiBzDecoder;
use reqwest::StatusCode;
use reqwest::redirect::Policy;

use super::*;
use crate::clock::ManualClock;
use crate::minute::{Minute, MinuteRange};

const KEY: &str = "test-key";

struct Sim {
    handle: FeedSimHandle,
    clock: ManualClock,
    http: reqwest::Client,
}

fn minute(s: &str) -> Minute {
    Minute::parse(s).unwrap()
}

fn settings() -> FeedSimSettings {
    FeedSimSettings {
        api_key: KEY.to_string(),
        batches: BatchSettings::exact(7, 4),
        ..FeedSimSettings::default()
    }
}

async fn start(settings: FeedSimSettings) -> Sim {
    let clock = ManualClock::new(minute("202611231000").start());
    let any = "127.0.0.1:0".parse().unwrap();
    let handle = FeedSimulator::start(settings, Arc::new(clock.clone()), any, any)
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();
    Sim {
        handle,
        clock,
        http,
    }
}

impl Sim {
    async fn api(&self, time: &str, key: Option<&str>) -> reqwest::Response {
        let url = format!(
            "{}/api/v3/feeds/file-behaviours/{time}",
            self.handle.base_url()
        );
        let mut request = self.http.get(url);
        if let Some(key) = key {
            request = request.header("x-apikey", key);
        }
        request.send().await.unwrap()
    }

    /// The `Location` of a 302 for `time`.
    async fn location(&self, time: &str) -> String {
        let response = self.api(time, Some(KEY)).await;
        assert_eq!(
            response.status(),
            StatusCode::FOUND,
            "{}",
            response.text().await.unwrap()
        );
        response.headers()["location"].to_str().unwrap().to_string()
    }

    async fn download(
        &self,
        url: &str,
    ) -> reqwest::Result<(StatusCode, Option<u64>, bytes::Bytes)> {
        let response = self.http.get(url).send().await?;
        let (status, len) = (response.status(), response.content_length());
        Ok((status, len, response.bytes().await?))
    }
}

async fn assert_error(response: reqwest::Response, status: StatusCode, code: &str) {
    assert_eq!(response.status(), status);
    let body = response.text().await.unwrap();
    assert!(
        body.starts_with(&format!(r#"{{"error": {{"code": "{code}", "message": ""#)),
        "{body}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], code);
    assert_eq!(v.as_object().unwrap().len(), 1);
}

fn decode(file: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    MultiBzDecoder::new(file).read_to_end(&mut out).map(|_| out)
}

#[tokio::test]
async fn redirects_to_a_keyless_signed_download_of_the_exact_batch() {
    let sim = start(settings()).await;
    let location = sim.location("202611230900").await;
    let prefix = format!(
        "{}/feeds/file-behaviours/202611230900.bz2?token=",
        sim.handle.download_base_url()
    );
    assert!(location.starts_with(&prefix), "{location}");
    assert_ne!(
        sim.handle.download_base_url(),
        sim.handle.base_url(),
        "two origins"
    );

    let (status, len, body) = sim.download(&location).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let expected = sim.handle.batch_file(minute("202611230900"));
    assert_eq!(len, Some(expected.len() as u64));
    assert_eq!(body, expected);
    let lines = sim.handle.batch_lines(minute("202611230900"));
    assert_eq!(decode(&body).unwrap(), join_lines(&lines));
    assert_eq!(lines.len(), 4);

    // The OpenAPI spelling works too.
    let url = format!(
        "{}/api/v3/feeds/file_behaviours/202611230859",
        sim.handle.base_url()
    );
    let response = sim
        .http
        .get(url)
        .header("x-apikey", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FOUND);

    let stats = sim.handle.stats();
    assert_eq!(
        (
            stats.api_requests(302),
            stats.downloads,
            stats.download_requests_with_credentials
        ),
        (2, 1, 0)
    );
    sim.handle.shutdown().await;
}

#[tokio::test]
async fn refuses_missing_wrong_and_unlicensed_keys() {
    let sim = start(settings()).await;
    assert_error(
        sim.api("202611230900", None).await,
        StatusCode::UNAUTHORIZED,
        "AuthenticationRequiredError",
    )
    .await;
    assert_error(
        sim.api("202611230900", Some("nope")).await,
        StatusCode::UNAUTHORIZED,
        "WrongCredentialsError",
    )
    .await;
    assert_error(
        sim.api("202611230900", Some("unlicensed-key")).await,
        StatusCode::FORBIDDEN,
        "ForbiddenError",
    )
    .await;
    assert_eq!(sim.handle.stats().api_requests(401), 2);
}

#[tokio::test]
async fn enforces_the_time_format_and_the_availability_window() {
    let sim = start(settings()).await;
    for bad in ["2026112309", "2026-11-23T09:00:00Z", "202611231360"] {
        assert_error(
            sim.api(bad, Some(KEY)).await,
            StatusCode::BAD_REQUEST,
            "InvalidArgumentError",
        )
        .await;
    }
    // 60-minute lag: at 10:00, 09:00 is the newest; 09:01 comes at 10:01.
    assert_error(
        sim.api("202611230901", Some(KEY)).await,
        StatusCode::BAD_REQUEST,
        "NotAvailableYet",
    )
    .await;
    sim.clock.advance(Duration::from_secs(60));
    sim.location("202611230901").await;
    // Seven days back: 2026-11-16 10:01 is the oldest at 10:01.
    sim.location("202611161001").await;
    assert_error(
        sim.api("202611161000", Some(KEY)).await,
        StatusCode::NOT_FOUND,
        "NotFoundError",
    )
    .await;
}

#[tokio::test]
async fn missing_minutes_answer_404_until_made_to_appear() {
    let mut s = settings();
    s.missing = MinuteSet::ranges([MinuteRange::new(
        minute("202611230850"),
        minute("202611230852"),
    )]);
    let sim = start(s).await;
    for t in ["202611230850", "202611230851", "202611230852"] {
        assert_error(
            sim.api(t, Some(KEY)).await,
            StatusCode::NOT_FOUND,
            "NotFoundError",
        )
        .await;
    }
    sim.location("202611230853").await;

    // In process.
    sim.handle
        .set_missing(MinuteRange::single(minute("202611230850")), false);
    sim.location("202611230850").await;

    // Over HTTP, for subprocess tests.
    let control = |method, range: &str| {
        sim.http
            .request(
                method,
                format!("{}/_sim/missing/{range}", sim.handle.base_url()),
            )
            .send()
    };
    let r = control(reqwest::Method::DELETE, "202611230851..202611230852")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    sim.location("202611230851").await;
    sim.location("202611230852").await;
    let r = control(reqwest::Method::POST, "202611230853")
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_error(
        sim.api("202611230853", Some(KEY)).await,
        StatusCode::NOT_FOUND,
        "NotFoundError",
    )
    .await;
    let r = control(reqwest::Method::POST, "yesterday").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

fn with_faults(rules: &[&str]) -> FeedSimSettings {
    let mut s = settings();
    s.faults.rules = rules.iter().map(|r| r.parse().unwrap()).collect();
    s.faults.retry_after = Duration::from_secs(2);
    s.faults.slow_delay = Duration::from_millis(300);
    s
}

#[tokio::test]
async fn api_faults_hit_the_first_attempt_then_the_minute_succeeds() {
    let sim = start(with_faults(&[
        "429=202611230900",
        "503=202611230901..202611230902",
        "504=202611230903",
    ]))
    .await;
    sim.clock.advance(Duration::from_secs(3 * 60));
    let r = sim.api("202611230900", Some(KEY)).await;
    assert_eq!(r.headers()["retry-after"], "2");
    assert_error(r, StatusCode::TOO_MANY_REQUESTS, "QuotaExceededError").await;
    assert_error(
        sim.api("202611230901", Some(KEY)).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "TransientError",
    )
    .await;
    assert_error(
        sim.api("202611230903", Some(KEY)).await,
        StatusCode::GATEWAY_TIMEOUT,
        "DeadlineExceededError",
    )
    .await;
    for t in ["202611230900", "202611230901", "202611230903"] {
        sim.location(t).await;
    }
    assert_error(
        sim.api("202611230902", Some(KEY)).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "TransientError",
    )
    .await;
    let stats = sim.handle.stats();
    assert_eq!(
        (
            stats.faults(FaultKind::Unavailable),
            stats.faults(FaultKind::QuotaExceeded)
        ),
        (2, 1)
    );
    assert_eq!(sim.handle.attempts(minute("202611230900")).api, 2);
}

#[tokio::test]
async fn faults_can_last_several_attempts_and_slow_ones_delay() {
    let mut s = with_faults(&["slow=202611230900", "503=202611230859"]);
    s.faults.attempts = 2;
    let sim = start(s).await;
    for _ in 0..2 {
        assert_eq!(
            sim.api("202611230859", Some(KEY)).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    sim.location("202611230859").await;
    let started = Instant::now();
    sim.location("202611230900").await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    sim.location("202611230900").await;
    sim.location("202611230900").await;
    assert_eq!(sim.handle.stats().faults(FaultKind::Slow), 2);
}

#[tokio::test]
async fn downloads_need_a_valid_unexpired_token() {
    let sim = start(settings()).await;
    let location = sim.location("202611230900").await;
    let (base, query) = location.split_once('?').unwrap();
    for bad in [
        base.to_string(),
        location.replace("token=", "token=0"),
        location.replace("202611230900.bz2", "202611230859.bz2"),
        location.replace("expires=", "expires=1"),
    ] {
        assert_eq!(
            sim.download(&bad).await.unwrap().0,
            StatusCode::FORBIDDEN,
            "{bad}"
        );
    }
    assert!(query.contains("expires="));
    sim.clock
        .advance(sim.handle.settings().url_ttl + Duration::from_secs(1));
    assert_eq!(
        sim.download(&location).await.unwrap().0,
        StatusCode::FORBIDDEN,
        "expired"
    );
    assert_eq!(sim.handle.stats().download_requests(403), 5);
}

#[tokio::test]
async fn detects_api_keys_sent_to_the_download_origin() {
    let sim = start(settings()).await;
    let location = sim.location("202611230900").await;
    let r = sim
        .http
        .get(&location)
        .header("x-apikey", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A client that follows redirects with its default policy leaks the key.
    let naive = reqwest::Client::new();
    let url = format!(
        "{}/api/v3/feeds/file-behaviours/202611230859",
        sim.handle.base_url()
    );
    let r = naive.get(url).header("x-apikey", KEY).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let stats = sim.handle.stats();
    assert_eq!(stats.download_requests_with_credentials, 2);
    assert_eq!(stats.credential_leaks[0].headers, ["x-apikey"]);
    assert_eq!(
        stats.credential_leaks[0].path,
        "/feeds/file-behaviours/202611230900.bz2"
    );
}

#[tokio::test]
async fn damaged_downloads_come_first_then_the_right_file() {
    let sim = start(with_faults(&[
        "truncated=202611230858",
        "corrupt=202611230859",
        "interrupted=202611230900",
    ]))
    .await;
    for t in ["202611230858", "202611230859", "202611230900"] {
        let expected = sim.handle.batch_file(minute(t));
        let location = sim.location(t).await;
        match sim.download(&location).await {
            Ok(_) if t == "202611230900" => panic!("an interrupted download must fail in transit"),
            Ok((status, len, body)) => {
                assert_eq!(status, StatusCode::OK);
                assert_eq!(len, Some(body.len() as u64));
                assert_ne!(body, expected, "{t}: first download should be damaged");
                assert!(decode(&body).is_err(), "{t}: damage must be detectable");
            }
            Err(e) => assert_eq!(
                t, "202611230900",
                "only the interrupted download fails in transit: {e:#}"
            ),
        }
        let (status, _, body) = sim.download(&location).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, expected, "{t}: second download is whole");
    }
    let stats = sim.handle.stats();
    assert_eq!(stats.downloads, 3);
    for kind in [
        FaultKind::Truncated,
        FaultKind::Corrupt,
        FaultKind::Interrupted,
    ] {
        assert_eq!(stats.faults(kind), 1);
    }
}

#[tokio::test]
async fn multi_stream_batches_with_bad_lines_decode_to_the_expected_lines() {
    let target = minute("202611230900");
    let mut s = settings();
    s.batches.multi_stream = MinuteSet::minute(target);
    s.batches.bad_lines = MinuteSet::minute(target);
    s.batches.empty_lines = MinuteSet::minute(target);
    s.batches.oversize_line_bytes = 100_000;
    let sim = start(s).await;
    let (_, _, body) = sim
        .download(&sim.location("202611230900").await)
        .await
        .unwrap();
    let lines = sim.handle.batch_lines(target);
    assert!(lines.iter().any(|l| l.kind == LineKind::TooLarge));
    assert!(lines.iter().any(|l| l.kind == LineKind::Empty));
    let expected: Vec<u8> = lines
        .iter()
        .map(|l| l.bytes.as_slice())
        .collect::<Vec<_>>()
        .join(&b'\n');
    let decoded = decode(&body).unwrap();
    assert_eq!(decoded.strip_suffix(b"\n").unwrap(), expected.as_slice());
}

#[tokio::test]
async fn stats_and_pregeneration_over_http() {
    let sim = start(settings()).await;
    sim.location("202611230900").await;
    let _ = sim.api("202611230900", None).await;
    let base = sim.handle.base_url();
    let r = sim
        .http
        .post(format!(
            "{base}/_sim/pregenerate/202611230850..202611230852"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let report: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(report["minutes"], 3);
    let stats: serde_json::Value = serde_json::from_str(
        &sim.http
            .get(format!("{base}/_sim/stats"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(stats["api_requests_by_status"]["302"], 1);
    assert_eq!(stats["api_requests_by_status"]["401"], 1);
    assert_eq!(stats["download_requests_with_credentials"], 0);
    assert!(stats["batches_generated"].as_u64().unwrap() >= 3);
    let r = sim
        .http
        .get(format!("{base}/api/v3/other"))
        .send()
        .await
        .unwrap();
    assert_error(r, StatusCode::NOT_FOUND, "NotFoundError").await;
}

#[tokio::test]
async fn the_simulate_command_serves_until_shut_down() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: crate::sim::SimulateArgs,
    }
    let cli = Cli::parse_from([
        "simulate",
        "--api-listen",
        "127.0.0.1:0",
        "--download-listen",
        "127.0.0.1:0",
        "--records-per-minute",
        "3",
    ]);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(crate::sim::run(cli.sim, shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!task.is_finished());
    let stopping = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopping.elapsed()
    );
}
