//! The capture batch: events of whole store transactions plus the checkpoint, in one queue
//! transaction. This is where invariants 1 and 2 are kept: the checkpoint moves only with
//! the events it covers, and the caller confirms the slot only after `write` returned.

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use tokio_postgres::types::Type;
use tokio_postgres::Client;

use super::{lsn_text, subscriptions, Result, EVENT_CHANNEL};
use crate::fhir::subscription::SubscriptionSpec;
use crate::fhir::topic::Interaction;

/// A matched change: one row in the queue whatever the number of topics it fired.
#[derive(Debug, Clone)]
pub struct QueuedEvent {
    /// The topics it fired, in configuration order; never empty.
    pub topics: Vec<Arc<str>>,
    pub(crate) resource_type: String,
    pub(crate) resource_id: String,
    pub(crate) version_id: Option<String>,
    pub(crate) interaction: Interaction,
    /// The resource as the store wrote it (the WAL bytes, no copy): rendered as FHIR JSON
    /// only when the batch is written and a full-resource subscription reads one of its
    /// topics. Most batches need no body, and a parsed value is several times bigger than
    /// the text a 30,000-row transaction holds.
    pub(crate) resource: Option<Arc<dyn ResourceBody>>,
    /// The canFilterBy values of this resource for its topics, as JSON text
    /// (`{param: Values}`, and `@topic: {url: {param: Values}}` for a topic whose parameter
    /// of that name differs): written as they were serialised, without a `Value` tree.
    pub filters: Option<String>,
    pub(crate) commit_lsn: u64,
    pub(crate) xid: u32,
    pub(crate) commit_time: DateTime<Utc>,
}

