//! The send decisions, as plain functions of a subscription's state and the clock: what a
//! worker does next, when a heartbeat is due, whether a batch waits, how long a retry waits,
//! and which status a failure leads to. Kept apart from SQL and channels so they are
//! tested on their own.

use chrono::{DateTime, Utc};
use std::time::Duration;

use crate::config::DeliveryConfig;
use crate::fhir::subscription::Status;

/// Failure thresholds and retry timing, from `[delivery]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendPolicy {
    pub(crate) max_attempts: i32,
    pub(crate) error_after: i32,
    pub(crate) off_after: i32,
    pub(crate) retry_initial_ms: u64,
    pub(crate) retry_max_ms: u64,
    pub(crate) batch_window: chrono::Duration,
    pub(crate) default_timeout: Duration,
}

impl From<&DeliveryConfig> for SendPolicy {
    fn from(d: &DeliveryConfig) -> Self {
        SendPolicy {
            max_attempts: d.max_attempts,
            error_after: d.error_after_failures,
            off_after: d.off_after_failures,
            retry_initial_ms: d.retry_initial_ms,
            retry_max_ms: d.retry_max_ms,
            batch_window: chrono::Duration::milliseconds(d.batch_window_ms as i64),
            default_timeout: d.default_timeout(),
        }
    }
}

/// Whether a batch of pending events goes out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Batch {
    Send,
    /// Fewer than maxCount events are ready and the batch window is still open.
    WaitUntil(DateTime<Utc>),
}

impl SendPolicy {
    /// The subscription's `timeout` when it sets one, else the default.
    pub(crate) fn timeout(&self, subscription_timeout: Option<i32>) -> Duration {
        subscription_timeout
            .filter(|t| *t > 0)
            .map(|t| Duration::from_secs(t as u64))
            .unwrap_or(self.default_timeout)
    }

    /// At most `maxCount` events per notification (1 when the subscription sets none).
    pub(crate) fn max_count(max_count: Option<i32>) -> i64 {
        i64::from(max_count.filter(|m| *m > 0).unwrap_or(1))
    }

    /// A full batch goes at once; a partial one waits for the window from its oldest event.
    pub(crate) fn batch(
        &self,
        ready: usize,
        max: i64,
        oldest_queued: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Batch {
        let until = oldest_queued + self.batch_window;
        if (ready as i64) < max && until > now {
            Batch::WaitUntil(until)
        } else {
            Batch::Send
        }
    }

    /// Exponential backoff with jitter: initial × 2^failures, capped, times `jitter` in
    /// [0.5, 1].
    pub(crate) fn backoff(&self, failures: i32, jitter: f64) -> Duration {
        let exp = 2u64.saturating_pow(failures.clamp(0, 30) as u32);
        let ms = self
            .retry_initial_ms
            .saturating_mul(exp)
            .min(self.retry_max_ms);
        Duration::from_millis((ms as f64 * jitter.clamp(0.5, 1.0)) as u64)
    }

    /// The delay before a retry: the backoff, or longer when the endpoint's `Retry-After`
    /// asks for it (at most an hour, so a bad header cannot park a subscription for days).
    pub(crate) fn retry_delay(&self, backoff: Duration, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(r) => backoff.max(r.min(Duration::from_secs(3600))),
            None => backoff,
        }
    }

    /// The status after one more consecutive failure: `error` from `error_after` (at once
    /// for a permanent refusal), `off` from `off_after`, else unchanged.
    pub(crate) fn status_after_failure(
        &self,
        failures_before: i32,
        status: Status,
        permanent: bool,
    ) -> Status {
        let failures = failures_before.saturating_add(1);
        if failures >= self.off_after {
            Status::Off
        } else if permanent || failures >= self.error_after {
            Status::Error
        } else {
            status
        }
    }
}

/// A heartbeat is due when the subscription has a `heartbeatPeriod` and nothing went out
/// for that long.
pub(crate) fn heartbeat_due(
    period: Option<i32>,
    last_sent: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    match period.filter(|p| *p > 0) {
        None => false,
        Some(p) => last_sent.is_none_or(|t| t + chrono::Duration::seconds(i64::from(p)) <= now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SendPolicy {
        SendPolicy::from(&DeliveryConfig::default())
    }

    #[test]
    fn failures_turn_error_then_off() {
        let p = policy();
        assert_eq!((p.error_after, p.off_after), (3, 50));
        assert_eq!(
            p.status_after_failure(0, Status::Active, false),
            Status::Active
        );
        assert_eq!(
            p.status_after_failure(1, Status::Active, false),
            Status::Active
        );
        assert_eq!(
            p.status_after_failure(2, Status::Active, false),
            Status::Error
        );
        assert_eq!(
            p.status_after_failure(48, Status::Error, false),
            Status::Error
        );
        assert_eq!(
            p.status_after_failure(49, Status::Error, false),
            Status::Off
        );
        // A 4xx refusal: error at the first failure, off still at off_after.
        assert_eq!(
            p.status_after_failure(0, Status::Active, true),
            Status::Error
        );
        assert_eq!(p.status_after_failure(49, Status::Error, true), Status::Off);
    }

    #[test]
    fn retry_after_lengthens_the_backoff_never_shortens_it() {
        let p = policy();
        let b = Duration::from_millis(500);
        assert_eq!(p.retry_delay(b, None), b);
        assert_eq!(
            p.retry_delay(b, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(p.retry_delay(b, Some(Duration::ZERO)), b);
        assert_eq!(
            p.retry_delay(b, Some(Duration::from_secs(86_400))),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let p = policy();
        assert_eq!(p.backoff(0, 1.0), Duration::from_millis(500));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(4000));
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(2000));
        assert_eq!(p.backoff(60, 1.0), Duration::from_millis(300_000));
    }

    #[test]
    fn partial_batches_wait_for_the_window_full_ones_do_not() {
        let mut p = policy();
        let now = Utc::now();
        assert_eq!(
            p.batch(1, 10, now, now),
            Batch::Send,
            "no window configured"
        );
        p.batch_window = chrono::Duration::milliseconds(500);
        let until = now + chrono::Duration::milliseconds(500);
        assert_eq!(p.batch(1, 10, now, now), Batch::WaitUntil(until));
        assert_eq!(p.batch(10, 10, now, now), Batch::Send);
        assert_eq!(p.batch(1, 10, now, until), Batch::Send, "window closed");
        assert_eq!(SendPolicy::max_count(None), 1);
        assert_eq!(SendPolicy::max_count(Some(0)), 1);
        assert_eq!(SendPolicy::max_count(Some(100)), 100);
    }

    #[test]
    fn heartbeats() {
        let now = Utc::now();
        let ago = |s| Some(now - chrono::Duration::seconds(s));
        assert!(!heartbeat_due(None, None, now));
        assert!(!heartbeat_due(Some(0), None, now));
        assert!(heartbeat_due(Some(10), None, now));
        assert!(!heartbeat_due(Some(10), ago(9), now));
        assert!(heartbeat_due(Some(10), ago(10), now));
    }

    #[test]
    fn timeouts() {
        let p = policy();
        assert_eq!(p.timeout(None), Duration::from_secs(10));
        assert_eq!(p.timeout(Some(0)), Duration::from_secs(10));
        assert_eq!(p.timeout(Some(3)), Duration::from_secs(3));
    }
}
