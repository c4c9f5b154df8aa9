//! Fetching minutes ahead of the publisher, with retries.
//!
//! Downloads are I/O bound, so several minutes are fetched at once
//! (`feed.prefetch`) while batches are still handed over strictly in minute
//! order. Transient failures (429, 5xx, timeouts, network, short downloads)
//! are retried here with exponential backoff and jitter, honouring
//! `Retry-After`; only a result the walker must act on comes back: a batch,
//! a 404, `NotAvailableYet`, or a permanent error. Memory: at most
//! `prefetch` spools, each holding at most `spool_memory_bytes` in RAM.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use super::api::{FeedClient, FetchError, Fetched};
use crate::metrics::FeedMetrics;
use crate::minute::Minute;

/// Exponential backoff with jitter between `initial` and `max`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    pub fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        let max = self.max;
        backoff.chain(std::iter::repeat(max))
    }
}

/// Fetches one minute, retrying transient failures until it gets an answer.
pub async fn fetch_with_retry(
    client: &FeedClient,
    minute: Minute,
    policy: RetryPolicy,
    metrics: &FeedMetrics,
) -> Result<Fetched, FetchError> {
    let mut delays = policy.delays();
    let mut attempt: u32 = 0;
    loop {
        let error = match client.fetch(minute).await {
            Ok(fetched) => {
                if let Fetched::Batch { spool, .. } = &fetched {
                    metrics.downloaded_bytes.inc_by(spool.len());
                }
                return Ok(fetched);
            }
            Err(e) if e.is_permanent() => return Err(e),
            Err(e) => e,
        };
        attempt += 1;
        metrics
            .fetch_retries
            .with_label_values(&[error.retry_cause()])
            .inc();
        metrics.batches.with_label_values(&["retried"]).inc();
        let backoff = delays.next().unwrap_or(policy.max);
        let delay = error.retry_after().map_or(backoff, |ra| ra.max(backoff));
        if attempt.is_multiple_of(10) {
            error!(batch = %minute, attempt, error = %error, retry_in = ?delay, "batch still failing; retrying");
        } else {
            warn!(batch = %minute, attempt, error = %error, retry_in = ?delay, "batch fetch failed; retrying");
        }
        tokio::time::sleep(delay).await;
    }
}

/// Minutes being fetched ahead, in order.
pub struct Prefetcher {
    client: Arc<FeedClient>,
    policy: RetryPolicy,
    metrics: FeedMetrics,
    depth: usize,
    inflight: BTreeMap<Minute, JoinHandle<Result<Fetched, FetchError>>>,
}

impl Prefetcher {
    pub fn new(
        client: Arc<FeedClient>,
        policy: RetryPolicy,
        metrics: FeedMetrics,
        depth: usize,
    ) -> Prefetcher {
        Prefetcher {
            client,
            policy,
            metrics,
            depth: depth.max(1),
            inflight: BTreeMap::new(),
        }
    }

    /// Starts fetching `from` and the minutes after it, up to `newest` and the prefetch depth.
    pub fn fill(&mut self, from: Minute, newest: Minute) {
        let stale: Vec<Minute> = self.inflight.range(..from).map(|(m, _)| *m).collect();
        for m in stale {
            if let Some(h) = self.inflight.remove(&m) {
                h.abort();
            }
        }
        let mut m = from;
        while m <= newest && from.minutes_until(m) < self.depth as i64 {
            if !self.inflight.contains_key(&m) {
                let handle = self.spawn(m);
                self.inflight.insert(m, handle);
            }
            m = m.next();
        }
    }

    fn spawn(&self, m: Minute) -> JoinHandle<Result<Fetched, FetchError>> {
        let (client, policy, metrics) = (self.client.clone(), self.policy, self.metrics.clone());
        tokio::spawn(async move { fetch_with_retry(&client, m, policy, &metrics).await })
    }

    /// The result for `minute` (fetched now if it was not prefetched).
    pub async fn take(&mut self, minute: Minute) -> Result<Fetched, FetchError> {
        let handle = match self.inflight.remove(&minute) {
            Some(h) => h,
            None => self.spawn(minute),
        };
        match handle.await {
            Ok(result) => result,
            Err(e) => Err(FetchError::Network {
                origin: "fetch task".into(),
                detail: e.to_string(),
            }),
        }
    }

    /// Cancels every fetch in flight (the walker is going elsewhere).
    pub fn clear(&mut self) {
        for (_, h) in std::mem::take(&mut self.inflight) {
            h.abort();
        }
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_capped() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let d: Vec<Duration> = p.delays().take(20).collect();
        assert!(
            d[0] >= Duration::from_millis(100) && d[0] <= Duration::from_millis(200),
            "{d:?}"
        );
        assert!(
            d.iter().all(|x| *x <= Duration::from_secs(4)),
            "jitter at most doubles: {d:?}"
        );
        assert!(d[19] >= Duration::from_secs(2), "reaches the cap: {d:?}");
    }
}
