//! Rescan results: the one message every request message gets back, and what
//! each KTIP answer means for it.
//!
//! Every field is always present (null when it does not apply), in this order:
//! `request_id`, `task_id`, `status`, `http_status`, `error`,
//! `validation_errors`, `response`, `attempts`, `received_at`,
//! `completed_at`, `duplicate_of`, `parameters`. Statuses: `accepted` and
//! `rejected` by the API, `invalid` before any call, `failed` after retries.
//!
//! Passwords never appear: `parameters` leaves them out, and text that comes
//! from outside (the API's body, a failure message that may quote the called
//! URL) is scrubbed of the request's passwords, raw and percent-encoded,
//! before it is stored. Pure: no I/O, no clock (times are arguments).

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::macros::format_description;

use super::request::{FieldError, Rejection, RescanRequest, percent_encoded};

/// Upstream text (API error descriptions, failure messages) is cut to this.
pub const MAX_MESSAGE_CHARS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The API accepted the rescan (HTTP 2xx).
    Accepted,
    /// The API refused it for good (400, 401, 403, 451, undocumented status).
    Rejected,
    /// Refused before any call (not JSON, broken rules, reply topic).
    Invalid,
    /// No answer worth keeping after the retries (404, 429, 5xx, network, TLS).
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Accepted => "accepted",
            Status::Rejected => "rejected",
            Status::Invalid => "invalid",
            Status::Failed => "failed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `error.kind` of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Broken rules, listed in `validation_errors`.
    Validation,
    /// The message was not a JSON object.
    NotJson,
    /// The request asked for a reply topic that is not allowed.
    ReplyTopicNotAllowed,
    /// HTTP 400 (`invalid-params`, `too-large-file`).
    BadRequest,
    /// HTTP 401: credentials refused.
    Unauthorized,
    /// HTTP 403: token instead of certificate, no API access, quota.
    Forbidden,
    /// HTTP 451.
    Legal,
    /// An HTTP status the API does not document; not retried.
    UnexpectedStatus,
    /// 404, 429, 5xx, timeouts or network errors until the retries ran out.
    RetriesExhausted,
    /// The TLS handshake failed (e.g. client certificate missing or expired).
    Tls,
    /// A fault of the consumer itself, e.g. a stored outcome it cannot read.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Validation => "validation",
            ErrorKind::NotJson => "not_json",
            ErrorKind::ReplyTopicNotAllowed => "reply_topic_not_allowed",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Legal => "legal",
            ErrorKind::UnexpectedStatus => "unexpected_status",
            ErrorKind::RetriesExhausted => "retries_exhausted",
            ErrorKind::Tls => "tls",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an HTTP status from the rescan endpoint means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Accepted,
    /// Permanent: do not retry.
    Rejected(ErrorKind),
    /// Transient: retry with backoff, a bounded number of times.
    Retryable,
}

/// The one place HTTP statuses are classified. 404 is retryable: the
/// portal uses it for "task failed or hung; run the query again later".
pub fn classify(status: u16) -> StatusClass {
    match status {
        200..=299 => StatusClass::Accepted,
        400 => StatusClass::Rejected(ErrorKind::BadRequest),
        401 => StatusClass::Rejected(ErrorKind::Unauthorized),
        403 => StatusClass::Rejected(ErrorKind::Forbidden),
        451 => StatusClass::Rejected(ErrorKind::Legal),
        404 | 408 | 429 | 500..=599 => StatusClass::Retryable,
        _ => StatusClass::Rejected(ErrorKind::UnexpectedStatus),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Where a request message sits; names a request that has no `request_id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageOrigin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl fmt::Display for MessageOrigin {
    /// `<topic>-<partition>-<offset>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}-{}", self.topic, self.partition, self.offset)
    }
}

/// When the request message was received and when its outcome was known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub received_at: SystemTime,
    pub completed_at: SystemTime,
}

/// One answer of the API: status and body as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiReply<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

