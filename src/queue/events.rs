//! The topic's events as delivery reads them, and a subscription's matches among them.
//!
//! A subscription's matches are not stored: they are the events of its topic after its
//! cursor that pass its filters, in event id order, numbered on from the cursor's
//! eventNumber. Events are written once by capture and never change, so the same cursor
//! and filters always give the same numbers: a notification sent again after a kill
//! carries the eventNumbers it carried before.

use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row};

use super::Result;
use crate::fhir::search::value::Values;
use crate::fhir::subscription::Filter;
use crate::fhir::topic::Interaction;

/// The key of topic-specific filter values in an event's `filters` (capture writes them,
/// sends read them).
pub(crate) const OWN_FILTERS: &str = "@topic";

/// One queued event of a topic, with that topic's canFilterBy values parsed.
#[derive(Debug, Clone)]
pub(crate) struct TopicEvent {
    pub(crate) id: i64,
    pub(crate) resource_type: String,
    pub(crate) resource_id: String,
    /// The store's version id of the change, when the store has one.
    pub(crate) version_id: Option<String>,
    pub(crate) interaction: Interaction,
    pub(crate) commit_time: DateTime<Utc>,
    pub(crate) resource: Option<Value>,
    pub(crate) queued_at: DateTime<Utc>,
    pub(crate) filters: HashMap<String, Values>,
}

impl TopicEvent {
    fn from_row(r: &Row, topic: &str) -> Self {
        Self::from_row_at(r, 0, topic)
    }

    /// [`COLUMNS`] read from column `at` on.
    fn from_row_at(r: &Row, at: usize, topic: &str) -> Self {
        let id: i64 = r.get(at);
        TopicEvent {
            id,
            resource_type: r.get(at + 1),
            resource_id: r.get(at + 2),
            version_id: r.get(at + 3),
            interaction: Interaction::parse(r.get(at + 4)).unwrap_or(Interaction::Update),
            commit_time: r.get(at + 5),
            resource: json_column(r, id, at + 6),
            queued_at: r.get(at + 7),
            filters: filter_values(json_column(r, id, at + 8), topic),
        }
    }

    /// Does this event pass every one of `filters` (AND across filters)?
    pub(crate) fn passes(&self, filters: &[Filter]) -> bool {
        filters
            .iter()
            .all(|f| f.matches(&self.resource_type, &self.filters))
    }
}

/// An event numbered for one subscription.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) event_number: i64,
    pub(crate) event: Arc<TopicEvent>,
}

const COLUMNS: &str = "id, resource_type, resource_id, version_id, interaction, commit_time,
    resource, queued_at, filters";

/// Events of `topic` with ids in `(after, until]`, oldest first, at most `limit`.
pub(crate) async fn after<C: GenericClient>(
    c: &C,
    topic: &str,
    after: i64,
    until: i64,
    limit: i64,
) -> Result<Vec<TopicEvent>> {
    let bounds = ("id > $2 AND id <= $3", "id");
    range(c, bounds, topic, after, until, limit).await
}

/// Events of `topic` with ids in `(floor, before]`, newest first, at most `limit`.
pub(crate) async fn before<C: GenericClient>(
    c: &C,
    topic: &str,
    before: i64,
    floor: i64,
    limit: i64,
) -> Result<Vec<TopicEvent>> {
    let bounds = ("id <= $2 AND id > $3", "id DESC");
    range(c, bounds, topic, before, floor, limit).await
}

/// Events of `topic` that `bounds` (a condition on `id` with $2 and $3, and the order)
/// select, at most `limit`.
async fn range<C: GenericClient>(
    c: &C,
    bounds: (&str, &str),
    topic: &str,
    a: i64,
    b: i64,
    limit: i64,
) -> Result<Vec<TopicEvent>> {
    let (filter, order) = bounds;
    let sql = format!(
        "SELECT {COLUMNS} FROM fhir_cdc.event
         WHERE {filter} AND $1 = ANY(topics) ORDER BY {order} LIMIT $4"
    );
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&topic, Type::TEXT),
        (&a, Type::INT8),
        (&b, Type::INT8),
        (&limit, Type::INT8),
    ];
    let rows = c.query_typed(&sql, &params).await?;
    Ok(rows
        .iter()
        .map(|r| TopicEvent::from_row(r, topic))
        .collect())
}

/// Events of `topic` by id (dead letters sent again), in id order.
pub(crate) async fn by_ids<C: GenericClient>(
    c: &C,
    topic: &str,
    ids: &[i64],
) -> Result<Vec<TopicEvent>> {
    let sql = format!("SELECT {COLUMNS} FROM fhir_cdc.event WHERE id = ANY($1) ORDER BY id");
    let rows = c.query_typed(&sql, &[(&ids, Type::INT8_ARRAY)]).await?;
    Ok(rows
        .iter()
        .map(|r| TopicEvent::from_row(r, topic))
        .collect())
}

/// The newest event id of any topic, and the events of `topic` after `after` up to it
/// (oldest first, at most `limit`), in one round trip.
pub(crate) async fn newest_and_after<C: GenericClient>(
    c: &C,
    topic: &str,
    after: i64,
    limit: i64,
) -> Result<(i64, Vec<TopicEvent>)> {
    let sql = format!(
        "WITH n AS (SELECT coalesce(max(id), 0) AS newest FROM fhir_cdc.event)
         SELECT n.newest, e.* FROM n LEFT JOIN LATERAL (
             SELECT {COLUMNS} FROM fhir_cdc.event
             WHERE id > $2 AND id <= n.newest AND $1 = ANY(topics) ORDER BY id LIMIT $3) e
         ON true"
    );
    let params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&topic, Type::TEXT),
        (&after, Type::INT8),
        (&limit, Type::INT8),
    ];
    let rows = c.query_typed(&sql, &params).await?;
    let newest = rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(after);
    let events = rows
        .iter()
        .filter(|r| r.get::<_, Option<i64>>(1).is_some())
        .map(|r| TopicEvent::from_row_at(r, 1, topic))
        .collect();
    Ok((newest, events))
}

/// The newest event id of any topic (0 for an empty queue).
pub(crate) async fn newest_id<C: GenericClient>(c: &C) -> Result<i64> {
    Ok(
        c.query_one("SELECT coalesce(max(id), 0) FROM fhir_cdc.event", &[])
            .await?
            .get(0),
    )
}

/// A JSON column stored as text (`resource`, `filters`), parsed; `None` when null. Capture
/// wrote it from a parsed value, so it is JSON; a row that is not (edited by hand) is logged
/// by id and read as null rather than stopping delivery.
fn json_column(r: &Row, id: i64, at: usize) -> Option<Value> {
    let text: Option<&str> = r.get(at);
    match serde_json::from_str(text?) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(event_id = id, column = at, error = %e, "queued event column is not JSON; read as absent");
            None
        }
    }
}

/// The canFilterBy values an event holds for `topic`: its own map under `@topic` when it has
/// one, else the shared map.
fn filter_values(filters: Option<Value>, topic: &str) -> HashMap<String, Values> {
    let Some(Value::Object(mut map)) = filters else {
        return HashMap::new();
    };
    let own = map
        .remove(OWN_FILTERS)
        .and_then(|mut o| o.get_mut(topic).map(Value::take));
    let chosen = own.unwrap_or(Value::Object(map));
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
