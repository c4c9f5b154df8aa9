//! The feed worker's durable state: its position and its gaps.
//!
//! One JSON record per worker in the compacted state topic, keyed by the
//! transactional id, written in the same Kafka transaction as the records of
//! the batch it accounts for. `next` is the first minute not yet accounted
//! for; `gaps` are minutes given up as missing but still re-checked while
//! inside the 7-day window; `lost` keeps a bounded history of ranges that can
//! no longer be fetched. Pure data and arithmetic; no I/O.

use serde::{Deserialize, Serialize};

use crate::minute::{Minute, MinuteRange};

/// Format version of the state record.
pub const STATE_FORMAT: u32 = 1;
/// How many lost ranges are remembered.
pub const LOST_HISTORY: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// A run of `missing_threshold` or more consecutive 404s.
    MissingRun,
    /// The saved position fell out of the 7-day window.
    WindowExpired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub first: Minute,
    pub last: Minute,
    pub reason: GapReason,
}

impl Gap {
    pub fn range(&self) -> MinuteRange {
        MinuteRange::new(self.first, self.last)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedState {
    pub format: u32,
    /// The first minute not yet published or skipped.
    pub next: Minute,
    /// Open gaps, sorted and disjoint.
    #[serde(default)]
    pub gaps: Vec<Gap>,
    /// Ranges that can no longer be fetched, oldest first, at most [`LOST_HISTORY`].
    #[serde(default)]
    pub lost: Vec<Gap>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateDecodeError {
    #[error("not a feed state record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("feed state format {0} is newer than this version understands ({STATE_FORMAT})")]
    Format(u32),
}

impl FeedState {
    pub fn starting_at(next: Minute) -> FeedState {
        FeedState {
            format: STATE_FORMAT,
            next,
            gaps: Vec::new(),
            lost: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<FeedState, StateDecodeError> {
        let s: FeedState = serde_json::from_slice(bytes)?;
        if s.format > STATE_FORMAT {
            return Err(StateDecodeError::Format(s.format));
        }
        Ok(s)
    }

    /// Records `range` as an open gap, merging with neighbours.
    pub fn add_gap(&mut self, range: MinuteRange, reason: GapReason) {
        let mut merged = Gap {
            first: range.first,
            last: range.last,
            reason,
        };
        self.gaps.retain(|g| {
            let touches = g.first <= merged.last.next() && merged.first <= g.last.next();
            if touches {
                merged.first = merged.first.min(g.first);
                merged.last = merged.last.max(g.last);
            }
            !touches
        });
        let at = self.gaps.partition_point(|g| g.first < merged.first);
        self.gaps.insert(at, merged);
    }

    /// Removes one minute from the open gaps (its batch was published after all).
    pub fn remove_gap_minute(&mut self, m: Minute) -> bool {
        let Some(i) = self.gaps.iter().position(|g| g.range().contains(m)) else {
            return false;
        };
        let g = self.gaps.remove(i);
        if m < g.last {
            self.gaps.insert(
                i,
                Gap {
                    first: m.next(),
                    last: g.last,
                    reason: g.reason,
                },
            );
        }
        if g.first < m {
            self.gaps.insert(
                i,
                Gap {
                    first: g.first,
                    last: m.prev(),
                    reason: g.reason,
                },
            );
        }
        true
    }

    /// Records a range that can no longer be fetched.
    pub fn add_lost(&mut self, range: MinuteRange, reason: GapReason) {
        self.lost.push(Gap {
            first: range.first,
            last: range.last,
            reason,
        });
        if self.lost.len() > LOST_HISTORY {
            let excess = self.lost.len() - LOST_HISTORY;
            self.lost.drain(..excess);
        }
    }

    /// Moves every gap minute older than `oldest` to the lost history; returns what moved.
    pub fn expire_gaps(&mut self, oldest: Minute) -> Vec<MinuteRange> {
        let mut expired = Vec::new();
        let mut kept = Vec::with_capacity(self.gaps.len());
        for g in std::mem::take(&mut self.gaps) {
            if g.first >= oldest {
                kept.push(g);
                continue;
            }
            let gone = MinuteRange::new(g.first, g.last.min(oldest.prev()));
            expired.push((gone, g.reason));
            if g.last >= oldest {
                kept.push(Gap {
                    first: oldest,
                    last: g.last,
                    reason: g.reason,
                });
            }
        }
        self.gaps = kept;
        for (range, reason) in &expired {
            self.add_lost(*range, *reason);
        }
        expired.into_iter().map(|(r, _)| r).collect()
    }

    /// Minutes in open gaps, oldest first.
    pub fn gap_minutes(&self) -> impl Iterator<Item = Minute> + '_ {
        self.gaps.iter().flat_map(|g| g.range().iter())
    }

    pub fn gap_minute_count(&self) -> i64 {
        self.gaps.iter().map(|g| g.range().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Minute {
        Minute::parse(s).unwrap()
    }

    fn r(a: &str, b: &str) -> MinuteRange {
        MinuteRange::new(m(a), m(b))
    }

    fn spans(s: &FeedState) -> Vec<(String, String)> {
        s.gaps
            .iter()
            .map(|g| (g.first.to_string(), g.last.to_string()))
            .collect()
    }

    #[test]
    fn round_trips_through_json() {
        let mut s = FeedState::starting_at(m("202611230900"));
        s.add_gap(r("202611230800", "202611230805"), GapReason::MissingRun);
        s.add_lost(r("202611150000", "202611150010"), GapReason::WindowExpired);
        let bytes = s.encode();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains(r#""next":"202611230900""#), "{text}");
        assert!(text.contains(r#""reason":"missing_run""#), "{text}");
        assert_eq!(FeedState::decode(&bytes).unwrap(), s);
    }

    #[test]
    fn refuses_unknown_formats_and_garbage() {
        assert!(FeedState::decode(b"not json").is_err());
        let e = FeedState::decode(br#"{"format": 9, "next": "202611230900"}"#).unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
    }

    #[test]
    fn gaps_merge_when_they_touch() {
        let mut s = FeedState::starting_at(m("202611231000"));
        s.add_gap(r("202611230900", "202611230901"), GapReason::MissingRun);
        s.add_gap(r("202611230905", "202611230906"), GapReason::MissingRun);
        s.add_gap(r("202611230902", "202611230902"), GapReason::MissingRun);
        assert_eq!(
            spans(&s),
            [
                ("202611230900".into(), "202611230902".into()),
                ("202611230905".into(), "202611230906".into())
            ]
        );
        s.add_gap(r("202611230903", "202611230904"), GapReason::MissingRun);
        assert_eq!(spans(&s), [("202611230900".into(), "202611230906".into())]);
        assert_eq!(s.gap_minute_count(), 7);
    }

    #[test]
    fn removing_a_minute_splits_its_gap() {
        let mut s = FeedState::starting_at(m("202611231000"));
        s.add_gap(r("202611230900", "202611230904"), GapReason::MissingRun);
        assert!(s.remove_gap_minute(m("202611230902")));
        assert_eq!(
            spans(&s),
            [
                ("202611230900".into(), "202611230901".into()),
                ("202611230903".into(), "202611230904".into())
            ]
        );
        assert!(s.remove_gap_minute(m("202611230900")));
        assert!(s.remove_gap_minute(m("202611230904")));
        assert!(!s.remove_gap_minute(m("202611230904")));
        assert_eq!(
            spans(&s),
            [
                ("202611230901".into(), "202611230901".into()),
                ("202611230903".into(), "202611230903".into())
            ]
        );
        assert_eq!(
            s.gap_minutes().map(|x| x.to_string()).collect::<Vec<_>>(),
            ["202611230901", "202611230903"]
        );
    }

    #[test]
    fn expiry_moves_old_gap_minutes_to_lost() {
        let mut s = FeedState::starting_at(m("202611231000"));
        s.add_gap(r("202611160000", "202611160009"), GapReason::MissingRun);
        s.add_gap(r("202611200000", "202611200001"), GapReason::MissingRun);
        let gone = s.expire_gaps(m("202611160005"));
        assert_eq!(gone, vec![r("202611160000", "202611160004")]);
        assert_eq!(
            spans(&s),
            [
                ("202611160005".into(), "202611160009".into()),
                ("202611200000".into(), "202611200001".into())
            ]
        );
        assert_eq!(s.lost.len(), 1);
        assert!(s.expire_gaps(m("202611160005")).is_empty());
    }

    #[test]
    fn lost_history_is_bounded() {
        let mut s = FeedState::starting_at(m("202611231000"));
        for i in 0..(LOST_HISTORY as i64 + 10) {
            let x = m("202601010000").plus(i * 10);
            s.add_lost(MinuteRange::single(x), GapReason::WindowExpired);
        }
        assert_eq!(s.lost.len(), LOST_HISTORY);
        assert_eq!(s.lost[0].first, m("202601010000").plus(100));
    }
}
