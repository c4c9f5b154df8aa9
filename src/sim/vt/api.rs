//! The API origin: `GET /api/v3/feeds/file-behaviours/{YYYYMMDDhhmm}` and the
//! `/_sim/` control endpoints.
//!
//! Checks run in the order the real service appears to apply them:
//!
//! ```text
//!  x-apikey ─ absent 401 AuthenticationRequiredError
//!           ─ unknown 401 WrongCredentialsError / unlicensed 403 ForbiddenError
//!  {time}   ─ not YYYYMMDDhhmm 400 InvalidArgumentError
//!  window   ─ newer than now-60m 400 NotAvailableYet / older than 7 days 404 NotFoundError
//!  faults   ─ first K attempts: 503 / 504 / 429 + Retry-After / delay
//!  missing  ─ 404 NotFoundError
//!  else     ─ 302, Location = signed URL on the download origin
//! ```
//!
//! Time comes from the injected clock; only the `slow` fault's delay is real time.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::minute::{FeedWindow, MinuteRange};

use super::download::strict_minute;
use super::faults::FaultKind;
use super::faults::{Side, active_fault};
use super::json::{write_key, write_str};
use super::server::Core;
use super::settings::parse_minute_range;

/// What the API handlers need: the simulator and where downloads are served.
pub struct ApiContext {
    pub core: Arc<Core>,
    /// e.g. `http://127.0.0.1:40123`, no trailing slash.
    pub download_base: String,
}

pub fn router(ctx: Arc<ApiContext>) -> Router {
    Router::new()
        .route("/api/v3/feeds/file-behaviours/{time}", get(batch))
        // The OpenAPI text spells the path with an underscore.
        .route("/api/v3/feeds/file_behaviours/{time}", get(batch))
        .route("/_sim/stats", get(stats))
        .route(
            "/_sim/missing/{range}",
            post(mark_missing).delete(mark_present),
        )
        .route("/_sim/pregenerate/{range}", post(pregenerate))
        .fallback(|| async {
            vt_error(StatusCode::NOT_FOUND, "NotFoundError", "Resource not found")
        })
        .with_state(ctx)
}

async fn batch(
    State(ctx): State<Arc<ApiContext>>,
    Path(time): Path<String>,
    headers: HeaderMap,
) -> Response {
    let response = answer(&ctx, &time, &headers).await;
    ctx.core
        .state
        .count_response(Side::Api, response.status().as_u16());
    tracing::debug!(time, status = response.status().as_u16(), "api request");
    response
}

