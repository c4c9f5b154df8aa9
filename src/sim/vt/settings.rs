//! Validated settings of the feed simulator.
//!
//! Every field has a type that cannot hold an invalid value ([`Fraction`] is
//! checked on construction, minute ranges are ordered), so a
//! [`FeedSimSettings`] built in a test or converted from the command line
//! (`args.rs`) needs no further checks downstream.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::minute::{Minute, MinuteRange};

use super::faults::FaultSettings;
use super::rng::{hash_bytes, unit_for};

/// A probability in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default)]
pub struct Fraction(f64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error(
        "`{0}` is not a fraction: expected a number in [0, 1] such as 0.02, or a percentage such as 2%"
    )]
    Fraction(String),
    #[error(
        "`{0}` is neither a fraction (0.02, 2%) nor a minute range (YYYYMMDDhhmm[..YYYYMMDDhhmm])"
    )]
    MinuteSpec(String),
    #[error("minute range `{0}` ends before it starts")]
    BackwardRange(String),
    #[error(
        "`{0}` is not a fault kind: expected one of 503, 504, 429, slow, truncated, corrupt, interrupted"
    )]
    FaultKind(String),
    #[error("`{0}` is not a fault: expected KIND=SPEC, e.g. 503=2% or truncated=202611230900")]
    Fault(String),
    #[error("{0}")]
    Invalid(String),
}

impl Fraction {
    pub const ZERO: Fraction = Fraction(0.0);
    pub const ONE: Fraction = Fraction(1.0);

