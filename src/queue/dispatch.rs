//! Dispatch: matches a topic's new events to its subscriptions and numbers them. One
//! transaction per round, under a per-topic advisory lock, so eventNumbers are gap-free
//! whatever crashes and however many delivery instances run.

use std::collections::HashMap;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::fhir::search::value::Values;
use crate::fhir::subscription::Filter;

use super::{Result, DELIVERY_CHANNEL};

/// Removes what retention lets go: delivered deliveries older than `hours`, and events older
/// than that which no delivery needs any more and dispatch has passed. Returns the number of
/// events removed.
pub async fn retain(client: &Client, topic: &str, hours: u64) -> Result<u64> {
    let hours = hours as f64;
    client
        .execute(
            "DELETE FROM fhir_cdc.delivery d USING fhir_cdc.subscription s
             WHERE d.subscription_id = s.id AND s.topic = $1 AND d.state = 'delivered'
               AND d.delivered_at < now() - make_interval(hours => $2::float8::int)",
            &[&topic, &hours],
        )
        .await?;
    // An event goes once every topic it fired has dispatched past it and no delivery
    // needs it.
    Ok(client
        .execute(
            "DELETE FROM fhir_cdc.event e
             WHERE e.id <= coalesce((SELECT last_event_id FROM fhir_cdc.dispatch_cursor WHERE topic = $1), 0)
               AND $1 = ANY(e.topics) AND e.queued_at < now() - make_interval(hours => $2::float8::int)
               AND NOT EXISTS (
                   SELECT 1 FROM unnest(e.topics) AS t(url)
                   LEFT JOIN fhir_cdc.dispatch_cursor c ON c.topic = t.url
                   WHERE coalesce(c.last_event_id, 0) < e.id)
               AND NOT EXISTS (SELECT 1 FROM fhir_cdc.delivery d WHERE d.event_id = e.id)",
            &[&topic, &hours],
        )
        .await?)
}

/// What one dispatch round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Round {
    /// Events looked at (0 when there were none or another instance holds the topic).
    pub looked: usize,
    /// Deliveries recorded: subscriptions have new work.
    pub matched: u64,
}

