//! The Postgres queue (schema `fhir_cdc`): migrations, the capture batch write, dispatch,
//! and the subscription rows delivery leases. All SQL the daemon runs against its own schema
//! lives under this module.

pub mod batch;
pub(crate) mod cursor;
pub mod dead;
pub(crate) mod events;
pub mod fatal;
pub(crate) mod gaps;
pub(crate) mod leases;
pub mod matched;
pub mod migrate;
pub(crate) mod retention;
pub mod sealed;
pub(crate) mod store_topics;
pub mod subscriptions;

use tokio_postgres::Client;

/// Channel capture notifies after each batch commit; the payload is the topic url.
pub(crate) const EVENT_CHANNEL: &str = "fhir_cdc_event";
/// Channel notified when a subscription has new work (created, changed, requeued); the
/// payload is the topic url.
pub(crate) const DELIVERY_CHANNEL: &str = "fhir_cdc_delivery";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("database: {}", crate::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("queue database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Other(String),
}

impl From<crate::db::ConnectError> for QueueError {
    fn from(e: crate::db::ConnectError) -> Self {
        match e {
            crate::db::ConnectError::Config(m) => QueueError::Other(format!("database URL: {m}")),
            crate::db::ConnectError::Db(e) => QueueError::Db(e),
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, QueueError>;

impl crate::error::Classify for QueueError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            QueueError::Db(e) if crate::db::is_certificate_error(e) => {
                crate::error::ErrorKind::Fatal
            }
            QueueError::Db(_) | QueueError::Pool(_) => crate::error::ErrorKind::Retryable,
            QueueError::Other(_) => crate::error::ErrorKind::Fatal,
        }
    }

    fn remedy(&self) -> Option<String> {
        match self {
            QueueError::Db(e) if crate::db::is_certificate_error(e) => Some(
                "the database's certificate does not verify: set sslrootcert to the CA that signed it, and use the host name it was issued for (docs/security.md, TLS)".into(),
            ),
            QueueError::Other(m) if m.starts_with("database URL") => Some(
                "fix source.url / queue.url (or FHIR_CDC_SOURCE_URL / FHIR_CDC_QUEUE_URL); `fhir-cdc check` tests them".into(),
            ),
            QueueError::Other(_) => Some(
                "run `fhir-cdc check --config F`; if it finds nothing, report this error with the log".into(),
            ),
            _ => None,
        }
    }
}

/// Tries to take the capture lock of `slot` on this session: one active capture per slot.
pub(crate) async fn capture_lock(c: &Client, slot: &str) -> Result<bool> {
    let key = format!("fhir_cdc.capture.{slot}");
    Ok(c.query_one(
        "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
        &[&key],
    )
    .await?
    .get(0))
}

/// Opens one connection and drives it on a task; errors of that task end up as errors of
/// the next call on the client.
/// The URL's `sslmode` / `sslrootcert` apply (see [`crate::db`]).
pub async fn connect(url: &str) -> Result<Client> {
    crate::db::connect(url).await.map_err(QueueError::from)
}

/// WAL bytes the slot holds back, when the slot exists (the queue may live elsewhere than
/// the store: then this reads nothing).
pub(crate) async fn slot_lag_bytes<C: tokio_postgres::GenericClient>(
    c: &C,
    slot: &str,
) -> Result<Option<f64>> {
    Ok(c.query_opt(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8
         FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await?
    .and_then(|r| r.get(0)))
}

/// Events after the cursor of each topic's furthest-behind subscription that still
/// receives events: the backlog delivery has (before filters, which only delivery applies).
pub(crate) async fn pending_by_topic<C: tokio_postgres::GenericClient>(
    c: &C,
) -> Result<Vec<(String, f64)>> {
    Ok(c.query(
        "SELECT m.topic, (SELECT count(*) FROM fhir_cdc.event e
                          WHERE e.id > m.cursor AND m.topic = ANY(e.topics))::float8
         FROM (SELECT topic, min(cursor_event_id) AS cursor FROM fhir_cdc.subscription
               WHERE status IN ('requested', 'active', 'error') AND NOT refused
               GROUP BY topic) m",
        &[],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// Subscriptions per status, every status listed (0 when none has it).
pub(crate) async fn subscriptions_by_status<C: tokio_postgres::GenericClient>(
    c: &C,
) -> Result<Vec<(String, f64)>> {
    Ok(c.query(
        "SELECT s.status, count(x.id)::float8
         FROM unnest(ARRAY['requested', 'active', 'error', 'off']) AS s(status)
         LEFT JOIN fhir_cdc.subscription x ON x.status = s.status GROUP BY s.status",
        &[],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// Whether the user may create schema `fhir_cdc` (or it exists already).
pub(crate) async fn can_hold_schema(c: &Client) -> Result<bool> {
    Ok(c.query_one(
        "SELECT has_database_privilege(current_database(), 'CREATE')
             OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'fhir_cdc')",
        &[],
    )
    .await?
    .get(0))
}

/// A round trip to the queue database (readiness).
pub(crate) async fn ping<C: tokio_postgres::GenericClient>(c: &C) -> Result<()> {
    c.execute("SELECT 1", &[]).await?;
    Ok(())
}

/// A pool for the API and delivery workers, with the URL's TLS settings.
pub fn pool(url: &str, size: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    crate::db::pool(url, size).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `0/16B3748` text form of an LSN, as Postgres prints and parses it.
pub(crate) fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

pub(crate) fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        for v in [0u64, 1, 0x16B3748, 0x1_0000_0000, u64::MAX] {
            assert_eq!(parse_lsn(&lsn_text(v)), Some(v));
        }
        assert_eq!(lsn_text(0x1_00000010), "1/10");
        assert_eq!(parse_lsn("zz"), None);
    }
}
