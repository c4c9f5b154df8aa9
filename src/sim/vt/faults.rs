//! Transport faults: which one hits a request, and what a damaged download looks like.
//!
//! A fault hits only the first `FaultSettings::attempts` requests for an
//! affected minute (API requests and downloads counted apart), so a client
//! that retries always gets through in the end; content faults (bad lines,
//! multi-stream files) are part of the batch instead (`batch.rs`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;

use crate::minute::Minute;

use super::settings::{FeedSimSettings, MinuteSet, SettingsError};

/// A transport fault: applied to the first `FaultSettings::attempts` requests
/// for an affected minute, so a client that retries eventually succeeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// API answers 503 `TransientError`.
    Unavailable,
    /// API answers 504 `DeadlineExceededError`.
    DeadlineExceeded,
    /// API answers 429 `QuotaExceededError` with `Retry-After`.
    QuotaExceeded,
    /// API answers correctly after `FaultSettings::slow_delay` (real time).
    Slow,
    /// Download serves a prefix of the file with a matching Content-Length.
    Truncated,
    /// Download serves the file with some bytes flipped (bzip2 CRCs catch it).
    Corrupt,
    /// Download announces the full length, sends part of it and drops the connection.
    Interrupted,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Unavailable,
        FaultKind::DeadlineExceeded,
        FaultKind::QuotaExceeded,
        FaultKind::Slow,
        FaultKind::Truncated,
        FaultKind::Corrupt,
        FaultKind::Interrupted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Unavailable => "503",
            FaultKind::DeadlineExceeded => "504",
            FaultKind::QuotaExceeded => "429",
            FaultKind::Slow => "slow",
            FaultKind::Truncated => "truncated",
            FaultKind::Corrupt => "corrupt",
            FaultKind::Interrupted => "interrupted",
        }
    }

    /// Whether the fault hits the API request (else the download).
    pub fn on_api(self) -> bool {
        matches!(
            self,
            FaultKind::Unavailable
                | FaultKind::DeadlineExceeded
                | FaultKind::QuotaExceeded
                | FaultKind::Slow
        )
    }
}

impl FromStr for FaultKind {
    type Err = SettingsError;
    fn from_str(s: &str) -> Result<FaultKind, SettingsError> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| SettingsError::FaultKind(s.to_string()))
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FaultRule {
    pub kind: FaultKind,
    pub minutes: MinuteSet,
}

