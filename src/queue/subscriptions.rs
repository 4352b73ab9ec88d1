//! Subscription rows: what the API and capture write, and what send workers lease.

use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::HashMap;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, GenericClient, Row};

use super::Result;
use crate::fhir::subscription::{ChannelType, Content, Status, SubscriptionSpec};
use crate::fhir::topic::Interaction;

/// A subscription row as delivery and the API read it.
#[derive(Debug, Clone)]
pub struct SubscriptionRow {
    pub id: String,
    pub origin: String,
    pub topic: String,
    pub status: Status,
    /// `None`: a channel this version does not deliver (a row written by a newer one).
    pub channel: Option<ChannelType>,
    pub endpoint: String,
    pub content: Content,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Option<i32>,
    pub max_count: Option<i32>,
    pub heartbeat_period: Option<i32>,
    pub next_attempt_at: DateTime<Utc>,
    pub last_sent_at: Option<DateTime<Utc>>,
    pub resource: Value,
    pub events_since_start: i64,
    pub handshake_done: bool,
    pub failures: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "id, origin, topic, status, channel, endpoint, content, content_type, headers, timeout,
    max_count, heartbeat_period, next_attempt_at, last_sent_at, resource, events_since_start,
    handshake_done, failures, last_error, created_at";

impl SubscriptionRow {
    fn from_row(r: &Row) -> Self {
        let headers: Value = r.get("headers");
        let headers = headers
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| {
                        Some((
                            h.get(0)?.as_str()?.to_string(),
                            h.get(1)?.as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        SubscriptionRow {
            id: r.get("id"),
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
            events_since_start: r.get("events_since_start"),
            handshake_done: r.get("handshake_done"),
            failures: r.get("failures"),
            last_error: r.get("last_error"),
            created_at: r.get("created_at"),
        }
    }

    /// The resource as the API serves it: the stored one with the server-owned status.
    pub fn to_resource(&self) -> Value {
        let mut r = self.resource.clone();
        r["id"] = Value::String(self.id.clone());
        r["status"] = Value::String(self.status.as_str().into());
        // R5 form: report the content actually sent (a topic's maxContent may cap it).
        if r.get("content").is_some() {
            r["content"] = Value::String(self.content.as_str().into());
        }
        r
    }
}

/// Records a Subscription from the store that was refused, in `error` with the reason.
pub async fn refuse<C: GenericClient>(
    c: &C,
    id: &str,
    topic: &str,
    resource: &Value,
    reason: &str,
) -> Result<()> {
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

/// Creates or replaces a subscription. Setting `requested` again re-arms the handshake.
pub async fn upsert<C: GenericClient>(
    c: &C,
    id: &str,
    origin: &str,
    spec: &SubscriptionSpec,
    resource: &Value,
) -> Result<()> {
    let headers: Value = spec
        .headers
        .iter()
        .map(|(k, v)| Value::Array(vec![k.clone().into(), v.clone().into()]))
        .collect();
    c.execute(
        "INSERT INTO fhir_cdc.subscription
             (id, origin, topic, status, endpoint, content, content_type, headers,
              heartbeat_period, timeout, max_count, resource, end_at, filters, channel,
              start_event_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                 (SELECT coalesce(max(id), 0) FROM fhir_cdc.event))
         ON CONFLICT (id) DO UPDATE SET
             status = EXCLUDED.status, channel = EXCLUDED.channel, endpoint = EXCLUDED.endpoint, content = EXCLUDED.content,
             content_type = EXCLUDED.content_type, headers = EXCLUDED.headers,
             heartbeat_period = EXCLUDED.heartbeat_period, timeout = EXCLUDED.timeout,
             max_count = EXCLUDED.max_count, resource = EXCLUDED.resource, end_at = EXCLUDED.end_at,
             filters = EXCLUDED.filters,
             handshake_done = CASE WHEN EXCLUDED.status = 'requested' THEN false
                                   ELSE fhir_cdc.subscription.handshake_done END,
             failures = CASE WHEN EXCLUDED.status = 'requested' THEN 0
                             ELSE fhir_cdc.subscription.failures END,
             refused = false, next_attempt_at = now(), updated_at = now()",
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

pub async fn delete<C: GenericClient>(c: &C, id: &str) -> Result<bool> {
    Ok(
        c.execute("DELETE FROM fhir_cdc.subscription WHERE id = $1", &[&id])
            .await?
            > 0,
    )
}

/// Subscriptions of `topic` that have work (a handshake, pending events whose retry time has
/// come, or a heartbeat due), oldest first, at most `limit`. `skip` are the ones this process
/// is already sending. A websocket subscription has work only where one of its sockets is
/// bound, so only ids in `bound` are taken for that channel.
pub async fn with_work<C: GenericClient>(
    c: &C,
    topic: &str,
    skip: &[String],
    bound: &[String],
    limit: i64,
) -> Result<Vec<String>> {
    Ok(c.query_typed(
        "SELECT s.id FROM fhir_cdc.subscription s
         WHERE s.topic = $1 AND NOT s.refused AND (s.end_at IS NULL OR s.end_at > now())
           AND s.id <> ALL($2) AND (s.channel <> 'websocket' OR s.id = ANY($3))
           AND ((s.status = 'requested' AND s.next_attempt_at <= now())
                OR (s.status IN ('active', 'error') AND s.handshake_done AND (
                    (s.next_attempt_at <= now() AND EXISTS (
                        SELECT 1 FROM fhir_cdc.delivery d
                        WHERE d.subscription_id = s.id AND d.state = 'pending'))
                    OR (s.heartbeat_period > 0 AND coalesce(s.last_sent_at, s.updated_at)
                        + make_interval(secs => s.heartbeat_period) <= now()))))
         ORDER BY s.next_attempt_at
         LIMIT $4",
        &[
            (&topic, Type::TEXT),
            (&skip, Type::TEXT_ARRAY),
            (&bound, Type::TEXT_ARRAY),
            (&limit, Type::INT8),
        ],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Takes the leases of those of `ids` that are free, in one round trip; returns those
/// taken. A lease is a session advisory lock on `c`, so each subscription is sent by one
/// process at a time (which keeps its order), and a process that dies loses its leases with
/// its connection, at once. Session locks nest within one session, so the caller keeps its
/// own set of what it holds. Give them back with [`release_many`].
pub async fn try_lease_many(c: &Client, ids: &[String]) -> Result<Vec<String>> {
    let keys: Vec<i64> = ids.iter().map(|id| lock_key(id)).collect();
    Ok(c.query_typed(
        "SELECT id FROM unnest($1::text[], $2::int8[]) WITH ORDINALITY AS u(id, k, n)
             WHERE pg_try_advisory_lock(k) ORDER BY n",
        &[(&ids, Type::TEXT_ARRAY), (&keys, Type::INT8_ARRAY)],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// The subscriptions of `ids` as a send may use them: read under their leases, and still
/// requested, active or in error. One round trip for all of them.
pub async fn sendable_many<C: GenericClient>(
    c: &C,
    ids: &[String],
) -> Result<Vec<SubscriptionRow>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM fhir_cdc.subscription
         WHERE id = ANY($1) AND status IN ('requested', 'active', 'error')"
    );
    Ok(c.query_typed(&sql, &[(&ids, Type::TEXT_ARRAY)])
        .await?
        .iter()
        .map(SubscriptionRow::from_row)
        .collect())
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

/// The earliest time a subscription of `topic` will have retry work.
pub async fn next_retry<C: GenericClient>(c: &C, topic: &str) -> Result<Option<DateTime<Utc>>> {
    Ok(c
        .query_one(
            "SELECT least(
                 (SELECT min(next_attempt_at) FROM fhir_cdc.subscription s
                  WHERE topic = $1 AND next_attempt_at > now()
                    AND (status = 'requested' OR (status IN ('active', 'error') AND EXISTS (
                        SELECT 1 FROM fhir_cdc.delivery d
                        WHERE d.subscription_id = s.id AND d.state = 'pending')))),
                 (SELECT min(coalesce(last_sent_at, updated_at) + make_interval(secs => heartbeat_period))
                  FROM fhir_cdc.subscription
                  WHERE topic = $1 AND status IN ('active', 'error') AND handshake_done
                    AND heartbeat_period > 0))",
            &[&topic],
        )
        .await?
        .get(0))
}

/// Turns subscriptions whose `end` has passed off. Returns their ids.
pub async fn expire<C: GenericClient>(c: &C) -> Result<Vec<String>> {
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

/// The highest eventNumber the subscriber has been sent or has lost (delivered or dead):
/// what a heartbeat reports, so heartbeats never move the count.
pub async fn last_settled_number<C: GenericClient>(c: &C, id: &str) -> Result<i64> {
    Ok(c.query_one(
        "SELECT coalesce(max(event_number), 0) FROM fhir_cdc.delivery
             WHERE subscription_id = $1 AND state <> 'pending'",
        &[&id],
    )
    .await?
    .get(0))
}

/// Records that something went out (or was tried) now; heartbeats count from it.
pub async fn touched<C: GenericClient>(c: &C, id: &str) -> Result<()> {
    c.execute(
        "UPDATE fhir_cdc.subscription SET last_sent_at = now() WHERE id = $1",
        &[&id],
    )
    .await?;
    Ok(())
}

/// Holds a subscription's next send until `at` (a batch window filling up).
pub async fn defer<C: GenericClient>(c: &C, id: &str, at: DateTime<Utc>) -> Result<()> {
    c.execute(
        "UPDATE fhir_cdc.subscription SET next_attempt_at = $2 WHERE id = $1",
        &[&id, &at],
    )
    .await?;
    Ok(())
}

/// A pending delivery joined with its event.
#[derive(Debug, Clone)]
pub struct Pending {
    pub event_number: i64,
    pub event_id: i64,
    pub attempts: i32,
    pub resource_type: String,
    pub resource_id: String,
    /// The store's version id of the change, when the store has one.
    pub version_id: Option<String>,
    pub interaction: Interaction,
    pub commit_time: DateTime<Utc>,
    pub resource: Option<Value>,
    pub queued_at: DateTime<Utc>,
}

/// Columns of a delivery joined with its event, as [`pending_from_row`] reads them.
const DELIVERY_COLUMNS: &str = "d.event_number, d.event_id, d.attempts, e.resource_type,
    e.resource_id, e.interaction, e.commit_time, e.resource, e.queued_at, e.version_id";

pub async fn pending<C: GenericClient>(c: &C, sub: &str, limit: i64) -> Result<Vec<Pending>> {
    // Its own query (not events_between) so the partial index on pending rows serves it.
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS}
         FROM fhir_cdc.delivery d JOIN fhir_cdc.event e ON e.id = d.event_id
         WHERE d.subscription_id = $1 AND d.state = 'pending'
         ORDER BY d.event_number LIMIT $2"
    );
    Ok(
        c.query_typed(&sql, &[(&sub, Type::TEXT), (&limit, Type::INT8)])
            .await?
            .iter()
            .map(pending_from_row)
            .collect(),
    )
}

/// The pending deliveries of several leased subscriptions in one round trip: for each of
/// `ids`, its first `limit` pending events in eventNumber order (each served by the partial
/// index on pending rows). A send loop takes this for the subscriptions it just leased, so
/// a notification costs no query of its own.
pub async fn pending_many<C: GenericClient>(
    c: &C,
    ids: &[String],
    limit: i64,
) -> Result<HashMap<String, Vec<Pending>>> {
    let sql = format!(
        "SELECT m.sub, x.* FROM unnest($1::text[]) AS m(sub)
         CROSS JOIN LATERAL (
             SELECT {DELIVERY_COLUMNS}
             FROM fhir_cdc.delivery d JOIN fhir_cdc.event e ON e.id = d.event_id
             WHERE d.subscription_id = m.sub AND d.state = 'pending'
             ORDER BY d.event_number LIMIT $2) x"
    );
    let mut out: HashMap<String, Vec<Pending>> = HashMap::new();
    let params: [(&(dyn ToSql + Sync), Type); 2] = [(&ids, Type::TEXT_ARRAY), (&limit, Type::INT8)];
    for r in c.query_typed(&sql, &params).await? {
        let sub: String = r.get(0);
        out.entry(sub).or_default().push(pending_from_row_at(&r, 1));
    }
    Ok(out)
}

/// Events of a subscription with eventNumbers in `since..=until`, whatever their delivery
/// state, for `$events`. At most `limit`.
pub async fn events_between<C: GenericClient>(
    c: &C,
    sub: &str,
    since: i64,
    until: i64,
    limit: i64,
) -> Result<Vec<Pending>> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS}
         FROM fhir_cdc.delivery d JOIN fhir_cdc.event e ON e.id = d.event_id
         WHERE d.subscription_id = $1 AND d.event_number BETWEEN $2 AND $3
         ORDER BY d.event_number LIMIT $4"
    );
    Ok(c.query(&sql, &[&sub, &since, &until, &limit])
        .await?
        .iter()
        .map(pending_from_row)
        .collect())
}

fn pending_from_row(r: &Row) -> Pending {
    pending_from_row_at(r, 0)
}

/// [`DELIVERY_COLUMNS`] read from column `at` on.
fn pending_from_row_at(r: &Row, at: usize) -> Pending {
    Pending {
        event_number: r.get(at),
        event_id: r.get(at + 1),
        attempts: r.get(at + 2),
        resource_type: r.get(at + 3),
        resource_id: r.get(at + 4),
        interaction: Interaction::parse(r.get(at + 5)).unwrap_or(Interaction::Update),
        commit_time: r.get(at + 6),
        resource: r.get(at + 7),
        queued_at: r.get(at + 8),
        version_id: r.get(at + 9),
    }
}

/// A handshake went through: the subscription is active.
pub async fn handshake_ok<C: GenericClient>(c: &C, id: &str) -> Result<()> {
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
pub async fn handshake_failed<C: GenericClient>(c: &C, id: &str, error: &str) -> Result<()> {
    c.execute(
        "UPDATE fhir_cdc.subscription SET status = 'error', last_error = $2,
             failures = failures + 1, updated_at = now()
         WHERE id = $1 AND status = 'requested'",
        &[&id, &error],
    )
    .await?;
    Ok(())
}

/// Notifications of several subscriptions reached their endpoints, in one statement: each
/// `(subscription, eventNumbers)` reached its endpoint. Send tasks hand their marks to one
/// writer per topic (in delivery), which groups whatever is waiting.
pub async fn delivered_many<C: GenericClient>(c: &C, marks: &[(&str, &[i64])]) -> Result<()> {
    let mut subs: Vec<&str> = Vec::new();
    let mut numbers: Vec<i64> = Vec::new();
    for (sub, ns) in marks {
        for n in ns.iter() {
            subs.push(sub);
            numbers.push(*n);
        }
    }
    let mut ids: Vec<&str> = marks.iter().map(|(s, _)| *s).collect();
    ids.sort_unstable();
    ids.dedup();
    // Subscription rows are locked in id order, as dispatch locks them, so a mark and a
    // dispatch round of the same topic cannot deadlock.
    c.execute_typed(
        "WITH l AS MATERIALIZED (
             SELECT id FROM fhir_cdc.subscription WHERE id = ANY($3)
             ORDER BY id FOR NO KEY UPDATE),
         d AS (
             UPDATE fhir_cdc.delivery d SET state = 'delivered', delivered_at = now(),
                 attempts = d.attempts + 1
             FROM unnest($1::text[], $2::int8[]) AS m(sub, n)
             WHERE d.subscription_id = m.sub AND d.event_number = m.n AND d.state = 'pending')
         UPDATE fhir_cdc.subscription s SET failures = 0, last_error = NULL,
             last_sent_at = now(),
             status = CASE WHEN s.status = 'error' THEN 'active' ELSE s.status END,
             next_attempt_at = now(), updated_at = now()
         FROM l WHERE s.id = l.id",
        &[
            (&subs, Type::TEXT_ARRAY),
            (&numbers, Type::INT8_ARRAY),
            (&ids, Type::TEXT_ARRAY),
        ],
    )
    .await?;
    Ok(())
}

/// A failed send as delivery's policy decided it.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub error: &'a str,
    pub retry_in: std::time::Duration,
    /// Attempts per event before it goes to `dead_letter`.
    pub max_attempts: i32,
    /// The subscription's status after this failure.
    pub new_status: Status,
    /// The consecutive failures that turned it off, for the dead-letter reason.
    pub off_after: i32,
    /// The endpoint refused these events for good (a 4xx): they are dead letters now.
    pub dead_now: bool,
}

/// A send failed. Counts the attempt, moves exhausted events and the events of a
/// subscription turned off to `dead_letter`, and schedules the retry.
pub async fn send_failed(
    tx: &tokio_postgres::Transaction<'_>,
    id: &str,
    numbers: &[i64],
    f: &Failure<'_>,
) -> Result<()> {
    tx.execute(
        "UPDATE fhir_cdc.delivery SET attempts = attempts + 1, last_error = $3
         WHERE subscription_id = $1 AND event_number = ANY($2) AND state = 'pending'",
        &[&id, &numbers, &f.error],
    )
    .await?;
    if f.dead_now {
        let reason = format!("refused by the endpoint, not retried: {}", f.error);
        tx.execute(
            "WITH dead AS (
                 UPDATE fhir_cdc.delivery SET state = 'dead'
                 WHERE subscription_id = $1 AND event_number = ANY($2) AND state = 'pending'
                 RETURNING subscription_id, event_number, event_id)
             INSERT INTO fhir_cdc.dead_letter (subscription_id, event_number, event_id, reason)
             SELECT subscription_id, event_number, event_id, $3 FROM dead
             ON CONFLICT DO NOTHING",
            &[&id, &numbers, &reason],
        )
        .await?;
    }
    let exhausted = format!("gave up after {} attempts: {}", f.max_attempts, f.error);
    tx.execute(
        "WITH dead AS (
             UPDATE fhir_cdc.delivery SET state = 'dead'
             WHERE subscription_id = $1 AND state = 'pending' AND attempts >= $2
             RETURNING subscription_id, event_number, event_id)
         INSERT INTO fhir_cdc.dead_letter (subscription_id, event_number, event_id, reason)
         SELECT subscription_id, event_number, event_id, $3 FROM dead
         ON CONFLICT DO NOTHING",
        &[&id, &f.max_attempts, &exhausted],
    )
    .await?;
    tx.execute(
        "UPDATE fhir_cdc.subscription SET failures = failures + 1, last_error = $2,
             updated_at = now(), last_sent_at = now(),
             next_attempt_at = now() + make_interval(secs => $3), status = $4
         WHERE id = $1",
        &[
            &id,
            &f.error,
            &f.retry_in.as_secs_f64(),
            &f.new_status.as_str(),
        ],
    )
    .await?;
    if f.new_status == Status::Off {
        let reason = format!(
            "subscription turned off after {} consecutive failures: {}",
            f.off_after, f.error
        );
        tx.execute(
            "WITH dead AS (
                 UPDATE fhir_cdc.delivery SET state = 'dead'
                 WHERE subscription_id = $1 AND state = 'pending'
                 RETURNING subscription_id, event_number, event_id)
             INSERT INTO fhir_cdc.dead_letter (subscription_id, event_number, event_id, reason)
             SELECT subscription_id, event_number, event_id, $2 FROM dead
             ON CONFLICT DO NOTHING",
            &[&id, &reason],
        )
        .await?;
    }
    Ok(())
}

/// Gives the leases of `ids` back, in one round trip.
pub async fn release_many(c: &Client, ids: &[String]) -> Result<()> {
    let keys: Vec<i64> = ids.iter().map(|id| lock_key(id)).collect();
    c.execute_typed(
        "SELECT count(pg_advisory_unlock(k)) FROM unnest($1::int8[]) AS u(k)",
        &[(&keys, Type::INT8_ARRAY)],
    )
    .await?;
    Ok(())
}
