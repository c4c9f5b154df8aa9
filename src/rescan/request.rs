//! Rescan requests: the JSON a requester puts on the topic, checked once into
//! a [`RescanRequest`], and the KTIP call it becomes.
//!
//! ```text
//! payload bytes ──parse_object──▶ top-level members ──Checker──▶ RescanRequest ──query()──▶ rescan_url()
//!                      │                                  │
//!                      └── Rejection::NotJson             └── Rejection::Invalid (every broken rule)
//! ```
//!
//! Every rule of the KTIP rescan reference is checked here, and every broken
//! rule is reported, not only the first. Unknown and duplicated members are
//! refused. The JSON Schema `schemas/rescan-request.schema.json` states the
//! same static rules; `tests/rescan_schema.rs` checks that both agree. Two
//! things only this code can do: check `exec_env` and `channel` against the
//! values the API offers ([`AllowedValues`]), and have the `url` crate parse
//! the URL (the schema's pattern is an approximation, so this side may refuse
//! a URL the schema accepts, never the reverse).
//!
//! Passwords are held as [`Secret`] and never appear in a message: no error
//! text here echoes any value. Lengths count characters (code points), as
//! JSON Schema does. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use reqwest::Url;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Secret;

pub const MAX_REQUEST_ID_CHARS: usize = 256;
pub const MAX_TASK_ID_CHARS: usize = 128;
/// Not a KTIP rule: a bound so one message cannot carry an unbounded URL.
pub const MAX_URL_CHARS: usize = 2048;
/// Not a KTIP rule: environment names are short; the API's list is authoritative.
pub const MAX_EXEC_ENV_CHARS: usize = 128;
pub const EXEC_TIME_SECONDS: std::ops::RangeInclusive<u16> = 30..=500;
pub const MAX_FILE_EXT_CHARS: usize = 10;
/// Not a KTIP rule: a bound for archive and document passwords.
pub const MAX_PASSWORD_CHARS: usize = 256;
/// Beyond this the portal silently shortens the command line; we refuse instead.
pub const MAX_CMD_LINE_CHARS: usize = 1024;

/// The path under the base URL, before the task id.
pub const RESCAN_PATH: &str = "api/sandbox/tasks/file_from_url";

/// A request member, by its JSON name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    RequestId,
    TaskId,
    Url,
    ExecEnv,
    ExecTime,
    FileExt,
    ProcessingType,
    UnzipPassword,
    DecryptHttps,
    ClickOnLinks,
    Channel,
    DocPassword,
    CmdLine,
}

impl Field {
    /// Every member a request may have, in the order errors are reported.
    pub const ALL: [Field; 13] = [
        Field::RequestId,
        Field::TaskId,
        Field::Url,
        Field::ExecEnv,
        Field::ExecTime,
        Field::FileExt,
        Field::ProcessingType,
        Field::UnzipPassword,
        Field::DecryptHttps,
        Field::ClickOnLinks,
        Field::Channel,
        Field::DocPassword,
        Field::CmdLine,
    ];

    pub fn json_name(self) -> &'static str {
        match self {
            Field::RequestId => "request_id",
            Field::TaskId => "task_id",
            Field::Url => "url",
            Field::ExecEnv => "exec_env",
            Field::ExecTime => "exec_time",
            Field::FileExt => "file_ext",
            Field::ProcessingType => "processing_type",
            Field::UnzipPassword => "unzip_password",
            Field::DecryptHttps => "decrypt_https",
            Field::ClickOnLinks => "click_on_links",
            Field::Channel => "channel",
            Field::DocPassword => "doc_password",
            Field::CmdLine => "cmd_line",
        }
    }

    pub fn from_json_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.json_name() == name)
    }

    /// Whether the value is a password: never echoed, logged or printed.
    pub fn is_secret(self) -> bool {
        matches!(self, Field::UnzipPassword | Field::DocPassword)
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.json_name())
    }
}

/// One row of [`QUERY_PARAMS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryParam {
    pub field: Field,
    /// The endpoint's query parameter name.
    pub name: &'static str,
    /// Whether a public KTIP source names this parameter.
    pub confirmed: bool,
}

/// Request member → KTIP query parameter, in query-string order. The one
/// place a query name is defined: a correction upstream is a one-line change.
pub const QUERY_PARAMS: [QueryParam; 11] = [
    QueryParam {
        field: Field::Url,
        name: "url",
        confirmed: true,
    },
    QueryParam {
        field: Field::ExecEnv,
        name: "exec_env",
        confirmed: true,
    },
    QueryParam {
        field: Field::ExecTime,
        name: "exec_time",
        confirmed: true,
    },
    QueryParam {
        field: Field::FileExt,
        name: "file_ext",
        confirmed: true,
    },
    QueryParam {
        field: Field::ProcessingType,
        name: "processing_type",
        confirmed: true,
    },
    QueryParam {
        field: Field::UnzipPassword,
        name: "unzip_password",
        confirmed: true,
    },
    QueryParam {
        field: Field::DecryptHttps,
        name: "decrypt_https",
        confirmed: true,
    },
    QueryParam {
        field: Field::ClickOnLinks,
        name: "click_on_links",
        confirmed: true,
    },
    // UNCONFIRMED upstream: no public source names the next three parameters.
    QueryParam {
        field: Field::Channel,
        name: "channel",
        confirmed: false,
    },
    QueryParam {
        field: Field::DocPassword,
        name: "doc_password",
        confirmed: false,
    },
    QueryParam {
        field: Field::CmdLine,
        name: "cmd_line",
        confirmed: false,
    },
];

/// Values the API offers, fetched at start by other code. `None` means "not
/// known": only the static rules apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedValues {
    pub exec_envs: Option<BTreeSet<String>>,
    pub channels: Option<BTreeSet<String>>,
}

/// One broken rule. `message` never contains the offending value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a payload is not a [`RescanRequest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Not UTF-8, not JSON, or JSON but not an object.
    #[error("not a JSON object: {reason}")]
    NotJson { reason: String },
    /// A JSON object that breaks at least one rule.
    #[error("invalid rescan request: {}", join(.errors))]
    Invalid {
        /// The request's `request_id`, when that member itself was valid.
        request_id: Option<String>,
        /// The request's `task_id` as given, when it was a string of at most
        /// 256 characters without control characters (for correlation only:
        /// it may be invalid).
        task_id: Option<String>,
        errors: Vec<FieldError>,
    },
}

