//! The simulator's mutable state: the request records tests assert on,
//! attempt counters (for "first K attempts" rules), the rules themselves and
//! the credentials, both changeable at run time.
//!
//! One std `Mutex` for all of it: no await happens while it is held and
//! every operation is a few collection updates.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::params::SECRET_PARAMS;
use super::settings::{KtipSimSettings, TaskRule, rule_for};

/// How the Basic-auth check went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthOutcome {
    Ok,
    /// No (or a malformed) `Authorization: Basic` header: 401.
    Missing,
    /// Wrong user name or password, or credentials switched off: 401.
    Invalid,
    /// Right password, user without API access: 403.
    Forbidden,
}

impl AuthOutcome {
    pub fn is_ok(self) -> bool {
        self == AuthOutcome::Ok
    }
}

/// One request, as answered. `Debug` masks the values of secret parameters.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Order of arrival, from 1.
    pub seq: u64,
    pub at: SystemTime,
    pub method: String,
    /// The path as sent (still percent-encoded).
    pub path: String,
    /// The decoded task id, for the rescan route.
    pub task_id: Option<String>,
    /// The decoded query, in order (secret values included: tests check them).
    pub query: Vec<(String, String)>,
    pub auth: AuthOutcome,
    /// The Basic-auth user name, if one was sent.
    pub username: Option<String>,
    /// Subject of the client certificate the connection presented.
    pub client_subject: Option<String>,
    pub status: u16,
}

impl RecordedRequest {
    /// The value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The query parameter names, in order.
    pub fn param_names(&self) -> Vec<&str> {
        self.query.iter().map(|(n, _)| n.as_str()).collect()
    }
}

impl fmt::Debug for RecordedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let query: Vec<(&str, &str)> = self
            .query
            .iter()
            .map(|(n, v)| {
                let shown = if SECRET_PARAMS.contains(&n.as_str()) {
                    "***"
                } else {
                    v.as_str()
                };
                (n.as_str(), shown)
            })
            .collect();
        f.debug_struct("RecordedRequest")
            .field("seq", &self.seq)
            .field("method", &self.method)
            .field("path", &self.path)
            .field("task_id", &self.task_id)
            .field("query", &query)
            .field("auth", &self.auth)
            .field("username", &self.username)
            .field("client_subject", &self.client_subject)
            .field("status", &self.status)
            .finish()
    }
}

/// Counters of everything answered (not bounded by the record limit).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KtipSimStats {
    /// API requests by HTTP status (`/_sim/` control requests excluded).
    pub requests_by_status: BTreeMap<u16, u64>,
    /// Rescan (`PUT`) requests per task id, whatever their outcome.
    pub rescans_by_task: BTreeMap<String, u32>,
    /// Every query parameter name any request sent.
    pub param_names_seen: BTreeSet<String>,
    /// Connections refused during the TLS handshake (no or a bad client certificate).
    pub tls_handshakes_refused: u64,
}

impl KtipSimStats {
    pub fn requests(&self, status: u16) -> u64 {
        self.requests_by_status.get(&status).copied().unwrap_or(0)
    }
}

struct Inner {
    records: VecDeque<RecordedRequest>,
    next_seq: u64,
    stats: KtipSimStats,
    /// Attempts that reached the rules, per task id (authenticated and valid).
    rule_attempts: HashMap<String, u32>,
    rules: Vec<TaskRule>,
    password: SecretString,
    credentials_valid: bool,
}

pub struct SimState {
    inner: Mutex<Inner>,
    max_records: usize,
}

impl SimState {
    pub fn new(settings: &KtipSimSettings) -> SimState {
        SimState {
            inner: Mutex::new(Inner {
                records: VecDeque::new(),
                next_seq: 1,
                stats: KtipSimStats::default(),
                rule_attempts: HashMap::new(),
                rules: settings.rules.clone(),
                password: settings.password.clone(),
                credentials_valid: true,
            }),
            max_records: settings.max_recorded_requests,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("ktip simulator state lock")
    }

    /// Whether `password` is the current one and credentials are switched on.
    pub fn password_ok(&self, password: &str) -> bool {
        let inner = self.lock();
        inner.credentials_valid && inner.password.expose_secret() == password
    }

    pub fn set_credentials_valid(&self, valid: bool) {
        self.lock().credentials_valid = valid;
    }

    pub fn set_password(&self, password: SecretString) {
        self.lock().password = password;
    }

    /// Counts an attempt at `task_id` that reached the rules and returns the rule hitting it.
    pub fn next_attempt(&self, task_id: &str) -> (u32, Option<TaskRule>) {
        let mut inner = self.lock();
        let attempt = inner.rule_attempts.entry(task_id.to_string()).or_insert(0);
        *attempt += 1;
        let attempt = *attempt;
        (attempt, rule_for(&inner.rules, task_id, attempt).cloned())
    }

    /// Adds `rule`, replacing one for the same pattern. New rules are checked first.
    pub fn set_rule(&self, rule: TaskRule) {
        let mut inner = self.lock();
        inner.rules.retain(|r| r.tasks != rule.tasks);
        inner.rules.insert(0, rule);
    }

    pub fn clear_rules(&self) {
        self.lock().rules.clear();
    }

    pub fn count_refused_handshake(&self) {
        self.lock().stats.tls_handshakes_refused += 1;
    }

    /// Stores `request` (its `seq` is assigned here) and updates the counters.
    pub fn record(&self, mut request: RecordedRequest, is_rescan: bool) {
        let mut inner = self.lock();
        request.seq = inner.next_seq;
        inner.next_seq += 1;
        let stats = &mut inner.stats;
        *stats.requests_by_status.entry(request.status).or_default() += 1;
        for (name, _) in &request.query {
            if !stats.param_names_seen.contains(name) {
                stats.param_names_seen.insert(name.clone());
            }
        }
        if is_rescan && let Some(id) = &request.task_id {
            *stats.rescans_by_task.entry(id.clone()).or_default() += 1;
        }
        if inner.records.len() >= self.max_records {
            inner.records.pop_front();
        }
        if self.max_records > 0 {
            inner.records.push_back(request);
        }
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().records.iter().cloned().collect()
    }

    pub fn requests_for(&self, task_id: &str) -> Vec<RecordedRequest> {
        self.lock()
            .records
            .iter()
            .filter(|r| r.task_id.as_deref() == Some(task_id))
            .cloned()
            .collect()
    }

    pub fn rescans_of(&self, task_id: &str) -> u32 {
        self.lock()
            .stats
            .rescans_by_task
            .get(task_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn stats(&self) -> KtipSimStats {
        self.lock().stats.clone()
    }
}
