//! A subscription's cursor: how far its events are settled (delivered or dead-lettered),
//! and the state of its head-of-line notification. One row write per subscription per send
//! round, grouped for all the subscriptions of the round; a dead letter adds one
//! `dead_letter` row per event it gives up on.

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Transaction};

use super::Result;
use crate::fhir::subscription::Status;

/// Where a subscription stands: every matching event up to `event_id` is settled, the last
/// of them with eventNumber `number`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    pub number: i64,
    pub event_id: i64,
}

/// A notification of `subscription` reached its endpoint: its cursor moves to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Advance {
    pub(crate) subscription: String,
    pub(crate) to: Cursor,
}

/// Moves the cursors of several subscriptions in one statement, and clears their failure
/// state. A cursor never moves back (a stale mark is ignored); of several marks of one
/// subscription the furthest counts. Rows are locked in id order so two writers of one
/// topic cannot deadlock.
pub(crate) async fn advance_many<C: GenericClient>(c: &C, marks: &[Advance]) -> Result<u64> {
    let mut best: std::collections::BTreeMap<&str, Cursor> = Default::default();
    for m in marks {
        let e = best.entry(m.subscription.as_str()).or_insert(m.to);
        if m.to.number > e.number || (m.to.number == e.number && m.to.event_id > e.event_id) {
            *e = m.to;
        }
    }
    let subs: Vec<&str> = best.keys().copied().collect();
    let numbers: Vec<i64> = best.values().map(|c| c.number).collect();
    let ids: Vec<i64> = best.values().map(|c| c.event_id).collect();
    Ok(c.execute_typed(
        "WITH m AS (SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[]) AS m(sub, n, e)),
         l AS MATERIALIZED (
             SELECT id FROM fhir_cdc.subscription WHERE id IN (SELECT sub FROM m)
             ORDER BY id FOR NO KEY UPDATE)
         UPDATE fhir_cdc.subscription s SET
             cursor_number = greatest(s.cursor_number, m.n),
             cursor_event_id = greatest(s.cursor_event_id, m.e),
             head_attempts = 0, failures = 0, last_error = NULL, last_sent_at = now(),
             status = CASE WHEN s.status = 'error' THEN 'active' ELSE s.status END,
             next_attempt_at = now(), updated_at = now()
         FROM m, l WHERE s.id = m.sub AND l.id = m.sub
           AND (m.n, m.e) >= (s.cursor_number, s.cursor_event_id)",
        &[
            (&subs, Type::TEXT_ARRAY),
            (&numbers, Type::INT8_ARRAY),
            (&ids, Type::INT8_ARRAY),
        ],
    )
    .await?)
}

/// Requeued dead letters of `subscription` that reached the endpoint: they are no longer
/// dead. Also clears the subscription's failure state.
pub(crate) async fn requeued_delivered<C: GenericClient>(
    c: &C,
    subscription: &str,
    numbers: &[i64],
) -> Result<()> {
    c.execute(
        "WITH d AS (DELETE FROM fhir_cdc.dead_letter
                    WHERE subscription_id = $1 AND event_number = ANY($2) AND requeued)
         UPDATE fhir_cdc.subscription s SET head_attempts = 0, failures = 0,
             last_error = NULL, last_sent_at = now(), next_attempt_at = now(),
             status = CASE WHEN s.status = 'error' THEN 'active' ELSE s.status END,
             updated_at = now()
         WHERE s.id = $1",
        &[&subscription, &numbers],
    )
    .await?;
    Ok(())
}

/// A failed send as delivery's policy decided it.
#[derive(Debug, Clone)]
pub(crate) struct Failure<'a> {
    pub(crate) error: &'a str,
    pub(crate) retry_in: std::time::Duration,
    /// The subscription's status after this failure.
    pub(crate) new_status: Status,
    /// The send carried events (a heartbeat does not count against the head's attempts).
    pub(crate) had_events: bool,
}

/// Counts a failed attempt of the head notification and schedules the retry.
pub(crate) async fn failed(tx: &Transaction<'_>, id: &str, f: &Failure<'_>) -> Result<()> {
    tx.execute(
        "UPDATE fhir_cdc.subscription SET failures = failures + 1, last_error = $2,
             head_attempts = head_attempts + $5::int4, updated_at = now(), last_sent_at = now(),
             next_attempt_at = now() + make_interval(secs => $3), status = $4
         WHERE id = $1",
        &[
            &id,
            &f.error,
            &f.retry_in.as_secs_f64(),
            &f.new_status.as_str(),
            &i32::from(f.had_events),
        ],
    )
    .await?;
    Ok(())
}

/// Gives up on `events` (`(eventNumber, event id)`, in order) of subscription `id`: one
/// dead letter each, and the cursor moves past them to `to` (a requeued dead letter given
/// up on again only stops being requeued).
pub(crate) async fn dead_letter(
    tx: &Transaction<'_>,
    id: &str,
    events: &[(i64, i64)],
    reason: &str,
    to: Option<Cursor>,
) -> Result<()> {
    let numbers: Vec<i64> = events.iter().map(|e| e.0).collect();
    let ids: Vec<i64> = events.iter().map(|e| e.1).collect();
    tx.execute(
        "INSERT INTO fhir_cdc.dead_letter (subscription_id, event_number, event_id, reason)
         SELECT $1, n, e, $4 FROM unnest($2::int8[], $3::int8[]) AS u(n, e)
         ON CONFLICT (subscription_id, event_number)
         DO UPDATE SET requeued = false, reason = EXCLUDED.reason, dead_at = now()",
        &[&id, &numbers, &ids, &reason],
    )
    .await?;
    if let Some(to) = to {
        tx.execute(
            "UPDATE fhir_cdc.subscription SET head_attempts = 0,
                 cursor_number = greatest(cursor_number, $2),
                 cursor_event_id = greatest(cursor_event_id, $3)
             WHERE id = $1",
            &[&id, &to.number, &to.event_id],
        )
        .await?;
    } else {
        tx.execute(
            "UPDATE fhir_cdc.subscription SET head_attempts = 0 WHERE id = $1",
            &[&id],
        )
        .await?;
    }
    Ok(())
}

/// Requeued dead letters of `ids`, oldest eventNumber first, at most `limit` each:
/// `(subscription, eventNumber, event id)`.
pub(crate) async fn requeued_many<C: GenericClient>(
    c: &C,
    ids: &[String],
    limit: i64,
) -> Result<Vec<(String, i64, i64)>> {
    Ok(c.query_typed(
        "SELECT m.sub, x.event_number, x.event_id FROM unnest($1::text[]) AS m(sub)
         CROSS JOIN LATERAL (
             SELECT event_number, event_id FROM fhir_cdc.dead_letter
             WHERE subscription_id = m.sub AND requeued
             ORDER BY event_number LIMIT $2) x",
        &[(&ids, Type::TEXT_ARRAY), (&limit, Type::INT8)],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect())
}
