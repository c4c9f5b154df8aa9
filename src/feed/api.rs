//! The VirusTotal file-behaviour feed API, as the worker uses it.
//!
//! `GET {base_url}/api/v3/feeds/file-behaviours/{YYYYMMDDhhmm}` with the
//! `x-apikey` header answers 302 with a signed download URL on another host.
//! Redirects are never followed automatically: most clients forward custom
//! headers such as `x-apikey` to the new host. The download is fetched by a
//! second client that carries no credentials at all. The signed URL is never
//! logged whole (only its origin), and errors are stripped of URLs.
//!
//! Each response is classified once, here: permanent (401/403: stop),
//! missing (404), not yet available (400 `NotAvailableYet`), or transient
//! (429, 5xx, timeouts, network, short downloads), which the caller retries.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::{StatusCode, Url, header};
use tracing::debug;

use super::spool::{Spool, SpoolWriter};
use crate::config::{FeedConfig, Secret};
use crate::minute::Minute;

/// A successful look-up of one minute.
#[derive(Debug)]
pub enum Fetched {
    /// The batch file, downloaded completely.
    Batch { spool: Spool, download_seconds: f64 },
    /// 404: no batch exists for that minute.
    Missing,
    /// 400 `NotAvailableYet`: inside the 60-minute lag.
    NotAvailableYet,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "VirusTotal refused the API key (HTTP 401 {code}: {message}); check feed.api_key / VT_API_KEY"
    )]
    Unauthorized { code: String, message: String },
    #[error(
        "VirusTotal denied access to the file-behaviour feed (HTTP 403 {code}: {message}); the API key needs a \"Sandbox feeds\" licence"
    )]
    Forbidden { code: String, message: String },
    #[error("rate limited by VirusTotal (HTTP 429 {code})")]
    RateLimited {
        code: String,
        retry_after: Option<Duration>,
    },
    #[error("VirusTotal server error (HTTP {status} {code})")]
    Server { status: u16, code: String },
    #[error("network error talking to {origin}: {detail}")]
    Network { origin: String, detail: String },
    #[error("download from {origin} failed: {detail}")]
    Download { origin: String, detail: String },
    #[error("unexpected answer from VirusTotal (HTTP {status} {code}): {message}")]
    Unexpected {
        status: u16,
        code: String,
        message: String,
    },
    #[error("cannot spool the download: {0}")]
    Spool(#[from] std::io::Error),
}

impl FetchError {
    /// Permanent errors stop the worker: retrying cannot help until an operator acts.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            FetchError::Unauthorized { .. } | FetchError::Forbidden { .. }
        )
    }

    /// The `cause` label of the retry counter.
    pub fn retry_cause(&self) -> &'static str {
        match self {
            FetchError::RateLimited { .. } => "rate_limited",
            FetchError::Server { .. } => "server_error",
            FetchError::Network { .. } | FetchError::Download { .. } => "network",
            _ => "other",
        }
    }

    /// A server-requested minimum wait (429 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// HTTP access to the feed.
pub struct FeedClient {
    api: reqwest::Client,
    download: reqwest::Client,
    base_url: String,
    api_key: Secret,
    spool_memory_bytes: usize,
    spool_dir: Option<std::path::PathBuf>,
}

