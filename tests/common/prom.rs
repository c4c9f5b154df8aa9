//! End-to-end observability harness: the real Prometheus server (the Debian
//! package's `/usr/bin/prometheus`) scraping a `sandbox-bridge` process every
//! second and evaluating the shipped alert rules, its HTTP API, the metric
//! selectors of the Grafana dashboards and alert rules, and the service's
//! `/metrics` `/healthz` `/readyz` endpoint.
//!
//! Everything runs on loopback with ports picked free, in temporary
//! directories; every child process is killed when its handle drops, so a
//! failed test leaves nothing running. Waits are hang guards, never timing
//! assertions.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use sandbox_bridge::clock::SystemClock;
use sandbox_bridge::sim::ktip::{KtipSimHandle, KtipSimSettings};
use sandbox_bridge::sim::vt::{
    BatchSettings, FeedSimHandle, FeedSimSettings, FeedSimulator, MinuteSet,
};

use super::API_KEY;
use super::kafka::repo_root;
use super::process::Proc;
use super::rescan::start_ktip;

/// The job name the alert rules and dashboards select (`job="sandbox-bridge"`).
pub const JOB: &str = "sandbox-bridge";

// ---- ports ------------------------------------------------------------------

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// A port whose neighbour (a broker's controller port) is free too.
pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if port < 65000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair");
}

/// An HTTP client for loopback: no proxy from the environment, bounded waits.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("HTTP client")
}

// ---- the service ------------------------------------------------------------

/// A `run` configuration with both pipelines: the feed configuration of
/// [`super::config_text`] plus the `[rescan]` section of
/// [`super::rescan::rescan_config_text`], with `/metrics` on a port the
/// kernel picks (the address is read back from the log).
pub fn run_config(feed_text: &str, rescan_text: &str) -> String {
    let from = rescan_text
        .find("[rescan]")
        .expect("rescan configuration has [rescan]");
    let to = rescan_text[from..]
        .find("[metrics]")
        .map(|i| from + i)
        .expect("rescan configuration has [metrics]");
    let rescan_section = &rescan_text[from..to];
    let metrics_off = "[metrics]\nlisten = \"off\"";
    assert!(
        feed_text.contains(metrics_off),
        "feed configuration has {metrics_off:?}"
    );
    feed_text.replace(
        metrics_off,
        &format!("{rescan_section}[metrics]\nlisten = \"127.0.0.1:0\""),
    )
}

/// The address `/metrics` is served on, from the service's log line
/// `serving /metrics, /healthz and /readyz address=…`.
pub fn served_address(log: &str) -> Option<String> {
    log.lines()
        .filter(|l| l.contains("serving /metrics"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("address="))
                .map(|a| a.trim_matches('"').to_string())
        })
}

