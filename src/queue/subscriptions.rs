//! Subscription rows: what the API and capture write, and what send workers lease.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::{GenericClient, Row};

use super::cursor::Cursor;
use super::matched::Track;
use super::Result;
use crate::fhir::subscription::{ChannelType, Content, Filter, Status, SubscriptionSpec};

/// A subscription row as delivery and the API read it.
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub(crate) id: String,
    pub(crate) origin: String,
    pub(crate) topic: String,
    pub status: Status,
    /// `None`: a channel this version does not deliver (a row written by a newer one).
    pub(crate) channel: Option<ChannelType>,
    pub(crate) endpoint: String,
    pub(crate) content: Content,
    pub(crate) content_type: String,
    pub(crate) headers: Vec<(String, String)>,
    /// The secret notifications are signed with, when the subscription has one.
    pub(crate) signing_secret: Option<String>,
    pub(crate) timeout: Option<i32>,
    pub(crate) max_count: Option<i32>,
    pub(crate) heartbeat_period: Option<i32>,
    pub(crate) next_attempt_at: DateTime<Utc>,
    pub(crate) last_sent_at: Option<DateTime<Utc>>,
    pub(crate) resource: Value,
    /// The checked filterBy entries (AND across them).
    pub(crate) filters: Vec<Filter>,
    /// How far its events are settled.
    pub cursor: Cursor,
    /// Failed attempts of the head-of-line notification.
    pub head_attempts: i32,
    /// Numbering looking back is exact down to this event id and eventNumber.
    pub(crate) start_event_id: i64,
    pub(crate) start_number: i64,
    pub(crate) failures: i32,
    pub(crate) last_error: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
}

pub(super) const COLUMNS: &str =
    "id, origin, topic, status, channel, endpoint, content, content_type, headers, signing_secret, timeout,
    max_count, heartbeat_period, next_attempt_at, last_sent_at, resource, filters, cursor_number,
    cursor_event_id, head_attempts, start_event_id, start_number, failures,
    last_error, created_at";

