//! The observability files against the real thing: the Prometheus server
//! (the Debian package `prometheus`) scrapes a running `sandbox-bridge run`
//! (feed worker and rescan consumer, fed by the VT feed and KTIP simulators
//! in this process, on a real Kafka broker) every second and evaluates the
//! shipped alert rules every second.
//!
//! - Healthy: every metric selector of the Grafana dashboards and of the
//!   alert rules returns at least one series, every dashboard query
//!   evaluates without error, and no alert fires.
//! - A run of missing minutes (and rescan traffic alongside): the missing-run
//!   alert fires.
//!
//! The real clock is used: the simulator serves minutes up to now − 60 min,
//! and the feed starts 15 minutes before that. All waits are hang guards.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use common::process::Proc;
use common::prom::{self, Prometheus};
use common::rescan::{
    KTIP_PASSWORD, Req, RescanNames, publish, rescan_config_text, valid, wait_results,
};
use common::{Names, bootstrap, config_text};
use sandbox_bridge::clock::{Clock, SystemClock};
use sandbox_bridge::minute::{FeedWindow, Minute, MinuteRange};
use sandbox_bridge::sim::ktip::KtipSimHandle;
use sandbox_bridge::sim::vt::{FeedSimHandle, MinuteSet};
use serde_json::Value;

/// The alert raised by the worker's missing-run error condition.
const MISSING_RUN_ALERT: &str = "SandboxBridgeFeedMissingRun";
/// Rescan requests sent in each scenario.
const REQUESTS: usize = 4;

/// The simulators, the service, and Prometheus scraping it.
struct Stack {
    // Field order is drop order: Prometheus and the service stop before the simulators.
    prom: Prometheus,
    service: Mutex<Proc>,
    /// Where the service serves /metrics; Prometheus' `instance` label.
    addr: String,
    rescan: RescanNames,
    _vt: FeedSimHandle,
    _ktip: KtipSimHandle,
    _dir: tempfile::TempDir,
}

