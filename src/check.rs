//! `sandbox-bridge check`: is this configuration ready to run?
//!
//! Checks, for the pipelines the configuration enables only:
//!
//! ```text
//!  config ─► kafka: metadata within kafka.operation_timeout
//!              ├─ every configured topic: exists? cleanup.policy as the pipeline needs?
//!              └─ transactions: init + begin + abort with a probe id of its own
//!            feed api: GET of the newest available minute (the redirect is not followed)
//!            ktip: client certificate (subject, expiry), GET api/sandbox/channels
//! ```
//!
//! One line per check (`ok`, `warn` or `FAIL` and a short reason), then a
//! summary; the command exits non-zero when any line is `FAIL`.
//!
//! Nothing is changed: no topic is created, no record written, no batch
//! downloaded, no rescan requested. The transaction probe never uses a live
//! transactional id: `init_transactions` with it would fence a running
//! worker. It uses `<live id>-check-<random hex>`, which the broker forgets
//! after `transactional.id.expiration.ms` (7 days by default). A consequence:
//! an ACL granting exactly the live id (not a prefix) does not cover the
//! probe id, and the line says so.
//!
//! No secret is printed: base URLs are shown by origin, HTTP errors without
//! their URL, and answers from the APIs only by status and error code.
//!
//! `kafka` holds the Kafka checks, `upstream` those of the two HTTP APIs;
//! each judges what it found in a pure function, unit-tested there.

mod kafka;
mod upstream;

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use reqwest::Url;

use crate::config::Config;
use crate::feed::api::origin_of;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// The report, written line by line as the checks finish (some take seconds).
pub struct Report<W: Write> {
    out: W,
    counts: [usize; 3],
}

impl<W: Write> Report<W> {
    pub fn new(out: W) -> Report<W> {
        Report {
            out,
            counts: [0; 3],
        }
    }

    fn add(&mut self, level: Level, check: &str, detail: impl std::fmt::Display) {
        self.counts[level as usize] += 1;
        // A closed stdout must not hide the exit status; nothing else to do about it.
        let _ = writeln!(self.out, "{:<4} {check}: {detail}", level.label());
        let _ = self.out.flush();
    }

    pub fn failures(&self) -> usize {
        self.counts[Level::Fail as usize]
    }

    pub fn passed(&self) -> bool {
        self.failures() == 0
    }

    fn summary(&mut self) {
        let [ok, warn, fail] = self.counts;
        let verdict = if fail == 0 { "ready" } else { "NOT ready" };
        let _ = writeln!(
            self.out,
            "summary: {ok} ok, {warn} {}, {fail} {}: {verdict}",
            plural(warn, "warning"),
            plural(fail, "problem"),
        );
        let _ = self.out.flush();
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

/// Runs every check the configuration calls for, writing the report to `out`.
pub async fn run<W: Write>(config: &Config, path: &Path, out: W) -> Report<W> {
    let mut r = Report::new(out);
    let pipelines: Vec<&str> = [
        (config.feed.enabled, "feed"),
        (config.rescan.enabled, "rescan"),
    ]
    .into_iter()
    .filter_map(|(on, name)| on.then_some(name))
    .collect();
    r.add(
        Level::Ok,
        "config",
        format!(
            "{} is valid; checking {}",
            path.display(),
            pipelines.join(" and ")
        ),
    );
    kafka::check_kafka(config, &mut r).await;
    if config.feed.enabled {
        upstream::check_feed_api(&config.feed, &mut r).await;
    }
    if config.rescan.enabled {
        upstream::check_certificate(&config.rescan, SystemTime::now(), &mut r);
        upstream::check_ktip_api(&config.rescan, &mut r).await;
    }
    r.summary();
    r
}

/// `scheme://host[:port]` of a base URL: never its path, query or user info.
fn display_origin(base_url: &str) -> String {
    Url::parse(base_url).map_or_else(|_| "(base_url)".into(), |u| origin_of(&u))
}

/// An error and its sources, `a: b: c`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_counts_and_summarises() {
        let mut r = Report::new(Vec::new());
        r.add(Level::Ok, "a", "fine");
        r.add(Level::Warn, "b", "hmm");
        r.add(Level::Fail, "c", "broken");
        r.summary();
        assert!(!r.passed());
        let text = String::from_utf8(r.out).unwrap();
        assert_eq!(
            text,
            "ok   a: fine\nwarn b: hmm\nFAIL c: broken\nsummary: 1 ok, 1 warning, 1 problem: NOT ready\n"
        );
    }

    #[test]
    fn origins_hide_user_info_and_paths() {
        assert_eq!(
            display_origin("https://user:pw@tip.example.com:8443/base"),
            "https://tip.example.com:8443"
        );
    }
}