    pub fn new(p: f64) -> Result<Fraction, SettingsError> {
        if (0.0..=1.0).contains(&p) {
            Ok(Fraction(p))
        } else {
            Err(SettingsError::Fraction(p.to_string()))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl FromStr for Fraction {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<Fraction, SettingsError> {
        let err = || SettingsError::Fraction(s.to_string());
        let p = match s.trim().strip_suffix('%') {
            Some(pct) => pct.trim().parse::<f64>().map_err(|_| err())? / 100.0,
            None => s.trim().parse::<f64>().map_err(|_| err())?,
        };
        Fraction::new(p).map_err(|_| err())
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parses `YYYYMMDDhhmm` or `YYYYMMDDhhmm..YYYYMMDDhhmm` (inclusive).
pub fn parse_minute_range(s: &str) -> Result<MinuteRange, SettingsError> {
    let err = || SettingsError::MinuteSpec(s.to_string());
    let strict = |p: &str| {
        let p = p.trim();
        if p.len() == 12 && p.bytes().all(|b| b.is_ascii_digit()) {
            Minute::parse(p).map_err(|_| err())
        } else {
            Err(err())
        }
    };
    let (first, last) = match s.split_once("..") {
        Some((a, b)) => (strict(a)?, strict(b)?),
        None => (strict(s)?, strict(s)?),
    };
    if last < first {
        return Err(SettingsError::BackwardRange(s.to_string()));
    }
    Ok(MinuteRange::new(first, last))
}

/// One command-line minute spec: a fraction of all minutes (`0.02`, `2%`)
/// or a minute range (`YYYYMMDDhhmm[..YYYYMMDDhhmm]`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinuteSpec {
    Fraction(Fraction),
    Range(MinuteRange),
}

impl FromStr for MinuteSpec {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<MinuteSpec, SettingsError> {
        let t = s.trim();
        if t.contains("..") || (t.len() == 12 && t.bytes().all(|b| b.is_ascii_digit())) {
            parse_minute_range(t).map(MinuteSpec::Range)
        } else {
            t.parse()
                .map(MinuteSpec::Fraction)
                .map_err(|_| SettingsError::MinuteSpec(s.to_string()))
        }
    }
}

/// A set of minutes: explicit ranges plus a seeded random fraction of all minutes.
///
/// Which minutes the fraction picks depends on the seed and on a per-use
/// salt, so "2% missing" and "2% truncated" pick different minutes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MinuteSet {
    pub fraction: Fraction,
    pub ranges: Vec<MinuteRange>,
}

impl MinuteSet {
    pub fn none() -> MinuteSet {
        MinuteSet::default()
    }

    pub fn fraction(p: Fraction) -> MinuteSet {
        MinuteSet {
            fraction: p,
            ranges: Vec::new(),
        }
    }

    pub fn ranges(ranges: impl IntoIterator<Item = MinuteRange>) -> MinuteSet {
        MinuteSet {
            fraction: Fraction::ZERO,
            ranges: ranges.into_iter().collect(),
        }
    }

    pub fn minute(m: Minute) -> MinuteSet {
        MinuteSet::ranges([MinuteRange::single(m)])
    }

    pub fn contains(&self, seed: u64, salt: u64, m: Minute) -> bool {
        self.ranges.iter().any(|r| r.contains(m))
            || (self.fraction.get() > 0.0
                && unit_for(seed, &[salt, m.unix_minutes() as u64]) < self.fraction.get())
    }

    /// The union of command-line specs; the last fraction given wins.
    pub fn from_specs(specs: &[MinuteSpec]) -> MinuteSet {
        let mut set = MinuteSet::none();
        for spec in specs {
            match spec {
                MinuteSpec::Fraction(p) => set.fraction = *p,
                MinuteSpec::Range(r) => set.ranges.push(*r),
            }
        }
        set
    }

    pub fn is_empty(&self) -> bool {
        self.fraction.get() == 0.0 && self.ranges.is_empty()
    }

    fn canonical(&self) -> String {
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|r| format!("{}..{}", r.first, r.last))
            .collect();
        format!("{}:{}", self.fraction.get(), ranges.join(","))
    }
}

/// What a batch holds. Everything here changes the generated bytes, so it is
/// all part of [`BatchSettings::fingerprint`].
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSettings {
    pub seed: u64,
    /// Mean number of valid records per minute.
    pub records_per_minute: u32,
    /// Each minute's count varies by up to this fraction either way
    /// (deterministically by seed and minute); zero gives exactly
    /// `records_per_minute` records every minute.
    pub records_variation: Fraction,
    /// Minutes whose batch holds one of each kind of bad line (see `records.rs`).
    pub bad_lines: MinuteSet,
    /// Minutes whose batch holds empty lines between records.
    pub empty_lines: MinuteSet,
    /// Minutes whose file is several concatenated bzip2 streams, split at
    /// arbitrary byte offsets (mid-line too), as `pbzip2` or appending writers make.
    pub multi_stream: MinuteSet,
    /// Size the oversize bad line must exceed: the worker's line limit.
    pub oversize_line_bytes: usize,
}

/// Test-sized by default: generation is CPU-heavy and tests run unoptimised.
pub const DEFAULT_RECORDS_PER_MINUTE: u32 = 20;
/// vt-go's line limit is 10 MB; the worker's default limit is 1.5 MiB.
pub const DEFAULT_OVERSIZE_LINE_BYTES: usize = 3 * 1024 * 1024 / 2;
/// Bumped whenever the generator's output changes, to invalidate disk caches.
pub const GENERATOR_VERSION: u32 = 1;

impl Default for BatchSettings {
    fn default() -> BatchSettings {
        BatchSettings {
            seed: 1,
            records_per_minute: DEFAULT_RECORDS_PER_MINUTE,
            records_variation: Fraction(0.3),
            bad_lines: MinuteSet::none(),
            empty_lines: MinuteSet::none(),
            multi_stream: MinuteSet::none(),
            oversize_line_bytes: DEFAULT_OVERSIZE_LINE_BYTES,
        }
    }
}

impl BatchSettings {
    /// Exactly `n` valid records every minute, nothing else: the easiest to assert on.
    pub fn exact(seed: u64, n: u32) -> BatchSettings {
        BatchSettings {
            seed,
            records_per_minute: n,
            records_variation: Fraction::ZERO,
            ..BatchSettings::default()
        }
    }

    /// Hex digest of everything that shapes the bytes: names the disk cache directory.
    pub fn fingerprint(&self) -> String {
        let canonical = format!(
            "v{GENERATOR_VERSION};seed={};n={};var={};bad={};empty={};multi={};oversize={}",
            self.seed,
            self.records_per_minute,
            self.records_variation.get(),
            self.bad_lines.canonical(),
            self.empty_lines.canonical(),
            self.multi_stream.canonical(),
            self.oversize_line_bytes,
        );
        hex::encode(&Sha256::digest(canonical.as_bytes())[..12])
    }

    /// Salted membership test, so content faults pick independent minutes.
    pub fn has(&self, set: &MinuteSet, salt: &str, m: Minute) -> bool {
        set.contains(self.seed, hash_bytes(salt.as_bytes()), m)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct CacheSettings {
    /// Bound of the in-memory cache of compressed batches.
    pub memory_bytes: u64,
    /// Optional directory of generated files, shared between runs; files
    /// live under a subdirectory named by [`BatchSettings::fingerprint`].
    pub dir: Option<PathBuf>,
}

impl Default for CacheSettings {
    fn default() -> CacheSettings {
        CacheSettings {
            memory_bytes: 256 * 1024 * 1024,
            dir: None,
        }
    }
}

/// Everything the feed simulator needs, already validated.
#[derive(Clone, Debug, PartialEq)]
pub struct FeedSimSettings {
    /// The key that is accepted.
    pub api_key: String,
    /// Keys that authenticate but lack the "Sandbox feeds" licence (403).
    pub unlicensed_api_keys: Vec<String>,
    pub batches: BatchSettings,
    /// Minutes with no batch (404), until [`super::FeedSimHandle::set_missing`] says otherwise.
    pub missing: MinuteSet,
    pub faults: FaultSettings,
    /// Lifetime of a signed download URL, measured on the simulator's clock.
    pub url_ttl: Duration,
    /// Base of the download URLs handed out, when the download listener is
    /// reached by another name (e.g. in a container); default: its bound address.
    pub download_public_url: Option<String>,
    pub cache: CacheSettings,
}

impl Default for FeedSimSettings {
    fn default() -> FeedSimSettings {
        FeedSimSettings {
            api_key: "demo-key".to_string(),
            unlicensed_api_keys: vec!["unlicensed-key".to_string()],
            batches: BatchSettings::default(),
            missing: MinuteSet::none(),
            faults: FaultSettings::default(),
            url_ttl: Duration::from_secs(15 * 60),
            download_public_url: None,
            cache: CacheSettings::default(),
        }
    }
}

impl FeedSimSettings {
    pub fn is_missing_by_config(&self, m: Minute) -> bool {
        self.missing.contains(self.batches.seed, 0x404, m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Minute {
        Minute::parse(s).unwrap()
    }

    #[test]
    fn parses_fractions_and_ranges() {
        assert_eq!("2%".parse::<Fraction>().unwrap().get(), 0.02);
        assert_eq!("0.5".parse::<Fraction>().unwrap().get(), 0.5);
        assert!("1.5".parse::<Fraction>().is_err() && "x".parse::<Fraction>().is_err());
        let r = parse_minute_range("202611230900..202611230905").unwrap();
        assert_eq!(r.len(), 6);
        assert_eq!(parse_minute_range("202611230900").unwrap().len(), 1);
        assert!(matches!(
            parse_minute_range("202611230905..202611230900"),
            Err(SettingsError::BackwardRange(_))
        ));
        assert!(parse_minute_range("2026-11-23T09:00:00Z").is_err());
    }

    #[test]
    fn minute_sets_mix_ranges_and_a_seeded_fraction() {
        let specs: Vec<MinuteSpec> = ["202611230900..202611230901", "10%"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let set = MinuteSet::from_specs(&specs);
        assert!(
            "garbage".parse::<MinuteSpec>().is_err() && "20261123".parse::<MinuteSpec>().is_err()
        );
        assert!(set.contains(1, 0, m("202611230900")) && set.contains(1, 0, m("202611230901")));
        let start = m("202611230000");
        let hits = (0..10_000)
            .filter(|i| set.contains(1, 0, start.plus(*i)))
            .count();
        assert!((800..1200).contains(&hits), "{hits}");
        let again = (0..10_000)
            .filter(|i| set.contains(1, 0, start.plus(*i)))
            .count();
        assert_eq!(hits, again);
        let other_salt = (0..10_000)
            .filter(|i| set.contains(1, 0, start.plus(*i)) && set.contains(1, 9, start.plus(*i)));
        assert!(
            other_salt.count() < 300,
            "salts should pick different minutes"
        );
    }

    #[test]
    fn fingerprint_follows_every_generation_setting() {
        let a = BatchSettings::default();
        let mut b = a.clone();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.multi_stream = MinuteSet::minute(Minute::parse("202611230900").unwrap());
        assert_ne!(a.fingerprint(), b.fingerprint());
        let c = BatchSettings {
            seed: 2,
            ..a.clone()
        };
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