/// Waits until the service logs where it serves `/metrics`; panics (with the
/// log) if it exits first or takes longer than `limit` (a hang guard).
pub async fn wait_served_address(p: &mut Proc, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(addr) = served_address(&p.log_text()) {
            return addr;
        }
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!(
                "sandbox-bridge exited with {status}; log:\n{}",
                p.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "sandbox-bridge did not serve /metrics within {limit:?}; log:\n{}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `http://{addr}{path}`: status and body (`None` when nothing answers).
pub async fn get(client: &reqwest::Client, addr: &str, path: &str) -> Option<(u16, String)> {
    let resp = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.text().await.unwrap_or_default();
    Some((status, body))
}

/// The last `n` lines of a log, for failure messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---- Prometheus -------------------------------------------------------------

/// The Prometheus server binary, or a panic that says how to install it.
pub fn prometheus_binary() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/prometheus");
    if debian.is_file() {
        return debian;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("prometheus");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "the Prometheus server is not installed (no /usr/bin/prometheus, none on PATH): \
         install the Debian package `prometheus` (sudo apt-get install prometheus); \
         scripts/setup.sh is meant to install it"
    );
}

/// The shipped alert rule files (`prometheus/rules/*.yml`), sorted.
pub fn rule_files() -> Vec<PathBuf> {
    let dir = repo_root().join("prometheus/rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml" || x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no rule files in {}", dir.display());
    files
}

/// A Prometheus server of one test: scrapes `targets` as job
/// `sandbox-bridge` every second and evaluates `rule_files` every second.
pub struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    log: PathBuf,
    pub url: String,
    client: reqwest::Client,
}

impl Prometheus {
    pub async fn start(targets: &[String], rule_files: &[PathBuf]) -> Prometheus {
        let binary = prometheus_binary();
        let client = http_client();
        // The port is picked free, then bound by Prometheus: another process
        // may take it in between, so a failed bind is retried on a new port.
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("prometheus.yml");
            std::fs::write(&config, scrape_config(targets, rule_files)).unwrap();
            let log = dir.path().join("prometheus.log");
            let port = free_port();
            let file = std::fs::File::create(&log).unwrap();
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
            let mut prom = Prometheus {
                child,
                _dir: dir,
                log,
                url: format!("http://127.0.0.1:{port}"),
                client: client.clone(),
            };
            if prom.wait_ready(Duration::from_secs(60)).await {
                return prom;
            }
            let text = prom.log_text();
            assert!(
                text.contains("address already in use"),
                "Prometheus did not start; log:\n{text}"
            );
        }
        panic!("Prometheus found no free port in 5 attempts");
    }

    /// True once `/-/ready` answers 200; false if the process exited.
    async fn wait_ready(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if let Ok(r) = self
                .client
                .get(format!("{}/-/ready", self.url))
                .send()
                .await
                && r.status().is_success()
            {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready within {limit:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, String> {
        let resp = self
            .client
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("GET {path}: not JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!(
                "GET {path} {query:?}: {} {}",
                body["errorType"], body["error"]
            ));
        }
        Ok(body["data"].clone())
    }

    /// An instant query: the series it returns, or Prometheus' error.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)]).await?;
        match &data["result"] {
            Value::Array(series) => Ok(series.clone()),
            // A scalar or string result: one value.
            other => Ok(vec![other.clone()]),
        }
    }

    /// The single value of a query with one series (`None` without series).
    pub async fn value(&self, expr: &str) -> Option<f64> {
        let series = self.query(expr).await.ok()?;
        series.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Active alerts (pending and firing).
    pub async fn alerts(&self) -> Vec<Value> {
        let data = self
            .api("/api/v1/alerts", &[])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        data["alerts"].as_array().cloned().unwrap_or_default()
    }

    /// The loaded rule groups.
    pub async fn rule_groups(&self) -> Vec<Value> {
        let data = self
            .api("/api/v1/rules", &[])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        data["groups"].as_array().cloned().unwrap_or_default()
    }

    /// Every loaded rule (alerting and recording).
    pub async fn rules(&self) -> Vec<Value> {
        self.rule_groups()
            .await
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Whether every rule group has been evaluated after `t`.
    pub async fn all_evaluated_after(&self, t: SystemTime) -> bool {
        let groups = self.rule_groups().await;
        assert!(!groups.is_empty(), "Prometheus loaded no rule groups");
        groups.iter().all(|g| {
            g["lastEvaluation"]
                .as_str()
                .and_then(parse_rfc3339)
                .is_some_and(|at| at > t)
        })
    }

    /// Waits until Prometheus scrapes the target `instance` successfully.
    pub async fn wait_up(&self, instance: &str, limit: Duration) {
        let expr = format!("up{{job=\"{JOB}\", instance=\"{instance}\"}} == 1");
        let deadline = Instant::now() + limit;
        while self.query(&expr).await.map_or(true, |s| s.is_empty()) {
            assert!(
                Instant::now() < deadline,
                "Prometheus did not scrape {instance} within {limit:?}; log:\n{}",
                tail(&self.log_text(), 30)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    /// A failed test must not leave a server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The test's Prometheus configuration: 1 s scrapes and evaluations.
fn scrape_config(targets: &[String], rule_files: &[PathBuf]) -> String {
    let quoted = |items: Vec<String>| {
        items
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let rules = quoted(rule_files.iter().map(|p| p.display().to_string()).collect());
    let targets = quoted(targets.to_vec());
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files: [{rules}]\n\
         scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    \
         static_configs:\n      - targets: [{targets}]\n"
    )
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.into())
}

/// A rule's `for` duration (seconds) from `/api/v1/rules`.
pub fn rule_for(rule: &Value) -> Duration {
    Duration::from_secs_f64(rule["duration"].as_f64().unwrap_or(0.0))
}

// ---- queries of the dashboards and rules ------------------------------------

/// One PromQL query of a dashboard: where it is and its text, with Grafana's
/// variables filled in (see [`fill_grafana_variables`]).
#[derive(Debug, Clone)]
pub struct DashboardQuery {
    pub file: String,
    pub panel: String,
    pub expr: String,
}

/// Every panel target's `expr` and every query variable's query of
/// `dashboards/*.json`; `label_values(SELECTOR, LABEL)` becomes `SELECTOR`.
pub fn dashboard_queries() -> Vec<DashboardQuery> {
    let dir = repo_root().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = file_name(&path);
        collect_queries(&json, &file, "", &mut out);
    }
    assert!(!out.is_empty(), "no queries in dashboards/*.json");
    out
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn collect_queries(v: &Value, file: &str, panel: &str, out: &mut Vec<DashboardQuery>) {
    match v {
        Value::Object(map) => {
            let title = map
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or(panel)
                .to_string();
            if let Some(Value::Array(targets)) = map.get("targets") {
                for t in targets {
                    if let Some(expr) = t["expr"].as_str() {
                        out.push(DashboardQuery {
                            file: file.to_string(),
                            panel: title.clone(),
                            expr: fill_grafana_variables(expr),
                        });
                    }
                }
            }
            if map.get("type").and_then(Value::as_str) == Some("query") {
                let query = match map.get("query") {
                    Some(Value::String(s)) => Some(s.as_str()),
                    Some(Value::Object(q)) => q.get("query").and_then(Value::as_str),
                    _ => None,
                };
                if let Some(q) = query.and_then(label_values_selector) {
                    let name = map.get("name").and_then(Value::as_str).unwrap_or("?");
                    out.push(DashboardQuery {
                        file: file.to_string(),
                        panel: format!("variable {name}"),
                        expr: fill_grafana_variables(q),
                    });
                }
            }
            for (k, child) in map {
                if k != "targets" {
                    collect_queries(child, file, &title, out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                collect_queries(item, file, panel, out);
            }
        }
        _ => {}
    }
}

/// `label_values(SELECTOR, LABEL)` → `SELECTOR`; other variable queries
/// (`label_values(LABEL)`, `query_result(EXPR)`) → their PromQL, if any.
fn label_values_selector(q: &str) -> Option<&str> {
    let q = q.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let (selector, _label) = args.rsplit_once(',')?;
        return Some(selector.trim());
    }
    q.strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
}

/// Fills in Grafana's variables: `$__rate_interval` and `$__interval` → 1m,
/// `$__range` → 1h (and their `_s`/`_ms` forms), every dashboard variable
/// (`$job`, `${instance}`, …) → `.*`, as the "All" option (`allValue: .*`) does.
pub fn fill_grafana_variables(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, used) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("unterminated ${...}");
            // ${var:format} → var
            let name = braced[..end].split(':').next().unwrap();
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        let value = match name {
            "__rate_interval" | "__interval" => "1m",
            "__range" => "1h",
            "__range_s" => "3600",
            "__range_ms" => "3600000",
            "__interval_ms" => "60000",
            "" => "$",
            n if n.starts_with("__") => panic!("unknown Grafana variable ${n} in {expr}"),
            _ => ".*",
        };
        out.push_str(value);
        rest = &after[used..];
    }
    out.push_str(rest);
    out
}

/// The vector selectors of a PromQL expression: each metric name with its
/// label matchers as written (`up{job="x"}`), and bare `{...}` selectors.
/// Function names, aggregation and binary-operator keywords, grouping label
/// lists, strings, numbers and range/subquery brackets are skipped.
pub fn selectors(expr: &str) -> Vec<String> {
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Binary operators, modifiers, and aggregation operators (which may take
    // `by (...)` before their parenthesis: `sum by (le) (...)`).
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    let c: Vec<char> = expr.chars().collect();
    let text = |a: usize, b: usize| c[a..b].iter().collect::<String>();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if matches!(ch, '"' | '\'' | '`') {
            i = skip_string(&c, i);
        } else if ch == '[' {
            i = closing(&c, i, '[', ']') + 1;
        } else if ch == '{' {
            let end = closing(&c, i, '{', '}');
            out.push(text(i, end + 1));
            i = end + 1;
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == ':') {
                i += 1;
            }
            let word = text(start, i);
            let mut j = i;
            while j < c.len() && c[j].is_whitespace() {
                j += 1;
            }
            let next = c.get(j).copied();
            let lower = word.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                if next == Some('(') {
                    i = closing(&c, j, '(', ')') + 1;
                }
            } else if KEYWORDS.contains(&lower.as_str()) || next == Some('(') {
                // A keyword or a function call: its arguments are scanned next.
            } else if next == Some('{') {
                let end = closing(&c, j, '{', '}');
                out.push(format!("{word}{}", text(j, end + 1)));
                i = end + 1;
            } else {
                out.push(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Index just past the string literal starting at `open`.
fn skip_string(c: &[char], open: usize) -> usize {
    let quote = c[open];
    let mut i = open + 1;
    while i < c.len() {
        if c[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if c[i] == quote {
            return i + 1;
        }
        i += 1;
    }
    panic!("unterminated string in {}", c.iter().collect::<String>());
}

/// Index of the bracket closing the one at `open`, skipping strings and nesting.
fn closing(c: &[char], open: usize, left: char, right: char) -> usize {
    let mut depth = 0;
    let mut i = open;
    while i < c.len() {
        match c[i] {
            '"' | '\'' | '`' => {
                i = skip_string(c, i);
                continue;
            }
            x if x == left => depth += 1,
            x if x == right => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
        i += 1;
    }
    panic!(
        "unbalanced {left}{right} in {}",
        c.iter().collect::<String>()
    );
}

/// The metric name of a selector (`None` for a bare `{...}`).
pub fn selector_name(selector: &str) -> Option<&str> {
    let name = selector.split('{').next().unwrap().trim();
    (!name.is_empty()).then_some(name)
}

/// Both simulators on free ports, for a process running both pipelines:
/// the feed's (5 records a minute from `seed`, `missing` minutes answered
/// 404) and the KTIP sandbox's with default settings.
pub async fn start_simulators(seed: u64, missing: MinuteSet) -> (FeedSimHandle, KtipSimHandle) {
    let any = "127.0.0.1:0".parse().unwrap();
    let vt = FeedSimulator::start(
        FeedSimSettings {
            api_key: API_KEY.to_string(),
            batches: BatchSettings::exact(seed, 5),
            missing,
            ..FeedSimSettings::default()
        },
        std::sync::Arc::new(SystemClock),
        any,
        any,
    )
    .await
    .unwrap();
    (vt, start_ktip(KtipSimSettings::default()).await)
}
