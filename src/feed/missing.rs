//! Runs of consecutive missing minutes (HTTP 404).
//!
//! One 404 is normal: no batch was generated that minute, so it is skipped.
//! `missing_threshold` consecutive 404s are an error condition; what follows
//! depends on the policy (re-check then record a gap, record a gap at once, or
//! halt), applied by the worker. Once a run has been recorded as a gap, every
//! further 404 of the same run joins the gap directly, so a long outage is
//! waited on once, not once per run. Pure state; no I/O.

use crate::minute::{Minute, MinuteRange};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    range: MinuteRange,
    recorded: bool,
}

/// What to do with a minute that answered 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    /// Below the threshold: skip it.
    Skip,
    /// The run just reached the threshold: raise the condition, apply the policy to this range.
    ThresholdReached(MinuteRange),
    /// The run was already recorded as a gap: add this minute to it.
    ExtendGap(Minute),
}

#[derive(Debug, Clone)]
pub struct MissingRuns {
    threshold: u32,
    run: Option<Run>,
}

impl MissingRuns {
    pub fn new(threshold: u32) -> MissingRuns {
        MissingRuns {
            threshold: threshold.max(1),
            run: None,
        }
    }

    pub fn on_missing(&mut self, m: Minute) -> OnMissing {
        let run = match self.run {
            Some(mut r) if r.range.last.next() == m => {
                r.range.last = m;
                r
            }
            _ => Run {
                range: MinuteRange::single(m),
                recorded: false,
            },
        };
        self.run = Some(run);
        if run.recorded {
            OnMissing::ExtendGap(m)
        } else if run.range.len() == i64::from(self.threshold) {
            OnMissing::ThresholdReached(run.range)
        } else if run.range.len() > i64::from(self.threshold) {
            // Only reachable if the policy chose to walk on without recording.
            OnMissing::ThresholdReached(run.range)
        } else {
            OnMissing::Skip
        }
    }

    /// A batch was found: the run (if any) ends. Returns it when it had raised the condition.
    pub fn on_present(&mut self) -> Option<MinuteRange> {
        self.run
            .take()
            .filter(|r| r.range.len() >= i64::from(self.threshold))
            .map(|r| r.range)
    }

    /// The current run was recorded as a gap.
    pub fn mark_recorded(&mut self) {
        if let Some(r) = &mut self.run {
            r.recorded = true;
        }
    }

    /// Forgets the run (the worker jumped elsewhere).
    pub fn reset(&mut self) {
        self.run = None;
    }

    /// Length of the current run of consecutive missing minutes.
    pub fn run_len(&self) -> i64 {
        self.run.map_or(0, |r| r.range.len())
    }

    /// Whether the error condition is raised (run at or over the threshold).
    pub fn raised(&self) -> bool {
        self.run_len() >= i64::from(self.threshold)
    }

    pub fn run(&self) -> Option<MinuteRange> {
        self.run.map(|r| r.range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(i: i64) -> Minute {
        Minute::parse("202611230900").unwrap().plus(i)
    }

    #[test]
    fn single_missing_minutes_are_skipped() {
        let mut runs = MissingRuns::new(2);
        assert_eq!(runs.on_missing(m(0)), OnMissing::Skip);
        assert!(!runs.raised());
        assert_eq!(runs.on_present(), None);
        assert_eq!(runs.on_missing(m(2)), OnMissing::Skip);
        assert_eq!(runs.run_len(), 1);
    }

    #[test]
    fn threshold_consecutive_misses_raise_the_condition() {
        let mut runs = MissingRuns::new(3);
        assert_eq!(runs.on_missing(m(0)), OnMissing::Skip);
        assert_eq!(runs.on_missing(m(1)), OnMissing::Skip);
        assert_eq!(
            runs.on_missing(m(2)),
            OnMissing::ThresholdReached(MinuteRange::new(m(0), m(2)))
        );
        assert!(runs.raised());
        assert_eq!(runs.on_present(), Some(MinuteRange::new(m(0), m(2))));
        assert!(!runs.raised());
    }

    #[test]
    fn non_consecutive_misses_start_a_new_run() {
        let mut runs = MissingRuns::new(2);
        runs.on_missing(m(0));
        assert_eq!(runs.on_missing(m(5)), OnMissing::Skip);
        assert_eq!(runs.run(), Some(MinuteRange::single(m(5))));
    }

    #[test]
    fn a_recorded_run_extends_its_gap() {
        let mut runs = MissingRuns::new(2);
        runs.on_missing(m(0));
        assert!(matches!(
            runs.on_missing(m(1)),
            OnMissing::ThresholdReached(_)
        ));
        runs.mark_recorded();
        assert_eq!(runs.on_missing(m(2)), OnMissing::ExtendGap(m(2)));
        assert_eq!(runs.on_missing(m(3)), OnMissing::ExtendGap(m(3)));
        assert_eq!(runs.run_len(), 4);
        assert_eq!(runs.on_present(), Some(MinuteRange::new(m(0), m(3))));
        assert_eq!(runs.on_missing(m(5)), OnMissing::Skip);
    }

    #[test]
    fn threshold_of_one_raises_on_the_first_miss() {
        let mut runs = MissingRuns::new(1);
        assert_eq!(
            runs.on_missing(m(0)),
            OnMissing::ThresholdReached(MinuteRange::single(m(0)))
        );
    }
}
