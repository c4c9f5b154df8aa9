//! The credentials gate: pause instead of rejecting the whole backlog.
//!
//! One 401/403 (or TLS refusal) may concern one request; `threshold`
//! consecutive ones mean the credentials or the certificate are wrong for
//! every request. Then the gate closes: calls wait at the gate instead of
//! being rejected, the consumer stops taking requests (without committing
//! them), and a probe reopens the gate when the credentials work again. Any
//! other answer from the API resets the count.

use std::sync::Mutex;

use tokio::sync::watch;

/// What to do with a request that met an authentication failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVerdict {
    /// Below the threshold: the failure concerns this request; report it.
    Reject,
    /// The gate is (now) closed: hold the request and call again after it reopens.
    Hold,
}

#[derive(Debug)]
struct Count {
    consecutive: u32,
}

#[derive(Debug)]
pub struct AuthGate {
    threshold: u32,
    count: Mutex<Count>,
    /// `Some(reason)` while closed.
    closed: watch::Sender<Option<String>>,
}

impl AuthGate {
    pub fn new(threshold: u32) -> AuthGate {
        AuthGate {
            threshold: threshold.max(1),
            count: Mutex::new(Count { consecutive: 0 }),
            closed: watch::channel(None).0,
        }
    }

    /// Records a 401/403/TLS refusal described by `reason`.
    pub fn on_auth_failure(&self, reason: &str) -> AuthVerdict {
        let mut c = self.count.lock().expect("gate lock");
        if self.closed.borrow().is_some() {
            return AuthVerdict::Hold;
        }
        c.consecutive += 1;
        if c.consecutive >= self.threshold {
            let why = format!(
                "{} consecutive authentication failures, the last: {reason}",
                c.consecutive
            );
            self.closed.send_replace(Some(why));
            AuthVerdict::Hold
        } else {
            AuthVerdict::Reject
        }
    }

    /// Records an answer that proves the credentials work.
    pub fn on_success(&self) {
        let mut c = self.count.lock().expect("gate lock");
        if self.closed.borrow().is_none() {
            c.consecutive = 0;
        }
    }

    /// Reopens the gate (a probe succeeded).
    pub fn reopen(&self) {
        let mut c = self.count.lock().expect("gate lock");
        c.consecutive = 0;
        self.closed.send_replace(None);
    }

    /// Why the gate is closed, if it is.
    pub fn closed_reason(&self) -> Option<String> {
        self.closed.borrow().clone()
    }

    /// Completes once the gate is open.
    pub async fn wait_open(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(Option::is_none).await;
    }

    /// Changes of the gate, for the consumer and the probe.
    pub fn watch(&self) -> watch::Receiver<Option<String>> {
        self.closed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn closes_after_the_threshold_and_holds_from_then_on() {
        let g = AuthGate::new(3);
        assert_eq!(g.on_auth_failure("401"), AuthVerdict::Reject);
        assert_eq!(g.on_auth_failure("401"), AuthVerdict::Reject);
        assert!(g.closed_reason().is_none());
        assert_eq!(g.on_auth_failure("403"), AuthVerdict::Hold);
        assert!(g.closed_reason().unwrap().contains("3 consecutive"));
        assert_eq!(g.on_auth_failure("401"), AuthVerdict::Hold);
        g.on_success();
        assert!(g.closed_reason().is_some(), "only a probe reopens the gate");
        g.reopen();
        assert!(g.closed_reason().is_none());
        assert_eq!(
            g.on_auth_failure("401"),
            AuthVerdict::Reject,
            "count starts again"
        );
    }

    #[test]
    fn a_success_resets_the_count() {
        let g = AuthGate::new(2);
        assert_eq!(g.on_auth_failure("401"), AuthVerdict::Reject);
        g.on_success();
        assert_eq!(g.on_auth_failure("401"), AuthVerdict::Reject);
        assert_eq!(g.on_auth_failure("401"), AuthVerdict::Hold);
    }

    #[tokio::test]
    async fn waiters_pass_when_the_gate_reopens() {
        let g = std::sync::Arc::new(AuthGate::new(1));
        g.on_auth_failure("401");
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.wait_open().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        g.reopen();
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
