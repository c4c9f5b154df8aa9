//! Validated settings of the KTIP sandbox simulator, and the per-task rules
//! that inject failures.
//!
//! A [`TaskRule`] says what a rescan of some task ids answers instead of
//! success: `flaky-*=503/2` answers 503 to the first two attempts at every
//! task id starting with `flaky-`, then lets them through. Rules are checked
//! in order; the first that applies wins.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

/// `Retry-After` of a `429` rule that does not give one.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error(
        "`{0}` is not a task rule: expected PATTERN=ACTION[/K], e.g. `flaky-*=503/2` or `slow-1=delay:2s`"
    )]
    Syntax(String),
    #[error(
        "`{0}` is not a rule action: expected one of 400, 401, 403, 404, 429[:DURATION], 451, 500, 503, delay:DURATION"
    )]
    Action(String),
}

/// Which task ids a rule covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskPattern {
    /// Exactly this id.
    Exact(String),
    /// Ids starting with this prefix (`*` alone: every id).
    Prefix(String),
}

impl TaskPattern {
    pub fn matches(&self, task_id: &str) -> bool {
        match self {
            TaskPattern::Exact(id) => task_id == id,
            TaskPattern::Prefix(prefix) => task_id.starts_with(prefix.as_str()),
        }
    }
}

impl FromStr for TaskPattern {
    type Err = RuleError;
    /// `abc` (exact), `abc*` (prefix) or `*` (all).
    fn from_str(s: &str) -> Result<TaskPattern, RuleError> {
        let err = || RuleError::Syntax(s.to_string());
        let (body, prefix) = match s.strip_suffix('*') {
            Some(p) => (p, true),
            None => (s, false),
        };
        if body.contains('*') || (!prefix && body.is_empty()) {
            return Err(err());
        }
        Ok(if prefix {
            TaskPattern::Prefix(body.to_string())
        } else {
            TaskPattern::Exact(body.to_string())
        })
    }
}

impl fmt::Display for TaskPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskPattern::Exact(id) => f.write_str(id),
            TaskPattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// What a matching rescan answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskAction {
    /// 400 `{"error": "too-large-file", ...}`.
    TooLargeFile,
    /// 401: user authentication failed.
    Unauthorized,
    /// 403: forbidden (no API access, quota).
    Forbidden,
    /// 404: the task failed or hung; run the query again later.
    TaskFailed,
    /// 429 with `Retry-After` (whole seconds, rounded up).
    TooManyRequests { retry_after: Duration },
    /// 451 Unavailable For Legal Reasons.
    LegalReasons,
    /// 500 Internal Server Error.
    Internal,
    /// 503 Service Unavailable, with a plain-text body as a proxy would send.
    Unavailable,
    /// Waits, then answers as if no rule applied (success if the request is valid).
    Delay(Duration),
}

impl TaskAction {
    /// The status answered; `None` for a delay.
    pub fn status(self) -> Option<u16> {
        Some(match self {
            TaskAction::TooLargeFile => 400,
            TaskAction::Unauthorized => 401,
            TaskAction::Forbidden => 403,
            TaskAction::TaskFailed => 404,
            TaskAction::TooManyRequests { .. } => 429,
            TaskAction::LegalReasons => 451,
            TaskAction::Internal => 500,
            TaskAction::Unavailable => 503,
            TaskAction::Delay(_) => return None,
        })
    }
}

impl FromStr for TaskAction {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<TaskAction, RuleError> {
        let err = || RuleError::Action(s.to_string());
        let duration = |d: &str| humantime::parse_duration(d).map_err(|_| err());
        let t = s.trim();
        if let Some(d) = t.strip_prefix("delay:") {
            return Ok(TaskAction::Delay(duration(d)?));
        }
        if let Some(d) = t.strip_prefix("429:") {
            return Ok(TaskAction::TooManyRequests {
                retry_after: duration(d)?,
            });
        }
        Ok(match t {
            "400" | "too-large-file" => TaskAction::TooLargeFile,
            "401" => TaskAction::Unauthorized,
            "403" => TaskAction::Forbidden,
            "404" => TaskAction::TaskFailed,
            "429" => TaskAction::TooManyRequests {
                retry_after: DEFAULT_RETRY_AFTER,
            },
            "451" => TaskAction::LegalReasons,
            "500" => TaskAction::Internal,
            "503" => TaskAction::Unavailable,
            _ => return Err(err()),
        })
    }
}

