//! The capture batch: events of whole store transactions plus the checkpoint, in one queue
//! transaction. This is where invariants 1 and 2 are kept: the checkpoint moves only with
//! the events it covers, and the caller confirms the slot only after `write` returned.

use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use tokio_postgres::Client;

use super::{lsn_text, subscriptions, Result, EVENT_CHANNEL};
use crate::fhir::subscription::SubscriptionSpec;
use crate::fhir::topic::Interaction;

/// A matched change: one row in the queue whatever the number of topics it fired.
#[derive(Debug, Clone)]
pub struct QueuedEvent {
    /// The topics it fired, in configuration order; never empty.
    pub topics: Vec<Arc<str>>,
    pub resource_type: String,
    pub resource_id: String,
    pub version_id: Option<String>,
    pub interaction: Interaction,
    /// The resource as JSON text (a parsed value is several times bigger, and a 30,000-row
    /// transaction holds them all); stored only for topics a full-resource subscription reads.
    pub resource: Option<Arc<str>>,
    /// The canFilterBy values of this resource for its topics (`{param: Values}`, and
    /// `@topic: {url: {param: Values}}` for a topic whose parameter of that name differs).
    pub filters: Option<Value>,
    pub commit_lsn: u64,
    pub xid: u32,
    pub commit_time: DateTime<Utc>,
}

/// The key of topic-specific filter values in an event's `filters`.
pub const OWN_FILTERS: &str = "@topic";

/// What a store transaction contributes to the queue, in stream order.
#[derive(Debug, Clone)]
pub enum Item {
    Event(QueuedEvent),
    /// A Subscription resource written into the store.
    UpsertSubscription {
        id: String,
        spec: Box<SubscriptionSpec>,
        resource: Value,
    },
    DeleteSubscription {
        id: String,
    },
    /// A Subscription written into the store that fails validation.
    RefuseSubscription {
        id: String,
        topic: String,
        resource: Value,
        reason: String,
    },
    /// A SubscriptionTopic written into the store (R4: the backport Basic).
    UpsertTopic {
        store_id: String,
        url: String,
        resource: Value,
    },
    DeleteTopic {
        store_id: String,
    },
}