impl Rejection {
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Rejection::NotJson { .. } => None,
            Rejection::Invalid { request_id, .. } => request_id.as_deref(),
        }
    }

    pub fn task_id(&self) -> Option<&str> {
        match self {
            Rejection::NotJson { .. } => None,
            Rejection::Invalid { task_id, .. } => task_id.as_deref(),
        }
    }

    /// The broken rules; empty for [`Rejection::NotJson`].
    pub fn errors(&self) -> &[FieldError] {
        match self {
            Rejection::NotJson { .. } => &[],
            Rejection::Invalid { errors, .. } => errors,
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors.iter().map(FieldError::to_string).collect();
    parts.join("; ")
}

/// A task id: `^[A-Za-z0-9_-]{1,128}$`, so it can never change the URL path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskId(String);

impl TaskId {
    pub fn new(id: &str) -> Option<TaskId> {
        task_id_problems(id)
            .is_empty()
            .then(|| TaskId(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn task_id_problems(id: &str) -> Vec<String> {
    if id.is_empty() {
        return vec!["must not be empty".into()];
    }
    let mut problems = Vec::new();
    if id.chars().count() > MAX_TASK_ID_CHARS {
        problems.push(format!("must be at most {MAX_TASK_ID_CHARS} characters"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        problems.push("may contain only A-Z, a-z, 0-9, '_' and '-'".into());
    }
    problems
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ProcessingType {
    #[serde(rename = "exec-only")]
    ExecOnly,
    #[serde(rename = "unzip-and-exec")]
    UnzipAndExec,
}

impl ProcessingType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessingType::ExecOnly => "exec-only",
            ProcessingType::UnzipAndExec => "unzip-and-exec",
        }
    }

    fn parse(s: &str) -> Option<ProcessingType> {
        match s {
            "exec-only" => Some(ProcessingType::ExecOnly),
            "unzip-and-exec" => Some(ProcessingType::UnzipAndExec),
            _ => None,
        }
    }
}

/// A validated rescan request. Only [`RescanRequest::parse`] makes one, so
/// every value here has passed every rule; `unzip_password` is only ever set
/// together with [`ProcessingType::UnzipAndExec`]. `Debug` redacts passwords.
#[derive(Debug, Clone)]
pub struct RescanRequest {
    request_id: Option<String>,
    task_id: TaskId,
    url: String,
    exec_env: Option<String>,
    exec_time: Option<u16>,
    file_ext: Option<String>,
    processing_type: Option<ProcessingType>,
    unzip_password: Option<Secret>,
    decrypt_https: Option<bool>,
    click_on_links: Option<bool>,
    channel: Option<String>,
    doc_password: Option<Secret>,
    cmd_line: Option<String>,
}

/// A query-string value. A password's `Debug` prints `[redacted]`.
#[derive(Debug, Clone)]
pub enum QueryValue {
    Plain(String),
    Secret(Secret),
}

impl QueryValue {
    /// The value to send.
    pub fn expose(&self) -> &str {
        match self {
            QueryValue::Plain(s) => s,
            QueryValue::Secret(s) => s.expose(),
        }
    }

    pub fn is_secret(&self) -> bool {
        matches!(self, QueryValue::Secret(_))
    }
}

impl RescanRequest {
    /// Parses and validates one request message.
    pub fn parse(payload: &[u8], allowed: &AllowedValues) -> Result<RescanRequest, Rejection> {
        let members = parse_object(payload)?;
        Checker::new(allowed).check(members)
    }

    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    pub fn task_id(&self) -> &TaskId {
        &self.task_id
    }

    /// The download URL exactly as the requester wrote it.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn exec_env(&self) -> Option<&str> {
        self.exec_env.as_deref()
    }

    pub fn exec_time(&self) -> Option<u16> {
        self.exec_time
    }

    pub fn file_ext(&self) -> Option<&str> {
        self.file_ext.as_deref()
    }

    pub fn processing_type(&self) -> Option<ProcessingType> {
        self.processing_type
    }

    pub fn unzip_password(&self) -> Option<&Secret> {
        self.unzip_password.as_ref()
    }

    pub fn decrypt_https(&self) -> Option<bool> {
        self.decrypt_https
    }

    pub fn click_on_links(&self) -> Option<bool> {
        self.click_on_links
    }

    pub fn channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    pub fn doc_password(&self) -> Option<&Secret> {
        self.doc_password.as_ref()
    }

    pub fn cmd_line(&self) -> Option<&str> {
        self.cmd_line.as_deref()
    }

    /// The passwords this request carries, to scrub from anything echoed.
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.unzip_password.iter().chain(self.doc_password.iter())
    }

    fn query_value(&self, field: Field) -> Option<QueryValue> {
        let plain = |s: &Option<String>| s.clone().map(QueryValue::Plain);
        let secret = |s: &Option<Secret>| s.clone().map(QueryValue::Secret);
        match field {
            Field::RequestId | Field::TaskId => None,
            Field::Url => Some(QueryValue::Plain(self.url.clone())),
            Field::ExecEnv => plain(&self.exec_env),
            Field::ExecTime => self.exec_time.map(|t| QueryValue::Plain(t.to_string())),
            Field::FileExt => plain(&self.file_ext),
            Field::ProcessingType => self
                .processing_type
                .map(|p| QueryValue::Plain(p.as_str().into())),
            Field::UnzipPassword => secret(&self.unzip_password),
            Field::DecryptHttps => self.decrypt_https.map(|b| QueryValue::Plain(b.to_string())),
            Field::ClickOnLinks => self
                .click_on_links
                .map(|b| QueryValue::Plain(b.to_string())),
            Field::Channel => plain(&self.channel),
            Field::DocPassword => secret(&self.doc_password),
            Field::CmdLine => plain(&self.cmd_line),
        }
    }

    /// The query parameters to send: exactly the members present, in
    /// [`QUERY_PARAMS`] order. Absent members are never sent.
    pub fn query(&self) -> Vec<(&'static str, QueryValue)> {
        QUERY_PARAMS
            .iter()
            .filter_map(|p| self.query_value(p.field).map(|v| (p.name, v)))
            .collect()
    }

    /// The validated non-secret members, as JSON, for echoing in a result.
    /// Passwords never appear, not even their names.
    pub fn parameters(&self) -> Map<String, Value> {
        let mut out = Map::new();
        for p in QUERY_PARAMS.iter().filter(|p| !p.field.is_secret()) {
            let value = match p.field {
                Field::ExecTime => self.exec_time.map(Value::from),
                Field::DecryptHttps => self.decrypt_https.map(Value::from),
                Field::ClickOnLinks => self.click_on_links.map(Value::from),
                field => self.query_value(field).map(|v| Value::from(v.expose())),
            };
            if let Some(v) = value {
                out.insert(p.field.json_name().into(), v);
            }
        }
        out
    }

    /// The full endpoint URL for this request under `base`.
    pub fn rescan_url(&self, base: &Url) -> Result<RescanUrl, RescanUrlError> {
        rescan_url(base, &self.task_id, &self.query())
    }
}

/// The full rescan URL. It holds the passwords in its query, so `Debug` and
/// `Display` print [`RescanUrl::redacted`]; send [`RescanUrl::expose`] only.
/// Note that `reqwest::Error`'s message contains the URL: log
/// `err.without_url()`.
#[derive(Clone)]
pub struct RescanUrl {
    url: Url,
    redacted: String,
}

impl RescanUrl {
    /// The URL to call. Never log it.
    pub fn expose(&self) -> &Url {
        &self.url
    }

    /// The URL with every password value replaced by `[redacted]`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl fmt::Debug for RescanUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Display for RescanUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RescanUrlError {
    #[error("the base URL must be http or https with a host")]
    BaseNotHttp,
    #[error("the base URL must have no user name, password, query or fragment")]
    BaseHasExtras,
    #[error("the task id would change the URL path")]
    PathChanged,
}

/// `PUT {base}/api/sandbox/tasks/file_from_url/{task_id}?{query}`, with the
/// task id percent-encoded as one path segment and every query name and value
/// percent-encoded (RFC 3986 unreserved characters kept; a space is `%20`,
/// `%SYSTEMROOT%` becomes `%25SYSTEMROOT%25`). `base` may carry a path prefix.
pub fn rescan_url(
    base: &Url,
    task_id: &TaskId,
    query: &[(&'static str, QueryValue)],
) -> Result<RescanUrl, RescanUrlError> {
    build_url(base, task_id.as_str(), query)
}

/// [`rescan_url`] for any segment text: a [`TaskId`] cannot hold `.`, `/` or
/// `%`, but the path is checked after building anyway (the URL parser treats
/// `%2e%2e` as `..`).
fn build_url(
    base: &Url,
    segment: &str,
    query: &[(&'static str, QueryValue)],
) -> Result<RescanUrl, RescanUrlError> {
    if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
        return Err(RescanUrlError::BaseNotHttp);
    }
    if !base.username().is_empty()
        || base.password().is_some()
        || base.query().is_some()
        || base.fragment().is_some()
    {
        return Err(RescanUrlError::BaseHasExtras);
    }
    let mut path = base.path().trim_end_matches('/').to_string();
    path.push('/');
    path.push_str(RESCAN_PATH);
    path.push('/');
    percent_encode(segment, &mut path);

    let mut sent = String::new();
    let mut redacted = String::new();
    for (i, (name, value)) in query.iter().enumerate() {
        for (out, text) in [
            (&mut sent, value.expose()),
            (
                &mut redacted,
                if value.is_secret() {
                    "[redacted]"
                } else {
                    value.expose()
                },
            ),
        ] {
            if i > 0 {
                out.push('&');
            }
            percent_encode(name, out);
            out.push('=');
            percent_encode(text, out);
        }
    }

    let mut url = base.clone();
    url.set_path(&path);
    url.set_query(Some(&sent));
    if url.path() != path || url.query() != Some(sent.as_str()) {
        return Err(RescanUrlError::PathChanged);
    }
    let mut shown = url.clone();
    shown.set_query(Some(&redacted));
    Ok(RescanUrl {
        url,
        redacted: shown.to_string(),
    })
}

/// Appends `text` percent-encoded: every byte but A-Z a-z 0-9 `-._~`.
fn percent_encode(text: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

/// `text` percent-encoded as [`rescan_url`] sends it, so a password can be
/// scrubbed from an error message that quotes the URL.
pub fn percent_encoded(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    percent_encode(text, &mut out);
    out
}

// ---------------------------------------------------------------------------
// Parsing: the top level as a list of members, so duplicates can be seen.

/// Parses one JSON object, keeping its members in order (duplicates too).
fn parse_object(payload: &[u8]) -> Result<Vec<(String, Value)>, Rejection> {
    let not_json = |reason: String| Rejection::NotJson { reason };
    let text = std::str::from_utf8(payload).map_err(|_| not_json("not UTF-8".into()))?;
    match serde_json::from_str::<TopLevel>(text) {
        Ok(TopLevel::Object(members)) => Ok(members),
        Ok(TopLevel::Other(kind)) => Err(not_json(format!("the payload is {kind}"))),
        // serde_json's syntax errors name a position, never the input.
        Err(e) => Err(not_json(e.to_string())),
    }
}

enum TopLevel {
    Object(Vec<(String, Value)>),
    Other(&'static str),
}

impl<'de> de::Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopLevelVisitor)
    }
}

struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
        let mut members = Vec::new();
        while let Some(entry) = map.next_entry::<String, Value>()? {
            members.push(entry);
        }
        Ok(TopLevel::Object(members))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(TopLevel::Other("an array"))
    }

    fn visit_str<E>(self, _: &str) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("a string"))
    }

    fn visit_bool<E>(self, _: bool) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("a boolean"))
    }

    fn visit_i64<E>(self, _: i64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("a number"))
    }

    fn visit_u64<E>(self, _: u64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("a number"))
    }

    fn visit_f64<E>(self, _: f64) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("a number"))
    }

    fn visit_unit<E>(self) -> Result<TopLevel, E> {
        Ok(TopLevel::Other("null"))
    }
}