impl SubscriptionRow {
    pub(super) fn from_row(r: &Row) -> Self {
        let id: String = r.get("id");
        let headers: Value = r.get("headers");
        let headers = headers
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| {
                        Some((
                            h.get(0)?.as_str()?.to_string(),
                            opened(&id, h.get(1)?.as_str()?),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let secret: Option<String> = r.get("signing_secret");
        SubscriptionRow {
            signing_secret: secret.map(|s| opened(&id, &s)),
            id,
            origin: r.get("origin"),
            topic: r.get("topic"),
            status: Status::parse(r.get("status")).unwrap_or(Status::Off),
            channel: ChannelType::parse(r.get("channel")),
            endpoint: r.get("endpoint"),
            content: Content::parse(r.get("content")).unwrap_or(Content::Empty),
            content_type: r.get("content_type"),
            headers,
            timeout: r.get("timeout"),
            max_count: r.get("max_count"),
            heartbeat_period: r.get("heartbeat_period"),
            next_attempt_at: r.get("next_attempt_at"),
            last_sent_at: r.get("last_sent_at"),
            resource: r.get("resource"),
            filters: serde_json::from_value(r.get("filters")).unwrap_or_default(),
            cursor: Cursor {
                number: r.get("cursor_number"),
                event_id: r.get("cursor_event_id"),
            },
            head_attempts: r.get("head_attempts"),
            start_event_id: r.get("start_event_id"),
            start_number: r.get("start_number"),
            failures: r.get("failures"),
            last_error: r.get("last_error"),
            created_at: r.get("created_at"),
        }
    }

    /// What numbering its matches needs.
    pub fn track(&self) -> Track {
        Track {
            topic: self.topic.clone(),
            filters: self.filters.clone(),
            cursor: self.cursor,
            start_event_id: self.start_event_id,
            start_number: self.start_number,
        }
    }

    /// The resource as the API serves it: the stored one with the server-owned status, and
    /// header values (the subscriber's secrets) redacted.
    pub(crate) fn to_resource(&self) -> Value {
        let mut r = self.resource.clone();
        crate::fhir::subscription::secrets::redact_headers(&mut r);
        r["id"] = Value::String(self.id.clone());
        r["status"] = Value::String(self.status.as_str().into());
        // R5 form: report the content actually sent (a topic's maxContent may cap it).
        if r.get("content").is_some() {
            r["content"] = Value::String(self.content.as_str().into());
        }
        r
    }
}

/// A sealed secret, opened. Delivery's start proves the key opens every stored one
/// (`sealed::seal_existing`), so a failure here means the row changed since: the value is
/// left sealed (a receiver refuses it; the secret never leaves in clear) and logged.
fn opened(id: &str, stored: &str) -> String {
    match super::sealed::open(id, stored) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(subscription = %id, error = %e, "cannot open a stored secret");
            stored.to_string()
        }
    }
}

/// Records a Subscription from the store that was refused, in `error` with the reason.
pub(crate) async fn refuse<C: GenericClient>(
    c: &C,
    id: &str,
    topic: &str,
    resource: &Value,
    reason: &str,
) -> Result<()> {
    let mut resource = resource.clone();
    super::sealed::seal_resource(id, &mut resource);
    let resource = &resource;
    c.execute(
        "INSERT INTO fhir_cdc.subscription
             (id, origin, topic, status, endpoint, content, content_type, resource, start_event_id,
              refused, last_error)
         VALUES ($1, 'store', $2, 'error', '', 'empty', '', $3, 0, true, $4)
         ON CONFLICT (id) DO UPDATE SET status = 'error', refused = true, last_error = $4,
             resource = $3, updated_at = now()",
        &[&id, &topic, resource, &reason],
    )
    .await?;
    Ok(())
}

/// The insert-or-update of a subscription row ($1 id … $16 signing secret); see [`upsert`].
const UPSERT: &str = "INSERT INTO fhir_cdc.subscription
             (id, origin, topic, status, endpoint, content, content_type, headers,
              heartbeat_period, timeout, max_count, resource, end_at, filters, channel,
              start_event_id, cursor_event_id, signing_secret)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, n.id, n.id, $16
         FROM (SELECT coalesce(max(id), 0) AS id FROM fhir_cdc.event) n
         ON CONFLICT (id) DO UPDATE SET
             status = EXCLUDED.status, channel = EXCLUDED.channel, endpoint = EXCLUDED.endpoint, content = EXCLUDED.content,
             content_type = EXCLUDED.content_type, headers = EXCLUDED.headers,
             heartbeat_period = EXCLUDED.heartbeat_period, timeout = EXCLUDED.timeout,
             max_count = EXCLUDED.max_count, resource = EXCLUDED.resource, end_at = EXCLUDED.end_at,
             filters = EXCLUDED.filters, signing_secret = EXCLUDED.signing_secret,
             -- Back from off: what happened while it was off is not its to send.
             cursor_event_id = CASE WHEN fhir_cdc.subscription.status = 'off'
                                         AND EXCLUDED.status <> 'off'
                                    THEN EXCLUDED.cursor_event_id
                                    ELSE fhir_cdc.subscription.cursor_event_id END,
             -- Numbering looking back is exact only where the filters were the same.
             start_event_id = CASE
                 WHEN fhir_cdc.subscription.status = 'off' AND EXCLUDED.status <> 'off'
                     THEN EXCLUDED.cursor_event_id
                 WHEN fhir_cdc.subscription.filters IS DISTINCT FROM EXCLUDED.filters
                     THEN fhir_cdc.subscription.cursor_event_id
                 ELSE fhir_cdc.subscription.start_event_id END,
             start_number = CASE
                 WHEN (fhir_cdc.subscription.status = 'off' AND EXCLUDED.status <> 'off')
                      OR fhir_cdc.subscription.filters IS DISTINCT FROM EXCLUDED.filters
                     THEN fhir_cdc.subscription.cursor_number
                 ELSE fhir_cdc.subscription.start_number END,
             head_attempts = CASE WHEN EXCLUDED.status = 'requested' THEN 0
                                  ELSE fhir_cdc.subscription.head_attempts END,
             handshake_done = CASE WHEN EXCLUDED.status = 'requested' THEN false
                                   ELSE fhir_cdc.subscription.handshake_done END,
             failures = CASE WHEN EXCLUDED.status = 'requested' THEN 0
                             ELSE fhir_cdc.subscription.failures END,
             refused = false, next_attempt_at = now(), updated_at = now()";

/// Creates or replaces a subscription. Setting `requested` again re-arms the handshake.
pub(crate) async fn upsert<C: GenericClient>(
    c: &C,
    id: &str,
    origin: &str,
    spec: &SubscriptionSpec,
    resource: &Value,
) -> Result<()> {
    let mut headers: Value = spec
        .headers
        .iter()
        .map(|(k, v)| Value::Array(vec![k.clone().into(), v.clone().into()]))
        .collect();
    super::sealed::seal_headers(id, &mut headers);
    let secret = spec
        .signing_secret
        .as_deref()
        .map(|s| super::sealed::seal(id, s));
    let mut resource = resource.clone();
    super::sealed::seal_resource(id, &mut resource);
    let resource = &resource;
    c.execute(
        UPSERT,
        &[
            &id,
            &origin,
            &spec.topic_url,
            &spec.status.as_str(),
            &spec.endpoint,
            &spec.content.as_str(),
            &spec.content_type,
            &headers,
            &spec.heartbeat_period,
            &spec.timeout,
            &spec.max_count,
            resource,
            &spec.end,
            &serde_json::to_value(&spec.filters).unwrap_or_else(|_| Value::Array(vec![])),
            &spec.channel.as_str(),
            &secret,
        ],
    )
    .await?;
    // Send loops (of every instance) wake for the handshake now, not at their next poll.
    c.execute(
        "SELECT pg_notify($1, $2)",
        &[&super::DELIVERY_CHANNEL, &spec.topic_url],
    )
    .await?;
    Ok(())
}

pub async fn get<C: GenericClient>(c: &C, id: &str) -> Result<Option<SubscriptionRow>> {
    let sql = format!("SELECT {COLUMNS} FROM fhir_cdc.subscription WHERE id = $1");
    Ok(c.query_opt(&sql, &[&id])
        .await?
        .map(|r| SubscriptionRow::from_row(&r)))
}

/// Search by `status` and `url` (the endpoint), both optional.
pub async fn search<C: GenericClient>(
    c: &C,
    status: Option<&str>,
    url: Option<&str>,
) -> Result<Vec<SubscriptionRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM fhir_cdc.subscription
         WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR endpoint = $2)
         ORDER BY created_at, id"
    );
    Ok(c.query(&sql, &[&status, &url])
        .await?
        .iter()
        .map(SubscriptionRow::from_row)
        .collect())
}

