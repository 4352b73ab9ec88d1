//! SubscriptionTopics that live in the store: capture records them at their place in the
//! stream; delivery and the API read them next to the configured ones.

use serde_json::Value;
use tokio_postgres::GenericClient;

use super::Result;
use crate::fhir::topic::Topic;

/// Channel capture notifies when a store topic appears, changes or goes.
pub(crate) const TOPIC_CHANNEL: &str = "fhir_cdc_topic";

pub(crate) async fn upsert<C: GenericClient>(
    c: &C,
    store_id: &str,
    url: &str,
    resource: &Value,
) -> Result<()> {
    c.execute(
        "INSERT INTO fhir_cdc.topic (store_id, url, resource) VALUES ($1, $2, $3)
         ON CONFLICT (store_id) DO UPDATE SET url = EXCLUDED.url, resource = EXCLUDED.resource,
             updated_at = now()",
        &[&store_id, &url, resource],
    )
    .await?;
    c.execute("SELECT pg_notify($1, $2)", &[&TOPIC_CHANNEL, &url])
        .await?;
    Ok(())
}

pub(crate) async fn delete<C: GenericClient>(c: &C, store_id: &str) -> Result<()> {
    c.execute(
        "DELETE FROM fhir_cdc.topic WHERE store_id = $1",
        &[&store_id],
    )
    .await?;
    c.execute("SELECT pg_notify($1, $2)", &[&TOPIC_CHANNEL, &store_id])
        .await?;
    Ok(())
}

/// Store topics as `(store id, topic)`. Rows that no longer read (or evaluate) are skipped
/// with a log line.
pub(crate) async fn load_store<C: GenericClient>(c: &C) -> Result<Vec<(String, Topic)>> {
    let rows = c
        .query(
            "SELECT store_id, resource FROM fhir_cdc.topic ORDER BY store_id",
            &[],
        )
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let id: String = r.get(0);
        let v: Value = r.get(1);
        match Topic::from_json(&v).and_then(|t| t.evaluable().map(|()| t)) {
            Ok(t) => out.push((id, t)),
            Err(e) => tracing::warn!(topic = %id, error = %e, "stored topic skipped"),
        }
    }
    Ok(out)
}