/// Why a request ended without an answer worth keeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure<'a> {
    kind: ErrorKind,
    message: String,
    last_reply: Option<ApiReply<'a>>,
}

impl<'a> Failure<'a> {
    /// Retries ran out. `message` says what the last attempt hit; it is
    /// scrubbed of passwords, but pass `reqwest::Error::without_url()` anyway.
    pub fn retries_exhausted(message: impl Into<String>) -> Failure<'a> {
        Failure {
            kind: ErrorKind::RetriesExhausted,
            message: message.into(),
            last_reply: None,
        }
    }

    /// The TLS handshake failed (client certificate missing, expired, refused).
    pub fn tls(message: impl Into<String>) -> Failure<'a> {
        Failure {
            kind: ErrorKind::Tls,
            message: message.into(),
            last_reply: None,
        }
    }

    /// The last HTTP answer, when the last attempt got one (e.g. a 503).
    pub fn with_last_reply(mut self, reply: ApiReply<'a>) -> Failure<'a> {
        self.last_reply = Some(reply);
        self
    }
}

/// The result message of one request message. Build it with the
/// constructors; serialize it with [`RescanResult::to_bytes`]. It reads back
/// from its own JSON (`Deserialize`), e.g. from an outcome store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RescanResult {
    request_id: String,
    task_id: Option<String>,
    status: Status,
    http_status: Option<u16>,
    error: Option<ResultError>,
    validation_errors: Vec<FieldError>,
    response: Option<Value>,
    attempts: u32,
    #[serde(serialize_with = "rfc3339_millis", deserialize_with = "rfc3339")]
    received_at: OffsetDateTime,
    #[serde(serialize_with = "rfc3339_millis", deserialize_with = "rfc3339")]
    completed_at: OffsetDateTime,
    duplicate_of: Option<String>,
    parameters: Option<Map<String, Value>>,
}

impl RescanResult {
    /// Refused before any call: not JSON, or broken rules.
    pub fn invalid(origin: &MessageOrigin, rejection: &Rejection, timing: Timing) -> RescanResult {
        let error = match rejection {
            Rejection::NotJson { reason } => ResultError {
                kind: ErrorKind::NotJson,
                message: format!("the message is not a JSON object: {reason}"),
            },
            Rejection::Invalid { errors, .. } => ResultError {
                kind: ErrorKind::Validation,
                message: format!(
                    "the request breaks {} rule(s); see validation_errors",
                    errors.len()
                ),
            },
        };
        RescanResult {
            request_id: request_id(rejection.request_id(), origin),
            task_id: rejection.task_id().map(str::to_string),
            status: Status::Invalid,
            validation_errors: rejection.errors().to_vec(),
            ..RescanResult::blank(timing, Some(error))
        }
    }

    /// A valid request refused before any call for another reason, such as
    /// [`ErrorKind::ReplyTopicNotAllowed`].
    pub fn refused(
        origin: &MessageOrigin,
        request: &RescanRequest,
        kind: ErrorKind,
        message: &str,
        timing: Timing,
    ) -> RescanResult {
        let message = Scrubber::new(request).text(message);
        RescanResult {
            status: Status::Invalid,
            ..RescanResult::for_request(
                origin,
                request,
                timing,
                Some(ResultError { kind, message }),
            )
        }
    }

    /// The API's final answer, after `attempts` calls. A retryable status
    /// here means the retries ran out on it: the result is `failed`.
    pub fn from_api(
        origin: &MessageOrigin,
        request: &RescanRequest,
        reply: ApiReply<'_>,
        attempts: u32,
        timing: Timing,
    ) -> RescanResult {
        let scrub = Scrubber::new(request);
        let (status, error) = match classify(reply.status) {
            StatusClass::Accepted => (Status::Accepted, None),
            StatusClass::Rejected(kind) => {
                let message = scrub.text(&rejection_message(reply, kind));
                (Status::Rejected, Some(ResultError { kind, message }))
            }
            StatusClass::Retryable => {
                let message = format!("HTTP {} on the last of {attempts} attempt(s)", reply.status);
                let kind = ErrorKind::RetriesExhausted;
                (Status::Failed, Some(ResultError { kind, message }))
            }
        };
        RescanResult {
            status,
            http_status: Some(reply.status),
            response: scrub.body(reply.body),
            attempts,
            ..RescanResult::for_request(origin, request, timing, error)
        }
    }

