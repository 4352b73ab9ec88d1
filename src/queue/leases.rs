//! Leases: which subscriptions of a topic have work, and the session advisory locks that
//! make each one sent by one process at a time. Released with the connection when a
//! process dies, so a killed instance's subscriptions are free at once.

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient};

use super::subscriptions::{SubscriptionRow, COLUMNS};
use super::Result;

/// Subscriptions of `topic` that have work (a handshake, events after the cursor or
/// requeued dead letters whose retry time has come, or a heartbeat due), oldest first, at
/// most `limit`. `newest` is the newest event id of the topic; `skip` are the ones this
/// process is already sending; `idle` those it found no event for up to `newest` (they may
/// still have a heartbeat due or requeued dead letters). A websocket
/// subscription has work only where one of its sockets is bound, so only ids in `bound` are
/// taken for that channel.
pub(crate) async fn with_work<C: GenericClient>(
    c: &C,
    topic: &str,
    newest: i64,
    skip: &[String],
    idle: &[String],
    bound: &[String],
    limit: i64,
) -> Result<Vec<String>> {
    Ok(c.query_typed(
        "SELECT s.id FROM fhir_cdc.subscription s
         WHERE s.topic = $1 AND NOT s.refused AND (s.end_at IS NULL OR s.end_at > now())
           AND s.id <> ALL($2) AND (s.channel <> 'websocket' OR s.id = ANY($3))
           AND ((s.status = 'requested' AND s.next_attempt_at <= now())
                OR (s.status IN ('active', 'error') AND s.handshake_done AND (
                    (s.next_attempt_at <= now() AND (
                        (s.cursor_event_id < $5 AND s.id <> ALL($6)) OR EXISTS (
                        SELECT 1 FROM fhir_cdc.dead_letter x
                        WHERE x.subscription_id = s.id AND x.requeued)))
                    OR (s.heartbeat_period > 0 AND coalesce(s.last_sent_at, s.updated_at)
                        + make_interval(secs => s.heartbeat_period) <= now()))))
         ORDER BY s.next_attempt_at
         LIMIT $4",
        &[
            (&topic, Type::TEXT),
            (&skip, Type::TEXT_ARRAY),
            (&bound, Type::TEXT_ARRAY),
            (&limit, Type::INT8),
            (&newest, Type::INT8),
            (&idle, Type::TEXT_ARRAY),
        ],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Takes the leases of those of `ids` that are free and reads the leased ones that a send
/// may use (still requested, active or in error), with whether they have requeued dead
/// letters, in one round trip. Returns the ids leased and the rows read. A lease is a
/// session advisory lock on `c`, so each subscription is sent by one process at a time
/// (which keeps its order), and a process that dies loses its leases with its connection,
/// at once. Session locks nest within one session, so the caller keeps its own set of what
/// it holds. Give them back with [`release_many`].
pub(crate) async fn lease_and_read(
    c: &Client,
    ids: &[String],
) -> Result<(Vec<String>, Vec<(SubscriptionRow, bool)>)> {
    let keys: Vec<i64> = ids.iter().map(|id| lock_key(id)).collect();
    let sql = format!(
        "WITH l AS MATERIALIZED (
             SELECT id, n FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY AS u(id, k, n)
             WHERE pg_try_advisory_lock(k))
         SELECT l.id AS leased_id, x.* FROM l LEFT JOIN LATERAL (
             SELECT {COLUMNS}, EXISTS (
                 SELECT 1 FROM fhir_cdc.dead_letter d
                 WHERE d.subscription_id = s.id AND d.requeued) AS has_requeued
             FROM fhir_cdc.subscription s
             WHERE s.id = l.id AND s.status IN ('requested', 'active', 'error')) x ON true
         ORDER BY l.n"
    );
    let rows = c
        .query_typed(&sql, &[(&ids, Type::TEXT_ARRAY), (&keys, Type::INT8_ARRAY)])
        .await?;
    let leased = rows.iter().map(|r| r.get("leased_id")).collect();
    let read = rows
        .iter()
        .filter(|r| r.get::<_, Option<String>>("id").is_some())
        .map(|r| (SubscriptionRow::from_row(r), r.get("has_requeued")))
        .collect();
    Ok((leased, read))
}

fn lock_key(id: &str) -> i64 {
    // FNV-1a, stable across processes and versions; collisions only serialise two subscriptions.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in b"fhir_cdc.subscription.".iter().chain(id.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h as i64
}

/// The earliest time a subscription of `topic` will have retry work (`newest` as in
/// [`with_work`]).
pub(crate) async fn next_retry<C: GenericClient>(
    c: &C,
    topic: &str,
    newest: i64,
) -> Result<Option<DateTime<Utc>>> {
    Ok(c
        .query_one(
            "SELECT least(
                 (SELECT min(next_attempt_at) FROM fhir_cdc.subscription s
                  WHERE topic = $1 AND next_attempt_at > now()
                    AND (status = 'requested' OR (status IN ('active', 'error') AND (
                        s.cursor_event_id < $2 OR EXISTS (
                            SELECT 1 FROM fhir_cdc.dead_letter x
                            WHERE x.subscription_id = s.id AND x.requeued))))),
                 (SELECT min(coalesce(last_sent_at, updated_at) + make_interval(secs => heartbeat_period))
                  FROM fhir_cdc.subscription
                  WHERE topic = $1 AND status IN ('active', 'error') AND handshake_done
                    AND heartbeat_period > 0))",
            &[&topic, &newest],
        )
        .await?
        .get(0))
}

/// Gives the leases of `ids` back, in one round trip.
pub(crate) async fn release_many(c: &Client, ids: &[String]) -> Result<()> {
    let keys: Vec<i64> = ids.iter().map(|id| lock_key(id)).collect();
    c.execute_typed(
        "SELECT count(pg_advisory_unlock(k)) FROM unnest($1::int8[]) AS u(k)",
        &[(&keys, Type::INT8_ARRAY)],
    )
    .await?;
    Ok(())
}
