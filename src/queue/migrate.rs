//! Schema migrations from `sql/`, applied in order at start-up under an advisory lock so
//! capture and delivery processes starting together do not race.

use tokio_postgres::Client;

use super::Result;

const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../sql/001_init.sql")),
    (2, include_str!("../../sql/002_channel.sql")),
    (3, include_str!("../../sql/003_capture_gap.sql")),
    (4, include_str!("../../sql/004_channels.sql")),
    (5, include_str!("../../sql/005_event_topics.sql")),
    (6, include_str!("../../sql/006_cursor.sql")),
    (7, include_str!("../../sql/007_signing_secret.sql")),
    (8, include_str!("../../sql/008_destinations.sql")),
    (9, include_str!("../../sql/009_fatal_error.sql")),
    (10, include_str!("../../sql/010_event_text.sql")),
];

/// Arbitrary but fixed key for the migration lock.
const LOCK_KEY: i64 = 0x0f4c_dc00_0001;

pub async fn run(client: &mut Client) -> Result<()> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await?;
    result
}

async fn apply(client: &mut Client) -> Result<()> {
    client
        .batch_execute(
            "SET client_min_messages = warning;
             CREATE SCHEMA IF NOT EXISTS fhir_cdc;
             CREATE TABLE IF NOT EXISTS fhir_cdc.schema_migration (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    for (version, sql) in MIGRATIONS {
        let done = client
            .query_opt(
                "SELECT 1 FROM fhir_cdc.schema_migration WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if done {
            continue;
        }
        let tx = client.transaction().await?;
        // 001 creates the schema itself; it already exists for the bookkeeping table.
        let sql = sql.replace("CREATE SCHEMA IF NOT EXISTS fhir_cdc;", "");
        tx.batch_execute(&sql).await?;
        tx.execute(
            "INSERT INTO fhir_cdc.schema_migration (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "applied queue migration");
    }
    Ok(())
}