    /// No answer worth keeping after `attempts` calls.
    pub fn failed(
        origin: &MessageOrigin,
        request: &RescanRequest,
        failure: Failure<'_>,
        attempts: u32,
        timing: Timing,
    ) -> RescanResult {
        let scrub = Scrubber::new(request);
        let error = ResultError {
            kind: failure.kind,
            message: scrub.text(&failure.message),
        };
        RescanResult {
            status: Status::Failed,
            http_status: failure.last_reply.map(|r| r.status),
            response: failure.last_reply.and_then(|r| scrub.body(r.body)),
            attempts,
            ..RescanResult::for_request(origin, request, timing, Some(error))
        }
    }

    /// This stored outcome, repeated for a later message with the same
    /// `request_id`. `original` names the first message
    /// (`<topic>-<partition>-<offset>`); `attempts` is 0 because the
    /// duplicate made no call; the times are the duplicate's.
    pub fn as_duplicate_of(&self, original: impl Into<String>, timing: Timing) -> RescanResult {
        RescanResult {
            duplicate_of: Some(original.into()),
            attempts: 0,
            received_at: utc(timing.received_at),
            completed_at: utc(timing.completed_at),
            ..self.clone()
        }
    }

    /// A stored outcome (this type's JSON, as published) answered again for
    /// a repeated `request_id`: [`RescanResult::as_duplicate_of`]. When the
    /// stored JSON cannot be read the answer is `failed`/`internal`, still
    /// naming `original`.
    pub fn replayed(stored: &Value, original: &str, timing: Timing) -> RescanResult {
        match RescanResult::deserialize(stored) {
            Ok(result) => result.as_duplicate_of(original, timing),
            Err(_) => {
                let text =
                    |name: &str| stored.get(name).and_then(Value::as_str).map(str::to_string);
                let error = ResultError {
                    kind: ErrorKind::Internal,
                    message: format!("the stored outcome of {original} could not be read"),
                };
                RescanResult {
                    request_id: text("request_id").unwrap_or_else(|| original.to_string()),
                    task_id: text("task_id"),
                    status: Status::Failed,
                    duplicate_of: Some(original.to_string()),
                    ..RescanResult::blank(timing, Some(error))
                }
            }
        }
    }

    fn blank(timing: Timing, error: Option<ResultError>) -> RescanResult {
        RescanResult {
            request_id: String::new(),
            task_id: None,
            status: Status::Invalid,
            http_status: None,
            error,
            validation_errors: Vec::new(),
            response: None,
            attempts: 0,
            received_at: utc(timing.received_at),
            completed_at: utc(timing.completed_at),
            duplicate_of: None,
            parameters: None,
        }
    }

    fn for_request(
        origin: &MessageOrigin,
        request: &RescanRequest,
        timing: Timing,
        error: Option<ResultError>,
    ) -> RescanResult {
        RescanResult {
            request_id: request_id(request.request_id(), origin),
            task_id: Some(request.task_id().to_string()),
            parameters: Some(request.parameters()),
            ..RescanResult::blank(timing, error)
        }
    }

