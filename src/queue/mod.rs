//! The Postgres queue (schema `fhir_cdc`): migrations, the capture batch write, dispatch,
//! and the subscription rows delivery leases. All SQL the daemon runs against its own schema
//! lives under this module.

pub mod batch;
pub mod dispatch;
pub mod migrate;
pub mod subscriptions;
pub mod topics;

use tokio_postgres::{Client, NoTls};

/// Channel capture notifies after each batch commit; the payload is the topic url.
pub const EVENT_CHANNEL: &str = "fhir_cdc_event";
/// Channel dispatch notifies after recording deliveries; the payload is the topic url.
pub const DELIVERY_CHANNEL: &str = "fhir_cdc_delivery";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("queue database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, QueueError>;

impl crate::error::Classify for QueueError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            QueueError::Db(_) | QueueError::Pool(_) => crate::error::ErrorKind::Retryable,
            QueueError::Other(_) => crate::error::ErrorKind::Fatal,
        }
    }
}

/// Tries to take the capture lock of `slot` on this session: one active capture per slot.
pub async fn capture_lock(c: &Client, slot: &str) -> Result<bool> {
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
pub async fn connect(url: &str) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "database connection closed");
        }
    });
    Ok(client)
}

/// WAL bytes the slot holds back, when the slot exists (the queue may live elsewhere than
/// the store: then this reads nothing).
pub async fn slot_lag_bytes<C: tokio_postgres::GenericClient>(
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

/// Pending deliveries per topic.
pub async fn pending_by_topic<C: tokio_postgres::GenericClient>(
    c: &C,
) -> Result<Vec<(String, f64)>> {
    Ok(c.query(
        "SELECT s.topic, count(*)::float8 FROM fhir_cdc.delivery d
         JOIN fhir_cdc.subscription s ON s.id = d.subscription_id
         WHERE d.state = 'pending' GROUP BY s.topic",
        &[],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// Whether the user may create schema `fhir_cdc` (or it exists already).
pub async fn can_hold_schema(c: &Client) -> Result<bool> {
    Ok(c.query_one(
        "SELECT has_database_privilege(current_database(), 'CREATE')
             OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'fhir_cdc')",
        &[],
    )
    .await?
    .get(0))
}

/// A round trip to the queue database (readiness).
pub async fn ping<C: tokio_postgres::GenericClient>(c: &C) -> Result<()> {
    c.execute("SELECT 1", &[]).await?;
    Ok(())
}

/// A pool for the API and delivery workers.
pub fn pool(url: &str, size: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    let pg: tokio_postgres::Config = url.parse()?;
    let mgr = deadpool_postgres::Manager::from_config(
        pg,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Ok(deadpool_postgres::Pool::builder(mgr)
        .max_size(size)
        .build()?)
}

/// `0/16B3748` text form of an LSN, as Postgres prints and parses it.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

pub fn parse_lsn(s: &str) -> Option<u64> {
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
