//! Command-line flags of the feed simulator (`sandbox-bridge simulate`).
//!
//! Every value is parsed by clap into a checked type, so a bad flag is a
//! usage error and [`VtFeedArgs::settings`] cannot fail. Defaults suit the
//! demo: fixed local ports, the `demo-key` key, 100 records a minute, no faults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use crate::minute::{FeedWindow, MinuteRange};

use super::faults::{FaultRule, FaultSettings};
use super::settings::{
    BatchSettings, CacheSettings, FeedSimSettings, Fraction, MinuteSet, MinuteSpec, SettingsError,
    parse_minute_range,
};

#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "VirusTotal file-behaviour feed simulator")]
pub struct VtFeedArgs {
    /// Address of the API listener (`base_url` of the worker). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8480")]
    pub api_listen: SocketAddr,

    /// Address of the download listener (the storage host the API redirects to).
    #[arg(long, default_value = "127.0.0.1:8481")]
    pub download_listen: SocketAddr,

    /// Base of the download URLs handed out, if clients reach the download listener
    /// under another name (default: its bound address).
    #[arg(long, value_name = "URL")]
    pub download_public_url: Option<String>,

    /// The API key the simulator accepts.
    #[arg(
        long,
        env = "SANDBOX_BRIDGE_SIM_API_KEY",
        default_value = "demo-key",
        hide_env_values = true
    )]
    pub api_key: String,

    /// A key that authenticates but has no "Sandbox feeds" licence (403). Repeatable.
    #[arg(
        long = "unlicensed-api-key",
        value_name = "KEY",
        default_value = "unlicensed-key"
    )]
    pub unlicensed_api_keys: Vec<String>,

    /// Seed of everything random: same seed and settings, same bytes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Mean number of records in a minute's batch (upstream's sibling feed averages ~625).
    #[arg(long, default_value_t = 100)]
    pub records_per_minute: u32,

    /// How far a minute's record count varies either way; 0 for exactly --records-per-minute.
    #[arg(long, default_value = "0.3", value_name = "FRACTION")]
    pub records_variation: Fraction,

    /// Minutes with no batch (404): a fraction (`2%`, `0.02`) or minutes (`YYYYMMDDhhmm[..YYYYMMDDhhmm]`). Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub missing: Vec<MinuteSpec>,

    /// Minutes whose batch holds one line of each bad kind (not UTF-8, not an object, bad id, oversize). Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub bad_lines: Vec<MinuteSpec>,

    /// Minutes whose batch holds empty lines. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub empty_lines: Vec<MinuteSpec>,

    /// Minutes whose file is several concatenated bzip2 streams. Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub multi_stream: Vec<MinuteSpec>,

    /// Size the oversize bad line exceeds (the worker's line limit).
    #[arg(long, default_value_t = super::settings::DEFAULT_OVERSIZE_LINE_BYTES, value_name = "BYTES")]
    pub oversize_line_bytes: usize,

    /// A transport fault, KIND=SPEC with KIND one of 503, 504, 429, slow (API) or
    /// truncated, corrupt, interrupted (download), e.g. `503=2%`. Repeatable.
    #[arg(long = "fault", value_name = "KIND=SPEC")]
    pub faults: Vec<FaultRule>,

    /// How many attempts at an affected minute a fault hits before the minute succeeds.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub fault_attempts: u32,

    /// Retry-After sent with 429.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_after: Duration,

    /// Delay of a `slow` response.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub slow_delay: Duration,

    /// Lifetime of a signed download URL.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub url_ttl: Duration,

    /// Bound of the in-memory cache of compressed batches.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub cache_memory_mib: u64,

    /// Directory caching generated files across runs (keyed by a hash of the generation settings).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Build these batches before listening: `FIRST..LAST` (YYYYMMDDhhmm) or `newest:N`
    /// (the N newest available minutes).
    #[arg(long, value_name = "RANGE")]
    pub pregenerate: Option<PregenerateSpec>,

    /// Exit once --pregenerate is done (to fill --cache-dir for a later run).
    #[arg(long, requires = "pregenerate")]
    pub pregenerate_only: bool,
}