    /// The message value: UTF-8 JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a RescanResult has string keys and finite numbers only")
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn task_id(&self) -> Option<&str> {
        self.task_id.as_deref()
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn http_status(&self) -> Option<u16> {
        self.http_status
    }

    pub fn error(&self) -> Option<&ResultError> {
        self.error.as_ref()
    }

    pub fn validation_errors(&self) -> &[FieldError] {
        &self.validation_errors
    }

    pub fn response(&self) -> Option<&Value> {
        self.response.as_ref()
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    pub fn duplicate_of(&self) -> Option<&str> {
        self.duplicate_of.as_deref()
    }
}

fn request_id(given: Option<&str>, origin: &MessageOrigin) -> String {
    given.map_or_else(|| origin.to_string(), str::to_string)
}

/// The message of a permanent refusal; a 400's body names the reason.
fn rejection_message(reply: ApiReply<'_>, kind: ErrorKind) -> String {
    let status = reply.status;
    match kind {
        ErrorKind::BadRequest => {
            let body: Option<Value> = serde_json::from_slice(reply.body).ok();
            let member = |name: &str| body.as_ref().and_then(|b| b.get(name)).and_then(Value::as_str);
            match (member("error"), member("description")) {
                (Some(e), Some(d)) => format!("HTTP 400 {e}: {d}"),
                (Some(e), None) => format!("HTTP 400 {e}"),
                _ => "HTTP 400: the API refused the parameters".into(),
            }
        }
        ErrorKind::Unauthorized => "HTTP 401: authentication failed; check the user name and password".into(),
        ErrorKind::Forbidden => {
            "HTTP 403: forbidden (no API access, quota, or a token instead of the client certificate)".into()
        }
        ErrorKind::Legal => "HTTP 451: unavailable for legal reasons".into(),
        _ => format!("HTTP {status}: a status the API does not document"),
    }
}

/// Replaces the request's passwords in upstream text.
struct Scrubber {
    needles: Vec<String>,
}

impl Scrubber {
    fn new(request: &RescanRequest) -> Scrubber {
        let mut needles: Vec<String> = request
            .secrets()
            .flat_map(|s| [s.expose().to_string(), percent_encoded(s.expose())])
            .filter(|s| !s.is_empty())
            .collect();
        // Longest first, so a password containing another is replaced whole.
        needles.sort_by_key(|s| std::cmp::Reverse(s.len()));
        needles.dedup();
        Scrubber { needles }
    }

    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), "[redacted]");
            }
        }
        out
    }

    /// Scrubbed and cut to [`MAX_MESSAGE_CHARS`].
    fn text(&self, text: &str) -> String {
        let clean = self.scrub(text);
        if clean.chars().count() <= MAX_MESSAGE_CHARS {
            return clean;
        }
        let mut cut: String = clean.chars().take(MAX_MESSAGE_CHARS).collect();
        cut.push('…');
        cut
    }

    /// The body as JSON when it is JSON, else as a JSON string; `None` when empty.
    fn body(&self, body: &[u8]) -> Option<Value> {
        if body.is_empty() {
            return None;
        }
        let value = serde_json::from_slice(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        Some(self.value(value))
    }

    fn value(&self, value: Value) -> Value {
        match value {
            Value::String(s) => Value::String(self.scrub(&s)),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| self.value(v)).collect()),
            Value::Object(members) => Value::Object(
                members
                    .into_iter()
                    .map(|(k, v)| (self.scrub(&k), self.value(v)))
                    .collect(),
            ),
            other => other,
        }
    }
}

/// UTC, cut to the millisecond the result shows (so a result reads back equal).
fn utc(t: SystemTime) -> OffsetDateTime {
    let t = OffsetDateTime::from(t);
    t.replace_millisecond(t.millisecond())
        .expect("a millisecond of a valid time is valid")
}

/// RFC 3339 in UTC with milliseconds (truncated): `2024-05-06T07:08:09.123Z`.
fn rfc3339_millis<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    let text = t
        .to_offset(time::UtcOffset::UTC)
        .format(&format)
        .map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