pub(crate) use super::events::OWN_FILTERS;

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
pub(crate) async fn full_topics<C: tokio_postgres::GenericClient>(
    c: &C,
) -> Result<HashSet<String>> {
    Ok(c.query_typed(
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
pub(crate) async fn write(
    client: &mut Client,
    slot: &str,
    items: &[Item],
    end_lsn: u64,
) -> Result<usize> {
    let mut open = Open::begin(client).await?;
    open.items(items).await?;
    open.commit(slot, end_lsn).await
}

/// A queue transaction being filled: with [`write`] for a batch of small store
/// transactions, or chunk by chunk for one large store transaction, so capture never holds
/// a whole large transaction in memory. Nothing is visible, and the checkpoint does not
/// move, until [`Open::commit`]; dropping it rolls everything back.
pub(crate) struct Open<'a> {
    tx: tokio_postgres::Transaction<'a>,
    /// Topics that a full-resource subscription reads: only their events carry bodies.
    full: HashSet<String>,
    /// Topics with events in this transaction (notified at commit).
    topics: BTreeSet<Arc<str>>,
    written: usize,
}

impl<'a> Open<'a> {
    pub(crate) async fn begin(client: &'a mut Client) -> Result<Open<'a>> {
        let tx = client.transaction().await?;
        // Bodies stay out of the queue unless a full-resource subscription needs them.
        let full = full_topics(&tx).await?;
        Ok(Open {
            tx,
            full,
            topics: BTreeSet::new(),
            written: 0,
        })
    }

    /// Writes items in stream order: runs of events as one multi-row insert each.
    pub(crate) async fn items(&mut self, items: &[Item]) -> Result<()> {
        let mut run: Vec<&QueuedEvent> = Vec::new();
        for item in items {
            if let Item::Event(e) = item {
                self.topics.extend(e.topics.iter().cloned());
                run.push(e);
                continue;
            }
            self.written += insert_events(&self.tx, &run, &self.full).await?;
            run.clear();
            control(&self.tx, item).await?;
        }
        self.written += insert_events(&self.tx, &run, &self.full).await?;
        Ok(())
    }

    /// Moves the checkpoint of `slot` to `end_lsn` and commits. Returns the number of
    /// events written.
    pub(crate) async fn commit(self, slot: &str, end_lsn: u64) -> Result<usize> {
        // The checkpoint and the wake-ups in one round trip.
        let tx = &self.tx;
        let notify = self.topics.iter().map(|t| async move {
            tx.execute_typed(
                "SELECT pg_notify($1, $2)",
                &[(&EVENT_CHANNEL, Type::TEXT), (&t.as_ref(), Type::TEXT)],
            )
            .await
        });
        tokio::try_join!(advance(&self.tx, slot, end_lsn), async {
            futures::future::try_join_all(notify)
                .await
                .map_err(Into::into)
        },)?;
        self.tx.commit().await?;
        Ok(self.written)
    }
}

/// A control item: a Subscription or SubscriptionTopic written into the store.
async fn control(tx: &tokio_postgres::Transaction<'_>, item: &Item) -> Result<()> {
    match item {
        Item::Event(_) => {}
        Item::UpsertSubscription { id, spec, resource } => {
            subscriptions::upsert(tx, id, "store", spec, resource).await?;
        }
        Item::UpsertTopic {
            store_id,
            url,
            resource,
        } => super::store_topics::upsert(tx, store_id, url, resource).await?,
        Item::DeleteTopic { store_id } => super::store_topics::delete(tx, store_id).await?,
        Item::RefuseSubscription {
            id,
            topic,
            resource,
            reason,
        } => subscriptions::refuse(tx, id, topic, resource, reason).await?,
        Item::DeleteSubscription { id } => {
            tx.execute(
                "DELETE FROM fhir_cdc.subscription WHERE id = $1 AND origin = 'store'",
                &[id],
            )
            .await?;
        }
    }
    Ok(())
}

/// The queue's event columns in the order [`insert_events`] writes them.
const EVENT_COLUMNS: &str = "topics, resource_type, resource_id, version_id, interaction, \
     commit_lsn, xid, commit_time, resource, filters";

/// Their types, for the binary COPY.
const EVENT_TYPES: [Type; 10] = [
    Type::TEXT_ARRAY,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::PG_LSN,
    Type::INT8,
    Type::TIMESTAMPTZ,
    // `resource` and `filters`: JSON as text, which the server stores without parsing
    // (sql/010_event_text.sql).
    Type::TEXT,
    Type::TEXT,
];

/// Writes a run of events with one binary `COPY`: Postgres spends several times less on
/// it than on a multi-row `INSERT … SELECT unnest(…)` (no planning, no text parsing of
/// LSNs and arrays), and Postgres shares the two cores with capture. Ids come from the
/// sequence in row order, so they follow stream order.
async fn insert_events(
    tx: &tokio_postgres::Transaction<'_>,
    run: &[&QueuedEvent],
    full: &HashSet<String>,
) -> Result<usize> {
    use futures::SinkExt;
    if run.is_empty() {
        return Ok(0);
    }
    let mut buf = BytesMut::with_capacity(copy_capacity(run));
    encode_events(run, full, &mut buf)?;
    let sink = tx
        .copy_in(&format!(
            "COPY fhir_cdc.event ({EVENT_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    futures::pin_mut!(sink);
    sink.send(buf.freeze()).await?;
    Ok(sink.finish().await? as usize)
}

/// About the size of a run's binary `COPY` stream without bodies: the buffer is sized once
/// instead of doubling from empty (its reallocations were 3% of capture's CPU in a drain).
fn copy_capacity(run: &[&QueuedEvent]) -> usize {
    const HEADER_AND_TRAILER: usize = 21;
    // 10 length words, the fixed-width columns, and the short texts around them.
    const ROW: usize = 160;
    let variable: usize = run
        .iter()
        .map(|e| e.filters.as_ref().map_or(0, String::len) + e.resource_id.len())
        .sum();
    HEADER_AND_TRAILER + run.len() * ROW + variable
}

/// The binary `COPY` stream of a run of events (header, rows, trailer) in one buffer: the
/// whole run goes to the server as one message, and capture's cost of it can be measured
/// without a server (`benches/capture.rs`).
pub fn encode_events(
    run: &[&QueuedEvent],
    full: &HashSet<String>,
    buf: &mut BytesMut,
) -> Result<()> {
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&[0; 8]);
    for e in run {
        let body = if e.topics.iter().any(|t| full.contains(t.as_ref())) {
            render(e.resource.as_deref())
        } else {
            None
        };
        encode_row(e, body.as_deref(), buf)?;
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    Ok(())
}

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// One event row in the binary `COPY` format of [`EVENT_TYPES`], written directly: the
/// generic `ToSql` path (type checks, an array encoder, boxed errors) was about an eighth of
/// capture's instructions per row. `tests::rows_encode_as_tokio_postgres_would` holds it to
/// that path byte for byte.
fn encode_row(e: &QueuedEvent, body: Option<&str>, buf: &mut BytesMut) -> Result<()> {
    let too_big = || super::QueueError::Other("an event column over 2 GB".into());
    let len = |n: usize| i32::try_from(n).map_err(|_| too_big());
    buf.extend_from_slice(&(EVENT_TYPES.len() as i16).to_be_bytes());
    // text[]: dimensions, has-nulls, element type, then the one dimension and its items.
    let items: usize = e.topics.iter().map(|t| 4 + t.len()).sum();
    buf.extend_from_slice(&len(20 + items)?.to_be_bytes());
    buf.extend_from_slice(&1i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&Type::TEXT.oid().to_be_bytes());
    buf.extend_from_slice(&len(e.topics.len())?.to_be_bytes());
    buf.extend_from_slice(&1i32.to_be_bytes());
    for t in &e.topics {
        put_bytes(buf, t.as_bytes(), len(t.len())?);
    }
    for text in [&e.resource_type, &e.resource_id] {
        put_bytes(buf, text.as_bytes(), len(text.len())?);
    }
    match &e.version_id {
        Some(v) => put_bytes(buf, v.as_bytes(), len(v.len())?),
        None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    let interaction = e.interaction.as_str();
    put_bytes(buf, interaction.as_bytes(), len(interaction.len())?);
    put_bytes(buf, &e.commit_lsn.to_be_bytes(), 8);
    put_bytes(buf, &i64::from(e.xid).to_be_bytes(), 8);
    let micros = e.commit_time.timestamp_micros() - PG_EPOCH_MICROS;
    put_bytes(buf, &micros.to_be_bytes(), 8);
    for json in [body, e.filters.as_deref()] {
        match json {
            Some(j) => put_bytes(buf, j.as_bytes(), len(j.len())?),
            None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    Ok(())
}

/// A field: its length, then its bytes.
fn put_bytes(buf: &mut BytesMut, bytes: &[u8], len: i32) {
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(bytes);
}

/// A resource body as capture hands it over: rendered as FHIR JSON only when a batch needs
/// it. The queue does not know the store's row formats; capture implements this for them.
pub(crate) trait ResourceBody: Send + Sync + std::fmt::Debug {
    fn render(&self) -> Option<String>;
}

/// The FHIR JSON text of an event's resource.
fn render(row: Option<&dyn ResourceBody>) -> Option<String> {
    row?.render()
}

/// Moves the checkpoint of `slot` to `lsn` when nothing is waiting to be queued: every store
/// commit up to `lsn` is queued or has nothing for us (or, inside a batch's transaction,
/// with the events it covers). Never moves it back.
pub(crate) async fn advance<C: tokio_postgres::GenericClient>(
    client: &C,
    slot: &str,
    lsn: u64,
) -> Result<()> {
    client
        .execute_typed(
            "INSERT INTO fhir_cdc.checkpoint (slot, lsn) VALUES ($1, $2::text::pg_lsn)
             ON CONFLICT (slot) DO UPDATE SET lsn = EXCLUDED.lsn, updated_at = now()
             WHERE fhir_cdc.checkpoint.lsn < EXCLUDED.lsn",
            &[(&slot, Type::TEXT), (&lsn_text(lsn), Type::TEXT)],
        )
        .await?;
    Ok(())
}

/// The end LSN of the last queued store commit for `slot`.
pub(crate) async fn checkpoint(client: &Client, slot: &str) -> Result<Option<u64>> {
    let row = client
        .query_opt(
            "SELECT lsn::text FROM fhir_cdc.checkpoint WHERE slot = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|r| super::parse_lsn(r.get::<_, &str>(0))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::types::{IsNull, PgLsn, ToSql};

    /// The rows as tokio-postgres' `ToSql` encodes the same values (the encoder before
    /// `encode_row`).
    fn oracle(e: &QueuedEvent, body: Option<&str>) -> BytesMut {
        let mut buf = BytesMut::new();
        let topics: Vec<&str> = e.topics.iter().map(AsRef::as_ref).collect();
        let filters = e.filters.as_deref();
        let row: [&(dyn ToSql + Sync); 10] = [
            &topics,
            &e.resource_type,
            &e.resource_id,
            &e.version_id,
            &e.interaction.as_str(),
            &PgLsn::from(e.commit_lsn),
            &i64::from(e.xid),
            &e.commit_time,
            &body,
            &filters,
        ];
        buf.extend_from_slice(&(row.len() as i16).to_be_bytes());
        for (value, ty) in row.iter().zip(&EVENT_TYPES) {
            let at = buf.len();
            buf.extend_from_slice(&[0; 4]);
            let len = match value.to_sql_checked(ty, &mut buf).unwrap() {
                IsNull::Yes => -1,
                IsNull::No => i32::try_from(buf.len() - at - 4).unwrap(),
            };
            buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        }
        buf
    }

    fn event(topics: &[&str], version: Option<&str>, filters: Option<&str>) -> QueuedEvent {
        QueuedEvent {
            topics: topics.iter().map(|t| Arc::from(*t)).collect(),
            resource_type: "Observation".into(),
            resource_id: "o-é1".into(),
            version_id: version.map(String::from),
            interaction: Interaction::Update,
            resource: None,
            filters: filters.map(String::from),
            commit_lsn: 0x1_6B37_4D48,
            xid: u32::MAX,
            commit_time: DateTime::parse_from_rfc3339("2026-12-03T14:05:06.123456Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn rows_encode_as_tokio_postgres_would() {
        let cases = [
            (
                event(
                    &["http://t/1"],
                    Some("7"),
                    Some(r#"{"patient":{"t":"reference","v":["Patient/p1"]}}"#),
                ),
                None,
            ),
            (
                event(&["http://t/1", "http://t/ü2", ""], None, None),
                Some(r#"{"resourceType":"Observation"}"#),
            ),
            (event(&["a"], Some(""), Some("{}")), Some("{}")),
        ];
        for (e, body) in &cases {
            let mut ours = BytesMut::new();
            encode_row(e, *body, &mut ours).unwrap();
            assert_eq!(ours, oracle(e, *body), "{e:?} {body:?}");
        }
        // Before 2000 (a negative Postgres timestamp) too.
        let mut old = event(&["a"], None, None);
        old.commit_time = DateTime::parse_from_rfc3339("1999-12-31T23:59:59.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut ours = BytesMut::new();
        encode_row(&old, None, &mut ours).unwrap();
        assert_eq!(ours, oracle(&old, None));
    }
}