impl FromStr for FaultRule {
    type Err = SettingsError;
    /// `KIND=SPEC`, e.g. `503=2%`, `truncated=202611230900..202611230905`.
    fn from_str(s: &str) -> Result<FaultRule, SettingsError> {
        let (kind, spec) = s
            .split_once('=')
            .ok_or_else(|| SettingsError::Fault(s.to_string()))?;
        Ok(FaultRule {
            kind: kind.parse()?,
            minutes: MinuteSet::from_specs(&[spec.parse()?]),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FaultSettings {
    /// At most one API fault and one download fault apply to a minute: the
    /// first matching rule of each side, in this order.
    pub rules: Vec<FaultRule>,
    /// How many attempts at an affected minute fail (each side counted apart).
    pub attempts: u32,
    /// `Retry-After` sent with 429.
    pub retry_after: Duration,
    /// Delay of a `slow` response.
    pub slow_delay: Duration,
}

impl Default for FaultSettings {
    fn default() -> FaultSettings {
        FaultSettings {
            rules: Vec::new(),
            attempts: 1,
            retry_after: Duration::from_secs(1),
            slow_delay: Duration::from_secs(5),
        }
    }
}

impl FaultSettings {
    /// The first rule of `side` whose minutes hold `m` (`seed` picks the random fractions).
    pub fn rule_for(&self, seed: u64, side: Side, m: Minute) -> Option<FaultKind> {
        self.rules
            .iter()
            .enumerate()
            .find(|(i, r)| {
                r.kind.on_api() == (side == Side::Api)
                    && r.minutes.contains(seed, 0xFA01 + *i as u64, m)
            })
            .map(|(_, r)| r.kind)
    }
}

/// Which side of the simulator a request reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Api,
    Download,
}

/// The fault for the `attempt`-th (1-based) request at minute `m`, if any.
pub fn active_fault(
    settings: &FeedSimSettings,
    side: Side,
    m: Minute,
    attempt: u32,
) -> Option<FaultKind> {
    if attempt > settings.faults.attempts {
        return None;
    }
    settings.faults.rule_for(settings.batches.seed, side, m)
}

/// The first two thirds of the file: a complete HTTP response holding an
/// incomplete bzip2 stream (the decoder hits end of input mid-stream).
pub fn truncated(file: &Bytes) -> Bytes {
    file.slice(..file.len() * 2 / 3)
}

/// The file with a few bytes inverted past the stream header, so the
/// header still looks right and the block CRCs catch the damage.
pub fn corrupted(file: &Bytes) -> Bytes {
    let mut bytes = file.to_vec();
    let len = bytes.len();
    if len > 16 {
        for at in [len / 3, len / 2, len * 2 / 3, len - 12] {
            bytes[at] ^= 0xA5;
        }
    }
    Bytes::from(bytes)
}

/// How much of the file is sent before an interrupted download drops the connection.
pub fn interrupted_prefix(file: &Bytes) -> Bytes {
    file.slice(..file.len() / 2)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use bzip2::read::MultiBzDecoder;

    use super::*;
    use crate::sim::vt::batch::batch_file;
    use crate::sim::vt::settings::BatchSettings;

    fn m(s: &str) -> Minute {
        Minute::parse(s).unwrap()
    }

    #[test]
    fn parses_fault_rules() {
        let r: FaultRule = "429=202611230900".parse().unwrap();
        assert_eq!(r.kind, FaultKind::QuotaExceeded);
        assert!(r.minutes.contains(0, 0, m("202611230900")));
        let r: FaultRule = "truncated=0.5".parse().unwrap();
        assert_eq!(
            (r.kind, r.minutes.fraction.get()),
            (FaultKind::Truncated, 0.5)
        );
        assert!("teapot=1".parse::<FaultRule>().is_err());
        assert!("503".parse::<FaultRule>().is_err());
    }

    #[test]
    fn faults_hit_only_the_first_attempts_of_affected_minutes() {
        let target = Minute::parse("202611230900").unwrap();
        let mut settings = FeedSimSettings::default();
        settings.faults.attempts = 2;
        settings.faults.rules = vec![
            FaultRule {
                kind: FaultKind::QuotaExceeded,
                minutes: MinuteSet::minute(target),
            },
            FaultRule {
                kind: FaultKind::Unavailable,
                minutes: MinuteSet::minute(target),
            },
            FaultRule {
                kind: FaultKind::Corrupt,
                minutes: MinuteSet::minute(target),
            },
        ];
        let at = |side, attempt| active_fault(&settings, side, target, attempt);
        assert_eq!(
            at(Side::Api, 1),
            Some(FaultKind::QuotaExceeded),
            "first matching rule wins"
        );
        assert_eq!(at(Side::Api, 2), Some(FaultKind::QuotaExceeded));
        assert_eq!(at(Side::Api, 3), None);
        assert_eq!(at(Side::Download, 1), Some(FaultKind::Corrupt));
        assert_eq!(active_fault(&settings, Side::Api, target.next(), 1), None);
    }

    #[test]
    fn damaged_files_fail_to_decode() {
        let file = Bytes::from(batch_file(
            &BatchSettings::exact(1, 5),
            Minute::parse("202611230900").unwrap(),
        ));
        let decode = |b: &Bytes| {
            let mut out = Vec::new();
            MultiBzDecoder::new(&b[..])
                .read_to_end(&mut out)
                .map(|_| out)
        };
        assert!(decode(&file).is_ok());
        assert!(decode(&truncated(&file)).is_err());
        assert!(decode(&corrupted(&file)).is_err());
        assert!(decode(&interrupted_prefix(&file)).is_err());
        assert_eq!(corrupted(&file).len(), file.len());
    }
}