impl fmt::Display for TaskAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskAction::Delay(d) => write!(f, "delay:{}", humantime::format_duration(*d)),
            TaskAction::TooManyRequests { retry_after } => {
                write!(f, "429:{}", humantime::format_duration(*retry_after))
            }
            other => write!(f, "{}", other.status().unwrap_or_default()),
        }
    }
}

/// A failure (or delay) injected into rescans of some task ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRule {
    pub tasks: TaskPattern,
    pub action: TaskAction,
    /// Only the first K attempts at a task id are hit; later ones pass. `None`: every attempt.
    pub first_attempts: Option<u32>,
}

impl TaskRule {
    pub fn new(tasks: TaskPattern, action: TaskAction) -> TaskRule {
        TaskRule {
            tasks,
            action,
            first_attempts: None,
        }
    }

    /// A rule for exactly `task_id`.
    pub fn task(task_id: &str, action: TaskAction) -> TaskRule {
        TaskRule::new(TaskPattern::Exact(task_id.to_string()), action)
    }

    /// A rule for every task id starting with `prefix`.
    pub fn prefix(prefix: &str, action: TaskAction) -> TaskRule {
        TaskRule::new(TaskPattern::Prefix(prefix.to_string()), action)
    }

    /// Limits the rule to the first `k` attempts at each task id.
    pub fn first(mut self, k: u32) -> TaskRule {
        self.first_attempts = Some(k);
        self
    }

    /// Whether the rule hits `attempt` (1-based) at `task_id`.
    pub fn applies(&self, task_id: &str, attempt: u32) -> bool {
        self.tasks.matches(task_id) && self.first_attempts.is_none_or(|k| attempt <= k)
    }
}

impl FromStr for TaskRule {
    type Err = RuleError;
    /// `PATTERN=ACTION[/K]`.
    fn from_str(s: &str) -> Result<TaskRule, RuleError> {
        let (pattern, rest) = s
            .split_once('=')
            .ok_or_else(|| RuleError::Syntax(s.to_string()))?;
        let (action, first) = match rest.rsplit_once('/') {
            Some((action, k)) => {
                let k = k
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| RuleError::Syntax(s.to_string()))?;
                (action, Some(k))
            }
            None => (rest, None),
        };
        Ok(TaskRule {
            tasks: pattern.trim().parse()?,
            action: action.parse()?,
            first_attempts: first,
        })
    }
}

impl fmt::Display for TaskRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.tasks, self.action)?;
        if let Some(k) = self.first_attempts {
            write!(f, "/{k}")?;
        }
        Ok(())
    }
}

/// The first rule hitting `attempt` at `task_id`.
pub fn rule_for<'a>(rules: &'a [TaskRule], task_id: &str, attempt: u32) -> Option<&'a TaskRule> {
    rules.iter().find(|r| r.applies(task_id, attempt))
}

/// Everything the KTIP simulator needs. `Debug` hides the password.
#[derive(Clone, Debug)]
pub struct KtipSimSettings {
    /// The Basic-auth user name accepted.
    pub username: String,
    /// Its password (changeable at run time through the handle).
    pub password: SecretString,
    /// Users that authenticate (with the password above) but get 403: no API access.
    pub forbidden_usernames: Vec<String>,
    /// Served by `GET /api/sandbox/exec_env`; the allowed `exec_env` values.
    pub exec_envs: Vec<String>,
    /// Served by `GET /api/sandbox/channels`; the allowed `channel` values (case-sensitive).
    pub channels: Vec<String>,
    /// Serve channels as `[{"name": "TOR"}, ...]` instead of `["TOR", ...]`:
    /// the real shape is unknown, and the consumer must read both.
    pub channels_as_objects: bool,
    /// Added before every answer (the benchmark uses 50 ms).
    pub latency: Duration,
    /// Failures injected per task id; more can be set at run time.
    pub rules: Vec<TaskRule>,
    /// Where the PEM files go; `None`: a temporary directory removed with the handle.
    pub pki_dir: Option<PathBuf>,
    /// Lifetime of the valid client certificate from start-up.
    pub client_cert_valid_for: Duration,
    /// Requests kept in detail for [`super::KtipSimHandle::requests`]; older
    /// ones are dropped (counters keep counting), so long benchmarks stay bounded.
    pub max_recorded_requests: usize,
}

