//! How far capture is behind the store, and what that means for the store's disk.
//!
//! Two figures: bytes — WAL written since the slot's confirmed position (read from the slot,
//! so it is true whatever capture believes) — and seconds — the age of the oldest store
//! commit received but not yet queued, 0 when nothing waits. Seconds come from the commit
//! times in the stream, not from `pg_stat_replication.flush_lag`: under a backlog the
//! walsender itself decodes late, and its lag tracker would only see the last leg.
//!
//! Above the warning thresholds a line is logged (once per change of level); above the hard
//! ones `/readyz` answers 503 "degraded" so a load balancer or an operator sees it, and a slot
//! whose WAL is about to be removed (`wal_status = unreserved`) or gone (`lost`) is critical.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use crate::config::{Config, LagConfig};
use crate::queue;

/// Microseconds from the Unix epoch to Postgres' (2000-01-01), for commit times.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Ok = 0,
    Warn = 1,
    Critical = 2,
}

/// Capture's state as the API and the lag monitor see it.
#[derive(Debug, Default)]
pub struct Health {
    /// The slot is being read: every store commit from now on is captured.
    pub(crate) streaming: AtomicBool,
    /// Unix µs of the oldest commit received and not yet queued; 0: nothing waits.
    behind_since: AtomicI64,
    level: AtomicU8,
    reason: Mutex<String>,
}

impl Health {
    pub(crate) fn is_streaming(&self) -> bool {
        self.streaming.load(Ordering::SeqCst)
    }

    /// A store commit (Postgres-epoch µs) that is not queued yet; the oldest one counts.
    pub(crate) fn received(&self, commit_pg_micros: i64) {
        self.behind_at(commit_pg_micros + PG_EPOCH_MICROS);
    }

    /// Capture stopped reading: from now on the store's commits wait.
    pub(crate) fn stopped(&self) {
        self.streaming.store(false, Ordering::SeqCst);
        self.behind_at(now_micros());
    }

    fn behind_at(&self, unix_micros: i64) {
        let _ = self
            .behind_since
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |cur| {
                (cur == 0 || unix_micros < cur).then_some(unix_micros)
            });
    }

    /// Everything received is queued; `open` is the commit time of a transaction still
    /// being read, if any.
    pub(crate) fn queued(&self, open_commit_pg_micros: Option<i64>) {
        self.behind_since.store(
            open_commit_pg_micros.map_or(0, |m| m + PG_EPOCH_MICROS),
            Ordering::SeqCst,
        );
    }

    /// Seconds the oldest waiting commit has waited (0 when none waits).
    pub(crate) fn seconds(&self) -> f64 {
        match self.behind_since.load(Ordering::SeqCst) {
            0 => 0.0,
            t => ((now_micros() - t).max(0)) as f64 / 1e6,
        }
    }

    /// `Some(reason)` while lag is above a hard threshold.
    pub(crate) fn degraded(&self) -> Option<String> {
        (self.level.load(Ordering::SeqCst) == Level::Critical as u8)
            .then(|| self.reason.lock().map(|r| r.clone()).unwrap_or_default())
    }

    /// Records a new level; returns the previous one.
    fn set(&self, level: Level, reason: String) -> u8 {
        if let Ok(mut r) = self.reason.lock() {
            *r = reason;
        }
        self.level.swap(level as u8, Ordering::SeqCst)
    }
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The slot as Postgres reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SlotFigures {
    /// WAL after the confirmed position.
    pub(crate) lag_bytes: f64,
    /// WAL the slot keeps on disk (after `restart_lsn`).
    pub(crate) retained_bytes: f64,
    /// `reserved`, `extended`, `unreserved`, `lost` (PG ≥ 13).
    pub(crate) wal_status: String,
}

/// The level for these figures, with the reason in words (no PHI: figures only).
pub(crate) fn level(cfg: &LagConfig, slot: &SlotFigures, seconds: f64) -> (Level, String) {
    let figures = format!(
        "slot lag {} bytes, {seconds:.1} s; WAL retained {} bytes; wal_status {}",
        slot.lag_bytes as u64, slot.retained_bytes as u64, slot.wal_status
    );
    let over = |bytes: u64, secs: u64| slot.lag_bytes > bytes as f64 || seconds > secs as f64;
    if slot.wal_status == "lost" || slot.wal_status == "unreserved" {
        return (
            Level::Critical,
            format!("{figures}: the slot's WAL is (about to be) removed"),
        );
    }
    if over(cfg.max_bytes, cfg.max_secs) {
        let limits = format!("max {} bytes / {} s", cfg.max_bytes, cfg.max_secs);
        return (Level::Critical, format!("{figures} (above {limits})"));
    }
    if over(cfg.warn_bytes, cfg.warn_secs) {
        let limits = format!("warn {} bytes / {} s", cfg.warn_bytes, cfg.warn_secs);
        return (Level::Warn, format!("{figures} (above {limits})"));
    }
    (Level::Ok, figures)
}

