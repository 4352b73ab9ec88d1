//! Retention: events go once they are older than `[queue] retention_hours` and every
//! subscription of their topics that still receives events has settled them. Events a dead
//! letter names stay (requeue sends them again).

use tokio_postgres::GenericClient;

use super::Result;

/// Removes what retention lets go among the events of `topic`; returns how many went. The
/// topic's bound is recorded in `fhir_cdc.retention`: numbering looking back (`$events`)
/// stops there.
pub(crate) async fn retain<C: GenericClient>(c: &C, topic: &str, hours: u64) -> Result<u64> {
    let hours = hours as f64;
    c.execute(
        "WITH young AS (
             SELECT id FROM fhir_cdc.event
             WHERE queued_at >= now() - make_interval(hours => $2::float8::int)
             ORDER BY id LIMIT 1),
         bound AS (
             SELECT least(
                 coalesce((SELECT id - 1 FROM young),
                          (SELECT coalesce(max(id), 0) FROM fhir_cdc.event)),
                 coalesce((SELECT min(cursor_event_id) FROM fhir_cdc.subscription
                           WHERE topic = $1 AND status IN ('requested', 'active', 'error')
                             AND NOT refused), 9223372036854775807)) AS through)
         INSERT INTO fhir_cdc.retention (topic, through_event_id)
         SELECT $1, through FROM bound
         ON CONFLICT (topic) DO UPDATE SET through_event_id = EXCLUDED.through_event_id
         WHERE fhir_cdc.retention.through_event_id < EXCLUDED.through_event_id",
        &[&topic, &hours],
    )
    .await?;
    // An event goes once every topic it fired has its bound past it.
    Ok(c.execute(
        "DELETE FROM fhir_cdc.event e
         WHERE e.id <= (SELECT through_event_id FROM fhir_cdc.retention WHERE topic = $1)
           AND $1 = ANY(e.topics)
           AND NOT EXISTS (
               SELECT 1 FROM unnest(e.topics) AS t(url)
               LEFT JOIN fhir_cdc.retention r ON r.topic = t.url
               WHERE coalesce(r.through_event_id, 0) < e.id)
           AND NOT EXISTS (SELECT 1 FROM fhir_cdc.dead_letter d WHERE d.event_id = e.id)",
        &[&topic],
    )
    .await?)
}

/// The bound retention recorded for `topic` (0: nothing removed).
pub(crate) async fn floor<C: GenericClient>(c: &C, topic: &str) -> Result<i64> {
    Ok(c.query_opt(
        "SELECT through_event_id FROM fhir_cdc.retention WHERE topic = $1",
        &[&topic],
    )
    .await?
    .map(|r| r.get(0))
    .unwrap_or(0))
}