impl VtFeedArgs {
    pub fn settings(&self) -> FeedSimSettings {
        FeedSimSettings {
            api_key: self.api_key.clone(),
            unlicensed_api_keys: self.unlicensed_api_keys.clone(),
            batches: BatchSettings {
                seed: self.seed,
                records_per_minute: self.records_per_minute,
                records_variation: self.records_variation,
                bad_lines: MinuteSet::from_specs(&self.bad_lines),
                empty_lines: MinuteSet::from_specs(&self.empty_lines),
                multi_stream: MinuteSet::from_specs(&self.multi_stream),
                oversize_line_bytes: self.oversize_line_bytes,
            },
            missing: MinuteSet::from_specs(&self.missing),
            faults: FaultSettings {
                rules: self.faults.clone(),
                attempts: self.fault_attempts,
                retry_after: self.retry_after,
                slow_delay: self.slow_delay,
            },
            url_ttl: self.url_ttl,
            download_public_url: self.download_public_url.clone(),
            cache: CacheSettings {
                memory_bytes: self.cache_memory_mib.saturating_mul(1024 * 1024),
                dir: self.cache_dir.clone(),
            },
        }
    }
}

/// Which batches to build before serving.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PregenerateSpec {
    Range(MinuteRange),
    /// The N newest available minutes at startup.
    Newest(u32),
}

impl PregenerateSpec {
    pub fn resolve(self, now: SystemTime) -> MinuteRange {
        match self {
            PregenerateSpec::Range(r) => r,
            PregenerateSpec::Newest(n) => {
                let newest = FeedWindow::at(now, 0).newest;
                MinuteRange::new(newest.plus(1 - i64::from(n.max(1))), newest)
            }
        }
    }
}

impl FromStr for PregenerateSpec {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<PregenerateSpec, SettingsError> {
        match s.strip_prefix("newest:") {
            Some(n) => n.parse().map(PregenerateSpec::Newest).map_err(|_| {
                SettingsError::Invalid(format!(
                    "`{s}`: expected newest:N with N a count of minutes"
                ))
            }),
            None => parse_minute_range(s).map(PregenerateSpec::Range),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::minute::Minute;
    use crate::sim::vt::faults::FaultKind;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        vt: VtFeedArgs,
    }

    fn parse(args: &[&str]) -> Result<VtFeedArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("sim").chain(args.iter().copied())).map(|c| c.vt)
    }

    #[test]
    fn defaults_give_a_clean_demo() {
        let s = parse(&[]).unwrap().settings();
        assert_eq!(s.api_key, "demo-key");
        assert_eq!(s.batches.records_per_minute, 100);
        assert!(s.missing.is_empty() && s.faults.rules.is_empty());
        assert_eq!(s.faults.attempts, 1);
    }

    #[test]
    fn flags_build_settings() {
        let args = parse(&[
            "--api-listen",
            "127.0.0.1:0",
            "--missing",
            "202611230900..202611230905",
            "--missing",
            "1%",
            "--fault",
            "429=202611230910",
            "--fault",
            "truncated=5%",
            "--records-variation",
            "0",
            "--retry-after",
            "3s",
            "--pregenerate",
            "newest:10",
        ])
        .unwrap();
        let s = args.settings();
        assert_eq!(args.api_listen.port(), 0);
        assert_eq!(s.missing.ranges[0].len(), 6);
        assert_eq!(s.missing.fraction.get(), 0.01);
        assert_eq!(s.faults.rules[0].kind, FaultKind::QuotaExceeded);
        assert_eq!(s.faults.rules[1].kind, FaultKind::Truncated);
        assert_eq!(s.batches.records_variation, Fraction::ZERO);
        assert_eq!(s.faults.retry_after, Duration::from_secs(3));
        let now = Minute::parse("202611231000").unwrap().start();
        let range = args.pregenerate.unwrap().resolve(now);
        assert_eq!(
            (range.first.to_string(), range.len()),
            ("202611230851".to_string(), 10)
        );
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            &["--missing", "sometimes"][..],
            &["--fault", "418=1%"],
            &["--fault", "503"],
            &["--records-variation", "2"],
            &["--pregenerate", "newest:x"],
            &["--pregenerate-only"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
