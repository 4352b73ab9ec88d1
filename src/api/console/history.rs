//! The console's last hour, a point per minute: events queued (from the queue's event ids,
//! so every capture instance counts), event notifications this process sent (from its
//! journal) and the slot's lag (the most seen in the minute). Sampled every
//! [`SAMPLE_EVERY`] by reads only: nothing is written for it. It starts empty with the
//! process.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::Config;
use crate::delivery::journal::Journal;
use crate::queue;

pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const MINUTES: usize = 60;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Minute {
    pub(crate) at: DateTime<Utc>,
    pub(crate) events_queued: u64,
    pub(crate) notifications_sent: u64,
    pub(crate) slot_lag_bytes: u64,
}

/// One reading of the counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    last_event_id: i64,
    sent: u64,
}

#[derive(Default)]
pub(crate) struct History {
    minutes: Mutex<VecDeque<Minute>>,
    last: Mutex<Option<Sample>>,
}

impl History {
    /// The last hour, oldest first.
    pub(crate) fn minutes(&self) -> Vec<Minute> {
        let m = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().cloned().collect()
    }

    /// Adds a reading taken at `at`: the growth since the previous one goes to `at`'s
    /// minute (the first reading only sets the baseline).
    fn add(&self, at: DateTime<Utc>, s: Sample, lag: u64) {
        let prev = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(s);
        let minute = at.duration_trunc(TimeDelta::minutes(1)).unwrap_or(at);
        let mut m = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        if m.back().map(|b| b.at) != Some(minute) {
            m.push_back(Minute {
                at: minute,
                events_queued: 0,
                notifications_sent: 0,
                slot_lag_bytes: 0,
            });
        }
        while m.len() > MINUTES {
            m.pop_front();
        }
        let Some(b) = m.back_mut() else { return };
        // The sent counter starts at 0 with the process, so even the first reading counts
        // what went out before it; the event ids need a first reading as their baseline.
        let sent_before = prev.map_or(0, |p| p.sent);
        b.notifications_sent += s.sent.saturating_sub(sent_before);
        if let Some(p) = prev {
            b.events_queued += (s.last_event_id - p.last_event_id).max(0) as u64;
        }
        b.slot_lag_bytes = b.slot_lag_bytes.max(lag);
    }
}

/// Samples until `shutdown`; a database that does not answer skips the reading.
pub(crate) async fn run(
    cfg: Arc<Config>,
    history: Arc<History>,
    journal: Arc<Journal>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns: Option<(Client, Client)> = None;
    loop {
        if conns.is_none() {
            conns = connect(&cfg).await;
        }
        if let Some((src, q)) = &conns {
            match read(src, q, &cfg.source.slot).await {
                Ok((last_event_id, lag)) => {
                    let sent = journal.sent();
                    history.add(
                        Utc::now(),
                        Sample {
                            last_event_id,
                            sent,
                        },
                        lag,
                    );
                }
                Err(e) => {
                    tracing::debug!(error = %e, "console sample skipped");
                    conns = None;
                }
            }
        }
        // Until the first reading (the events' baseline), try again soon.
        let wait = if history.minutes().is_empty() {
            Duration::from_millis(500)
        } else {
            SAMPLE_EVERY
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn connect(cfg: &Config) -> Option<(Client, Client)> {
    let src = queue::connect(&cfg.source.url).await.ok()?;
    let q = queue::connect(cfg.queue_url()).await.ok()?;
    Some((src, q))
}

/// The newest event id and the slot's lag in bytes.
async fn read(src: &Client, q: &Client, slot: &str) -> Result<(i64, u64), tokio_postgres::Error> {
    // Before delivery's migrations have made the queue there are no events yet: 0, not an
    // error, so the first reading's baseline comes before the first event (a retried
    // reading could come after a burst and never count it).
    let exists: bool = q
        .query_one("SELECT to_regclass('fhir_cdc.event') IS NOT NULL", &[])
        .await?
        .get(0);
    let last: i64 = if exists {
        q.query_one("SELECT coalesce(max(id), 0) FROM fhir_cdc.event", &[])
            .await?
            .get(0)
    } else {
        0
    };
    let lag: f64 = src
        .query_opt(
            "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::float8
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .map_or(0.0, |r| r.get(0));
    Ok((last, lag.max(0.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn growth_goes_to_the_minute_it_was_seen_in_and_an_hour_is_kept() {
        let h = History::default();
        let t = |m: u32, s: u32| Utc.with_ymd_and_hms(2026, 12, 1, 10, m, s).unwrap();
        let s = |id, sent| Sample {
            last_event_id: id,
            sent,
        };
        h.add(t(0, 10), s(100, 5), 10);
        h.add(t(0, 40), s(130, 9), 500);
        h.add(t(1, 5), s(150, 9), 20);
        let m = h.minutes();
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].at, t(0, 0));
        assert_eq!(
            (
                m[0].events_queued,
                m[0].notifications_sent,
                m[0].slot_lag_bytes
            ),
            (30, 9, 500),
            "the first reading is the events' baseline (sends count from 0); lag is the most seen"
        );
        assert_eq!((m[1].events_queued, m[1].notifications_sent), (20, 0));
        for i in 2..70 {
            h.add(t(0, 0) + TimeDelta::minutes(i), s(150, 9), 0);
        }
        assert_eq!(h.minutes().len(), MINUTES);
    }
}
