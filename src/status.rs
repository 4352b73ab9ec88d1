//! `fhir-cdc status`: the state an operator asks about, read straight from the slot and
//! the queue, so it answers while the daemon is down: how far behind the slot is, who holds
//! capture, what each subscription waits for and why it fails. References and hosts only,
//! never resource content. Exit status: 0 healthy, 1 degraded, 2 cannot connect.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Client;

use crate::capture::lag::{self, Level, SlotFigures};
use crate::config::Config;
use crate::queue::{self, matched, subscriptions};

/// What `status --json` prints; the field names are stable.
#[derive(Debug, Serialize)]
pub struct Report {
    pub healthy: bool,
    /// Why it is not healthy, one line each.
    pub(crate) problems: Vec<String>,
    pub(crate) slot: Slot,
    pub(crate) capture: Capture,
    pub(crate) topics: Vec<TopicState>,
    pub(crate) subscriptions: Vec<SubState>,
    pub(crate) dead_letters: i64,
    pub(crate) capture_gaps: i64,
    /// Tasks that stopped on an error retrying cannot fix, with what to do (until they run
    /// again).
    pub(crate) stopped: Vec<queue::fatal::Stopped>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) exists: bool,
    pub(crate) active: bool,
    pub(crate) wal_status: String,
    /// WAL after the slot's confirmed position.
    pub(crate) lag_bytes: u64,
    /// Seconds since capture last moved its checkpoint, when WAL waits (0 otherwise): an
    /// upper bound of how old the oldest unqueued store commit is.
    pub(crate) lag_seconds: f64,
    /// WAL the slot keeps on the store's disk.
    pub(crate) retained_bytes: u64,
    /// `ok`, `warn` or `critical` against `[source.lag]`.
    pub(crate) level: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Capture {
    /// The session holding capture's lock on the slot (the active capture), if any.
    pub(crate) lock_holder: Option<Holder>,
    /// The last store commit queued (its end LSN) and when the checkpoint last moved.
    pub(crate) checkpoint_lsn: Option<String>,
    pub(crate) checkpoint_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Holder {
    pub(crate) pid: i32,
    pub(crate) application_name: String,
    pub(crate) client_addr: Option<String>,
    pub(crate) since: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub(crate) struct TopicState {
    pub(crate) url: String,
    /// Events after the cursor of its furthest-behind subscription (before filters).
    pub(crate) events_behind: i64,
}

#[derive(Debug, Serialize)]
pub(crate) struct SubState {
    pub(crate) id: String,
    pub(crate) topic: String,
    pub(crate) status: String,
    pub(crate) channel: String,
    /// The endpoint's host only (never its path, query or credentials).
    pub(crate) endpoint_host: String,
    pub(crate) pending: i64,
    pub(crate) oldest_pending_age_seconds: Option<f64>,
    pub(crate) failures: i32,
    pub(crate) next_attempt_at: DateTime<Utc>,
    pub(crate) last_error: Option<String>,
}

/// Why a report could not be made: a database did not answer.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct Unreachable {
    pub(crate) what: &'static str,
    pub(crate) source: queue::QueueError,
}

/// Reads the slot and the queue, over connections of its own.
pub async fn report(cfg: &Config) -> Result<Report, Unreachable> {
    let unreachable = |what| move |source| Unreachable { what, source };
    let src = queue::connect(&cfg.source.url)
        .await
        .map_err(unreachable("store database"))?;
    let q = queue::connect(cfg.queue_url())
        .await
        .map_err(unreachable("queue database"))?;
    report_with(&src, &q, cfg).await
}

/// Reads the slot over `src` (the store's database) and the queue over `q`.
pub(crate) async fn report_with(
    src: &Client,
    q: &Client,
    cfg: &Config,
) -> Result<Report, Unreachable> {
    let unreachable = |what| move |source| Unreachable { what, source };
    let slot = read_slot(src, cfg)
        .await
        .map_err(unreachable("store database"))?;
    let capture = read_capture(src, q, cfg)
        .await
        .map_err(unreachable("queue database"))?;
    let (topics, subs, dead, gaps) = read_queue(q).await.map_err(unreachable("queue database"))?;
    // A queue not yet migrated to 009 has no record of stops.
    let stopped = queue::fatal::all(q).await.unwrap_or_default();
    let mut r = Report {
        healthy: true,
        problems: Vec::new(),
        slot,
        capture,
        topics,
        subscriptions: subs,
        dead_letters: dead,
        capture_gaps: gaps,
        stopped,
    };
    grade(&mut r, cfg);
    Ok(r)
}

async fn read_slot(c: &Client, cfg: &Config) -> queue::Result<Slot> {
    let name = cfg.source.slot.clone();
    let row = c
        .query_opt(
            "SELECT active, coalesce(wal_status, ''),
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::float8,
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::float8
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    let Some(row) = row else {
        return Ok(Slot {
            name,
            exists: false,
            active: false,
            wal_status: String::new(),
            lag_bytes: 0,
            lag_seconds: 0.0,
            retained_bytes: 0,
            level: "critical".into(),
        });
    };
    let figures = SlotFigures {
        lag_bytes: row.get(2),
        retained_bytes: row.get(3),
        wal_status: row.get(1),
    };
    Ok(Slot {
        name,
        exists: true,
        active: row.get(0),
        wal_status: figures.wal_status.clone(),
        lag_bytes: figures.lag_bytes as u64,
        lag_seconds: 0.0,
        retained_bytes: figures.retained_bytes as u64,
        level: String::new(),
    })
}

async fn read_capture(src: &Client, q: &Client, cfg: &Config) -> queue::Result<Capture> {
    let key = format!("fhir_cdc.capture.{}", cfg.source.slot);
    let holder = src
        .query_opt(
            "SELECT a.pid, coalesce(a.application_name, ''), host(a.client_addr), a.backend_start
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
               AND ((l.classid::bigint << 32) | l.objid::bigint) = hashtextextended($1, 0)",
            &[&key],
        )
        .await?
        .map(|r| Holder {
            pid: r.get(0),
            application_name: r.get(1),
            client_addr: r.get(2),
            since: r.get(3),
        });
    let checkpoint = q
        .query_opt(
            "SELECT lsn::text, updated_at FROM fhir_cdc.checkpoint WHERE slot = $1",
            &[&cfg.source.slot],
        )
        .await
        .ok()
        .flatten();
    Ok(Capture {
        lock_holder: holder,
        checkpoint_lsn: checkpoint.as_ref().map(|r| r.get(0)),
        checkpoint_at: checkpoint.as_ref().map(|r| r.get(1)),
    })
}

type QueueState = (Vec<TopicState>, Vec<SubState>, i64, i64);

async fn read_queue(q: &Client) -> queue::Result<QueueState> {
    let topics = queue::pending_by_topic(q)
        .await?
        .into_iter()
        .map(|(url, n)| TopicState {
            url,
            events_behind: n as i64,
        })
        .collect();
    let mut subs = Vec::new();
    for row in subscriptions::search(q, None, None).await? {
        subs.push(sub_state(q, row).await?);
    }
    let dead: i64 = q
        .query_one(
            "SELECT count(*) FROM fhir_cdc.dead_letter WHERE NOT requeued",
            &[],
        )
        .await?
        .get(0);
    let gaps: i64 = q
        .query_one("SELECT count(*) FROM fhir_cdc.capture_gap", &[])
        .await?
        .get(0);
    Ok((topics, subs, dead, gaps))
}

async fn sub_state(q: &Client, row: subscriptions::SubscriptionRow) -> queue::Result<SubState> {
    let receiving = matches!(row.status.as_str(), "requested" | "active" | "error");
    let (pending, oldest) = if receiving {
        let track = row.track();
        let first = matched::pending(q, &track, 1).await?;
        let age = first
            .first()
            .map(|p| (Utc::now() - p.event.queued_at).as_seconds_f64());
        (matched::count_pending(q, &track).await?, age)
    } else {
        (0, None)
    };
    Ok(SubState {
        channel: row.channel.map(|c| c.as_str()).unwrap_or("unknown").into(),
        endpoint_host: host(&row.endpoint),
        status: row.status.as_str().into(),
        pending,
        oldest_pending_age_seconds: oldest,
        failures: row.failures,
        next_attempt_at: row.next_attempt_at,
        last_error: row.last_error,
        topic: row.topic,
        id: row.id,
    })
}

/// The host (and port) of an endpoint URL, or the domain of a `mailto:` address.
fn host(endpoint: &str) -> String {
    if let Some(addr) = endpoint.strip_prefix("mailto:") {
        return addr.rsplit('@').next().unwrap_or_default().to_string();
    }
    match url::Url::parse(endpoint) {
        Ok(u) => match (u.host_str(), u.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => String::new(),
        },
        Err(_) => String::new(),
    }
}

/// What makes the report degraded.
fn problems(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    if !r.slot.exists {
        out.push(format!("slot {} does not exist", r.slot.name));
    } else if !r.slot.active {
        out.push(format!(
            "slot {} is not being read (no capture is running)",
            r.slot.name
        ));
    }
    if r.slot.level != "ok" && r.slot.exists {
        out.push(format!("slot lag is {}", r.slot.level));
    }
    for s in r.subscriptions.iter().filter(|s| s.status == "error") {
        let why = s.last_error.as_deref().unwrap_or("no reason recorded");
        out.push(format!("subscription {} is in error: {why}", s.id));
    }
    if r.dead_letters > 0 {
        out.push(format!(
            "{} dead letter(s) (fhir-cdc dead-letters list)",
            r.dead_letters
        ));
    }
    if r.capture_gaps > 0 {
        out.push(format!("{} capture gap(s) recorded", r.capture_gaps));
    }
    for s in &r.stopped {
        let fix = s.remedy.as_deref().unwrap_or("see the log");
        out.push(format!(
            "{} stopped at {}: {} -- fix: {fix}",
            s.task,
            s.at.to_rfc3339(),
            s.error
        ));
    }
    out
}

/// Fills the slot's lag seconds and level from the checkpoint's age and `[source.lag]`,
/// then the verdict.
fn grade(r: &mut Report, cfg: &Config) {
    let waiting = r.slot.lag_bytes > 0;
    r.slot.lag_seconds = match (waiting, r.capture.checkpoint_at) {
        (true, Some(at)) => (Utc::now() - at).as_seconds_f64().max(0.0),
        _ => 0.0,
    };
    let figures = SlotFigures {
        lag_bytes: r.slot.lag_bytes as f64,
        retained_bytes: r.slot.retained_bytes as f64,
        wal_status: r.slot.wal_status.clone(),
    };
    let (level, _) = lag::level(&cfg.source.lag, &figures, r.slot.lag_seconds);
    r.slot.level = match (r.slot.exists, level) {
        (false, _) | (_, Level::Critical) => "critical",
        (_, Level::Warn) => "warn",
        (_, Level::Ok) => "ok",
    }
    .into();
    r.problems = problems(r);
    r.healthy = r.problems.is_empty();
}

/// The report as a readable table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let verdict = if r.healthy { "healthy" } else { "DEGRADED" };
    s.push_str(&format!("fhir-cdc status: {verdict}\n"));
    for p in &r.problems {
        s.push_str(&format!("  ! {p}\n"));
    }
    let sl = &r.slot;
    s.push_str(&format!(
        "\nslot {}: {}, wal_status {}, lag {} bytes / {:.0} s, retained {} bytes ({})\n",
        sl.name,
        if sl.active { "active" } else { "NOT ACTIVE" },
        if sl.wal_status.is_empty() {
            "-"
        } else {
            &sl.wal_status
        },
        sl.lag_bytes,
        sl.lag_seconds,
        sl.retained_bytes,
        sl.level
    ));
    let c = &r.capture;
    let holder = c.lock_holder.as_ref().map_or("none".to_string(), |h| {
        format!(
            "pid {} {} {}",
            h.pid,
            h.application_name,
            h.client_addr.as_deref().unwrap_or("local")
        )
    });
    s.push_str(&format!(
        "capture: lock holder {holder}; last commit queued {} at {}\n",
        c.checkpoint_lsn.as_deref().unwrap_or("-"),
        c.checkpoint_at.map_or("-".into(), |t| t.to_rfc3339())
    ));
    s.push_str("\ntopic\tevents behind\n");
    for t in &r.topics {
        s.push_str(&format!("{}\t{}\n", t.url, t.events_behind));
    }
    s.push_str("\nsubscription\tstatus\tchannel\thost\tpending\toldest (s)\tfailures\tnext attempt\tlast error\n");
    for x in &r.subscriptions {
        s.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            x.id,
            x.status,
            x.channel,
            x.endpoint_host,
            x.pending,
            x.oldest_pending_age_seconds
                .map_or("-".into(), |a| format!("{a:.0}")),
            x.failures,
            x.next_attempt_at.to_rfc3339(),
            x.last_error.as_deref().unwrap_or("-")
        ));
    }
    s.push_str(&format!(
        "\ndead letters: {}; capture gaps: {}\n",
        r.dead_letters, r.capture_gaps
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_of_an_endpoint_is_shown() {
        assert_eq!(
            host("https://user:pw@engine.example.org:8443/hook?token=secret"),
            "engine.example.org:8443"
        );
        assert_eq!(host("http://10.0.0.1/x"), "10.0.0.1");
        assert_eq!(
            host("mailto:lab@hospital.example.org"),
            "hospital.example.org"
        );
        assert_eq!(host(""), "");
    }
}
