//! This process's recent send attempts, in memory, for the console: the last
//! [`PER_SUBSCRIPTION`] per subscription (when, what, the receiver's status code, how long)
//! and a count of event notifications accepted. Kept in memory on purpose: a row per attempt
//! would be exactly the per-notification write the cursor design removed from the store's
//! database. So it starts empty when the process starts, and with several `deliver`
//! instances each console shows the attempts of its own instance.

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::channel::{Accepted, SendError};
use crate::fhir::notification::Kind;

/// Attempts kept per subscription.
pub(crate) const PER_SUBSCRIPTION: usize = 20;

/// Subscriptions kept; beyond it the journal stops taking new subscriptions (memory stays
/// bounded: about 2.5 KB per subscription).
const MAX_SUBSCRIPTIONS: usize = 50_000;

/// One send of a notification. References and numbers only: never the Bundle.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Attempt {
    pub(crate) at: DateTime<Utc>,
    /// `event-notification`, `handshake` or `heartbeat`.
    pub(crate) kind: &'static str,
    /// The eventNumbers carried, first and last (none for a handshake or heartbeat).
    pub(crate) first_event: Option<i64>,
    pub(crate) last_event: Option<i64>,
    pub(crate) ok: bool,
    /// The HTTP status (rest-hook, message), accepted or not.
    pub(crate) status_code: Option<u16>,
    pub(crate) duration_ms: f64,
    /// Why it failed, as `$status` says it (the receiver's answer, never the payload).
    pub(crate) error: Option<String>,
}

#[derive(Default)]
pub struct Journal {
    attempts: Mutex<HashMap<String, VecDeque<Attempt>>>,
    sent: AtomicU64,
}

impl Journal {
    /// Records a send of `kind` carrying `events` that took `took`. A websocket send with
    /// no client bound is not an attempt (the events wait for a bind) and is not recorded.
    pub(crate) fn record(
        &self,
        subscription: &str,
        kind: Kind,
        events: &[i64],
        took: Duration,
        outcome: &Result<Accepted, SendError>,
    ) {
        if matches!(outcome, Err(SendError::NoListener)) {
            return;
        }
        if outcome.is_ok() && kind == Kind::EventNotification {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
        let a = Attempt {
            at: Utc::now(),
            kind: kind.as_str(),
            first_event: events.first().copied(),
            last_event: events.last().copied(),
            ok: outcome.is_ok(),
            status_code: match outcome {
                Ok(acc) => acc.status,
                Err(SendError::Status(code, _)) => Some(*code),
                Err(_) => None,
            },
            duration_ms: took.as_secs_f64() * 1000.0,
            error: outcome.as_ref().err().map(|e| e.to_string()),
        };
        let mut all = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        if !all.contains_key(subscription) && all.len() >= MAX_SUBSCRIPTIONS {
            return;
        }
        // The key is allocated only the first time a subscription is seen.
        if !all.contains_key(subscription) {
            all.insert(
                subscription.to_string(),
                VecDeque::with_capacity(PER_SUBSCRIPTION),
            );
        }
        let Some(list) = all.get_mut(subscription) else {
            return;
        };
        if list.len() == PER_SUBSCRIPTION {
            list.pop_front();
        }
        list.push_back(a);
    }

    /// The subscription's last attempts, newest first.
    pub(crate) fn last(&self, subscription: &str) -> Vec<Attempt> {
        let all = self.attempts.lock().unwrap_or_else(|e| e.into_inner());
        all.get(subscription)
            .map(|l| l.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Event notifications accepted by receivers since the process started.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_twenty_newest_first_and_counts_accepted_event_notifications() {
        let j = Journal::default();
        let ms = Duration::from_millis(3);
        for n in 1..=25 {
            j.record(
                "s",
                Kind::EventNotification,
                &[n],
                ms,
                &Ok(Accepted { status: Some(200) }),
            );
        }
        j.record(
            "s",
            Kind::EventNotification,
            &[26, 27],
            ms,
            &Err(SendError::Status(503, None)),
        );
        j.record("s", Kind::Heartbeat, &[], ms, &Ok(Accepted::default()));
        j.record(
            "s",
            Kind::EventNotification,
            &[26],
            ms,
            &Err(SendError::NoListener),
        );
        let last = j.last("s");
        assert_eq!(last.len(), PER_SUBSCRIPTION);
        assert_eq!(last[0].kind, "heartbeat");
        assert_eq!(last[1].status_code, Some(503));
        assert!(!last[1].ok);
        assert_eq!(
            (last[1].first_event, last[1].last_event),
            (Some(26), Some(27))
        );
        assert_eq!(last[1].error.as_deref(), Some("endpoint answered HTTP 503"));
        assert_eq!(last[2].first_event, Some(25));
        assert_eq!(last[19].first_event, Some(8), "the oldest ones went");
        assert_eq!(j.sent(), 25, "accepted event notifications only");
        assert!(j.last("other").is_empty());
    }
}