// ---------------------------------------------------------------------------
// Validation.

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn is_control(c: char) -> bool {
    c <= '\u{1f}' || c == '\u{7f}'
}

/// Which characters a free-text member may hold.
#[derive(Clone, Copy)]
enum Charset {
    /// Passwords: anything.
    Any,
    /// No C0 control characters and no DEL.
    Printable,
}

/// Collects every broken rule of one request.
struct Checker<'a> {
    allowed: &'a AllowedValues,
    errors: Vec<FieldError>,
}

impl<'a> Checker<'a> {
    fn new(allowed: &'a AllowedValues) -> Checker<'a> {
        Checker {
            allowed,
            errors: Vec::new(),
        }
    }

    fn error(&mut self, field: Field, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.json_name().into(),
            message: message.into(),
        });
    }

    fn check(mut self, members: Vec<(String, Value)>) -> Result<RescanRequest, Rejection> {
        let mut known: BTreeMap<Field, Value> = BTreeMap::new();
        let mut duplicates = BTreeSet::new();
        let mut unknown: Vec<String> = Vec::new();
        for (name, value) in members {
            match Field::from_json_name(&name) {
                Some(field) if known.contains_key(&field) => {
                    duplicates.insert(field);
                }
                Some(field) => {
                    known.insert(field, value);
                }
                None if !unknown.contains(&name) => unknown.push(name),
                None => {}
            }
        }
        let get = |f: Field| known.get(&f);

        let request_id = get(Field::RequestId).and_then(|v| {
            self.text(
                Field::RequestId,
                v,
                MAX_REQUEST_ID_CHARS,
                Charset::Printable,
            )
        });
        let task_id = match get(Field::TaskId) {
            None => {
                self.error(Field::TaskId, "is required");
                None
            }
            Some(v) => self.task_id(v),
        };
        let url = match get(Field::Url) {
            None => {
                self.error(Field::Url, "is required");
                None
            }
            Some(v) => self.url(v),
        };
        let exec_env = get(Field::ExecEnv).and_then(|v| self.exec_env(v));
        let exec_time = get(Field::ExecTime).and_then(|v| self.exec_time(v));
        let file_ext = get(Field::FileExt).and_then(|v| self.file_ext(v));
        let processing_type = get(Field::ProcessingType).and_then(|v| self.processing_type(v));
        let unzip_password = get(Field::UnzipPassword).and_then(|v| {
            let password = self.text(Field::UnzipPassword, v, MAX_PASSWORD_CHARS, Charset::Any);
            let with_unzip = get(Field::ProcessingType)
                .is_some_and(|p| p.as_str() == Some(ProcessingType::UnzipAndExec.as_str()));
            if !with_unzip {
                self.error(
                    Field::UnzipPassword,
                    "is only allowed with processing_type \"unzip-and-exec\"",
                );
                return None;
            }
            password.map(Secret::new)
        });
        let decrypt_https =
            get(Field::DecryptHttps).and_then(|v| self.boolean(Field::DecryptHttps, v));
        let click_on_links =
            get(Field::ClickOnLinks).and_then(|v| self.boolean(Field::ClickOnLinks, v));
        let channel = get(Field::Channel).and_then(|v| self.channel(v));
        let doc_password = get(Field::DocPassword)
            .and_then(|v| self.text(Field::DocPassword, v, MAX_PASSWORD_CHARS, Charset::Any))
            .map(Secret::new);
        let cmd_line = get(Field::CmdLine)
            .and_then(|v| self.text(Field::CmdLine, v, MAX_CMD_LINE_CHARS, Charset::Printable));

        for field in duplicates {
            self.error(field, "appears more than once");
        }
        for name in unknown {
            self.errors.push(FieldError {
                message: format!(
                    "unknown field; the allowed fields are {}",
                    allowed_field_list()
                ),
                field: shorten(&name),
            });
        }

        match (task_id, url) {
            (Some(task_id), Some(url)) if self.errors.is_empty() => Ok(RescanRequest {
                request_id,
                task_id,
                url,
                exec_env,
                exec_time,
                file_ext,
                processing_type,
                unzip_password,
                decrypt_https,
                click_on_links,
                channel,
                doc_password,
                cmd_line,
            }),
            _ => Err(Rejection::Invalid {
                request_id,
                task_id: get(Field::TaskId)
                    .and_then(Value::as_str)
                    .filter(|s| s.chars().count() <= 256 && !s.chars().any(is_control))
                    .map(str::to_string),
                errors: self.errors,
            }),
        }
    }

    /// The value as a string, or an error naming the JSON type it had.
    fn string<'v>(&mut self, field: Field, v: &'v Value) -> Option<&'v str> {
        match v {
            Value::String(s) => Some(s),
            other => {
                self.error(field, format!("must be a string, got {}", json_type(other)));
                None
            }
        }
    }

    /// A non-empty string of at most `max` characters.
    fn text(&mut self, field: Field, v: &Value, max: usize, charset: Charset) -> Option<String> {
        let s = self.string(field, v)?;
        if s.is_empty() {
            self.error(field, "must not be empty");
            return None;
        }
        let before = self.errors.len();
        if s.chars().count() > max {
            self.error(field, format!("must be at most {max} characters"));
        }
        if matches!(charset, Charset::Printable) && s.chars().any(is_control) {
            self.error(field, "must not contain control characters");
        }
        (self.errors.len() == before).then(|| s.to_string())
    }

    fn task_id(&mut self, v: &Value) -> Option<TaskId> {
        let s = self.string(Field::TaskId, v)?;
        let problems = task_id_problems(s);
        if problems.is_empty() {
            return Some(TaskId(s.to_string()));
        }
        for p in problems {
            self.error(Field::TaskId, p);
        }
        None
    }

    fn url(&mut self, v: &Value) -> Option<String> {
        let s = self.string(Field::Url, v)?;
        if s.is_empty() {
            self.error(Field::Url, "must not be empty");
            return None;
        }
        let before = self.errors.len();
        if s.chars().count() > MAX_URL_CHARS {
            self.error(
                Field::Url,
                format!("must be at most {MAX_URL_CHARS} characters"),
            );
        }
        match url_shape(s) {
            Err(problem) => self.error(Field::Url, problem),
            Ok(()) => match Url::parse(s) {
                Err(e) => self.error(Field::Url, format!("is not a valid URL ({e})")),
                Ok(u) if u.host().is_none() => self.error(Field::Url, "must have a host"),
                Ok(_) => {}
            },
        }
        (self.errors.len() == before).then(|| s.to_string())
    }

    fn exec_env(&mut self, v: &Value) -> Option<String> {
        let s = self.text(Field::ExecEnv, v, MAX_EXEC_ENV_CHARS, Charset::Printable)?;
        if let Some(known) = &self.allowed.exec_envs
            && !known.contains(&s)
        {
            let msg = format!(
                "is not an execution environment the API offers ({})",
                list(known)
            );
            self.error(Field::ExecEnv, msg);
            return None;
        }
        Some(s)
    }

    fn exec_time(&mut self, v: &Value) -> Option<u16> {
        let Value::Number(n) = v else {
            self.error(
                Field::ExecTime,
                format!("must be an integer, got {}", json_type(v)),
            );
            return None;
        };
        // JSON Schema counts 60.0 as an integer; so do we.
        let seconds = n.as_f64().unwrap_or(f64::NAN);
        if !(n.is_u64() || n.is_i64() || seconds.fract() == 0.0) {
            self.error(
                Field::ExecTime,
                "must be an integer, got a fractional number",
            );
            return None;
        }
        let (lo, hi) = (EXEC_TIME_SECONDS.start(), EXEC_TIME_SECONDS.end());
        if !(f64::from(*lo)..=f64::from(*hi)).contains(&seconds) {
            self.error(
                Field::ExecTime,
                format!("must be between {lo} and {hi} seconds"),
            );
            return None;
        }
        // In range, so exact.
        Some(seconds as u16)
    }

    fn file_ext(&mut self, v: &Value) -> Option<String> {
        let s = self.string(Field::FileExt, v)?;
        if s.is_empty() {
            self.error(Field::FileExt, "must not be empty");
            return None;
        }
        let before = self.errors.len();
        if s.contains('.') {
            self.error(Field::FileExt, "must be given without the dot");
        }
        if s.chars().count() > MAX_FILE_EXT_CHARS {
            self.error(
                Field::FileExt,
                format!("must be at most {MAX_FILE_EXT_CHARS} characters"),
            );
        }
        if s.chars().any(|c| c == ' ' || is_control(c)) {
            self.error(
                Field::FileExt,
                "must not contain spaces or control characters",
            );
        }
        (self.errors.len() == before).then(|| s.to_string())
    }

    fn processing_type(&mut self, v: &Value) -> Option<ProcessingType> {
        let s = self.string(Field::ProcessingType, v)?;
        let parsed = ProcessingType::parse(s);
        if parsed.is_none() {
            self.error(
                Field::ProcessingType,
                "must be \"exec-only\" or \"unzip-and-exec\"",
            );
        }
        parsed
    }

    fn boolean(&mut self, field: Field, v: &Value) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                let msg = format!(
                    "must be a JSON boolean (true or false), got {}",
                    json_type(other)
                );
                self.error(field, msg);
                None
            }
        }
    }

    fn channel(&mut self, v: &Value) -> Option<String> {
        let s = self.string(Field::Channel, v)?;
        if !is_channel(s) {
            self.error(
                Field::Channel,
                "must be \"TOR\", \"Tarpit\" or a two-letter uppercase region code such as \"RU\" (case-sensitive)",
            );
            return None;
        }
        if let Some(known) = &self.allowed.channels
            && !known.contains(s)
        {
            self.error(
                Field::Channel,
                format!("is not a channel the API offers ({})", list(known)),
            );
            return None;
        }
        Some(s.to_string())
    }
}

