//! The observability files checked against the code, without network or
//! broker: the Grafana dashboards (`dashboards/*.json`), the Prometheus alert
//! rules and their promtool tests (`prometheus/`), the scrape configuration,
//! and the demo bridge configuration written by `docker-compose.yml`.
//!
//! Every `sandbox_bridge_*` name they mention must be registered by
//! [`Metrics::new`], so renaming a metric without updating a dashboard or an
//! alert fails here instead of silently showing "no data" or never firing.
//! (PromQL itself is checked by `promtool` in scripts/check-observability.sh.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use prometheus::proto::MetricType;
use sandbox_bridge::config::Config;
use sandbox_bridge::metrics::{Metrics, PREFIX};
use serde_json::Value;

/// The datasource every panel, target and query variable must use: the
/// dashboard's own `datasource` variable, never a fixed uid or an import input.
const DATASOURCE_UID: &str = "${datasource}";
/// Suffixes Prometheus adds to a histogram's name.
const HISTOGRAM_SUFFIXES: &[&str] = &["_bucket", "_count", "_sum"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Files under `dir` (recursively) whose name ends with `suffix`, sorted.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    found.sort();
    assert!(!found.is_empty(), "no *{suffix} under {}", dir.display());
    found
}

/// The metric families of the catalogue: every name, and which are histograms.
struct Catalogue {
    names: BTreeSet<String>,
    histograms: BTreeSet<String>,
}

impl Catalogue {
    fn gather() -> Catalogue {
        let metrics = Metrics::new();
        // gather() leaves out a labelled family until it has a child. Every
        // one is created at zero at start except the per-partition consumer
        // lag, whose partitions are known only once assigned: give it one.
        metrics.rescan.consumer_lag.with_label_values(&["0"]);
        let mut names = BTreeSet::new();
        let mut histograms = BTreeSet::new();
        for family in metrics.registry.gather() {
            let name = family.name().to_string();
            if family.get_field_type() == MetricType::HISTOGRAM {
                histograms.insert(name.clone());
            }
            names.insert(name);
        }
        Catalogue { names, histograms }
    }

    /// Whether `name` is a registered series: a family, or the `_bucket`,
    /// `_count` or `_sum` series of a registered histogram (a gauge may end in
    /// `_sum` itself, so the exact name is looked up first).
    fn knows(&self, name: &str) -> bool {
        self.names.contains(name)
            || HISTOGRAM_SUFFIXES.iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| self.histograms.contains(base))
            })
    }

    /// The `sandbox_bridge_*` names in `text` that the catalogue does not know.
    fn unknown_in(&self, text: &str) -> Vec<String> {
        metric_names_in(text)
            .into_iter()
            .filter(|n| !self.knows(n))
            .collect()
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every identifier in `text` that starts with `<PREFIX>_`.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let prefix = format!("{PREFIX}_");
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(&prefix) {
        if text[..at].chars().next_back().is_some_and(is_name_char) {
            continue; // inside a longer identifier
        }
        let name: String = text[at..]
            .chars()
            .take_while(|&c| is_name_char(c))
            .collect();
        names.insert(name);
    }
    names
}

#[test]
fn metric_names_are_found_and_resolved() {
    let text = r#"rate(sandbox_bridge_feed_records_total{a="b"}[5m]) / x_sandbox_bridge_no
        histogram_quantile(0.9, sandbox_bridge_rescan_api_duration_seconds_bucket)"#;
    let found: Vec<_> = metric_names_in(text).into_iter().collect();
    assert_eq!(
        found,
        [
            "sandbox_bridge_feed_records_total",
            "sandbox_bridge_rescan_api_duration_seconds_bucket"
        ]
    );
    let catalogue = Catalogue::gather();
    assert!(catalogue.knows("sandbox_bridge_rescan_api_duration_seconds_bucket"));
    assert!(catalogue.knows("sandbox_bridge_feed_stage_duration_seconds_count"));
    // A gauge whose own name ends in _sum.
    assert!(catalogue.knows("sandbox_bridge_rescan_consumer_lag_records_sum"));
    assert!(!catalogue.knows("sandbox_bridge_feed_records_total_sum"));
    assert!(!catalogue.knows("sandbox_bridge_feed_lag"));
}

// ---- dashboards -------------------------------------------------------------

fn dashboards() -> Vec<(PathBuf, String, Value)> {
    files(&root().join("dashboards"), ".json")
        .into_iter()
        .map(|path| {
            let text = read(&path);
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            (path, text, json)
        })
        .collect()
}