impl FeedClient {
    pub fn new(cfg: &FeedConfig) -> Result<FeedClient, reqwest::Error> {
        let agent = concat!("sandbox-bridge/", env!("CARGO_PKG_VERSION"));
        let api = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout)
            .user_agent(agent)
            .build()?;
        // A separate client for the storage host: no credentials, no redirects.
        let download = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(cfg.download_timeout)
            .connect_timeout(cfg.request_timeout)
            .user_agent(agent)
            .build()?;
        Ok(FeedClient {
            api,
            download,
            base_url: cfg.base_url.clone(),
            api_key: cfg.api_key.clone(),
            spool_memory_bytes: cfg.spool_memory_bytes,
            spool_dir: cfg.spool_dir.clone(),
        })
    }

    fn batch_url(&self, minute: Minute) -> String {
        format!("{}/api/v3/feeds/file-behaviours/{minute}", self.base_url)
    }

    /// One attempt at one minute.
    pub async fn fetch(&self, minute: Minute) -> Result<Fetched, FetchError> {
        let url = self.batch_url(minute);
        let response = self
            .api
            .get(&url)
            .header("x-apikey", self.api_key.expose())
            .header(header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| network(&self.base_url, e))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| FetchError::Unexpected {
                    status: status.as_u16(),
                    code: String::new(),
                    message: "redirect without a Location header".into(),
                })?;
            let target = Url::parse(&url)
                .and_then(|base| base.join(location))
                .map_err(|_| FetchError::Unexpected {
                    status: status.as_u16(),
                    code: String::new(),
                    message: "redirect to an unparseable Location".into(),
                })?;
            return self.download(minute, target).await;
        }
        let retry_after = retry_after(response.headers());
        let (code, message) = error_body(response).await;
        Err(match status {
            StatusCode::BAD_REQUEST if code == "NotAvailableYet" => {
                return Ok(Fetched::NotAvailableYet);
            }
            StatusCode::NOT_FOUND => return Ok(Fetched::Missing),
            StatusCode::UNAUTHORIZED => FetchError::Unauthorized { code, message },
            StatusCode::FORBIDDEN => FetchError::Forbidden { code, message },
            StatusCode::TOO_MANY_REQUESTS => FetchError::RateLimited { code, retry_after },
            s if s.is_server_error() => FetchError::Server {
                status: s.as_u16(),
                code,
            },
            s => FetchError::Unexpected {
                status: s.as_u16(),
                code,
                message,
            },
        })
    }

    async fn download(&self, minute: Minute, target: Url) -> Result<Fetched, FetchError> {
        let origin = origin_of(&target);
        debug!(%minute, %origin, "downloading batch");
        let started = Instant::now();
        let response =
            self.download
                .get(target)
                .send()
                .await
                .map_err(|e| FetchError::Download {
                    origin: origin.clone(),
                    detail: e.without_url().to_string(),
                })?;
        let status = response.status();
        if status != StatusCode::OK {
            // An expired or refused signed URL: asking the API again gives a fresh one.
            return Err(FetchError::Download {
                origin,
                detail: format!("HTTP {status}"),
            });
        }
        let expected = response.content_length();
        let mut spool = SpoolWriter::new(self.spool_memory_bytes, self.spool_dir.clone());
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| FetchError::Download {
                origin: origin.clone(),
                detail: e.without_url().to_string(),
            })?;
            spool.write(&chunk)?;
        }
        if let Some(expected) = expected
            && spool.len() != expected
        {
            return Err(FetchError::Download {
                origin,
                detail: format!("short body: {} of {expected} bytes", spool.len()),
            });
        }
        Ok(Fetched::Batch {
            spool: spool.finish()?,
            download_seconds: started.elapsed().as_secs_f64(),
        })
    }
}

fn network(origin: &str, e: reqwest::Error) -> FetchError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let detail = e.without_url().to_string();
    FetchError::Network {
        origin: origin.to_string(),
        detail: format!("{kind}: {detail}"),
    }
}

/// `scheme://host[:port]` of a URL: what may be logged of a signed download URL.
pub fn origin_of(url: &Url) -> String {
    url.origin().ascii_serialization()
}

fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate_to_system_time(v)?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

fn httpdate_to_system_time(v: &str) -> Option<std::time::SystemTime> {
    let fmt = time::format_description::well_known::Rfc2822;
    let dt = time::OffsetDateTime::parse(v, &fmt).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(dt.unix_timestamp()).ok()?))
}

/// `(code, message)` of a VirusTotal error body `{"error": {"code", "message"}}`.
async fn error_body(response: reqwest::Response) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let bytes = response.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<Body>(&bytes) {
        Ok(b) => (b.error.code, truncate(&b.error.message, 300)),
        Err(_) => (
            String::new(),
            truncate(&String::from_utf8_lossy(&bytes), 300),
        ),
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_hides_path_and_token() {
        let u =
            Url::parse("https://storage.example.com:8443/bucket/202611230900.bz2?token=SECRET&x=1")
                .unwrap();
        assert_eq!(origin_of(&u), "https://storage.example.com:8443");
    }

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        let mut h = header::HeaderMap::new();
        h.insert(header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None, "a date in the past means no wait");
        h.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn only_credentials_problems_are_permanent() {
        let perm = FetchError::Forbidden {
            code: "ForbiddenError".into(),
            message: String::new(),
        };
        assert!(perm.is_permanent());
        assert!(perm.to_string().contains("Sandbox feeds"));
        let e = FetchError::Unauthorized {
            code: "WrongCredentialsError".into(),
            message: "Wrong API key".into(),
        };
        assert!(e.is_permanent() && e.to_string().contains("feed.api_key"));
        for t in [
            FetchError::RateLimited {
                code: String::new(),
                retry_after: None,
            },
            FetchError::Server {
                status: 503,
                code: String::new(),
            },
            FetchError::Network {
                origin: String::new(),
                detail: String::new(),
            },
        ] {
            assert!(!t.is_permanent());
        }
    }
}
