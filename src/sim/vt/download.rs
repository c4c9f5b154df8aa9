//! The download origin: serves batch files at short-lived signed URLs, like
//! the storage host the real API redirects to.
//!
//! It is a different origin from the API on purpose: a client that follows
//! the redirect with its default settings forwards `x-apikey` here, which
//! leaks the key. Every request carrying `x-apikey` or `Authorization` is
//! recorded in the stats so tests can assert that never happens.
//!
//! Errors are storage-style XML, not the API's JSON.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;

use crate::minute::Minute;

use super::faults::FaultKind;
use super::faults::{Side, active_fault, corrupted, interrupted_prefix, truncated};
use super::rng::hmac_sha256;
use super::server::Core;
use super::state::CredentialLeak;

const CREDENTIAL_HEADERS: [&str; 2] = ["x-apikey", "authorization"];

/// Signs and checks download URLs: `token = HMAC-SHA256(secret, minute, expiry)`.
pub struct UrlSigner {
    secret: [u8; 32],
}

impl UrlSigner {
    /// A signer with a fresh random secret: URLs from an earlier run stop working.
    pub fn random() -> UrlSigner {
        UrlSigner {
            secret: rand::random(),
        }
    }

    pub fn token(&self, m: Minute, expires: i64) -> String {
        hex::encode(hmac_sha256(
            &self.secret,
            format!("{m}\n{expires}").as_bytes(),
        ))
    }

    /// Path and query of the download URL of `m`, valid until `expires` (unix seconds).
    pub fn path_and_query(&self, m: Minute, expires: i64) -> String {
        format!(
            "/feeds/file-behaviours/{m}.bz2?token={}&expires={expires}",
            self.token(m, expires)
        )
    }

    pub fn verify(&self, m: Minute, expires: i64, token: &str) -> bool {
        let expected = self.token(m, expires);
        // Constant time, as a real storage host would compare.
        expected.len() == token.len()
            && expected
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

pub fn router(core: Arc<Core>) -> Router {
    Router::new()
        .route("/feeds/file-behaviours/{file}", get(download))
        .fallback(|| async {
            storage_error(
                StatusCode::NOT_FOUND,
                "NoSuchKey",
                "The specified key does not exist.",
            )
        })
        .with_state(core)
}

#[derive(serde::Deserialize)]
struct Signed {
    token: Option<String>,
    expires: Option<String>,
}

async fn download(
    State(core): State<Arc<Core>>,
    Path(file): Path<String>,
    Query(signed): Query<Signed>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let leaked: Vec<String> = CREDENTIAL_HEADERS
        .iter()
        .filter(|h| headers.contains_key(**h))
        .map(|h| h.to_string())
        .collect();
    if !leaked.is_empty() {
        tracing::warn!(path = uri.path(), headers = ?leaked, "download request carried credentials");
        core.state.record_leak(CredentialLeak {
            path: uri.path().to_string(),
            headers: leaked,
        });
    }
    let response = answer(&core, &file, signed).await;
    core.state
        .count_response(Side::Download, response.status().as_u16());
    response
}

async fn answer(core: &Core, file: &str, signed: Signed) -> Response {
    let Some(m) = file.strip_suffix(".bz2").and_then(strict_minute) else {
        return storage_error(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        );
    };
    let expires = signed
        .expires
        .as_deref()
        .and_then(|e| e.parse::<i64>().ok());
    let (Some(token), Some(expires)) = (signed.token, expires) else {
        return storage_error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Missing signature or expiry.",
        );
    };
    if !core.signer.verify(m, expires, &token) {
        return storage_error(
            StatusCode::FORBIDDEN,
            "SignatureDoesNotMatch",
            "The request signature is invalid.",
        );
    }
    let now = core
        .clock
        .now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now > expires {
        return storage_error(
            StatusCode::FORBIDDEN,
            "ExpiredToken",
            "The provided token has expired.",
        );
    }
    let file = match core.store.get(m).await {
        Ok(file) => file,
        Err(e) => {
            tracing::error!(minute = %m, error = %e, "cannot produce batch");
            return storage_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "We encountered an internal error.",
            );
        }
    };
    let attempt = core.state.next_attempt(Side::Download, m);
    let fault = active_fault(&core.settings, Side::Download, m, attempt);
    if let Some(kind) = fault {
        tracing::info!(minute = %m, attempt, fault = %kind, "injecting download fault");
        core.state.count_fault(kind);
    }
    let full_len = file.len();
    let body = match fault {
        Some(FaultKind::Truncated) => Body::from(truncated(&file)),
        Some(FaultKind::Corrupt) => Body::from(corrupted(&file)),
        Some(FaultKind::Interrupted) => {
            // Content-Length promises the whole file; the stream ends early
            // with an error, so hyper drops the connection mid-body.
            let parts: [Result<Bytes, std::io::Error>; 2] = [
                Ok(interrupted_prefix(&file)),
                Err(std::io::Error::other("simulated connection reset")),
            ];
            let body = Body::from_stream(futures::stream::iter(parts));
            return (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/x-bzip2".to_string()),
                    (header::CONTENT_LENGTH, full_len.to_string()),
                ],
                body,
            )
                .into_response();
        }
        _ => {
            core.state.count_download();
            Body::from(file)
        }
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-bzip2")],
        body,
    )
        .into_response()
}

/// `YYYYMMDDhhmm` and nothing else (`Minute::parse` also takes RFC 3339).
pub fn strict_minute(s: &str) -> Option<Minute> {
    (s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| Minute::parse(s).ok())
        .flatten()
}

fn storage_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    (
        status,
        [(header::CONTENT_TYPE, "application/xml; charset=UTF-8")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_minute_and_expiry() {
        let signer = UrlSigner::random();
        let m = Minute::parse("202611230900").unwrap();
        let token = signer.token(m, 1000);
        assert!(signer.verify(m, 1000, &token));
        assert!(!signer.verify(m, 1001, &token));
        assert!(!signer.verify(m.next(), 1000, &token));
        assert!(!signer.verify(m, 1000, &token[1..]));
        assert!(!UrlSigner::random().verify(m, 1000, &token));
        assert!(
            signer
                .path_and_query(m, 1000)
                .starts_with("/feeds/file-behaviours/202611230900.bz2?token=")
        );
    }

    #[test]
    fn strict_minutes_only() {
        assert!(strict_minute("202611230900").is_some());
        assert!(strict_minute("2026-11-23T09:00:00Z").is_none());
        assert!(strict_minute("202611230960").is_none());
    }
}