async fn read_slot(c: &tokio_postgres::Client, slot: &str) -> queue::Result<Option<SlotFigures>> {
    let row = c
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8,
                    coalesce(wal_status, '')
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|r| SlotFigures {
        lag_bytes: r.get::<_, Option<f64>>(0).unwrap_or(0.0),
        retained_bytes: r.get::<_, Option<f64>>(1).unwrap_or(0.0),
        wal_status: r.get(2),
    }))
}

/// Reads the slot every `check_secs` until `shutdown`: gauges, log lines on a change of
/// level, and the level `/readyz` reports. A failed read is retried on the next tick.
pub async fn monitor(cfg: Arc<Config>, health: Arc<Health>, mut shutdown: watch::Receiver<bool>) {
    let every = Duration::from_secs(cfg.source.lag.check_secs.max(1));
    let mut conn: Option<tokio_postgres::Client> = None;
    // Every second until the slot is first read (capture creates it at start), then every
    // `check_secs`: the gauges exist from the first scrape after capture streams.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        wait = every.min(Duration::from_secs(1));
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            conn = queue::connect(&cfg.source.url).await.ok();
        }
        let Some(c) = &conn else { continue };
        match read_slot(c, &cfg.source.slot).await {
            Ok(Some(slot)) => {
                record(&cfg, &health, &slot);
                wait = every;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "slot lag not read"),
        }
    }
}

fn record(cfg: &Config, health: &Health, slot: &SlotFigures) {
    let seconds = health.seconds();
    metrics::gauge!(crate::metrics::SLOT_LAG_BYTES).set(slot.lag_bytes);
    metrics::gauge!(crate::metrics::SLOT_RETAINED_BYTES).set(slot.retained_bytes);
    metrics::gauge!(crate::metrics::SLOT_LAG_SECONDS).set(seconds);
    let streaming = if health.is_streaming() { 1.0 } else { 0.0 };
    metrics::gauge!(crate::metrics::CAPTURE_STREAMING).set(streaming);
    let invalid = matches!(slot.wal_status.as_str(), "lost" | "unreserved");
    metrics::gauge!(crate::metrics::SLOT_INVALID).set(if invalid { 1.0 } else { 0.0 });
    let (level, reason) = level(&cfg.source.lag, slot, seconds);
    let before = health.set(level, reason.clone());
    if before == level as u8 {
        return;
    }
    let slot_name = &cfg.source.slot;
    match level {
        Level::Critical => {
            tracing::error!(slot = %slot_name, "{reason}; /readyz reports degraded")
        }
        Level::Warn => tracing::warn!(slot = %slot_name, "{reason}"),
        Level::Ok => {
            tracing::info!(slot = %slot_name, "slot lag back under the thresholds: {reason}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(lag: f64, status: &str) -> SlotFigures {
        SlotFigures {
            lag_bytes: lag,
            retained_bytes: lag,
            wal_status: status.into(),
        }
    }

    #[test]
    fn levels_follow_the_thresholds_and_the_wal_status() {
        let cfg = LagConfig {
            warn_bytes: 100,
            warn_secs: 10,
            max_bytes: 1000,
            max_secs: 60,
            check_secs: 1,
        };
        assert_eq!(level(&cfg, &slot(50.0, "reserved"), 1.0).0, Level::Ok);
        assert_eq!(level(&cfg, &slot(150.0, "reserved"), 1.0).0, Level::Warn);
        assert_eq!(level(&cfg, &slot(50.0, "reserved"), 11.0).0, Level::Warn);
        let (l, why) = level(&cfg, &slot(50.0, "reserved"), 61.0);
        assert_eq!(l, Level::Critical);
        assert!(why.contains("max 1000 bytes / 60 s"), "{why}");
        assert_eq!(
            level(&cfg, &slot(2000.0, "extended"), 0.0).0,
            Level::Critical
        );
        assert_eq!(level(&cfg, &slot(0.0, "lost"), 0.0).0, Level::Critical);
    }

    #[test]
    fn seconds_count_from_the_oldest_waiting_commit() {
        let h = Health::default();
        assert_eq!(h.seconds(), 0.0);
        let now_pg = now_micros() - PG_EPOCH_MICROS;
        h.received(now_pg - 5_000_000);
        h.received(now_pg - 1_000_000);
        assert!((4.9..6.0).contains(&h.seconds()), "{}", h.seconds());
        h.queued(Some(now_pg - 1_000_000));
        assert!((0.9..2.0).contains(&h.seconds()), "{}", h.seconds());
        h.queued(None);
        assert_eq!(h.seconds(), 0.0);
        h.set(Level::Critical, "x".into());
        assert_eq!(h.degraded().as_deref(), Some("x"));
    }
}
