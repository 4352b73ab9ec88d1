//! Getting a stream: checks and creates what capture needs in the store (wal_level, the
//! publication over the profile's tables, the slot), takes the slot's standby lock, and
//! starts replication at the checkpoint.

use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig};
use std::time::Duration;
use tokio::sync::watch;

use super::error::{CaptureError, Result};
use crate::config::SourceConfig;
use crate::queue;
use crate::store::{setup, StoreProfile};

/// Replication connection settings from a `postgresql://` URL.
pub(crate) fn replication_config(
    url: &str,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig> {
    let target = crate::db::Target::parse(url).map_err(CaptureError::Config)?;
    let u = url::Url::parse(&target.url)
        .map_err(|_| CaptureError::Config("source.url is not a postgresql:// URL".into()))?;
    let host = u.host_str().unwrap_or("localhost").to_string();
    let user = if u.username().is_empty() {
        "postgres".to_string()
    } else {
        url_decode(u.username())
    };
    let password = u.password().map(url_decode).unwrap_or_default();
    let db = u.path().trim_start_matches('/');
    let db = if db.is_empty() {
        user.clone()
    } else {
        url_decode(db)
    };
    Ok(
        ReplicationConfig::new(host, user, password, db, slot, publication)
            .with_port(u.port().unwrap_or(5432))
            .with_application_name(format!("fhir-cdc-{slot}"))
            .with_tls(target.replication_tls()),
    )
}

fn url_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}

/// wal_level, publication and slot, as the profile needs them. `checkpoint` > 0 means capture
/// used the slot before; `resync_from_now` allows replacing a lost slot (then `Some`).
pub(crate) async fn prepare_store(
    src: &SourceConfig,
    profile: &dyn StoreProfile,
    checkpoint: u64,
    resync_from_now: bool,
) -> Result<Option<setup::Resync>> {
    let mut store = queue::connect(&src.url).await?;
    setup::check_wal_level(&store).await?;
    profile.prepare().await?;
    setup::sync_publication(&mut store, profile, &src.publication, src.create_missing).await?;
    let policy = setup::SlotPolicy {
        create_missing: src.create_missing,
        streamed_before: checkpoint > 0,
        resync_from_now,
    };
    Ok(setup::ensure_slot(&store, &src.slot, policy).await?)
}

/// Waits until this instance holds the slot's lock: one active capture per slot; a second
/// instance waits here as a standby. `false` when shutdown came first.
pub(crate) async fn take_slot_lock(
    qc: &tokio_postgres::Client,
    slot: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<bool> {
    while !queue::capture_lock(qc, slot).await? {
        tracing::info!(slot = %slot, "another capture holds the slot; waiting as standby");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return Ok(false),
        }
    }
    Ok(true)
}

/// Starts streaming the slot from the checkpoint (0: from the slot's own position).
pub(crate) async fn start_replication(
    src: &SourceConfig,
    checkpoint: u64,
) -> Result<ReplicationClient> {
    let mut rc = replication_config(&src.url, &src.slot, &src.publication)?
        .with_status_interval(Duration::from_secs(1));
    if checkpoint > 0 {
        rc = rc
            .with_start_lsn(Lsn(checkpoint))
            .with_ack_lsn(Lsn(checkpoint));
    }
    let mut repl = ReplicationClient::connect(rc)
        .await
        .map_err(|e| CaptureError::Replication(format!("starting replication: {e}")))?;
    repl.wait_started()
        .await
        .map_err(|e| CaptureError::Replication(format!("starting replication: {e}")))?;
    Ok(repl)
}