/// Every panel, including those nested in (collapsed) rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    let mut pending: Vec<&Value> = dashboard["panels"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    while let Some(panel) = pending.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            pending.extend(nested);
        }
        all.push(panel);
    }
    all
}

fn is_template_datasource(ds: &Value) -> bool {
    ds["uid"] == DATASOURCE_UID && ds["type"] == "prometheus"
}

/// PromQL of the dashboard: panel targets and query variables.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries: Vec<String> = panels(dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query" {
            let q = &var["query"];
            let q = q
                .as_str()
                .or_else(|| q["query"].as_str())
                .unwrap_or_default();
            queries.push(q.to_string());
        }
    }
    queries
}

#[test]
fn dashboards_have_no_import_inputs() {
    for (path, text, json) in dashboards() {
        let name = path.display();
        assert!(json.get("__inputs").is_none(), "{name}: has __inputs");
        assert!(!text.contains("__inputs"), "{name}: mentions __inputs");
        assert!(
            !text.contains("${DS_"),
            "{name}: uses a ${{DS_...}} import input"
        );
        assert!(
            !text.contains("\"datasource\": \"Prometheus\""),
            "{name}: names a data source instead of the variable"
        );
    }
}

#[test]
fn dashboards_select_their_datasource_with_the_template_variable() {
    for (path, _, json) in dashboards() {
        let name = path.display();
        let vars = json["templating"]["list"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no templating.list"));
        let ds_var = vars
            .iter()
            .find(|v| v["name"] == "datasource")
            .unwrap_or_else(|| panic!("{name}: no `datasource` variable"));
        assert_eq!(ds_var["type"], "datasource", "{name}");
        assert_eq!(ds_var["query"], "prometheus", "{name}");
        for var in vars.iter().filter(|v| v["type"] == "query") {
            assert!(
                is_template_datasource(&var["datasource"]),
                "{name}: variable {} does not use ${{datasource}}",
                var["name"]
            );
        }

        let mut targets = 0;
        for panel in panels(&json) {
            let title = &panel["title"];
            if panel["type"] == "row" {
                continue;
            }
            assert!(
                is_template_datasource(&panel["datasource"]),
                "{name}: panel {title} does not use ${{datasource}}"
            );
            let panel_targets = panel["targets"]
                .as_array()
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| panic!("{name}: panel {title} has no targets"));
            for target in panel_targets {
                assert!(
                    is_template_datasource(&target["datasource"]),
                    "{name}: a target of panel {title} does not use ${{datasource}}"
                );
                let expr = target["expr"].as_str().unwrap_or_default();
                assert!(!expr.trim().is_empty(), "{name}: panel {title}: empty expr");
                targets += 1;
            }
        }
        assert!(targets > 0, "{name}: no queries at all");
    }
}

#[test]
fn dashboards_are_well_formed() {
    let mut uids = BTreeSet::new();
    for (path, _, json) in dashboards() {
        let name = path.display();
        let uid = json["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no uid"));
        assert!(
            !uid.is_empty() && uid.len() <= 40,
            "{name}: uid must be 1-40 characters"
        );
        assert!(uids.insert(uid.to_string()), "{name}: uid {uid} used twice");
        assert!(
            json["title"].as_str().is_some_and(|t| !t.is_empty()),
            "{name}: no title"
        );

        let mut ids = BTreeSet::new();
        for panel in panels(&json) {
            let title = &panel["title"];
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: panel {title} has no id"));
            assert!(ids.insert(id), "{name}: panel id {id} used twice");
            let pos = &panel["gridPos"];
            let (x, w) = (pos["x"].as_u64(), pos["w"].as_u64());
            let (Some(x), Some(w)) = (x, w) else {
                panic!("{name}: panel {title} has no gridPos");
            };
            assert!(x + w <= 24, "{name}: panel {title} is wider than the grid");
        }
    }
}

