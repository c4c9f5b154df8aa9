//! The upstream API checks, each a side-effect-free authenticated call: the
//! VirusTotal feed (key and licence, without downloading the batch) and the
//! KTIP portal (client certificate, TLS handshake and credentials).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use reqwest::{StatusCode, header};

use super::{Level, Report, chain, display_origin, plural};
use crate::config::{FeedConfig, RescanConfig};
use crate::minute::{FEED_LAG, Minute};
use crate::rescan::api::{CallError, KtipClient, certificate_not_after};

/// A client certificate expiring sooner than this is a warning.
const CERT_WARN_DAYS: i64 = 14;

/// Judges the API's answer to `GET .../file-behaviours/{minute}`.
fn judge_feed_answer(status: StatusCode, code: &str, minute: Minute) -> (Level, String) {
    let code = if code.is_empty() {
        String::new()
    } else {
        format!(" {code}")
    };
    let answer = format!("HTTP {}{code}", status.as_u16());
    match status {
        s if s.is_redirection() || s == StatusCode::OK => (
            Level::Ok,
            format!(
                "key accepted, feed licence present (batch {minute}: {answer}; not downloaded)"
            ),
        ),
        StatusCode::NOT_FOUND => (
            Level::Ok,
            format!("key accepted, feed licence present (no batch for {minute}: {answer})"),
        ),
        StatusCode::BAD_REQUEST if code.trim() == "NotAvailableYet" => (
            Level::Ok,
            format!("key accepted (batch {minute} not available yet: {answer})"),
        ),
        StatusCode::UNAUTHORIZED => (
            Level::Fail,
            format!(
                "VirusTotal refused the API key ({answer}): check feed.api_key, feed.api_key_file or VT_API_KEY"
            ),
        ),
        StatusCode::FORBIDDEN => (
            Level::Fail,
            format!(
                "the API key has no access to the file-behaviour feed ({answer}): it needs a \"Sandbox feeds\" licence"
            ),
        ),
        StatusCode::TOO_MANY_REQUESTS => (
            Level::Warn,
            format!("rate limited ({answer}): the key is known but its quota is used up for now"),
        ),
        s if s.is_server_error() => (
            Level::Fail,
            format!("VirusTotal server error ({answer}): key not confirmed; try again"),
        ),
        _ => (
            Level::Fail,
            format!("unexpected answer ({answer}): key not confirmed"),
        ),
    }
}

/// Asks for the newest available minute without following the redirect to
/// the download: authenticates the key and the licence, downloads nothing.
pub(super) async fn check_feed_api<W: Write>(cfg: &FeedConfig, r: &mut Report<W>) {
    let check = format!("feed api {}", display_origin(&cfg.base_url));
    // One minute past the lag, so a clock a little ahead still asks for an available batch.
    let now = SystemTime::now();
    let minute = Minute::containing(now - FEED_LAG - Duration::from_secs(60));
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(cfg.request_timeout)
        .connect_timeout(cfg.request_timeout)
        .user_agent(concat!("sandbox-bridge/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            r.add(
                Level::Fail,
                &check,
                format!("cannot build the HTTP client: {}", chain(&e.without_url())),
            );
            return;
        }
    };
    let url = format!("{}/api/v3/feeds/file-behaviours/{minute}", cfg.base_url);
    let response = client
        .get(url)
        .header("x-apikey", cfg.api_key.expose())
        .header(header::ACCEPT, "application/json")
        .send()
        .await;
    let (level, detail) = match response {
        Ok(response) => {
            let status = response.status();
            let code = if status.is_redirection() {
                // The Location is a signed URL: neither followed nor printed.
                String::new()
            } else {
                error_code(&response.bytes().await.unwrap_or_default())
            };
            judge_feed_answer(status, &code, minute)
        }
        Err(e) => (
            Level::Fail,
            format!("no answer: {}", chain(&e.without_url())),
        ),
    };
    r.add(level, &check, detail);
}

/// The `code` of a VirusTotal error body `{"error": {"code": ...}}`, if it looks like one.
fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_default()
}

/// The subject of the first certificate in a PEM file (`certificate_not_after` reads its expiry).
fn certificate_subject(pem: &[u8]) -> Option<String> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .find(|p| p.label == "CERTIFICATE")
        .and_then(|p| p.parse_x509().ok().map(|c| c.subject().to_string()))
}

/// Judges the certificate's expiry at `now`.
fn judge_expiry(subject: &str, not_after: SystemTime, now: SystemTime) -> (Level, String) {
    let date = time::OffsetDateTime::from(not_after)
        .format(&time::macros::format_description!(
            "[year]-[month]-[day] [hour]:[minute] UTC"
        ))
        .unwrap_or_else(|_| "an unreadable date".into());
    match not_after.duration_since(now) {
        Err(_) => (
            Level::Fail,
            format!("{subject}: expired on {date}; the portal refuses it: renew it"),
        ),
        Ok(left) => {
            let days = (left.as_secs() / 86_400) as i64;
            let text = format!(
                "{subject}: expires {date} ({days} {} left)",
                plural(days as usize, "day")
            );
            if days < CERT_WARN_DAYS {
                (Level::Warn, format!("{text}: renew it soon"))
            } else {
                (Level::Ok, text)
            }
        }
    }
}

pub(super) fn check_certificate<W: Write>(cfg: &RescanConfig, now: SystemTime, r: &mut Report<W>) {
    let check = "ktip client certificate";
    let Some(path) = &cfg.client_cert else {
        r.add(
            Level::Warn,
            check,
            "rescan.client_cert is not set: the KTIP portal requires a client certificate (mutual TLS)",
        );
        return;
    };
    let pem = match std::fs::read(path) {
        Ok(p) => p,
        Err(e) => {
            r.add(
                Level::Fail,
                check,
                format!("cannot read {}: {e}", path.display()),
            );
            return;
        }
    };
    let (level, detail) = match (certificate_subject(&pem), certificate_not_after(&pem)) {
        (Some(subject), Some(not_after)) => judge_expiry(&subject, not_after, now),
        _ => (
            Level::Fail,
            format!(
                "{} (rescan.client_cert) holds no readable PEM certificate",
                path.display()
            ),
        ),
    };
    r.add(level, check, detail);
}