impl Stack {
    /// Starts everything; `extra_feed` is appended to `[feed]`.
    async fn start(test: &str, start: Minute, missing: MinuteSet, extra_feed: &str) -> Stack {
        // Fail before starting anything when Prometheus is not installed.
        prom::prometheus_binary();
        let (vt, ktip) = prom::start_simulators(41, missing).await;
        let names = Names::new(test);
        let rescan = RescanNames::new(test);
        let boot = bootstrap();
        let text = prom::run_config(
            &config_text(&boot, &vt.base_url(), &names, start, extra_feed),
            &rescan_config_text(&boot, &ktip, &rescan, "a", "", ""),
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("run.toml");
        std::fs::write(&config, text).unwrap();
        let mut service = Proc::spawn("run", &config, &dir.path().join("service.log"), &[]);
        let addr = prom::wait_served_address(&mut service, Duration::from_secs(60)).await;
        let prom = Prometheus::start(std::slice::from_ref(&addr), &prom::rule_files()).await;
        prom.wait_up(&addr, Duration::from_secs(60)).await;
        Stack {
            prom,
            service: Mutex::new(service),
            addr,
            rescan,
            _vt: vt,
            _ktip: ktip,
            _dir: dir,
        }
    }

    /// Sends valid rescan requests and waits for their committed results.
    async fn rescan_traffic(&self, n: usize) {
        let reqs: Vec<Req> = (0..n)
            .map(|i| Req::json(&format!("key-{i}"), valid(&format!("prom-e2e-{i}"))))
            .collect();
        let boot = bootstrap();
        publish(&boot, &self.rescan.requests, &reqs).await;
        let results = wait_results(&boot, &self.rescan.results, n, Duration::from_secs(120)).await;
        for r in &results {
            assert_eq!(r.status(), "accepted", "{}", r.json);
        }
        // The results are counted by the service and scraped.
        let expr = "sum(sandbox_bridge_rescan_requests_total{status=\"accepted\"})";
        self.wait_for(
            Duration::from_secs(60),
            &format!("{expr} >= {n}"),
            async || self.prom.value(expr).await.is_some_and(|v| v >= n as f64),
        )
        .await;
    }

    /// Polls `cond` (a hang guard); fails with the logs of both processes.
    async fn wait_for(&self, limit: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !cond().await {
            self.assert_service_runs();
            assert!(
                Instant::now() < deadline,
                "{what}: not reached within {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn assert_service_runs(&self) {
        let mut p = self.service.lock().unwrap();
        if let Some(status) = p.child.try_wait().unwrap() {
            panic!(
                "the service exited with {status}:\n{}",
                prom::tail(&p.log_text(), 60)
            );
        }
    }

    fn service_log(&self) -> String {
        self.service.lock().unwrap().log_text()
    }

    fn logs(&self) -> String {
        format!(
            "--- service log (tail) ---\n{}\n--- Prometheus log (tail) ---\n{}",
            prom::tail(&self.service_log(), 40),
            prom::tail(&self.prom.log_text(), 20)
        )
    }
}

/// The newest minute the simulator serves now (now − 60 min).
fn newest_now() -> Minute {
    FeedWindow::at(SystemClock.now(), 0).newest
}

/// Every metric selector of the dashboards and of the loaded alert rules,
/// with where it is used. `ALERTS{...}` (Prometheus' own series of active
/// alerts, used by the overview's "Firing alerts" panel) is left out: that it
/// is empty is exactly what a healthy service looks like.
async fn all_selectors(prom: &Prometheus) -> BTreeMap<String, Vec<String>> {
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for q in prom::dashboard_queries() {
        for s in prom::selectors(&q.expr) {
            wanted
                .entry(s)
                .or_default()
                .push(format!("{} / {}", q.file, q.panel));
        }
    }
    let rules = prom.rules().await;
    assert!(
        rules.len() >= 10,
        "Prometheus loaded only {} rules from prometheus/rules/",
        rules.len()
    );
    for r in &rules {
        let query = r["query"].as_str().expect("rule query");
        for s in prom::selectors(query) {
            wanted
                .entry(s)
                .or_default()
                .push(format!("rule {}", r["name"].as_str().unwrap_or("?")));
        }
    }
    wanted.retain(|s, _| !matches!(prom::selector_name(s), Some("ALERTS" | "ALERTS_FOR_STATE")));
    assert!(
        wanted.len() >= 20,
        "suspiciously few selectors found: {wanted:#?}"
    );
    wanted
}

fn firing(alerts: &[Value]) -> Vec<&Value> {
    alerts.iter().filter(|a| a["state"] == "firing").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_service_every_selector_has_series_and_no_alert_fires() {
    let start = newest_now().plus(-15);
    let stack = Stack::start("prom-healthy", start, MinuteSet::none(), "").await;
    stack.rescan_traffic(REQUESTS).await;

    // Every dashboard query is valid PromQL for this Prometheus.
    let queries = prom::dashboard_queries();
    for q in &queries {
        if let Err(e) = stack.prom.query(&q.expr).await {
            panic!("{} / {}: {}\n{e}", q.file, q.panel, q.expr);
        }
    }

    // Every selector returns a series once the service has run a while.
    let wanted = all_selectors(&stack.prom).await;
    eprintln!("healthy: checking {} selectors", wanted.len());
    let mut empty: Vec<String> = wanted.keys().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !empty.is_empty() {
        let mut still = Vec::new();
        for s in &empty {
            match stack.prom.query(s).await {
                Ok(series) if !series.is_empty() => {}
                Ok(_) => still.push(s.clone()),
                Err(e) => panic!("selector {s} (from {:?}): {e}", wanted[s]),
            }
        }
        empty = still;
        if empty.is_empty() {
            break;
        }
        stack.assert_service_runs();
        assert!(
            Instant::now() < deadline,
            "selectors without any series after 180 s:\n{}\n{}",
            empty
                .iter()
                .map(|s| format!("  {s}  (used by {:?})", wanted[s]))
                .collect::<Vec<_>>()
                .join("\n"),
            stack.logs()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // Every rule evaluates without error.
    for r in stack.prom.rules().await {
        assert_eq!(
            r["health"], "ok",
            "rule {} does not evaluate: {}",
            r["name"], r["lastError"]
        );
    }

    // No alert fires: watched over several evaluations of every rule group
    // after all series exist (pending alerts with a `for:` are allowed).
    let after = SystemTime::now() + Duration::from_secs(5);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let alerts = stack.prom.alerts().await;
        let f = firing(&alerts);
        assert!(f.is_empty(), "alerts fire on a healthy service: {f:#?}");
        if stack.prom.all_evaluated_after(after).await {
            let pending: Vec<_> = alerts.iter().map(|a| &a["labels"]["alertname"]).collect();
            eprintln!("healthy: no alert firing; pending: {pending:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rule groups were not evaluated\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_run_fires_the_missing_run_alert() {
    let start = newest_now().plus(-15);
    // Five minutes without a batch, with missing_threshold = 3. With
    // missing_policy = "halt" the worker stays in the run, re-checking it, so
    // the error condition stays raised (recheck-then-gap would record a gap
    // after missing_recheck_for and clear it).
    let run = MinuteRange::new(start.plus(5), start.plus(9));
    let stack = Stack::start(
        "prom-missing",
        start,
        MinuteSet::ranges([run]),
        "missing_threshold = 3\nmissing_policy = \"halt\"",
    )
    .await;

    // The shipped rule, as loaded. It has no `for:`, so it fires on the first
    // evaluation that sees the condition. Should a `for:` be added, the hang
    // guard below grows by it; a long one would need a copy of the rules with
    // it shortened here.
    let rules = stack.prom.rules().await;
    let rule = rules
        .iter()
        .find(|r| r["name"] == MISSING_RUN_ALERT)
        .unwrap_or_else(|| panic!("no rule {MISSING_RUN_ALERT} in prometheus/rules/"));
    let hold = prom::rule_for(rule);
    assert!(
        hold <= Duration::from_secs(120),
        "{MISSING_RUN_ALERT} has `for: {hold:?}`: too long for this test; load a copy with it shortened"
    );

    // Rescan traffic while the feed sits in the run.
    stack.rescan_traffic(REQUESTS).await;

    let limit = Duration::from_secs(180) + hold;
    let mut alert = None;
    stack
        .wait_for(limit, &format!("{MISSING_RUN_ALERT} firing"), async || {
            alert =
                stack.prom.alerts().await.into_iter().find(|a| {
                    a["labels"]["alertname"] == MISSING_RUN_ALERT && a["state"] == "firing"
                });
            alert.is_some()
        })
        .await;
    let alert = alert.unwrap();
    let labels = &alert["labels"];
    assert_eq!(labels["job"], prom::JOB, "{alert:#}");
    assert_eq!(labels["instance"], stack.addr.as_str(), "{alert:#}");
    assert_eq!(labels["severity"], "critical", "{alert:#}");
    let value: f64 = alert["value"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("alert value: {alert:#}"));
    assert!(
        value >= 3.0,
        "run length {value} below the threshold: {alert:#}"
    );
    let summary = alert["annotations"]["summary"].as_str().unwrap_or("");
    assert!(summary.contains(&stack.addr), "{summary}");
    // The secret of the KTIP simulator never reaches the service's log.
    assert!(!stack.service_log().contains(KTIP_PASSWORD));
}

#[test]
fn selectors_are_found_in_dashboard_and_rule_queries() {
    let q = prom::fill_grafana_variables(
        r#"sum by (le, stage) (rate(sandbox_bridge_feed_stage_duration_seconds_bucket{job=~"$job", instance=~"${instance}"}[$__rate_interval])) / ignoring (status) group_left sum(increase(x_total[$__range])) > bool 0.5"#,
    );
    assert_eq!(
        prom::selectors(&q),
        [
            r#"sandbox_bridge_feed_stage_duration_seconds_bucket{job=~".*", instance=~".*"}"#,
            "x_total",
        ]
    );
    let rule = r#"sandbox_bridge_feed_missing_run_minutes and on (job, instance) sandbox_bridge_feed_missing_run_alert == 1"#;
    assert_eq!(
        prom::selectors(rule),
        [
            "sandbox_bridge_feed_missing_run_minutes",
            "sandbox_bridge_feed_missing_run_alert"
        ]
    );
    assert_eq!(
        prom::selectors(r#"absent(up{job="a}b"}) or (time() - y offset 5m) > 6 * 86400"#),
        [r#"up{job="a}b"}"#, "y"]
    );
    assert_eq!(
        prom::selectors(r#"histogram_quantile(0.95, sum by (le) (rate(h_bucket[5m:1m])))"#),
        ["h_bucket"]
    );
    assert_eq!(prom::selector_name(r#"ALERTS{a="b"}"#), Some("ALERTS"));
    // Every dashboard has queries, and each yields at least one selector.
    for q in prom::dashboard_queries() {
        assert!(
            !prom::selectors(&q.expr).is_empty(),
            "{} / {}: no selector in {}",
            q.file,
            q.panel,
            q.expr
        );
        assert!(!q.expr.contains('$'), "variable left in {}", q.expr);
    }
}