#[test]
fn dashboard_rates_use_the_rate_interval() {
    for (path, _, json) in dashboards() {
        for expr in dashboard_queries(&json) {
            // rate() and irate() always over $__rate_interval; increase() may
            // also span $__range or a window its panel's title names.
            for (at, _) in expr.match_indices("rate(") {
                let rest = &expr[at..];
                let window = rest.find('[').and_then(|open| {
                    rest[open..]
                        .find(']')
                        .map(|close| &rest[open..=open + close])
                });
                assert_eq!(
                    window,
                    Some("[$__rate_interval]"),
                    "{}: {expr}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn dashboards_use_only_registered_metrics() {
    let catalogue = Catalogue::gather();
    for (path, _, json) in dashboards() {
        let mut seen = 0;
        for expr in dashboard_queries(&json) {
            seen += metric_names_in(&expr).len();
            let unknown = catalogue.unknown_in(&expr);
            assert!(
                unknown.is_empty(),
                "{}: {unknown:?} not registered by Metrics::new() (in `{expr}`)",
                path.display()
            );
        }
        assert!(
            seen > 0,
            "{}: no sandbox-bridge metric used",
            path.display()
        );
    }
}

// ---- Prometheus ---------------------------------------------------------------

#[test]
fn alert_rules_and_their_tests_use_only_registered_metrics() {
    let catalogue = Catalogue::gather();
    let prometheus = root().join("prometheus");
    let rules = files(&prometheus.join("rules"), ".yml");
    let tests = files(&prometheus.join("tests"), ".yml");
    for path in rules.iter().chain(&tests) {
        let text = read(path);
        assert!(
            !metric_names_in(&text).is_empty(),
            "{}: no sandbox-bridge metric",
            path.display()
        );
        let unknown = catalogue.unknown_in(&text);
        assert!(
            unknown.is_empty(),
            "{}: {unknown:?} not registered by Metrics::new()",
            path.display()
        );
    }
    for path in &rules {
        let text = read(path);
        assert!(
            !text.contains("$__"),
            "{}: Grafana variables have no meaning in Prometheus rules",
            path.display()
        );
    }
}

#[test]
fn scrape_config_matches_the_rules_and_the_default_metrics_port() {
    let prometheus = root().join("prometheus");
    let scrape = read(&prometheus.join("prometheus.yml"));
    assert!(scrape.contains("job_name: sandbox-bridge"), "{scrape}");
    assert!(scrape.contains("rules/*.rules.yml"), "rules not loaded");
    for rules in files(&prometheus.join("rules"), ".rules.yml") {
        assert!(read(&rules).contains(r#"up{job="sandbox-bridge"}"#));
    }
    // The port scraped is the one the shipped configuration listens on.
    let example = root().join("config/sandbox-bridge.example.toml");
    let env: BTreeMap<String, String> = [
        ("VT_API_KEY", "example-key"),
        ("KTIP_USERNAME", "example-user"),
        ("KTIP_PASSWORD", "example-password"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .into();
    let config = Config::parse(&read(&example), example.parent().unwrap(), &env)
        .unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    let port = config.metrics.listen.expect("metrics enabled").port();
    assert!(
        scrape.contains(&format!("port: {port}")),
        "not scraping port {port}"
    );
}

// ---- docker-compose.yml -----------------------------------------------------

/// The demo bridge's configuration: the here-document of the `bridge-demo`
/// service, without its YAML indentation.
fn compose_demo_config() -> String {
    let compose = read(&root().join("docker-compose.yml"));
    let start = compose
        .find("cat > /tmp/sandbox-bridge-demo.toml <<'EOF'\n")
        .expect("bridge-demo writes its configuration with a here-document");
    let body = &compose[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let mut lines = Vec::new();
    for line in body.lines() {
        if line.trim() == "EOF" {
            return lines.join("\n");
        }
        lines.push(line);
    }
    panic!("the here-document does not end with EOF");
}

#[test]
fn the_compose_demo_configuration_loads() {
    let text = compose_demo_config();
    let indent = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap();
    let text: String = text
        .lines()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    // The simulator writes these files at run time: stand-ins here.
    let pki = tempfile::tempdir().unwrap();
    for file in ["ca.pem", "client.pem"] {
        std::fs::write(pki.path().join(file), "").unwrap();
    }
    let text = text.replace(
        "/var/lib/sandbox-bridge/pki/",
        &format!("{}/", pki.path().display()),
    );
    let config = Config::parse(&text, pki.path(), &BTreeMap::new())
        .unwrap_or_else(|e| panic!("the demo configuration in docker-compose.yml: {e}"));
    assert!(config.feed.enabled && config.rescan.enabled);
    let listen = config.metrics.listen.expect("metrics enabled");
    assert!(
        listen.ip().is_unspecified(),
        "in a container /metrics must listen on all interfaces, not {listen}"
    );
    // Its own topics and identity, apart from a production bridge's.
    assert!(config.feed.topic.starts_with("demo."));
    assert_ne!(config.feed.transactional_id, "sandbox-bridge-feed");
}
