//! Calling the rescan endpoint for each valid request, within bounds.
//!
//! At most `max_in_flight` calls at once (a semaphore) and at most
//! `max_requests_per_minute` started per minute (a token bucket). Retryable
//! answers — 404 ("task failed or hung"), 429 (honouring `Retry-After`), 5xx,
//! timeouts and connection errors — are retried with exponential backoff and
//! jitter, bounded by `max_attempts` and `retry_deadline`. 401/403 and TLS
//! refusals go through the [`AuthGate`]: below its threshold they are the
//! request's answer; once it closes, the call waits and is made again after
//! the gate reopens (the request is neither rejected nor committed meanwhile).
//! Calls run on tokio; outcomes go back to the consumer thread.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::api::{ApiAnswer, CallError, KtipClient};
use super::gate::{AuthGate, AuthVerdict};
use super::request::RescanUrl;
use crate::feed::fetch::RetryPolicy;
use crate::metrics::RescanMetrics;

/// How a call ended.
#[derive(Debug, Clone)]
pub enum CallOutcome {
    /// A final answer from the API (200, 400, 451, or 401/403 below the gate's threshold, ...).
    Answered { answer: ApiAnswer, attempts: u32 },
    /// The TLS handshake was refused (below the gate's threshold).
    Tls { error: CallError, attempts: u32 },
    /// Retries exhausted; the last failure.
    GaveUp { last: LastFailure, attempts: u32 },
}

#[derive(Debug, Clone)]
pub enum LastFailure {
    Status(ApiAnswer),
    Transport(CallError),
}

impl std::fmt::Display for LastFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LastFailure::Status(a) => write!(f, "HTTP {}", a.status),
            LastFailure::Transport(e) => write!(f, "{e}"),
        }
    }
}

/// Bounds of one call.
#[derive(Debug, Clone, Copy)]
pub struct CallPolicy {
    pub max_attempts: u32,
    pub deadline: Duration,
    pub backoff: RetryPolicy,
}

pub struct Executor {
    client: Arc<KtipClient>,
    gate: Arc<AuthGate>,
    permits: Arc<Semaphore>,
    limiter: DefaultDirectRateLimiter,
    policy: CallPolicy,
    metrics: RescanMetrics,
}

impl Executor {
    pub fn new(
        client: Arc<KtipClient>,
        gate: Arc<AuthGate>,
        max_in_flight: usize,
        per_minute: u32,
        policy: CallPolicy,
        metrics: RescanMetrics,
    ) -> Executor {
        let per_minute = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        // A burst of one second's share (at least 1, at most max_in_flight):
        // no 60-second window sees much more than `per_minute` calls.
        let burst = NonZeroU32::new((per_minute.get() / 60).clamp(1, max_in_flight.max(1) as u32))
            .unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_minute(per_minute).allow_burst(burst);
        Executor {
            client,
            gate,
            permits: Arc::new(Semaphore::new(max_in_flight)),
            limiter: RateLimiter::direct(quota),
            policy,
            metrics,
        }
    }

    pub fn gate(&self) -> &Arc<AuthGate> {
        &self.gate
    }

    /// Makes the call for one request until it has an outcome.
    pub async fn call(&self, url: &RescanUrl) -> CallOutcome {
        let mut attempts = 0u32;
        let mut started = Instant::now();
        let mut delays = self.policy.backoff.delays();
        loop {
            if self.gate.closed_reason().is_some() {
                self.gate.wait_open().await;
                // The pause was not this request's fault: its budget starts again.
                started = Instant::now();
                delays = self.policy.backoff.delays();
            }
            let result = {
                let _permit = self.permits.acquire().await;
                self.limiter.until_ready().await;
                attempts += 1;
                self.metrics.in_flight.inc();
                let t = Instant::now();
                let r = self.client.put_empty(url.expose().clone()).await;
                self.metrics.in_flight.dec();
                self.metrics.observe_call(&r, t.elapsed().as_secs_f64());
                r
            };
            let failure = match result {
                Ok(a) if a.status == 401 || a.status == 403 => {
                    match self.gate.on_auth_failure(&format!("HTTP {}", a.status)) {
                        AuthVerdict::Reject => {
                            return CallOutcome::Answered {
                                answer: a,
                                attempts,
                            };
                        }
                        AuthVerdict::Hold => continue,
                    }
                }
                Ok(a) if is_retryable(a.status) => LastFailure::Status(a),
                Ok(a) => {
                    self.gate.on_success();
                    return CallOutcome::Answered {
                        answer: a,
                        attempts,
                    };
                }
                Err(e @ CallError::Tls(_)) => {
                    match self.gate.on_auth_failure("TLS handshake refused") {
                        AuthVerdict::Reject => return CallOutcome::Tls { error: e, attempts },
                        AuthVerdict::Hold => continue,
                    }
                }
                Err(e) => LastFailure::Transport(e),
            };
            if let LastFailure::Status(_) = failure {
                // The API answered: the credentials work.
                self.gate.on_success();
            }
            let backoff = delays.next().unwrap_or(self.policy.backoff.max);
            let wait = match &failure {
                LastFailure::Status(a) => a.retry_after.map_or(backoff, |r| r.max(backoff)),
                LastFailure::Transport(_) => backoff,
            };
            if attempts >= self.policy.max_attempts
                || started.elapsed() + wait > self.policy.deadline
            {
                warn!(attempts, last = %failure, "rescan call gave up after retries");
                return CallOutcome::GaveUp {
                    last: failure,
                    attempts,
                };
            }
            self.metrics.retries.inc();
            debug!(attempt = attempts, last = %failure, retry_in = ?wait, "rescan call failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// Probes while the gate is closed and reopens it once the API accepts the credentials.
    pub async fn probe_until_open(&self, interval: Duration) {
        let mut rx = self.gate.watch();
        loop {
            if rx.wait_for(Option::is_some).await.is_err() {
                return;
            }
            tokio::time::sleep(interval).await;
            match self.client.probe().await {
                Ok(status) if (200..300).contains(&status) => {
                    tracing::info!("KTIP credentials accepted again; resuming rescan requests");
                    self.gate.reopen();
                }
                Ok(status) => warn!(
                    status,
                    "KTIP credentials still refused; rescan requests stay paused"
                ),
                Err(e) => warn!(error = %e, "KTIP probe failed; rescan requests stay paused"),
            }
        }
    }
}

/// 404 (task failed or hung), 408, 429 and 5xx are worth asking again.
pub fn is_retryable(status: u16) -> bool {
    matches!(status, 404 | 408 | 429) || (500..600).contains(&status)
}
