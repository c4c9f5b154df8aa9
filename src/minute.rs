//! Batch minutes and the feed's availability window.
//!
//! The feed publishes one batch per UTC minute, named `YYYYMMDDhhmm`. A batch
//! becomes available 60 minutes after its minute starts and can be fetched
//! for 7 days. Everything here is pure arithmetic on whole minutes since the
//! Unix epoch, so it is unit-tested without clocks or I/O.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// How long after its minute starts a batch becomes available.
pub const FEED_LAG: Duration = Duration::from_secs(60 * 60);
/// How long a batch stays available.
pub const FEED_WINDOW: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// One UTC minute, the name of one feed batch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Minute(i64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{input}` is not a minute: expected YYYYMMDDhhmm (UTC) or an RFC 3339 time")]
pub struct MinuteParseError {
    input: String,
}

impl Minute {
    /// The minute containing `t` (rounded down).
    pub fn containing(t: SystemTime) -> Minute {
        Minute(unix_seconds(t).div_euclid(60))
    }

    /// The first minute starting at or after `t` (rounded up).
    pub fn starting_at_or_after(t: SystemTime) -> Minute {
        let s = unix_seconds(t);
        Minute(s.div_euclid(60) + i64::from(s.rem_euclid(60) != 0))
    }

    pub fn from_unix_minutes(m: i64) -> Minute {
        Minute(m)
    }

    pub fn unix_minutes(self) -> i64 {
        self.0
    }

    /// Start of the minute, in seconds since the Unix epoch.
    pub fn unix_seconds(self) -> i64 {
        self.0 * 60
    }

    /// Start of the minute, in milliseconds since the Unix epoch (Kafka timestamps).
    pub fn unix_millis(self) -> i64 {
        self.0 * 60_000
    }

    pub fn start(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(self.unix_seconds()).unwrap_or(0))
    }

    pub fn next(self) -> Minute {
        Minute(self.0 + 1)
    }

    pub fn prev(self) -> Minute {
        Minute(self.0 - 1)
    }

    pub fn plus(self, minutes: i64) -> Minute {
        Minute(self.0 + minutes)
    }

    /// Whole minutes from `self` to `later` (negative when `later` is earlier).
    pub fn minutes_until(self, later: Minute) -> i64 {
        later.0 - self.0
    }

    /// The instant this minute's batch becomes available (minute start + 60 min).
    pub fn available_at(self) -> SystemTime {
        self.start() + FEED_LAG
    }

    /// Parses `YYYYMMDDhhmm` (UTC) or an RFC 3339 timestamp (rounded down to its minute).
    pub fn parse(input: &str) -> Result<Minute, MinuteParseError> {
        let err = || MinuteParseError {
            input: input.to_string(),
        };
        let s = input.trim();
        if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
            let fmt = format_description!("[year][month][day][hour][minute]");
            let dt = time::PrimitiveDateTime::parse(s, &fmt).map_err(|_| err())?;
            return Ok(Minute(dt.assume_utc().unix_timestamp().div_euclid(60)));
        }
        let dt = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| err())?;
        Ok(Minute(dt.unix_timestamp().div_euclid(60)))
    }

    fn datetime(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.unix_seconds())
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// RFC 3339 form of the minute's start, for logs and state records.
    pub fn rfc3339(self) -> String {
        self.datetime()
            .format(&Rfc3339)
            .unwrap_or_else(|_| self.to_string())
    }
}

impl fmt::Display for Minute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.datetime();
        write!(
            f,
            "{:04}{:02}{:02}{:02}{:02}",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute()
        )
    }
}

impl fmt::Debug for Minute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Minute({self})")
    }
}

impl FromStr for Minute {
    type Err = MinuteParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Minute::parse(s)
    }
}

impl serde::Serialize for Minute {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Minute {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Minute::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An inclusive range of minutes, e.g. a run of missing batches or a gap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MinuteRange {
    pub first: Minute,
    pub last: Minute,
}

impl MinuteRange {
    pub fn new(first: Minute, last: Minute) -> MinuteRange {
        debug_assert!(first <= last);
        MinuteRange { first, last }
    }

    pub fn single(m: Minute) -> MinuteRange {
        MinuteRange { first: m, last: m }
    }

    pub fn len(&self) -> i64 {
        self.first.minutes_until(self.last) + 1
    }

    pub fn is_empty(&self) -> bool {
        self.last < self.first
    }

    pub fn contains(&self, m: Minute) -> bool {
        self.first <= m && m <= self.last
    }

    pub fn iter(&self) -> impl Iterator<Item = Minute> + use<> {
        let (a, b) = (self.first.0, self.last.0);
        (a..=b).map(Minute)
    }
}

impl fmt::Display for MinuteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}..{} ({} minutes)", self.first, self.last, self.len())
        }
    }
}

