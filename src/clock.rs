//! The wall clock, injectable so tests can move time.
//!
//! Everything that depends on the feed's availability window (the worker and
//! the simulator) reads time through a [`Clock`]. [`SystemClock`] is the real
//! one; [`ManualClock`] only moves when a test tells it to, and wakes every
//! task sleeping on it when it does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::watch;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;

    /// Completes once `now() >= deadline`.
    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()>;
}

pub type SharedClock = Arc<dyn Clock>;

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            // Sleep in slices so a wall-clock jump (NTP step, suspend) is noticed.
            loop {
                let now = SystemTime::now();
                let Ok(left) = deadline.duration_since(now) else {
                    return;
                };
                if left.is_zero() {
                    return;
                }
                tokio::time::sleep(left.min(Duration::from_secs(5))).await;
            }
        })
    }
}

/// A clock that only moves when told to.
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<SystemTime>>,
    tick: watch::Sender<SystemTime>,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> ManualClock {
        let (tick, _) = watch::channel(start);
        ManualClock {
            now: Arc::new(Mutex::new(start)),
            tick,
        }
    }

    pub fn set(&self, t: SystemTime) {
        *self.now.lock().expect("clock lock") = t;
        self.tick.send_replace(t);
    }

    pub fn advance(&self, d: Duration) {
        let t = self.now() + d;
        self.set(t);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().expect("clock lock")
    }

    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()> {
        let mut rx = self.tick.subscribe();
        Box::pin(async move {
            // `wait_for` checks the current value first, then every change.
            let _ = rx.wait_for(|now| *now >= deadline).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_when_advanced() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = ManualClock::new(start);
        let sleeper = tokio::spawn(clock.sleep_until(start + Duration::from_secs(60)));
        tokio::task::yield_now().await;
        clock.advance(Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sleeper.is_finished(), "woke before its deadline");
        clock.advance(Duration::from_secs(30));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("sleeper did not wake")
            .unwrap();
        assert_eq!(clock.now(), start + Duration::from_secs(60));
    }

    #[tokio::test]
    async fn past_deadlines_complete_at_once() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(100));
        tokio::time::timeout(
            Duration::from_secs(1),
            clock.sleep_until(SystemTime::UNIX_EPOCH),
        )
        .await
        .unwrap();
        tokio::time::timeout(
            Duration::from_secs(1),
            SystemClock.sleep_until(SystemTime::UNIX_EPOCH),
        )
        .await
        .unwrap();
    }
}