/// Judges the answer to the side-effect-free probe (`GET {channels_path}`).
fn judge_ktip_probe(
    result: &Result<u16, CallError>,
    path: &str,
    client_cert: Option<&Path>,
) -> (Level, String) {
    let credentials = "check rescan.username / rescan.password (or their *_file keys, KTIP_USERNAME / KTIP_PASSWORD)";
    let cert = match client_cert {
        Some(p) => format!("client certificate {} (rescan.client_cert)", p.display()),
        None => "no client certificate: rescan.client_cert is not set".to_string(),
    };
    match result {
        Ok(200) => (
            Level::Ok,
            format!(
                "TLS handshake with the client certificate and credentials accepted (GET {path}: HTTP 200)"
            ),
        ),
        Ok(401) => (
            Level::Fail,
            format!("credentials refused (GET {path}: HTTP 401): {credentials}"),
        ),
        Ok(403) => (
            Level::Fail,
            format!(
                "credentials refused (GET {path}: HTTP 403: the account has no access to the sandbox API)"
            ),
        ),
        Ok(429) => (
            Level::Warn,
            format!("rate limited (GET {path}: HTTP 429): credentials not confirmed"),
        ),
        Ok(status) => (
            Level::Fail,
            format!("unexpected answer (GET {path}: HTTP {status})"),
        ),
        Err(CallError::Tls(detail)) => (
            Level::Fail,
            format!("TLS handshake refused: {detail}; {cert}"),
        ),
        // Without a client certificate the portal may close the connection
        // rather than fail the handshake visibly.
        Err(e) if client_cert.is_none() => (
            Level::Fail,
            format!("{e}; TLS handshake probably refused: {cert}"),
        ),
        Err(e) => (Level::Fail, e.to_string()),
    }
}

pub(super) async fn check_ktip_api<W: Write>(cfg: &RescanConfig, r: &mut Report<W>) {
    let check = format!("ktip api {}", display_origin(&cfg.base_url));
    let client = match KtipClient::new(cfg) {
        Ok(c) => c,
        Err(e) => {
            r.add(Level::Fail, &check, e);
            return;
        }
    };
    let result = client.probe().await;
    let (level, detail) = judge_ktip_probe(&result, &cfg.channels_path, cfg.client_cert.as_deref());
    r.add(level, &check, detail);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_answers_say_what_is_wrong_with_the_key() {
        let m = Minute::parse("202611231059").unwrap();
        let judge = |s: u16, code| judge_feed_answer(StatusCode::from_u16(s).unwrap(), code, m);
        assert_eq!(judge(302, "").0, Level::Ok);
        assert_eq!(judge(404, "NotFoundError").0, Level::Ok);
        assert_eq!(judge(400, "NotAvailableYet").0, Level::Ok);
        assert_eq!(judge(400, "BadRequestError").0, Level::Fail);
        let (l, d) = judge(401, "WrongCredentialsError");
        assert!(l == Level::Fail && d.contains("refused the API key"), "{d}");
        let (l, d) = judge(403, "ForbiddenError");
        assert!(l == Level::Fail && d.contains("licence"), "{d}");
        assert_eq!(judge(429, "QuotaExceededError").0, Level::Warn);
        assert_eq!(judge(503, "").0, Level::Fail);
    }

    #[test]
    fn error_codes_are_taken_only_when_they_look_like_codes() {
        assert_eq!(
            error_code(br#"{"error":{"code":"WrongCredentialsError","message":"x"}}"#),
            "WrongCredentialsError"
        );
        assert_eq!(error_code(br#"{"error":{"code":"has space"}}"#), "");
        assert_eq!(error_code(b"<html>"), "");
    }

    #[test]
    fn ktip_answers_name_credentials_and_certificate() {
        let cert = Path::new("/etc/ktip/client.pem");
        let (l, d) = judge_ktip_probe(&Ok(200), "api/sandbox/channels", Some(cert));
        assert_eq!(l, Level::Ok, "{d}");
        for status in [401, 403] {
            let (l, d) = judge_ktip_probe(&Ok(status), "p", Some(cert));
            assert!(l == Level::Fail && d.contains("credentials refused"), "{d}");
        }
        let tls = Err(CallError::Tls("peer sent no certificates".into()));
        let (l, d) = judge_ktip_probe(&tls, "p", Some(cert));
        assert!(l == Level::Fail && d.contains("TLS handshake") && d.contains("client.pem"));
        let (l, d) = judge_ktip_probe(&Err(CallError::Connect("reset".into())), "p", None);
        assert!(
            l == Level::Fail && d.contains("rescan.client_cert is not set"),
            "{d}"
        );
    }

    #[test]
    fn certificate_expiry_warns_under_two_weeks_and_fails_when_past() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let day = Duration::from_secs(86_400);
        let (l, d) = judge_expiry("CN=c", now + day * 90 + day / 2, now);
        assert_eq!(l, Level::Ok);
        assert!(
            d.starts_with("CN=c: expires 2030-") && d.contains("(90 days left)"),
            "{d}"
        );
        assert_eq!(judge_expiry("CN=c", now + day * 13, now).0, Level::Warn);
        let (l, d) = judge_expiry("CN=c", now - day, now);
        assert!(l == Level::Fail && d.contains("expired"), "{d}");
    }
}