pub const DEFAULT_USERNAME: &str = "demo";
pub const DEFAULT_PASSWORD: &str = "demo-password";
pub const DEFAULT_FORBIDDEN_USERNAME: &str = "no-api-access";
pub const DEFAULT_EXEC_ENVS: [&str; 5] = [
    "Windows 10 x64",
    "Windows 7 x64",
    "Windows 11 x64",
    "Ubuntu 22.04",
    "Android 11",
];
pub const DEFAULT_CHANNELS: [&str; 7] = ["TOR", "Tarpit", "RU", "US", "GB", "DE", "NL"];
/// 90 days: far enough that the consumer's expiry warning stays quiet by default.
pub const DEFAULT_CLIENT_CERT_DAYS: u64 = 90;
pub const DEFAULT_MAX_RECORDED_REQUESTS: usize = 100_000;

impl Default for KtipSimSettings {
    fn default() -> KtipSimSettings {
        KtipSimSettings {
            username: DEFAULT_USERNAME.to_string(),
            password: SecretString::from(DEFAULT_PASSWORD),
            forbidden_usernames: vec![DEFAULT_FORBIDDEN_USERNAME.to_string()],
            exec_envs: DEFAULT_EXEC_ENVS.map(String::from).to_vec(),
            channels: DEFAULT_CHANNELS.map(String::from).to_vec(),
            channels_as_objects: false,
            latency: Duration::ZERO,
            rules: Vec::new(),
            pki_dir: None,
            client_cert_valid_for: Duration::from_secs(DEFAULT_CLIENT_CERT_DAYS * 24 * 3600),
            max_recorded_requests: DEFAULT_MAX_RECORDED_REQUESTS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let r: TaskRule = "flaky-*=503/2".parse().unwrap();
        assert_eq!(
            r,
            TaskRule::prefix("flaky-", TaskAction::Unavailable).first(2)
        );
        assert_eq!(r.to_string(), "flaky-*=503/2");
        let r: TaskRule = "slow-1=delay:250ms".parse().unwrap();
        assert_eq!(
            r,
            TaskRule::task("slow-1", TaskAction::Delay(Duration::from_millis(250)))
        );
        let r: TaskRule = "*=429:5s".parse().unwrap();
        assert_eq!(
            r.action,
            TaskAction::TooManyRequests {
                retry_after: Duration::from_secs(5)
            }
        );
        assert!(r.applies("anything", 1_000));
        assert_eq!(
            "big=too-large-file".parse::<TaskRule>().unwrap().action,
            TaskAction::TooLargeFile
        );
        for bad in [
            "503",
            "x=418",
            "x=503/two",
            "=503",
            "a*b=503",
            "x=delay:soon",
        ] {
            assert!(bad.parse::<TaskRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn first_matching_rule_wins_and_first_k_lets_later_attempts_pass() {
        let rules = vec![
            TaskRule::task("t-1", TaskAction::LegalReasons),
            TaskRule::prefix("t-", TaskAction::Internal).first(2),
        ];
        assert_eq!(
            rule_for(&rules, "t-1", 5).map(|r| r.action),
            Some(TaskAction::LegalReasons)
        );
        assert_eq!(
            rule_for(&rules, "t-2", 2).map(|r| r.action),
            Some(TaskAction::Internal)
        );
        assert_eq!(rule_for(&rules, "t-2", 3), None);
        assert_eq!(rule_for(&rules, "u-1", 1), None);
    }

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", KtipSimSettings::default());
        assert!(!shown.contains(DEFAULT_PASSWORD), "{shown}");
    }
}
