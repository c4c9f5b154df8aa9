//! Answering one request: route, global latency, Basic auth, the rescan
//! checks, the per-task rules, and the record every answer leaves.
//!
//! Order, as a real front end would apply it: latency, then authentication
//! (401/403 before anything else), then routing, then the rescan's body and
//! query checks (400), then the rules (a rule never hides a bad request).
//! `/_sim/` control requests skip latency, auth and recording (they still
//! need the client certificate: they share the TLS listener).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::auth::{judge, parse_basic};
use super::params::{Allowed, RescanParams, decode_path_segment, parse_query, validate};
use super::settings::{KtipSimSettings, TaskAction};
use super::state::{AuthOutcome, RecordedRequest, SimState};

pub const EXEC_ENV_PATH: &str = "/api/sandbox/exec_env";
pub const CHANNELS_PATH: &str = "/api/sandbox/channels";
pub const RESCAN_PATH_PREFIX: &str = "/api/sandbox/tasks/file_from_url/";
/// A rescan's body must be empty; anything beyond this is not even read.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// What the portal picks when `exec_time` is not given (invented: undocumented).
const DEFAULT_EXEC_TIME_SECS: u32 = 100;

/// State shared by every connection.
pub struct Core {
    pub settings: KtipSimSettings,
    pub state: SimState,
    /// Cancelled when the simulator stops; ends sleeping requests too.
    pub shutdown: CancellationToken,
}

/// What the TLS handshake established about a connection.
pub struct ConnInfo {
    pub client_subject: Option<String>,
}

enum Route {
    ExecEnv,
    Channels,
    Rescan(String),
    WrongMethod(&'static str),
    NotFound,
}

fn route(method: &Method, path: &str) -> Route {
    let (want, found) = if path == EXEC_ENV_PATH {
        (Method::GET, Route::ExecEnv)
    } else if path == CHANNELS_PATH {
        (Method::GET, Route::Channels)
    } else if let Some(raw_id) = path.strip_prefix(RESCAN_PATH_PREFIX) {
        match decode_path_segment(raw_id) {
            Ok(id) if !raw_id.is_empty() && !raw_id.contains('/') => {
                (Method::PUT, Route::Rescan(id))
            }
            _ => return Route::NotFound,
        }
    } else {
        return Route::NotFound;
    };
    if *method == want {
        found
    } else if want == Method::PUT {
        Route::WrongMethod("PUT")
    } else {
        Route::WrongMethod("GET")
    }
}

/// hyper's service function: never fails, every problem is an HTTP answer.
pub async fn handle(
    core: Arc<Core>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if let Some(control) = path.strip_prefix("/_sim/") {
        let body = axum::body::to_bytes(Body::new(body), MAX_BODY_BYTES)
            .await
            .unwrap_or_default();
        return Ok(control_request(&core, &parts.method, control, &body));
    }

    if !sleep_unless_shutdown(&core.shutdown, core.settings.latency).await {
        return Ok(unavailable());
    }
    let credentials = parse_basic(
        parts
            .headers
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    );
    let auth = judge(
        credentials.as_ref(),
        &core.settings.username,
        &core.settings.forbidden_usernames,
        &core.state,
    );
    let query = parse_query(parts.uri.query());
    let route = route(&parts.method, &path);
    let task_id = match &route {
        Route::Rescan(id) => Some(id.clone()),
        _ => None,
    };
    let response = answer(&core, route, auth, query.clone(), body).await;

    let record = RecordedRequest {
        seq: 0,
        at: SystemTime::now(),
        method: parts.method.to_string(),
        path,
        task_id,
        query: query.unwrap_or_default(),
        auth,
        username: credentials.map(|c| c.username),
        client_subject: conn.client_subject.clone(),
        status: response.status().as_u16(),
    };
    // Names only: values may be secrets (unzip_password, doc_password).
    tracing::debug!(
        method = %record.method,
        path = %record.path,
        params = ?record.param_names(),
        auth = ?record.auth,
        status = record.status,
        "KTIP simulator answered"
    );
    let is_rescan = record.method == "PUT" && record.task_id.is_some();
    core.state.record(record, is_rescan);
    Ok(response)
}

async fn answer(
    core: &Core,
    route: Route,
    auth: AuthOutcome,
    query: Result<Vec<(String, String)>, String>,
    body: Incoming,
) -> Response<Body> {
    match auth {
        AuthOutcome::Ok => {}
        AuthOutcome::Missing | AuthOutcome::Invalid => return failure(TaskAction::Unauthorized),
        AuthOutcome::Forbidden => return failure(TaskAction::Forbidden),
    }
    let settings = &core.settings;
    match route {
        Route::ExecEnv => json_response(StatusCode::OK, &json!(settings.exec_envs)),
        Route::Channels if settings.channels_as_objects => {
            let objects: Vec<_> = settings
                .channels
                .iter()
                .map(|name| json!({ "name": name }))
                .collect();
            json_response(StatusCode::OK, &json!(objects))
        }
        Route::Channels => json_response(StatusCode::OK, &json!(settings.channels)),
        Route::Rescan(task_id) => rescan(core, &task_id, query, body)
            .await
            .unwrap_or_else(|r| r),
        Route::WrongMethod(allow) => {
            let mut response = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                &format!("use {allow}"),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            response
        }
        Route::NotFound => error_response(StatusCode::NOT_FOUND, "not-found", "no such API method"),
    }
}

/// `PUT /api/sandbox/tasks/file_from_url/{task_id}`; `Err` is an early answer.
async fn rescan(
    core: &Core,
    task_id: &str,
    query: Result<Vec<(String, String)>, String>,
    body: Incoming,
) -> Result<Response<Body>, Response<Body>> {
    let invalid =
        |description: &str| error_response(StatusCode::BAD_REQUEST, "invalid-params", description);
    match axum::body::to_bytes(Body::new(body), MAX_BODY_BYTES).await {
        Ok(body) if body.is_empty() => {}
        Ok(_) | Err(_) => {
            return Err(invalid(
                "the request body must be empty: parameters go in the query string",
            ));
        }
    }
    let pairs = query.map_err(|e| invalid(&e))?;
    let allowed = Allowed {
        exec_envs: &core.settings.exec_envs,
        channels: &core.settings.channels,
    };
    let params = validate(&pairs, &allowed).map_err(|e| invalid(&e))?;

    let (attempt, rule) = core.state.next_attempt(task_id);
    if let Some(rule) = &rule {
        tracing::debug!(task_id, attempt, rule = %rule, "KTIP simulator rule applies");
    }
    match rule.map(|r| r.action) {
        None => {}
        Some(TaskAction::Delay(d)) if !sleep_unless_shutdown(&core.shutdown, d).await => {
            return Err(unavailable());
        }
        Some(TaskAction::Delay(_)) => {}
        Some(action) => return Err(failure(action)),
    }
    Ok(created(&core.settings, task_id, &params))
}

/// The 200 body: undocumented upstream, so invented but plausible, and JSON.
fn created(settings: &KtipSimSettings, task_id: &str, params: &RescanParams) -> Response<Body> {
    let exec_env = params
        .exec_env
        .clone()
        .or_else(|| settings.exec_envs.first().cloned());
    let created_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json_response(
        StatusCode::OK,
        &json!({
            "task_id": task_id,
            "status": "created",
            "file_url": params.url,
            "exec_env": exec_env,
            "exec_time": params.exec_time.unwrap_or(DEFAULT_EXEC_TIME_SECS),
            "created_at": created_at,
        }),
    )
}

/// The answer of an injected (or authentication) failure.
fn failure(action: TaskAction) -> Response<Body> {
    match action {
        TaskAction::TooLargeFile => error_response(
            StatusCode::BAD_REQUEST,
            "too-large-file",
            "the file is too large to be processed",
        ),
        TaskAction::Unauthorized => {
            let mut response = error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "user authentication failed: check the user name and password",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Basic realm="Kaspersky Threat Intelligence Portal""#),
            );
            response
        }
        TaskAction::Forbidden => error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "access denied: the account has no access to this API",
        ),
        TaskAction::TaskFailed => error_response(
            StatusCode::NOT_FOUND,
            "not-found",
            "specified task failed or hung; run the query again later",
        ),
        TaskAction::TooManyRequests { retry_after } => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-requests",
                "request quota exceeded",
            );
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            response
        }
        TaskAction::LegalReasons => error_response(
            StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS,
            "unavailable-for-legal-reasons",
            "the object cannot be processed for legal reasons",
        ),
        TaskAction::Internal => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal-error",
            "internal server error",
        ),
        TaskAction::Unavailable => unavailable(),
        TaskAction::Delay(_) => unreachable!("a delay is not a failure"),
    }
}

