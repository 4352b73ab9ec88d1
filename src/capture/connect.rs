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

/// Replication connection settings from a `postgresql://` URL. A host that is a directory
/// (`postgresql:///fhir?host=/var/run/postgresql&user=cdc`, or `%2Fvar%2Frun%2Fpostgresql`
/// as the URL's host, as libpq and tokio-postgres read them) is the server's Unix socket
/// there, for the replication stream as for the other connections: a daemon on the
/// database's own machine then spares the walsender loopback TCP's cost per message
/// (`pg_recvlogical` drained 73,000 rows/s over TCP and 93,000 over the socket in one
/// `scripts/bench.sh` run: `recvlogical_socket_rows_per_s`).
pub(crate) fn replication_config(
    url: &str,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig> {
    let target = crate::db::Target::parse(url).map_err(CaptureError::Config)?;
    let u = url::Url::parse(&target.url)
        .map_err(|_| CaptureError::Config("source.url is not a postgresql:// URL".into()))?;
    let query = |k: &str| {
        u.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    };
    let host = query("host")
        .or_else(|| u.host_str().filter(|h| !h.is_empty()).map(url_decode))
        .unwrap_or_else(|| "localhost".to_string());
    let port = match query("port") {
        Some(p) => p
            .parse()
            .map_err(|_| CaptureError::Config(format!("source.url: port={p} is not a port")))?,
        None => u.port().unwrap_or(5432),
    };
    let user = match query("user") {
        Some(user) => user,
        None if u.username().is_empty() => "postgres".to_string(),
        None => url_decode(u.username()),
    };
    let password = u.password().map(url_decode).unwrap_or_default();
    let db = u.path().trim_start_matches('/');
    let db = if db.is_empty() {
        user.clone()
    } else {
        url_decode(db)
    };
    let tls = target.replication_tls();
    let socket = host.starts_with('/');
    if socket && tls.mode.requires_tls() {
        return Err(CaptureError::Config(format!(
            "source.url: host {host} is a Unix socket, which has no TLS: drop sslmode={}",
            crate::db::mode_name(target.mode)
        )));
    }
    Ok(
        ReplicationConfig::new(host, user, password, db, slot, publication)
            .with_port(port)
            .with_application_name(format!("fhir-cdc-{slot}"))
            .with_tls(if socket {
                pgwire_replication::TlsConfig::disabled()
            } else {
                tls
            }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> (String, u16, String, String, bool) {
        let c = replication_config(url, "s", "p").expect("parses");
        let socket = c.is_unix_socket();
        (c.host, c.port, c.user, c.database, socket)
    }

    #[test]
    fn tcp_hosts_and_unix_socket_directories() {
        assert_eq!(
            target("postgresql://cdc@db.example:6432/fhir"),
            (
                "db.example".into(),
                6432,
                "cdc".into(),
                "fhir".into(),
                false
            )
        );
        // libpq's forms of a socket directory: a `host` parameter, or an encoded host.
        assert_eq!(
            target("postgresql:///fhir?host=/var/run/postgresql&port=5433&user=cdc"),
            (
                "/var/run/postgresql".into(),
                5433,
                "cdc".into(),
                "fhir".into(),
                true
            )
        );
        assert_eq!(
            target("postgresql://cdc@%2Fvar%2Frun%2Fpostgresql/fhir"),
            (
                "/var/run/postgresql".into(),
                5432,
                "cdc".into(),
                "fhir".into(),
                true
            )
        );
        assert_eq!(target("postgresql:///fhir").0, "localhost");
    }

    #[test]
    fn a_socket_with_tls_required_or_a_bad_port_is_refused() {
        let e = replication_config(
            "postgresql:///fhir?host=/run/postgresql&sslmode=require",
            "s",
            "p",
        )
        .expect_err("no TLS on a socket");
        assert!(e.to_string().contains("Unix socket"), "{e}");
        let prefer = replication_config("postgresql:///fhir?host=/run/pg&sslmode=prefer", "s", "p")
            .expect("prefer falls back to plain");
        assert!(!prefer.tls.mode.requires_tls());
        assert!(replication_config("postgresql:///fhir?host=/run/pg&port=x", "s", "p").is_err());
    }
}