fn rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
    let text = String::deserialize(d)?;
    OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::json;

    use super::*;
    use crate::rescan::request::AllowedValues;

    const SECRET: &str = "hunter2 &Zz";

    fn origin() -> MessageOrigin {
        MessageOrigin {
            topic: "rescan-requests".into(),
            partition: 3,
            offset: 42,
        }
    }

    /// 2024-05-06T07:08:09.123999999Z and one minute later.
    fn timing() -> Timing {
        let received_at = UNIX_EPOCH + Duration::new(1_714_979_289, 123_999_999);
        Timing {
            received_at,
            completed_at: received_at + Duration::from_secs(60),
        }
    }

    fn request(v: Value) -> RescanRequest {
        RescanRequest::parse(v.to_string().as_bytes(), &AllowedValues::default()).unwrap()
    }

    fn with_passwords() -> RescanRequest {
        request(json!({
            "request_id": "req-7", "task_id": "T-1", "url": "https://files.example/x.zip",
            "processing_type": "unzip-and-exec", "unzip_password": SECRET, "doc_password": SECRET,
            "exec_time": 60, "decrypt_https": false,
        }))
    }

    fn json_of(r: &RescanResult) -> Value {
        serde_json::from_slice(&r.to_bytes()).unwrap()
    }

    const FIELDS: [&str; 12] = [
        "request_id",
        "task_id",
        "status",
        "http_status",
        "error",
        "validation_errors",
        "response",
        "attempts",
        "received_at",
        "completed_at",
        "duplicate_of",
        "parameters",
    ];

    /// Field names exactly as specified, in order, with their JSON types.
    fn assert_shape(r: &RescanResult) -> Value {
        let text = String::from_utf8(r.to_bytes()).unwrap();
        let mut at = 0;
        for name in FIELDS {
            let pos = text[at..]
                .find(&format!("\"{name}\":"))
                .unwrap_or_else(|| panic!("{name} in {text}"));
            at += pos;
        }
        let v = json_of(r);
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), FIELDS.len(), "{text}");
        assert!(obj["request_id"].is_string());
        assert!(obj["task_id"].is_string() || obj["task_id"].is_null());
        assert!(
            ["accepted", "rejected", "invalid", "failed"]
                .contains(&obj["status"].as_str().unwrap())
        );
        assert!(obj["http_status"].is_u64() || obj["http_status"].is_null());
        match &obj["error"] {
            Value::Null => {}
            Value::Object(e) => {
                assert_eq!(e.len(), 2, "{text}");
                assert!(e["kind"].is_string() && e["message"].is_string(), "{text}");
            }
            other => panic!("error: {other}"),
        }
        for e in obj["validation_errors"].as_array().unwrap() {
            let e = e.as_object().unwrap();
            assert_eq!(e.len(), 2);
            assert!(e["field"].is_string() && e["message"].is_string());
        }
        assert!(obj["attempts"].is_u64());
        for t in ["received_at", "completed_at"] {
            let s = obj[t].as_str().unwrap();
            assert_eq!(s.len(), "2024-05-06T07:08:09.123Z".len(), "{s}");
            assert!(s.ends_with('Z'), "{s}");
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap();
        }
        assert!(obj["duplicate_of"].is_string() || obj["duplicate_of"].is_null());
        assert!(obj["parameters"].is_object() || obj["parameters"].is_null());
        v
    }

    fn assert_no_secret(r: &RescanResult) {
        let bytes = String::from_utf8(r.to_bytes()).unwrap();
        let debug = format!("{r:?}");
        for shown in [&bytes, &debug] {
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(!shown.contains(&percent_encoded(SECRET)), "{shown}");
        }
        let parameters = json_of(r)["parameters"].to_string();
        assert!(!parameters.contains("password"), "{parameters}");
    }

    #[test]
    fn accepted_result() {
        let body = br#"{"task_id": "T-1", "state": "created"}"#;
        let reply = ApiReply { status: 200, body };
        let r = RescanResult::from_api(&origin(), &with_passwords(), reply, 2, timing());
        let v = assert_shape(&r);
        assert_eq!(
            v,
            json!({
                "request_id": "req-7", "task_id": "T-1", "status": "accepted", "http_status": 200,
                "error": null, "validation_errors": [],
                "response": {"task_id": "T-1", "state": "created"}, "attempts": 2,
                "received_at": "2024-05-06T07:08:09.123Z", "completed_at": "2024-05-06T07:09:09.123Z",
                "duplicate_of": null,
                "parameters": {
                    "url": "https://files.example/x.zip", "exec_time": 60,
                    "processing_type": "unzip-and-exec", "decrypt_https": false,
                },
            })
        );
        assert_no_secret(&r);
    }

    #[test]
    fn rejected_results_carry_the_kind_and_the_apis_reason() {
        let body = br#"{"error": "invalid-params", "description": "exec_env is unknown"}"#;
        let r = RescanResult::from_api(
            &origin(),
            &with_passwords(),
            ApiReply { status: 400, body },
            1,
            timing(),
        );
        let v = assert_shape(&r);
        assert_eq!(v["status"], "rejected");
        assert_eq!(
            v["error"],
            json!({"kind": "bad_request", "message": "HTTP 400 invalid-params: exec_env is unknown"})
        );
        assert_eq!(v["response"]["error"], "invalid-params");
        for (status, kind) in [
            (401, "unauthorized"),
            (403, "forbidden"),
            (451, "legal"),
            (418, "unexpected_status"),
        ] {
            let r = RescanResult::from_api(
                &origin(),
                &with_passwords(),
                ApiReply { status, body: b"" },
                1,
                timing(),
            );
            let v = assert_shape(&r);
            assert_eq!(
                (v["status"].as_str(), v["error"]["kind"].as_str()),
                (Some("rejected"), Some(kind))
            );
            assert_eq!(v["http_status"], status);
            assert_eq!(v["response"], Value::Null, "an empty body is null");
        }
    }

    #[test]
    fn a_retryable_final_answer_is_failed() {
        let reply = ApiReply {
            status: 503,
            body: b"<html>busy</html>",
        };
        let r = RescanResult::from_api(&origin(), &with_passwords(), reply, 5, timing());
        let v = assert_shape(&r);
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"]["kind"], "retries_exhausted");
        assert_eq!(
            v["response"], "<html>busy</html>",
            "a non-JSON body is kept as a string"
        );
        assert_eq!(v["attempts"], 5);
    }

    #[test]
    fn failed_results() {
        let req = with_passwords();
        let message = format!(
            "error sending request for url (https://tip.example/api?unzip_password={}): timed out",
            percent_encoded(SECRET)
        );
        let r = RescanResult::failed(
            &origin(),
            &req,
            Failure::retries_exhausted(message),
            4,
            timing(),
        );
        let v = assert_shape(&r);
        assert_eq!(
            (v["status"].as_str(), v["error"]["kind"].as_str()),
            (Some("failed"), Some("retries_exhausted"))
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("unzip_password=[redacted]"),
            "{v}"
        );
        assert_eq!(v["http_status"], Value::Null);
        assert_no_secret(&r);

        let last = ApiReply {
            status: 404,
            body: br#"{"error": "task hung"}"#,
        };
        let r = RescanResult::failed(
            &origin(),
            &req,
            Failure::retries_exhausted("HTTP 404").with_last_reply(last),
            3,
            timing(),
        );
        let v = assert_shape(&r);
        assert_eq!(v["http_status"], 404);
        assert_eq!(v["response"], json!({"error": "task hung"}));

        let r = RescanResult::failed(
            &origin(),
            &req,
            Failure::tls("certificate required"),
            1,
            timing(),
        );
        assert_eq!(assert_shape(&r)["error"]["kind"], "tls");
    }

    #[test]
    fn invalid_results() {
        let payload = br#"{"task_id": "../x", "url": "ftp://x", "exec_time": 10, "unzip_password": "hunter2 &Zz"}"#;
        let rejection = RescanRequest::parse(payload, &AllowedValues::default()).unwrap_err();
        let r = RescanResult::invalid(&origin(), &rejection, timing());
        let v = assert_shape(&r);
        assert_eq!(v["request_id"], "rescan-requests-3-42");
        assert_eq!(v["task_id"], "../x");
        assert_eq!(v["status"], "invalid");
        assert_eq!(v["error"]["kind"], "validation");
        assert_eq!(v["attempts"], 0);
        assert_eq!(v["http_status"], Value::Null);
        assert_eq!(v["parameters"], Value::Null);
        let fields: Vec<&str> = v["validation_errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, ["task_id", "url", "exec_time", "unzip_password"]);
        assert_eq!(r.validation_errors().len(), 4);
        let bytes = String::from_utf8(r.to_bytes()).unwrap();
        assert!(!bytes.contains(SECRET) && !format!("{r:?}").contains(SECRET));

        let rejection = RescanRequest::parse(b"[1]", &AllowedValues::default()).unwrap_err();
        let r = RescanResult::invalid(&origin(), &rejection, timing());
        let v = assert_shape(&r);
        assert_eq!(v["task_id"], Value::Null);
        assert_eq!(v["error"]["kind"], "not_json");
        assert_eq!(v["validation_errors"], json!([]));

        let rejection = RescanRequest::parse(
            br#"{"request_id": "mine", "url": 1}"#,
            &AllowedValues::default(),
        )
        .unwrap_err();
        assert_eq!(
            RescanResult::invalid(&origin(), &rejection, timing()).request_id(),
            "mine"
        );
    }

    #[test]
    fn refused_results() {
        let r = RescanResult::refused(
            &origin(),
            &with_passwords(),
            ErrorKind::ReplyTopicNotAllowed,
            "reply topic \"other\" is not in the allow-list",
            timing(),
        );
        let v = assert_shape(&r);
        assert_eq!(v["status"], "invalid");
        assert_eq!(v["error"]["kind"], "reply_topic_not_allowed");
        assert_eq!(v["validation_errors"], json!([]));
        assert_eq!(v["task_id"], "T-1");
        assert_no_secret(&r);
    }

    #[test]
    fn passwords_echoed_by_the_api_are_scrubbed() {
        let req = with_passwords();
        let body = format!(
            r#"{{"error": "invalid-params", "description": "bad password {SECRET}", "{SECRET}": ["{SECRET}", 1]}}"#
        );
        let r = RescanResult::from_api(
            &origin(),
            &req,
            ApiReply {
                status: 400,
                body: body.as_bytes(),
            },
            1,
            timing(),
        );
        assert_no_secret(&r);
        assert!(
            json_of(&r)["error"]["message"]
                .as_str()
                .unwrap()
                .ends_with("bad password [redacted]")
        );
        let text = format!("plain text with {SECRET} and {}", percent_encoded(SECRET));
        let r = RescanResult::from_api(
            &origin(),
            &req,
            ApiReply {
                status: 200,
                body: text.as_bytes(),
            },
            1,
            timing(),
        );
        assert_no_secret(&r);
        assert_eq!(
            json_of(&r)["response"],
            "plain text with [redacted] and [redacted]"
        );
    }

    #[test]
    fn the_request_id_falls_back_to_the_message_position() {
        let req = request(json!({"task_id": "t", "url": "http://a.example/"}));
        let r = RescanResult::from_api(
            &origin(),
            &req,
            ApiReply {
                status: 200,
                body: b"{}",
            },
            1,
            timing(),
        );
        assert_eq!(r.request_id(), "rescan-requests-3-42");
        assert_eq!(
            json_of(&r)["parameters"],
            json!({"url": "http://a.example/"})
        );
    }

    #[test]
    fn duplicates_repeat_the_stored_outcome() {
        let stored = RescanResult::from_api(
            &origin(),
            &with_passwords(),
            ApiReply {
                status: 200,
                body: b"{}",
            },
            3,
            timing(),
        );
        let later = Timing {
            received_at: UNIX_EPOCH + Duration::from_secs(1_714_990_000),
            completed_at: UNIX_EPOCH + Duration::from_millis(1_714_990_000_007),
        };
        let dup = stored.as_duplicate_of("rescan-requests-3-42", later);
        let v = assert_shape(&dup);
        assert_eq!(v["duplicate_of"], "rescan-requests-3-42");
        assert_eq!(v["status"], "accepted");
        assert_eq!(v["attempts"], 0);
        assert_eq!(v["received_at"], "2024-05-06T10:06:40.000Z");
        assert_eq!(v["completed_at"], "2024-05-06T10:06:40.007Z");
        assert_eq!(dup.duplicate_of(), Some("rescan-requests-3-42"));
        assert_eq!(stored.duplicate_of(), None);
    }

    #[test]
    fn times_are_utc_milliseconds() {
        let r = RescanResult::invalid(
            &origin(),
            &Rejection::NotJson { reason: "x".into() },
            Timing {
                received_at: UNIX_EPOCH,
                completed_at: UNIX_EPOCH + Duration::from_nanos(999_999),
            },
        );
        let v = json_of(&r);
        assert_eq!(v["received_at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["completed_at"], "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn status_classification() {
        for s in [200, 201, 202, 204] {
            assert_eq!(classify(s), StatusClass::Accepted, "{s}");
        }
        assert_eq!(classify(400), StatusClass::Rejected(ErrorKind::BadRequest));
        assert_eq!(
            classify(401),
            StatusClass::Rejected(ErrorKind::Unauthorized)
        );
        assert_eq!(classify(403), StatusClass::Rejected(ErrorKind::Forbidden));
        assert_eq!(classify(451), StatusClass::Rejected(ErrorKind::Legal));
        for s in [404, 408, 429, 500, 502, 503, 504, 599] {
            assert_eq!(classify(s), StatusClass::Retryable, "{s}");
        }
        for s in [100, 301, 302, 405, 409, 413, 418, 600] {
            assert_eq!(
                classify(s),
                StatusClass::Rejected(ErrorKind::UnexpectedStatus),
                "{s}"
            );
        }
    }

    #[test]
    fn kinds_and_statuses_serialize_as_their_names() {
        for kind in [
            ErrorKind::Validation,
            ErrorKind::NotJson,
            ErrorKind::ReplyTopicNotAllowed,
            ErrorKind::BadRequest,
            ErrorKind::Unauthorized,
            ErrorKind::Forbidden,
            ErrorKind::Legal,
            ErrorKind::UnexpectedStatus,
            ErrorKind::RetriesExhausted,
            ErrorKind::Tls,
            ErrorKind::Internal,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        for status in [
            Status::Accepted,
            Status::Rejected,
            Status::Invalid,
            Status::Failed,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.as_str());
        }
    }

    #[test]
    fn results_read_back_and_replay() {
        let stored = RescanResult::from_api(
            &origin(),
            &with_passwords(),
            ApiReply {
                status: 400,
                body: b"{\"error\": \"too-large-file\"}",
            },
            2,
            timing(),
        );
        let value = json_of(&stored);
        assert_eq!(RescanResult::deserialize(&value).unwrap(), stored);
        let later = Timing {
            received_at: UNIX_EPOCH,
            completed_at: UNIX_EPOCH,
        };
        let replay = RescanResult::replayed(&value, "rescan-requests-3-42", later);
        assert_eq!(
            replay,
            stored.as_duplicate_of("rescan-requests-3-42", later)
        );
        assert_eq!(replay.error().unwrap().kind, ErrorKind::BadRequest);

        let broken = json!({"request_id": "req-9", "task_id": "T-9", "status": "sideways"});
        let replay = RescanResult::replayed(&broken, "rescan-requests-0-1", later);
        let v = assert_shape(&replay);
        assert_eq!(
            (v["request_id"].as_str(), v["task_id"].as_str()),
            (Some("req-9"), Some("T-9"))
        );
        assert_eq!(
            (v["status"].as_str(), v["error"]["kind"].as_str()),
            (Some("failed"), Some("internal"))
        );
        assert_eq!(v["duplicate_of"], "rescan-requests-0-1");
    }
}