/// 503 with an HTML body, as a proxy in front of the portal would answer.
fn unavailable() -> Response<Body> {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "text/html")],
        "<html><body><h1>503 Service Unavailable</h1></body></html>\n",
    )
        .into_response()
}

fn error_response(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    json_response(
        status,
        &json!({ "error": error, "description": description }),
    )
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// Sleeps `d`; `false` if the simulator began shutting down first.
async fn sleep_unless_shutdown(shutdown: &CancellationToken, d: Duration) -> bool {
    if d.is_zero() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// `/_sim/` requests, for subprocess tests and the demo:
/// `GET stats`, `PUT credentials/valid`, `PUT credentials/rotated`,
/// `POST rules` (body `PATTERN=ACTION[/K]`), `DELETE rules`.
fn control_request(core: &Core, method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    let state = &core.state;
    match (method.as_str(), path) {
        ("GET", "stats") => match serde_json::to_value(state.stats()) {
            Ok(v) => json_response(StatusCode::OK, &v),
            Err(e) => error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal-error",
                &e.to_string(),
            ),
        },
        ("PUT", "credentials/valid" | "credentials/rotated") => {
            let valid = path == "credentials/valid";
            tracing::info!(valid, "KTIP simulator credentials switched");
            state.set_credentials_valid(valid);
            StatusCode::NO_CONTENT.into_response()
        }
        ("POST", "rules") => match std::str::from_utf8(body).map(|s| s.trim().parse()) {
            Ok(Ok(rule)) => {
                tracing::info!(rule = %rule, "KTIP simulator rule set");
                state.set_rule(rule);
                StatusCode::NO_CONTENT.into_response()
            }
            Ok(Err(e)) => error_response(StatusCode::BAD_REQUEST, "invalid-params", &e.to_string()),
            Err(_) => error_response(StatusCode::BAD_REQUEST, "invalid-params", "not UTF-8"),
        },
        ("DELETE", "rules") => {
            state.clear_rules();
            StatusCode::NO_CONTENT.into_response()
        }
        _ => error_response(StatusCode::NOT_FOUND, "not-found", "no such control method"),
    }
}