pub(crate) async fn delete<C: GenericClient>(c: &C, id: &str) -> Result<bool> {
    Ok(
        c.execute("DELETE FROM fhir_cdc.subscription WHERE id = $1", &[&id])
            .await?
            > 0,
    )
}

/// Turns subscriptions whose `end` has passed off. Returns their ids.
pub(crate) async fn expire<C: GenericClient>(c: &C) -> Result<Vec<String>> {
    Ok(c.query(
        "UPDATE fhir_cdc.subscription SET status = 'off', updated_at = now(),
                 last_error = 'subscription end reached'
             WHERE end_at <= now() AND status <> 'off' RETURNING id",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Records that something went out (or was tried) now; heartbeats count from it.
pub(crate) async fn touched<C: GenericClient>(c: &C, id: &str) -> Result<()> {
    c.execute(
        "UPDATE fhir_cdc.subscription SET last_sent_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// Holds a subscription's next send until `at` (a batch window filling up).
pub(crate) async fn defer<C: GenericClient>(c: &C, id: &str, at: DateTime<Utc>) -> Result<()> {
    c.execute(
        "UPDATE fhir_cdc.subscription SET next_attempt_at = $2 WHERE id = $1",
        &[&id, &at],
    )
    .await?;
    Ok(())
}

/// A handshake went through: the subscription is active.
pub(crate) async fn handshake_ok<C: GenericClient>(c: &C, id: &str) -> Result<()> {
    c.execute(
        "UPDATE fhir_cdc.subscription SET status = 'active', handshake_done = true, failures = 0,
             last_error = NULL, last_sent_at = now(), updated_at = now()
         WHERE id = $1 AND status = 'requested'",
        &[&id],
    )
    .await?;
    Ok(())
}

/// A handshake failed: the subscription goes to `error` until the client asks again.
pub(crate) async fn handshake_failed<C: GenericClient>(c: &C, id: &str, error: &str) -> Result<()> {
    c.execute(
        "UPDATE fhir_cdc.subscription SET status = 'error', last_error = $2,
             failures = failures + 1, updated_at = now()
         WHERE id = $1 AND status = 'requested'",
        &[&id, &error],
    )
    .await?;
    Ok(())
}