/// The minutes that can be fetched at a given instant.
///
/// The newest is the minute starting 60 minutes or more before `now`; the
/// oldest is the first minute starting within the last 7 days, plus
/// `edge_margin` so a batch about to expire is not asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeedWindow {
    pub oldest: Minute,
    pub newest: Minute,
}

impl FeedWindow {
    pub fn at(now: SystemTime, edge_margin_minutes: i64) -> FeedWindow {
        let newest = Minute::containing(now.checked_sub(FEED_LAG).unwrap_or(UNIX_EPOCH));
        let oldest =
            Minute::starting_at_or_after(now.checked_sub(FEED_WINDOW).unwrap_or(UNIX_EPOCH))
                .plus(edge_margin_minutes);
        FeedWindow { oldest, newest }
    }

    pub fn contains(&self, m: Minute) -> bool {
        self.oldest <= m && m <= self.newest
    }

    /// Minutes from `next` up to the newest available one (0 when caught up).
    pub fn pending_from(&self, next: Minute) -> i64 {
        next.minutes_until(self.newest).saturating_add(1).max(0)
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rfc: &str) -> SystemTime {
        let dt = OffsetDateTime::parse(rfc, &Rfc3339).unwrap();
        UNIX_EPOCH + Duration::from_secs(dt.unix_timestamp() as u64)
    }

    #[test]
    fn parses_and_formats_batch_names() {
        let m = Minute::parse("201912010802").unwrap();
        assert_eq!(m.to_string(), "201912010802");
        assert_eq!(m.rfc3339(), "2019-12-01T08:02:00Z");
        assert_eq!(m.next().to_string(), "201912010803");
        assert_eq!(
            Minute::parse("201912312359").unwrap().next().to_string(),
            "202001010000"
        );
    }

    #[test]
    fn parses_rfc3339_rounding_down() {
        let m = Minute::parse("2019-12-01T08:02:59Z").unwrap();
        assert_eq!(m.to_string(), "201912010802");
        let m = Minute::parse("2019-12-01T10:02:30+02:00").unwrap();
        assert_eq!(m.to_string(), "201912010802");
    }

    #[test]
    fn refuses_malformed_minutes() {
        for bad in [
            "",
            "2019120108",
            "201913010802",
            "201912011260",
            "20191201080a",
            "yesterday",
        ] {
            assert!(Minute::parse(bad).is_err(), "{bad} should be refused");
        }
        let e = Minute::parse("nope").unwrap_err().to_string();
        assert!(e.contains("YYYYMMDDhhmm"), "{e}");
    }

    #[test]
    fn newest_available_is_sixty_minutes_back() {
        // At 10:00:00 the batch of 09:00 is available, 09:01 is not.
        let w = FeedWindow::at(at("2026-11-23T10:00:00Z"), 0);
        assert_eq!(w.newest.to_string(), "202611230900");
        // One second before, only 08:59.
        let w = FeedWindow::at(at("2026-11-23T09:59:59Z"), 0);
        assert_eq!(w.newest.to_string(), "202611230859");
        assert_eq!(
            Minute::parse("202611230901").unwrap().available_at(),
            at("2026-11-23T10:01:00Z")
        );
    }

    #[test]
    fn oldest_available_is_seven_days_back() {
        let w = FeedWindow::at(at("2026-11-23T10:00:30Z"), 0);
        assert_eq!(w.oldest.to_string(), "202611161001");
        let w = FeedWindow::at(at("2026-11-23T10:00:00Z"), 0);
        assert_eq!(w.oldest.to_string(), "202611161000");
        let w = FeedWindow::at(at("2026-11-23T10:00:00Z"), 5);
        assert_eq!(w.oldest.to_string(), "202611161005");
        assert!(w.contains(w.oldest) && w.contains(w.newest));
        assert!(!w.contains(w.newest.next()) && !w.contains(w.oldest.prev()));
    }

    #[test]
    fn pending_counts_available_minutes_not_yet_published() {
        let w = FeedWindow::at(at("2026-11-23T10:00:00Z"), 0);
        assert_eq!(w.pending_from(w.newest.next()), 0);
        assert_eq!(w.pending_from(w.newest.plus(5)), 0);
        assert_eq!(w.pending_from(w.newest), 1);
        assert_eq!(w.pending_from(w.newest.plus(-9)), 10);
    }

    #[test]
    fn ranges_count_and_iterate() {
        let a = Minute::parse("202611230900").unwrap();
        let r = MinuteRange::new(a, a.plus(2));
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            ["202611230900", "202611230901", "202611230902"]
        );
        assert!(r.contains(a.next()) && !r.contains(a.plus(3)));
        assert_eq!(r.to_string(), "202611230900..202611230902 (3 minutes)");
    }

    #[test]
    fn serde_round_trips_as_batch_name() {
        let m = Minute::parse("202611230900").unwrap();
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, "\"202611230900\"");
        assert_eq!(serde_json::from_str::<Minute>(&s).unwrap(), m);
    }
}
