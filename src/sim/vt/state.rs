//! The simulator's mutable state: runtime changes to missing minutes,
//! per-minute attempt counters (for faults) and the counters reported by
//! `GET /_sim/stats`.
//!
//! One std `Mutex` for all of it: no await happens while it is held and
//! every operation is a few map updates.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::minute::{Minute, MinuteRange};

use super::faults::FaultKind;
use super::faults::Side;

/// At most this many credential-carrying download requests are kept in detail.
const MAX_LEAKS_KEPT: usize = 100;

/// Counters of everything the simulator answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FeedSimStats {
    /// API requests by HTTP status (control requests under `/_sim/` excluded).
    pub api_requests_by_status: BTreeMap<u16, u64>,
    /// Download requests by HTTP status.
    pub download_requests_by_status: BTreeMap<u16, u64>,
    /// Downloads served in full and undamaged.
    pub downloads: u64,
    /// Download requests that carried `x-apikey` or `Authorization`: must stay 0.
    pub download_requests_with_credentials: u64,
    /// The first of those requests, for the assertion message.
    pub credential_leaks: Vec<CredentialLeak>,
    /// Transport faults injected, by kind name (`503`, `truncated`, ...).
    pub faults_injected: BTreeMap<String, u64>,
    /// Batches generated (not read from a cache).
    pub batches_generated: u64,
    /// Batches read from the on-disk cache.
    pub batches_read_from_disk: u64,
}

impl FeedSimStats {
    pub fn api_requests(&self, status: u16) -> u64 {
        self.api_requests_by_status
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    pub fn download_requests(&self, status: u16) -> u64 {
        self.download_requests_by_status
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    pub fn faults(&self, kind: FaultKind) -> u64 {
        self.faults_injected.get(kind.name()).copied().unwrap_or(0)
    }
}

/// A download request that carried credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CredentialLeak {
    pub path: String,
    /// Names of the credential headers present (never their values).
    pub headers: Vec<String>,
}

/// How many times a minute was asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MinuteAttempts {
    pub api: u32,
    pub download: u32,
}

#[derive(Default)]
struct Inner {
    /// Runtime overrides of the configured missing set; the last matching entry wins.
    missing_overrides: Vec<(MinuteRange, bool)>,
    attempts: HashMap<Minute, MinuteAttempts>,
    stats: FeedSimStats,
}

#[derive(Default)]
pub struct SimState {
    inner: Mutex<Inner>,
}

impl SimState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only counters behind: keep going.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn set_missing(&self, range: MinuteRange, missing: bool) {
        self.lock().missing_overrides.push((range, missing));
    }

    /// The runtime override for `m`, if one was set.
    pub fn missing_override(&self, m: Minute) -> Option<bool> {
        let inner = self.lock();
        inner
            .missing_overrides
            .iter()
            .rev()
            .find(|(r, _)| r.contains(m))
            .map(|(_, missing)| *missing)
    }

    /// Counts one more request at `m` and returns its 1-based attempt number.
    pub fn next_attempt(&self, side: Side, m: Minute) -> u32 {
        let mut inner = self.lock();
        let a = inner.attempts.entry(m).or_default();
        let n = match side {
            Side::Api => &mut a.api,
            Side::Download => &mut a.download,
        };
        *n += 1;
        *n
    }

    pub fn attempts(&self, m: Minute) -> MinuteAttempts {
        self.lock().attempts.get(&m).copied().unwrap_or_default()
    }

    pub fn count_response(&self, side: Side, status: u16) {
        let mut inner = self.lock();
        let by_status = match side {
            Side::Api => &mut inner.stats.api_requests_by_status,
            Side::Download => &mut inner.stats.download_requests_by_status,
        };
        *by_status.entry(status).or_default() += 1;
    }

    pub fn count_fault(&self, kind: FaultKind) {
        *self
            .lock()
            .stats
            .faults_injected
            .entry(kind.name().to_string())
            .or_default() += 1;
    }

    pub fn count_download(&self) {
        self.lock().stats.downloads += 1;
    }

    pub fn count_generated(&self, from_disk: bool) {
        let mut inner = self.lock();
        if from_disk {
            inner.stats.batches_read_from_disk += 1;
        } else {
            inner.stats.batches_generated += 1;
        }
    }

    pub fn record_leak(&self, leak: CredentialLeak) {
        let mut inner = self.lock();
        inner.stats.download_requests_with_credentials += 1;
        if inner.stats.credential_leaks.len() < MAX_LEAKS_KEPT {
            inner.stats.credential_leaks.push(leak);
        }
    }

    pub fn stats(&self) -> FeedSimStats {
        self.lock().stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_missing_override_wins() {
        let state = SimState::default();
        let a = Minute::parse("202611230900").unwrap();
        assert_eq!(state.missing_override(a), None);
        state.set_missing(MinuteRange::new(a, a.plus(5)), true);
        state.set_missing(MinuteRange::single(a.plus(2)), false);
        assert_eq!(state.missing_override(a), Some(true));
        assert_eq!(state.missing_override(a.plus(2)), Some(false));
        assert_eq!(state.missing_override(a.plus(6)), None);
    }

    #[test]
    fn attempts_are_counted_per_side_and_minute() {
        let state = SimState::default();
        let a = Minute::parse("202611230900").unwrap();
        assert_eq!(state.next_attempt(Side::Api, a), 1);
        assert_eq!(state.next_attempt(Side::Api, a), 2);
        assert_eq!(state.next_attempt(Side::Download, a), 1);
        assert_eq!(state.next_attempt(Side::Api, a.next()), 1);
        assert_eq!(
            state.attempts(a),
            MinuteAttempts {
                api: 2,
                download: 1
            }
        );
    }

    #[test]
    fn stats_serialise_with_status_keys() {
        let state = SimState::default();
        state.count_response(Side::Api, 302);
        state.count_response(Side::Api, 302);
        state.count_fault(FaultKind::Unavailable);
        let json = serde_json::to_value(state.stats()).unwrap();
        assert_eq!(json["api_requests_by_status"]["302"], 2);
        assert_eq!(json["faults_injected"]["503"], 1);
        assert_eq!(state.stats().faults(FaultKind::Unavailable), 1);
    }
}