/// Dispatches the events of `topic` among the next `limit` events.
pub async fn round(client: &mut Client, topic: &str, limit: i64) -> Result<Round> {
    let tx = client.transaction().await?;
    // Three statements in one round trip (a round per capture commit must stay cheap): the
    // topic's lock with its cursor row (no row when another instance holds the topic), the
    // events after the cursor, and the subscriptions. Events are one row per change for all
    // its topics: the cursor walks every event and stops at the last one looked at, whether
    // it was this topic's or not. The subscriptions get no row lock here: the topic's
    // advisory lock serialises numbering, and the INSERT below locks only those that
    // matched (in id order, as delivered marks do). Locking all of them from here made every
    // mark of the topic wait.
    let by_topic: [(&(dyn ToSql + Sync), Type); 1] = [(&topic, Type::TEXT)];
    let after_cursor: [(&(dyn ToSql + Sync), Type); 2] =
        [(&topic, Type::TEXT), (&limit, Type::INT8)];
    let (cursor, rows, subs) = tokio::try_join!(
        tx.query_typed(
            "WITH l AS (SELECT pg_try_advisory_xact_lock(
                             hashtextextended('fhir_cdc.dispatch.' || $1, 0)) AS ok)
             INSERT INTO fhir_cdc.dispatch_cursor (topic, last_event_id)
             SELECT $1, 0 FROM l WHERE l.ok
             ON CONFLICT (topic) DO UPDATE SET topic = EXCLUDED.topic
             RETURNING last_event_id",
            &by_topic,
        ),
        tx.query_typed(
            "SELECT id, $1 = ANY(topics), resource_type,
                    CASE WHEN $1 = ANY(topics) THEN filters END
             FROM fhir_cdc.event
             WHERE id > coalesce((SELECT last_event_id FROM fhir_cdc.dispatch_cursor
                                  WHERE topic = $1), 0)
             ORDER BY id LIMIT $2",
            &after_cursor,
        ),
        // Every subscription that is not off counts the events, delivered or not.
        tx.query_typed(
            "SELECT id, start_event_id, filters FROM fhir_cdc.subscription
             WHERE topic = $1 AND status IN ('requested', 'active', 'error') AND NOT refused",
            &by_topic,
        ),
    )?;
    let Some(cursor) = cursor.first().map(|r| r.get::<_, i64>(0)) else {
        return Ok(Round::default());
    };
    // The statements run in the order sent, so the events were read after the lock; a
    // cursor read before it could only be older, and what it let through is dropped here.
    let looked = rows.len();
    let rows: Vec<_> = rows
        .into_iter()
        .filter(|r| r.get::<_, i64>(0) > cursor)
        .collect();
    let Some(last) = rows.last().map(|r| r.get::<_, i64>(0)) else {
        return Ok(Round { looked, matched: 0 });
    };
    // This topic's events with their canFilterBy values, parsed once for all subscriptions.
    let events: Vec<(i64, String, HashMap<String, Values>)> = rows
        .iter()
        .filter(|r| r.get::<_, bool>(1))
        .map(|r| {
            let filters: Option<serde_json::Value> = r.get(3);
            (r.get(0), r.get(2), filter_values(filters, topic))
        })
        .collect();
    // Every (subscription, event) match, numbered in one statement: with thousands of
    // subscriptions one INSERT per subscription would make dispatch the bottleneck.
    let mut sub_ids: Vec<&str> = Vec::new();
    let mut event_ids: Vec<i64> = Vec::new();
    for s in &subs {
        let id: &str = s.get(0);
        let start: i64 = s.get(1);
        let filters: Vec<Filter> = serde_json::from_value(s.get(2)).unwrap_or_default();
        // AND across filters; each filter applies to the resource type it names.
        for (eid, ty, values) in &events {
            if *eid > start && filters.iter().all(|f| f.matches(ty, values)) {
                sub_ids.push(id);
                event_ids.push(*eid);
            }
        }
    }
    // The deliveries, the cursor and the wake-up for other instances in one round trip.
    let insert = async {
        if sub_ids.is_empty() {
            return Ok(0);
        }
        tx.execute_typed(
            "WITH m AS (SELECT sub, ev FROM unnest($1::text[], $2::int8[]) AS u(sub, ev)),
             counts AS (SELECT sub, count(*) AS n FROM m GROUP BY sub),
             locked AS MATERIALIZED (
                 SELECT id FROM fhir_cdc.subscription WHERE id IN (SELECT sub FROM counts)
                 ORDER BY id FOR NO KEY UPDATE),
             upd AS (
                 UPDATE fhir_cdc.subscription s SET events_since_start = s.events_since_start + c.n
                 FROM counts c, locked l WHERE s.id = c.sub AND l.id = c.sub
                 RETURNING s.id, s.events_since_start - c.n AS base)
             INSERT INTO fhir_cdc.delivery (subscription_id, event_number, event_id)
             SELECT m.sub, upd.base + row_number() OVER (PARTITION BY m.sub ORDER BY m.ev), m.ev
             FROM m JOIN upd ON upd.id = m.sub",
            &[(&sub_ids, Type::TEXT_ARRAY), (&event_ids, Type::INT8_ARRAY)],
        )
        .await
    };
    let cursor_to: [(&(dyn ToSql + Sync), Type); 2] = [(&topic, Type::TEXT), (&last, Type::INT8)];
    let advance = tx.execute_typed(
        "UPDATE fhir_cdc.dispatch_cursor SET last_event_id = $2 WHERE topic = $1",
        &cursor_to,
    );
    let notify = async {
        if sub_ids.is_empty() {
            return Ok(0);
        }
        tx.execute_typed(
            "SELECT pg_notify($1, $2)",
            &[(&DELIVERY_CHANNEL, Type::TEXT), (&topic, Type::TEXT)],
        )
        .await
    };
    let (matched, _, _) = tokio::try_join!(insert, advance, notify)?;
    tx.commit().await?;
    metrics::counter!(crate::metrics::DISPATCHED, "topic" => topic.to_string()).increment(matched);
    Ok(Round { looked, matched })
}

/// The canFilterBy values an event holds for `topic`: its own map under `@topic` when it has
/// one, else the shared map.
fn filter_values(filters: Option<serde_json::Value>, topic: &str) -> HashMap<String, Values> {
    let Some(serde_json::Value::Object(mut map)) = filters else {
        return HashMap::new();
    };
    let own = map
        .remove(super::batch::OWN_FILTERS)
        .and_then(|mut o| o.get_mut(topic).map(serde_json::Value::take));
    let chosen = own.unwrap_or(serde_json::Value::Object(map));
    serde_json::from_value(chosen).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_topic_reads_its_own_filter_values_when_it_has_them() {
        let f = json!({
            "patient": {"t": "reference", "v": ["Patient/1"]},
            "@topic": {"http://b": {"patient": {"t": "reference", "v": ["Patient/2"]}}}
        });
        let a = filter_values(Some(f.clone()), "http://a");
        let b = filter_values(Some(f), "http://b");
        assert_eq!(a.len(), 1, "the shared map, without @topic");
        assert_ne!(
            serde_json::to_value(&a["patient"]).unwrap(),
            serde_json::to_value(&b["patient"]).unwrap()
        );
        assert!(filter_values(None, "http://a").is_empty());
    }
}