fn is_channel(s: &str) -> bool {
    matches!(s, "TOR" | "Tarpit") || (s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase()))
}

/// The schema's `url` pattern, by hand:
/// `^[Hh][Tt][Tt][Pp][Ss]?://(HOST|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?([/?#][^\x00-\x20\x7f\\]*)?$`
/// where HOST is one or more characters other than controls, space, DEL and
/// ``"#%/:<>?@[\]^`{|}``. No user name or password: the URL is echoed in results.
fn url_shape(s: &str) -> Result<(), &'static str> {
    const HOST: &str =
        "must have a host, optionally a port (:digits), and no user name or password";
    let rest = strip_prefix_ignore_case(s, "https://")
        .or_else(|| strip_prefix_ignore_case(s, "http://"))
        .ok_or("must start with http:// or https://")?;
    if s.chars().any(|c| c <= ' ' || c == '\u{7f}' || c == '\\') {
        return Err("must not contain spaces, control characters or backslashes");
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let port = if let Some(ip6) = authority.strip_prefix('[') {
        let close = ip6.find(']').ok_or(HOST)?;
        let literal = &ip6[..close];
        let ok = !literal.is_empty()
            && literal
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
        if !ok {
            return Err(HOST);
        }
        &ip6[close + 1..]
    } else {
        let end = authority.find(':').unwrap_or(authority.len());
        let host = &authority[..end];
        if host.is_empty() || !host.chars().all(is_host_char) {
            return Err(HOST);
        }
        &authority[end..]
    };
    if !port.is_empty() {
        let digits = port.strip_prefix(':').ok_or(HOST)?;
        if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HOST);
        }
    }
    Ok(())
}

