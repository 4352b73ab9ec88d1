//! Dead letters: events a subscription did not get (attempts exhausted, the endpoint refused
//! them, or the subscription was turned off), for operators to list and send again.

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use tokio_postgres::GenericClient;

use super::{Result, DELIVERY_CHANNEL};

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub subscription_id: String,
    pub event_number: i64,
    pub resource: String,
    pub interaction: String,
    pub reason: String,
    pub dead_at: DateTime<Utc>,
    /// Put back in the queue and not yet delivered.
    pub requeued: bool,
}

/// Dead letters, oldest first; of one subscription when `sub` is given.
pub async fn list<C: GenericClient>(c: &C, sub: Option<&str>) -> Result<Vec<DeadLetter>> {
    let rows = c
        .query(
            "SELECT x.subscription_id, x.event_number, e.resource_type || '/' || e.resource_id,
                    e.interaction, x.reason, x.dead_at, x.requeued
             FROM fhir_cdc.dead_letter x JOIN fhir_cdc.event e ON e.id = x.event_id
             WHERE $1::text IS NULL OR x.subscription_id = $1
             ORDER BY x.subscription_id, x.event_number",
            &[&sub],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            subscription_id: r.get(0),
            event_number: r.get(1),
            resource: r.get(2),
            interaction: r.get(3),
            reason: r.get(4),
            dead_at: r.get(5),
            requeued: r.get(6),
        })
        .collect())
}

/// Puts dead letters back in the queue (of one subscription, or all when `sub` is None):
/// they are sent again, ahead of the subscription's newer events, with their original
/// eventNumbers and fresh attempt counts, and removed once delivered. The send workers are
/// woken. Returns (subscription, events requeued).
pub async fn requeue(
    c: &mut tokio_postgres::Client,
    sub: Option<&str>,
) -> Result<Vec<(String, i64)>> {
    let tx = c.transaction().await?;
    let rows = tx
        .query(
            "WITH back AS (
                 UPDATE fhir_cdc.dead_letter SET requeued = true
                 WHERE ($1::text IS NULL OR subscription_id = $1) AND NOT requeued
                 RETURNING subscription_id)
             SELECT subscription_id, count(*) FROM back GROUP BY subscription_id ORDER BY 1",
            &[&sub],
        )
        .await?;
    let out: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let ids: Vec<&str> = out.iter().map(|(s, _)| s.as_str()).collect();
    tx.execute(
        "UPDATE fhir_cdc.subscription SET next_attempt_at = now(), head_attempts = 0
         WHERE id = ANY($1)",
        &[&ids],
    )
    .await?;
    tx.execute(
        "SELECT pg_notify($1, topic) FROM fhir_cdc.subscription WHERE id = ANY($2) GROUP BY topic",
        &[&DELIVERY_CHANNEL, &ids],
    )
    .await?;
    tx.commit().await?;
    Ok(out)
}

/// Dead letters per subscription, for `$status`.
pub(crate) async fn counts<C: GenericClient>(
    c: &C,
    ids: &[String],
) -> Result<HashMap<String, i64>> {
    Ok(c.query(
        "SELECT subscription_id, count(*) FROM fhir_cdc.dead_letter
         WHERE subscription_id = ANY($1) AND NOT requeued GROUP BY subscription_id",
        &[&ids],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// Dead letters of a topic's subscriptions, for the metrics gauge.
pub(crate) async fn count_by_topic<C: GenericClient>(c: &C, topic: &str) -> Result<i64> {
    Ok(c.query_one(
        "SELECT count(*) FROM fhir_cdc.dead_letter x
         JOIN fhir_cdc.subscription s ON s.id = x.subscription_id
         WHERE s.topic = $1 AND NOT x.requeued",
        &[&topic],
    )
    .await?
    .get(0))
}