/// Topics that a full-resource subscription reads: only their events carry bodies.
pub async fn full_topics<C: tokio_postgres::GenericClient>(c: &C) -> Result<HashSet<String>> {
    Ok(c.query(
        "SELECT DISTINCT topic FROM fhir_cdc.subscription
         WHERE content = 'full-resource' AND status <> 'off'",
        &[],
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// Writes `items` and moves the checkpoint of `slot` to `end_lsn`, atomically.
/// Returns the number of events written.
pub async fn write(client: &mut Client, slot: &str, items: &[Item], end_lsn: u64) -> Result<usize> {
    let tx = client.transaction().await?;
    // Bodies stay out of the queue unless a full-resource subscription needs them.
    let full = full_topics(&tx).await?;
    let mut topics = BTreeSet::new();
    let mut run: Vec<&QueuedEvent> = Vec::new();
    let mut written = 0;
    for item in items {
        match item {
            Item::Event(e) => {
                topics.extend(e.topics.iter().cloned());
                run.push(e);
            }
            Item::UpsertSubscription { id, spec, resource } => {
                written += insert_events(&tx, &run, &full).await?;
                run.clear();
                subscriptions::upsert(&tx, id, "store", spec, resource).await?;
            }
            Item::UpsertTopic {
                store_id,
                url,
                resource,
            } => {
                written += insert_events(&tx, &run, &full).await?;
                run.clear();
                super::topics::upsert(&tx, store_id, url, resource).await?;
            }
            Item::DeleteTopic { store_id } => {
                written += insert_events(&tx, &run, &full).await?;
                run.clear();
                super::topics::delete(&tx, store_id).await?;
            }
            Item::RefuseSubscription {
                id,
                topic,
                resource,
                reason,
            } => {
                subscriptions::refuse(&tx, id, topic, resource, reason).await?;
            }
            Item::DeleteSubscription { id } => {
                written += insert_events(&tx, &run, &full).await?;
                run.clear();
                tx.execute(
                    "DELETE FROM fhir_cdc.subscription WHERE id = $1 AND origin = 'store'",
                    &[id],
                )
                .await?;
            }
        }
    }
    written += insert_events(&tx, &run, &full).await?;
    tx.execute(
        "INSERT INTO fhir_cdc.checkpoint (slot, lsn) VALUES ($1, $2::text::pg_lsn)
         ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, updated_at = now()
         WHERE fhir_cdc.checkpoint.lsn < EXCLUDED.lsn",
        &[&slot, &lsn_text(end_lsn)],
    )
    .await?;
    for t in &topics {
        tx.execute("SELECT pg_notify($1, $2)", &[&EVENT_CHANNEL, &t.as_ref()])
            .await?;
    }
    tx.commit().await?;
    Ok(written)
}

/// Joins an event's topics into one text for the multi-row insert (Postgres arrays of
/// arrays must be rectangular); topic urls never hold a control character.
const TOPIC_SEPARATOR: &str = "\u{1f}";

async fn insert_events(
    tx: &tokio_postgres::Transaction<'_>,
    run: &[&QueuedEvent],
    full: &HashSet<String>,
) -> Result<usize> {
    if run.is_empty() {
        return Ok(0);
    }
    let n = run.len();
    let mut topics = Vec::with_capacity(n);
    let mut rtype = Vec::with_capacity(n);
    let mut rid = Vec::with_capacity(n);
    let mut ver = Vec::with_capacity(n);
    let mut inter = Vec::with_capacity(n);
    let mut lsn = Vec::with_capacity(n);
    let mut xid = Vec::with_capacity(n);
    let mut time = Vec::with_capacity(n);
    let mut body: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut filters: Vec<Option<&Value>> = Vec::with_capacity(n);
    for e in run {
        topics.push(e.topics.join(TOPIC_SEPARATOR));
        rtype.push(e.resource_type.as_str());
        rid.push(e.resource_id.as_str());
        ver.push(e.version_id.as_deref());
        inter.push(e.interaction.as_str());
        lsn.push(lsn_text(e.commit_lsn));
        xid.push(i64::from(e.xid));
        time.push(e.commit_time);
        filters.push(e.filters.as_ref());
        body.push(if e.topics.iter().any(|t| full.contains(t.as_ref())) {
            e.resource.as_deref()
        } else {
            None
        });
    }
    // unnest keeps array order, so ids follow stream order.
    let rows = tx
        .execute(
            "INSERT INTO fhir_cdc.event
                 (topics, resource_type, resource_id, version_id, interaction, commit_lsn, xid, commit_time, resource, filters)
             SELECT string_to_array(t, E'\\x1f'), rt, ri, v, i, l::pg_lsn, x, ct, b::jsonb, f
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::int8[], $8::timestamptz[], $9::text[], $10::jsonb[])
                  WITH ORDINALITY AS u(t, rt, ri, v, i, l, x, ct, b, f, ord)
             ORDER BY ord",
            &[&topics, &rtype, &rid, &ver, &inter, &lsn, &xid, &time, &body, &filters],
        )
        .await?;
    Ok(rows as usize)
}

/// Moves the checkpoint of `slot` to `lsn` when nothing is waiting to be queued: every store
/// commit up to `lsn` is queued or has nothing for us. Never moves it back.
pub async fn advance(client: &Client, slot: &str, lsn: u64) -> Result<()> {
    client
        .execute(
            "INSERT INTO fhir_cdc.checkpoint (slot, lsn) VALUES ($1, $2::text::pg_lsn)
             ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, updated_at = now()
             WHERE fhir_cdc.checkpoint.lsn < EXCLUDED.lsn",
            &[&slot, &lsn_text(lsn)],
        )
        .await?;
    Ok(())
}

/// The end LSN of the last queued store commit for `slot`.
pub async fn checkpoint(client: &Client, slot: &str) -> Result<Option<u64>> {
    let row = client
        .query_opt(
            "SELECT lsn::text FROM fhir_cdc.checkpoint WHERE slot = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| super::parse_lsn(r.get::<_, &str>(0))))
}
