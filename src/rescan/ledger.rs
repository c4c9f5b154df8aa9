//! Which requests of each partition are finished, in offset order.
//!
//! Requests finish out of order (API calls take different times), but a
//! consumer offset can only say "everything before here is done". So per
//! partition only the contiguous run of finished requests from the oldest
//! unfinished one is committable, together with exactly their results; later
//! results wait. Offsets are those received, which need not be consecutive
//! (transaction markers and compaction leave holes). Pure; no I/O.

use std::collections::{BTreeMap, HashMap};

/// Finished-or-not state of every request taken and not yet committed.
#[derive(Debug)]
pub struct Ledger<T> {
    partitions: HashMap<i32, BTreeMap<i64, Option<T>>>,
}

impl<T> Default for Ledger<T> {
    fn default() -> Self {
        Ledger {
            partitions: HashMap::new(),
        }
    }
}

impl<T> Ledger<T> {
    /// Starts tracking a request whose outcome is not known yet.
    pub fn pending(&mut self, partition: i32, offset: i64) {
        self.partitions
            .entry(partition)
            .or_default()
            .insert(offset, None);
    }

    /// Records an outcome; `false` if the request is not tracked (its
    /// partition was revoked meanwhile), in which case the outcome is dropped.
    pub fn finish(&mut self, partition: i32, offset: i64, outcome: T) -> bool {
        match self
            .partitions
            .get_mut(&partition)
            .and_then(|p| p.get_mut(&offset))
        {
            Some(slot) => {
                *slot = Some(outcome);
                true
            }
            None => false,
        }
    }

    /// Tracks a request that finished as soon as it arrived.
    pub fn finished(&mut self, partition: i32, offset: i64, outcome: T) {
        self.partitions
            .entry(partition)
            .or_default()
            .insert(offset, Some(outcome));
    }

    /// Forgets a partition (revoked); returns how many unfinished requests it held.
    pub fn forget(&mut self, partition: i32) -> usize {
        self.partitions
            .remove(&partition)
            .map_or(0, |p| p.values().filter(|s| s.is_none()).count())
    }

    /// Per partition, the committable run: finished outcomes from the oldest
    /// tracked request up to the first unfinished one.
    pub fn committable(&self) -> Vec<(i32, Vec<(i64, &T)>)> {
        let mut out = Vec::new();
        for (p, slots) in &self.partitions {
            let run: Vec<(i64, &T)> = slots
                .iter()
                .map_while(|(o, s)| s.as_ref().map(|t| (*o, t)))
                .collect();
            if !run.is_empty() {
                out.push((*p, run));
            }
        }
        out.sort_by_key(|(p, _)| *p);
        out
    }

    /// Drops every request of `partition` up to and including `offset` (committed).
    pub fn committed(&mut self, partition: i32, offset: i64) {
        if let Some(slots) = self.partitions.get_mut(&partition) {
            let rest = slots.split_off(&(offset + 1));
            *slots = rest;
        }
    }

    /// Requests tracked and not yet committed.
    pub fn len(&self) -> usize {
        self.partitions.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Requests still waiting for an outcome.
    pub fn unfinished(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.values().filter(|s| s.is_none()).count())
            .sum()
    }

    /// Finished requests waiting to be committed.
    pub fn finished_count(&self) -> usize {
        self.len() - self.unfinished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(l: &Ledger<&'static str>) -> Vec<(i32, Vec<(i64, &'static str)>)> {
        l.committable()
            .into_iter()
            .map(|(p, r)| (p, r.into_iter().map(|(o, t)| (o, *t)).collect()))
            .collect()
    }

    #[test]
    fn only_the_contiguous_finished_run_is_committable() {
        let mut l = Ledger::default();
        for o in [10, 11, 13, 14] {
            l.pending(0, o);
        }
        assert!(l.finish(0, 11, "b"));
        assert!(l.finish(0, 14, "d"));
        assert!(run(&l).is_empty(), "offset 10 is still open");
        assert!(l.finish(0, 10, "a"));
        assert_eq!(run(&l), vec![(0, vec![(10, "a"), (11, "b")])]);
        l.committed(0, 11);
        assert!(run(&l).is_empty());
        assert!(l.finish(0, 13, "c"));
        assert_eq!(run(&l), vec![(0, vec![(13, "c"), (14, "d")])]);
        assert_eq!(l.len(), 2);
        l.committed(0, 14);
        assert!(l.is_empty());
    }

    #[test]
    fn partitions_are_independent() {
        let mut l = Ledger::default();
        l.pending(0, 1);
        l.finished(1, 7, "x");
        l.pending(1, 8);
        assert_eq!(run(&l), vec![(1, vec![(7, "x")])]);
        assert_eq!((l.unfinished(), l.finished_count()), (2, 1));
    }

    #[test]
    fn outcomes_of_revoked_partitions_are_dropped() {
        let mut l = Ledger::default();
        l.pending(3, 5);
        l.pending(3, 6);
        l.finished(3, 4, "done");
        assert_eq!(l.forget(3), 2);
        assert!(
            !l.finish(3, 5, "late"),
            "a revoked partition takes no outcome"
        );
        assert!(l.is_empty());
    }
}