fn is_host_char(c: char) -> bool {
    !(c <= ' ' || c == '\u{7f}' || "\"#%/:<>?@[\\]^`{|}".contains(c))
}

fn strip_prefix_ignore_case<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

fn allowed_field_list() -> String {
    let names: Vec<&str> = Field::ALL.iter().map(|f| f.json_name()).collect();
    names.join(", ")
}

/// The values of a set, for a message; long sets are cut.
fn list(set: &BTreeSet<String>) -> String {
    const SHOWN: usize = 32;
    let mut names: Vec<String> = set.iter().take(SHOWN).map(|s| shorten(s)).collect();
    if set.len() > SHOWN {
        names.push(format!("and {} more", set.len() - SHOWN));
    }
    if names.is_empty() {
        return "none".into();
    }
    names.join(", ")
}

/// At most 64 characters of a name, for a message.
fn shorten(name: &str) -> String {
    const MAX: usize = 64;
    if name.chars().count() <= MAX {
        return name.to_string();
    }
    let mut s: String = name.chars().take(MAX).collect();
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SECRET: &str = "s3cr3t-Pa55";

    fn parse_with(v: &Value, allowed: &AllowedValues) -> Result<RescanRequest, Rejection> {
        RescanRequest::parse(v.to_string().as_bytes(), allowed)
    }

    fn parse(v: Value) -> Result<RescanRequest, Rejection> {
        parse_with(&v, &AllowedValues::default())
    }

    /// A valid request with `extra` members added (or replaced).
    fn with(extra: Value) -> Value {
        let mut base = json!({"task_id": "abc-123_X", "url": "https://example.com/f.zip"});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    fn errors_of(v: Value) -> Vec<FieldError> {
        match parse(v) {
            Ok(r) => panic!("accepted: {r:?}"),
            Err(e) => e.errors().to_vec(),
        }
    }

    /// Asserts `v` is refused and that every error is about `field`.
    fn refused(field: &str, v: Value) {
        let errors = errors_of(v.clone());
        assert!(!errors.is_empty(), "{v}");
        assert!(errors.iter().all(|e| e.field == field), "{v}: {errors:?}");
    }

    fn accepted(v: Value) -> RescanRequest {
        parse(v.clone()).unwrap_or_else(|e| panic!("{v}: {e}"))
    }

    fn query_text(r: &RescanRequest) -> Vec<(&'static str, String)> {
        r.query()
            .into_iter()
            .map(|(n, v)| (n, v.expose().to_string()))
            .collect()
    }

    #[test]
    fn minimal_and_full_requests_are_accepted() {
        let r = accepted(with(json!({})));
        assert_eq!(r.task_id().as_str(), "abc-123_X");
        assert_eq!(r.url(), "https://example.com/f.zip");
        assert_eq!(r.request_id(), None);
        let full = accepted(with(json!({
            "request_id": "req-1", "exec_env": "Win10x64", "exec_time": 120, "file_ext": "exe",
            "processing_type": "unzip-and-exec", "unzip_password": SECRET, "decrypt_https": false,
            "click_on_links": true, "channel": "RU", "doc_password": SECRET, "cmd_line": "/A $sample",
        })));
        assert_eq!(full.request_id(), Some("req-1"));
        assert_eq!(full.exec_time(), Some(120));
        assert_eq!(full.processing_type(), Some(ProcessingType::UnzipAndExec));
        assert_eq!(full.unzip_password().unwrap().expose(), SECRET);
        assert_eq!(full.doc_password().unwrap().expose(), SECRET);
        assert_eq!(full.secrets().count(), 2);
    }

    #[test]
    fn request_id_rule() {
        accepted(with(json!({"request_id": "r".repeat(256)})));
        accepted(with(json!({"request_id": "ключ 1"})));
        refused("request_id", with(json!({"request_id": ""})));
        refused("request_id", with(json!({"request_id": "r".repeat(257)})));
        refused("request_id", with(json!({"request_id": "a\nb"})));
        refused("request_id", with(json!({"request_id": 7})));
        refused("request_id", with(json!({"request_id": null})));
    }

    #[test]
    fn task_id_rule_and_path_injection() {
        accepted(with(json!({"task_id": "a".repeat(128)})));
        accepted(with(json!({"task_id": "A-z_09"})));
        for bad in [
            "../x", "a/b", "%2e%2e", "..", ".", "a b", " ", "a?b", "a#b", "a\\b", "é", "a\u{0}", "",
        ] {
            refused("task_id", with(json!({"task_id": bad})));
            assert!(TaskId::new(bad).is_none(), "{bad:?}");
        }
        refused("task_id", with(json!({"task_id": "a".repeat(129)})));
        refused("task_id", with(json!({"task_id": 42})));
        let mut missing = with(json!({}));
        missing.as_object_mut().unwrap().remove("task_id");
        assert_eq!(
            errors_of(missing),
            vec![FieldError {
                field: "task_id".into(),
                message: "is required".into()
            }]
        );
        // Both problems of a long id with a slash are reported.
        assert_eq!(
            errors_of(with(json!({"task_id": format!("{}/", "a".repeat(128))}))).len(),
            2
        );
    }

    #[test]
    fn url_rule() {
        for ok in [
            "http://example.com",
            "https://example.com/path?q=1&r=%20#frag",
            "HTTPS://Example.COM:8443/x",
            "http://192.0.2.1:80/a.exe",
            "http://[2001:db8::1]:8080/",
            "https://bücher.example/файл.zip",
            "http://localhost/$sample%SYSTEMROOT%",
        ] {
            accepted(with(json!({ "url": ok })));
        }
        for bad in [
            "",
            "ftp://example.com/x",
            "file:///etc/passwd",
            "example.com/x",
            "http://",
            "http:///x",
            "http://:80/",
            "http://user:pw@example.com/",
            "http://exa mple.com/",
            "http://example.com/a b",
            " http://example.com/",
            "http://example.com/\t",
            "http://example.com\\evil.com/",
            "http://example.com:/",
            "http://example.com:123456/",
            "http://example.com:99999/",
            "http://[::g]/",
            "http://1.2.3.256/",
            "http://[]/",
            "http://exa%41mple.com/",
        ] {
            refused("url", with(json!({ "url": bad })));
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_CHARS));
        refused("url", with(json!({ "url": long })));
        refused("url", with(json!({"url": ["https://example.com/"]})));
        let mut missing = with(json!({}));
        missing.as_object_mut().unwrap().remove("url");
        refused("url", missing);
    }

    #[test]
    fn exec_env_rule_static_and_known() {
        accepted(with(json!({"exec_env": "Win10x64"})));
        refused("exec_env", with(json!({"exec_env": ""})));
        refused("exec_env", with(json!({"exec_env": "x".repeat(129)})));
        refused("exec_env", with(json!({"exec_env": true})));
        let known = AllowedValues {
            exec_envs: Some(["Win10x64".to_string(), "Win7x64".to_string()].into()),
            channels: None,
        };
        assert!(parse_with(&with(json!({"exec_env": "Win7x64"})), &known).is_ok());
        let err = parse_with(&with(json!({"exec_env": "Linux"})), &known).unwrap_err();
        assert_eq!(err.errors().len(), 1);
        assert_eq!(err.errors()[0].field, "exec_env");
        assert!(
            err.errors()[0].message.contains("Win10x64, Win7x64"),
            "{err}"
        );
        // A known but empty list refuses every value.
        let none = AllowedValues {
            exec_envs: Some(BTreeSet::new()),
            channels: None,
        };
        assert!(parse_with(&with(json!({"exec_env": "Win7x64"})), &none).is_err());
    }

    #[test]
    fn exec_time_rule() {
        for ok in [json!(30), json!(500), json!(120), json!(60.0), json!(3e2)] {
            accepted(with(json!({ "exec_time": ok })));
        }
        assert_eq!(
            accepted(with(json!({"exec_time": 60.0}))).exec_time(),
            Some(60)
        );
        for bad in [
            json!(29),
            json!(501),
            json!(0),
            json!(-60),
            json!(60.5),
            json!(1e300),
            json!(u64::MAX),
            json!("60"),
            json!(null),
            json!(true),
        ] {
            refused("exec_time", with(json!({ "exec_time": bad })));
        }
    }

    #[test]
    fn file_ext_rule() {
        accepted(with(json!({"file_ext": "exe"})));
        accepted(with(json!({"file_ext": "abcdefghij"})));
        accepted(with(json!({"file_ext": "ééééééééé😀"}))); // 10 characters, 22 bytes
        refused("file_ext", with(json!({"file_ext": ".exe"})));
        refused("file_ext", with(json!({"file_ext": "tar.gz"})));
        refused("file_ext", with(json!({"file_ext": "abcdefghijk"})));
        refused("file_ext", with(json!({"file_ext": ""})));
        refused("file_ext", with(json!({"file_ext": "e xe"})));
        refused("file_ext", with(json!({"file_ext": 7})));
        // Dot and length are two broken rules.
        assert_eq!(
            errors_of(with(json!({"file_ext": ".abcdefghijk"}))).len(),
            2
        );
    }

    #[test]
    fn processing_type_and_unzip_password_rules() {
        accepted(with(json!({"processing_type": "exec-only"})));
        accepted(with(json!({"processing_type": "unzip-and-exec"})));
        accepted(with(
            json!({"processing_type": "unzip-and-exec", "unzip_password": SECRET}),
        ));
        refused(
            "processing_type",
            with(json!({"processing_type": "EXEC-ONLY"})),
        );
        refused("processing_type", with(json!({"processing_type": "unzip"})));
        refused("processing_type", with(json!({"processing_type": 1})));
        refused("unzip_password", with(json!({"unzip_password": SECRET})));
        refused(
            "unzip_password",
            with(json!({"processing_type": "exec-only", "unzip_password": SECRET})),
        );
        refused(
            "unzip_password",
            with(json!({"processing_type": "unzip-and-exec", "unzip_password": ""})),
        );
        refused(
            "unzip_password",
            with(json!({"processing_type": "unzip-and-exec", "unzip_password": 1234})),
        );
        let errors = errors_of(with(
            json!({"processing_type": "zip", "unzip_password": SECRET}),
        ));
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["processing_type", "unzip_password"]);
    }

    #[test]
    fn booleans_must_be_json_booleans() {
        for field in ["decrypt_https", "click_on_links"] {
            accepted(with(json!({ field: true })));
            accepted(with(json!({ field: false })));
            for bad in [
                json!("true"),
                json!(1),
                json!(0),
                json!(null),
                json!("false"),
            ] {
                refused(field, with(json!({ field: bad })));
            }
        }
    }

    #[test]
    fn channel_rule_static_and_known() {
        for ok in ["TOR", "Tarpit", "RU", "US", "GB"] {
            accepted(with(json!({ "channel": ok })));
        }
        for bad in [
            "tor", "Tor", "TARPIT", "tarpit", "ru", "Ru", "RUS", "R", "", "R1", " RU",
        ] {
            refused("channel", with(json!({ "channel": bad })));
        }
        refused("channel", with(json!({"channel": 1})));
        let known = AllowedValues {
            exec_envs: None,
            channels: Some(["RU".to_string(), "TOR".to_string(), "Tarpit".to_string()].into()),
        };
        assert!(parse_with(&with(json!({"channel": "RU"})), &known).is_ok());
        let err = parse_with(&with(json!({"channel": "US"})), &known).unwrap_err();
        assert_eq!(err.errors()[0].field, "channel");
        // The static rule still applies when the API's list is known.
        let lax = AllowedValues {
            exec_envs: None,
            channels: Some(["ru".to_string()].into()),
        };
        assert!(parse_with(&with(json!({"channel": "ru"})), &lax).is_err());
    }

    #[test]
    fn doc_password_and_cmd_line_rules() {
        accepted(with(json!({"doc_password": SECRET})));
        accepted(with(json!({"doc_password": "p".repeat(256)})));
        refused("doc_password", with(json!({"doc_password": ""})));
        refused(
            "doc_password",
            with(json!({"doc_password": "p".repeat(257)})),
        );
        refused("doc_password", with(json!({"doc_password": false})));
        accepted(with(json!({"cmd_line": "c".repeat(1024)})));
        accepted(with(json!({"cmd_line": "😀".repeat(1024)})));
        accepted(with(
            json!({"cmd_line": "%%SYSTEMROOT%%\\notepad.exe /A $sample"}),
        ));
        refused("cmd_line", with(json!({"cmd_line": "c".repeat(1025)})));
        refused("cmd_line", with(json!({"cmd_line": ""})));
        refused("cmd_line", with(json!({"cmd_line": "a\nb"})));
        refused("cmd_line", with(json!({"cmd_line": ["a"]})));
    }

    #[test]
    fn every_broken_rule_is_reported() {
        let errors = errors_of(json!({
            "task_id": "../x", "url": "ftp://x", "exec_time": "60", "file_ext": ".exe",
            "decrypt_https": "yes", "channel": "ru", "cmd_line": 5, "extra": 1,
        }));
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "task_id",
                "url",
                "exec_time",
                "file_ext",
                "decrypt_https",
                "channel",
                "cmd_line",
                "extra"
            ]
        );
        assert!(errors[2].message.contains("got a string"), "{errors:?}");
        let everything_missing = errors_of(json!({}));
        assert_eq!(everything_missing.len(), 2);
    }

    #[test]
    fn unknown_and_duplicate_fields_are_refused() {
        let errors = errors_of(with(json!({"exec_envs": "Win10", "priority": 1})));
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].field, "exec_envs");
        assert!(errors[0].message.starts_with("unknown field"), "{errors:?}");
        assert!(errors[0].message.contains("exec_env"), "{errors:?}");
        let dup = br#"{"task_id": "a", "url": "https://a.example/", "url": "https://b.example/"}"#;
        let err = RescanRequest::parse(dup, &AllowedValues::default()).unwrap_err();
        assert_eq!(
            err.errors(),
            [FieldError {
                field: "url".into(),
                message: "appears more than once".into()
            }]
        );
        // A long unknown name is shortened in the report.
        let long = "k".repeat(1000);
        let errors = errors_of(with(json!({ long: 1 })));
        assert!(errors[0].field.chars().count() <= 65);
    }

    #[test]
    fn non_objects_and_broken_json_are_not_json() {
        for payload in [
            &b"[1, 2]"[..],
            b"\"text\"",
            b"42",
            b"null",
            b"true",
            b"",
            b"{",
            b"{} {}",
            b"not json",
            b"\xff\xfe",
        ] {
            match RescanRequest::parse(payload, &AllowedValues::default()) {
                Err(e @ Rejection::NotJson { .. }) => {
                    assert!(e.errors().is_empty());
                    assert_eq!(e.task_id(), None);
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(payload)),
            }
        }
    }

    #[test]
    fn rejection_keeps_ids_for_correlation() {
        let err = parse(json!({"request_id": "r-1", "task_id": "../x", "url": 1})).unwrap_err();
        assert_eq!(err.request_id(), Some("r-1"));
        assert_eq!(err.task_id(), Some("../x"));
        let err =
            parse(json!({"request_id": "", "task_id": "x".repeat(300), "url": 1})).unwrap_err();
        assert_eq!(err.request_id(), None);
        assert_eq!(err.task_id(), None);
    }

    #[test]
    fn query_holds_exactly_the_present_fields_in_table_order() {
        let r = accepted(json!({
            "cmd_line": "/A $sample", "channel": "TOR", "click_on_links": false, "decrypt_https": true,
            "doc_password": SECRET, "unzip_password": SECRET, "processing_type": "unzip-and-exec",
            "file_ext": "docx", "exec_time": 30, "exec_env": "Win10x64", "url": "https://e.example/",
            "task_id": "t1", "request_id": "r1",
        }));
        let names: Vec<&str> = r.query().iter().map(|(n, _)| *n).collect();
        let table: Vec<&str> = QUERY_PARAMS.iter().map(|p| p.name).collect();
        assert_eq!(names, table);
        let q = query_text(&r);
        assert!(q.contains(&("decrypt_https", "true".into())));
        assert!(q.contains(&("click_on_links", "false".into())));
        assert!(q.contains(&("exec_time", "30".into())));
        let secret: Vec<&str> = r
            .query()
            .iter()
            .filter(|(_, v)| v.is_secret())
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(secret, ["unzip_password", "doc_password"]);

        let minimal = accepted(with(json!({"decrypt_https": false})));
        assert_eq!(
            query_text(&minimal),
            [
                ("url", "https://example.com/f.zip".to_string()),
                ("decrypt_https", "false".into())
            ]
        );
    }

    #[test]
    fn the_table_covers_every_field_but_the_ids_once() {
        let mut fields: Vec<Field> = QUERY_PARAMS.iter().map(|p| p.field).collect();
        fields.sort();
        fields.dedup();
        assert_eq!(fields.len(), QUERY_PARAMS.len());
        let expected: Vec<Field> = Field::ALL
            .into_iter()
            .filter(|f| !matches!(f, Field::RequestId | Field::TaskId))
            .collect();
        assert_eq!(fields, expected);
        let unconfirmed: Vec<&str> = QUERY_PARAMS
            .iter()
            .filter(|p| !p.confirmed)
            .map(|p| p.name)
            .collect();
        assert_eq!(unconfirmed, ["channel", "doc_password", "cmd_line"]);
    }

    #[test]
    fn rescan_url_encodes_every_value() {
        let r = accepted(with(json!({
            "task_id": "T-1_a", "url": "https://files.example/a.zip?x=1&y=2",
            "cmd_line": "%SYSTEMROOT%\\notepad.exe /A $sample +x", "exec_time": 60,
            "processing_type": "unzip-and-exec", "unzip_password": "p&w=1 %",
        })));
        let base = Url::parse("https://tip.kaspersky.com").unwrap();
        let built = r.rescan_url(&base).unwrap();
        let url = built.expose();
        assert_eq!(url.path(), "/api/sandbox/tasks/file_from_url/T-1_a");
        assert_eq!(
            url.query().unwrap(),
            "url=https%3A%2F%2Ffiles.example%2Fa.zip%3Fx%3D1%26y%3D2&exec_time=60\
             &processing_type=unzip-and-exec&unzip_password=p%26w%3D1%20%25\
             &cmd_line=%25SYSTEMROOT%25%5Cnotepad.exe%20%2FA%20%24sample%20%2Bx"
        );
        // Decoding gives back the literal text, `%SYSTEMROOT%` included.
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        assert!(pairs.contains(&(
            "cmd_line".into(),
            "%SYSTEMROOT%\\notepad.exe /A $sample +x".into()
        )));
        assert!(pairs.contains(&("unzip_password".into(), "p&w=1 %".into())));
        assert!(pairs.contains(&("url".into(), "https://files.example/a.zip?x=1&y=2".into())));
    }

    #[test]
    fn rescan_url_keeps_a_base_path_prefix() {
        let r = accepted(with(json!({})));
        for base in [
            "http://127.0.0.1:8080/prefix",
            "http://127.0.0.1:8080/prefix/",
        ] {
            let built = r.rescan_url(&Url::parse(base).unwrap()).unwrap();
            assert_eq!(
                built.expose().path(),
                "/prefix/api/sandbox/tasks/file_from_url/abc-123_X"
            );
            assert_eq!(built.expose().port(), Some(8080));
        }
    }

    #[test]
    fn rescan_url_refuses_bad_bases() {
        let r = accepted(with(json!({})));
        for (base, err) in [
            ("ftp://example.com/", RescanUrlError::BaseNotHttp),
            ("https://u:p@example.com/", RescanUrlError::BaseHasExtras),
            ("https://example.com/?a=1", RescanUrlError::BaseHasExtras),
            ("https://example.com/#f", RescanUrlError::BaseHasExtras),
        ] {
            assert_eq!(
                r.rescan_url(&Url::parse(base).unwrap()).unwrap_err(),
                err,
                "{base}"
            );
        }
    }

    #[test]
    fn a_segment_can_never_leave_the_path() {
        // Belt and braces below validation: raw segments that a TaskId can't hold.
        let base = Url::parse("https://tip.example/root/").unwrap();
        let prefix = "/root/api/sandbox/tasks/file_from_url/";
        for segment in [
            "../x", "a/b", "%2e%2e", "..", ".", "a b", "a?b#c", "%2F", "é",
        ] {
            match build_url(&base, segment, &[]) {
                Err(RescanUrlError::PathChanged) => {}
                Err(e) => panic!("{segment:?}: {e}"),
                Ok(u) => {
                    let path = u.expose().path();
                    let rest = path
                        .strip_prefix(prefix)
                        .unwrap_or_else(|| panic!("{path}"));
                    assert!(
                        !rest.is_empty() && !rest.contains('/'),
                        "{segment:?} → {path}"
                    );
                    assert_eq!(u.expose().query(), Some(""));
                }
            }
        }
        assert!(matches!(
            build_url(&base, "..", &[]),
            Err(RescanUrlError::PathChanged)
        ));
        assert!(
            matches!(build_url(&base, "%2e%2e", &[]).map(|u| u.expose().path().to_string()),
            Ok(p) if p == format!("{prefix}%252e%252e"))
        );
    }

    #[test]
    fn passwords_are_redacted_everywhere() {
        let r = accepted(with(json!({
            "processing_type": "unzip-and-exec", "unzip_password": SECRET, "doc_password": SECRET,
        })));
        let debug = format!("{r:?}");
        assert!(
            !debug.contains(SECRET) && debug.contains("[redacted]"),
            "{debug}"
        );
        let query = format!("{:?}", r.query());
        assert!(!query.contains(SECRET), "{query}");
        let built = r
            .rescan_url(&Url::parse("https://tip.example").unwrap())
            .unwrap();
        for shown in [
            format!("{built}"),
            format!("{built:?}"),
            built.redacted().to_string(),
        ] {
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(shown.contains("unzip_password=%5Bredacted%5D"), "{shown}");
        }
        assert!(built.expose().as_str().contains(&percent_encoded(SECRET)));
        let params = Value::Object(r.parameters()).to_string();
        assert!(
            !params.contains(SECRET) && !params.contains("password"),
            "{params}"
        );

        // Refusals never echo a password, whatever rule it breaks.
        for bad in [
            json!({"unzip_password": SECRET}),
            json!({"processing_type": "exec-only", "unzip_password": SECRET}),
            json!({"doc_password": format!("{SECRET}{}", "x".repeat(300))}),
            json!({"unzip_pasword": SECRET}),
            json!({"task_id": SECRET, "url": SECRET, "cmd_line": format!("{SECRET}\n")}),
        ] {
            let err = parse(with(bad)).unwrap_err();
            let shown = format!("{err} {err:?}");
            let reported: String = err.errors().iter().map(|e| format!("{e} ")).collect();
            assert!(!reported.contains(SECRET), "{reported}");
            // task_id is echoed for correlation; it is not a password field.
            if err.task_id() != Some(SECRET) {
                assert!(!shown.contains(SECRET), "{shown}");
            }
        }
    }

    #[test]
    fn parameters_echo_the_non_secret_fields_with_their_types() {
        let r = accepted(with(json!({
            "exec_time": 90, "decrypt_https": false, "channel": "Tarpit", "file_ext": "js",
            "processing_type": "unzip-and-exec", "unzip_password": SECRET, "request_id": "r",
        })));
        assert_eq!(
            Value::Object(r.parameters()),
            json!({
                "url": "https://example.com/f.zip", "exec_time": 90, "decrypt_https": false,
                "channel": "Tarpit", "file_ext": "js", "processing_type": "unzip-and-exec",
            })
        );
    }
}