async fn answer(ctx: &ApiContext, time: &str, headers: &HeaderMap) -> Response {
    let core = &ctx.core;
    let settings = &core.settings;
    match headers
        .get("x-apikey")
        .map(|v| v.to_str().unwrap_or_default())
    {
        None => {
            return vt_error(
                StatusCode::UNAUTHORIZED,
                "AuthenticationRequiredError",
                "X-Apikey header is missing",
            );
        }
        Some(key) if key == settings.api_key => {}
        Some(key) if settings.unlicensed_api_keys.iter().any(|k| k == key) => {
            return vt_error(
                StatusCode::FORBIDDEN,
                "ForbiddenError",
                "You are not authorized to perform the requested operation",
            );
        }
        Some(_) => {
            return vt_error(
                StatusCode::UNAUTHORIZED,
                "WrongCredentialsError",
                "Wrong API key",
            );
        }
    }
    let Some(m) = strict_minute(time) else {
        let message = format!("Invalid time format: {time}, expected YYYYMMDDhhmm");
        return vt_error(StatusCode::BAD_REQUEST, "InvalidArgumentError", &message);
    };
    let now = core.clock.now();
    let window = FeedWindow::at(now, 0);
    if m > window.newest {
        return vt_error(
            StatusCode::BAD_REQUEST,
            "NotAvailableYet",
            &format!("Batch {m} is not available yet"),
        );
    }
    if m < window.oldest {
        return vt_error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            &format!("Batch {m} is too old"),
        );
    }

    let attempt = core.state.next_attempt(Side::Api, m);
    if let Some(kind) = active_fault(settings, Side::Api, m, attempt) {
        tracing::info!(minute = %m, attempt, fault = %kind, "injecting api fault");
        core.state.count_fault(kind);
        match kind {
            FaultKind::Unavailable => {
                return vt_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "TransientError",
                    "Please try again later",
                );
            }
            FaultKind::DeadlineExceeded => {
                return vt_error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "DeadlineExceededError",
                    "Deadline exceeded",
                );
            }
            FaultKind::QuotaExceeded => {
                let mut response = vt_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "QuotaExceededError",
                    "Quota exceeded",
                );
                let secs = settings.faults.retry_after.as_secs_f64().ceil() as u64;
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, secs.into());
                return response;
            }
            FaultKind::Slow => tokio::time::sleep(settings.faults.slow_delay).await,
            FaultKind::Truncated | FaultKind::Corrupt | FaultKind::Interrupted => {}
        }
    }

    let missing = core
        .state
        .missing_override(m)
        .unwrap_or_else(|| settings.is_missing_by_config(m));
    if missing {
        return vt_error(
            StatusCode::NOT_FOUND,
            "NotFoundError",
            &format!("Batch {m} not found"),
        );
    }

    let now_secs = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let expires = now_secs + settings.url_ttl.as_secs() as i64;
    let location = format!(
        "{}{}",
        ctx.download_base,
        core.signer.path_and_query(m, expires)
    );
    // Start building the file now: the client asks for it next.
    let store = core.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.get(m).await {
            tracing::warn!(minute = %m, error = %e, "cannot pre-build batch");
        }
    });
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

async fn stats(State(ctx): State<Arc<ApiContext>>) -> Response {
    match serde_json::to_vec(&ctx.core.state.stats()) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => vt_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &e.to_string(),
        ),
    }
}

async fn mark_missing(State(ctx): State<Arc<ApiContext>>, Path(range): Path<String>) -> Response {
    set_missing(&ctx, &range, true)
}

async fn mark_present(State(ctx): State<Arc<ApiContext>>, Path(range): Path<String>) -> Response {
    set_missing(&ctx, &range, false)
}

fn set_missing(ctx: &ApiContext, range: &str, missing: bool) -> Response {
    match parse_minute_range(range) {
        Ok(r) => {
            tracing::info!(range = %r, missing, "missing minutes changed");
            ctx.core.state.set_missing(r, missing);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => vt_error(
            StatusCode::BAD_REQUEST,
            "InvalidArgumentError",
            &e.to_string(),
        ),
    }
}

async fn pregenerate(State(ctx): State<Arc<ApiContext>>, Path(range): Path<String>) -> Response {
    let range: MinuteRange = match parse_minute_range(&range) {
        Ok(r) => r,
        Err(e) => {
            return vt_error(
                StatusCode::BAD_REQUEST,
                "InvalidArgumentError",
                &e.to_string(),
            );
        }
    };
    let cancel = ctx.core.shutdown.clone();
    match ctx.core.store.pregenerate(range, &cancel).await {
        Ok(report) => {
            let body = serde_json::json!({
                "minutes": report.minutes,
                "compressed_bytes": report.compressed_bytes,
                "elapsed_ms": report.elapsed.as_millis() as u64,
            });
            (
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Err(e) => vt_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            &e.to_string(),
        ),
    }
}

/// `{"error": {"code": "...", "message": "..."}}`, formatted like the real API.
pub fn vt_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut body = Vec::with_capacity(64 + message.len());
    body.extend_from_slice(b"{");
    write_key(&mut body, "error");
    body.extend_from_slice(b"{");
    write_key(&mut body, "code");
    write_str(&mut body, code);
    body.extend_from_slice(b", ");
    write_key(&mut body, "message");
    write_str(&mut body, message);
    body.extend_from_slice(b"}}");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
