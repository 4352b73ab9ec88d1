//! Publication and slot: created when missing, from what the profile says the store's
//! resource tables are. Never includes schema `fhir_cdc`.

use tokio_postgres::Client;

use crate::config::{ProfileKind, SourceConfig};

/// Quotes an identifier for SQL.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` of a generic table entry, quoted.
pub fn qualified(default_schema: &str, table: &str) -> String {
    let (s, t) = table.split_once('.').unwrap_or((default_schema, table));
    format!("{}.{}", ident(s), ident(t))
}

/// The statement that creates the publication this store needs.
pub async fn publication_sql(client: &Client, src: &SourceConfig) -> anyhow::Result<String> {
    let name = ident(&src.publication);
    let with = "WITH (publish = 'insert, update, delete')";
    match src.profile {
        ProfileKind::Aidbox => {
            let version: i32 = client
                .query_one("SELECT current_setting('server_version_num')::int", &[])
                .await?
                .get(0);
            if version >= 150000 {
                // Schema-wide, so resource tables created later are captured too.
                Ok(format!(
                    "CREATE PUBLICATION {name} FOR TABLES IN SCHEMA {} {with}",
                    ident(&src.schema)
                ))
            } else {
                let tables: Vec<String> = client
                    .query(
                        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relkind = 'r'
                           AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'resource')
                           AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'txid')
                         ORDER BY 1",
                        &[&src.schema],
                    )
                    .await?
                    .iter()
                    .map(|r| qualified(&src.schema, r.get(0)))
                    .collect();
                anyhow::ensure!(
                    !tables.is_empty(),
                    "no Aidbox-style resource tables found in schema {}",
                    src.schema
                );
                Ok(format!(
                    "CREATE PUBLICATION {name} FOR TABLE {} {with}",
                    tables.join(", ")
                ))
            }
        }
        ProfileKind::Generic => {
            let tables: Vec<String> = src
                .tables
                .iter()
                .map(|t| qualified(&src.schema, &t.table))
                .collect();
            Ok(format!(
                "CREATE PUBLICATION {name} FOR TABLE {} {with}",
                tables.join(", ")
            ))
        }
    }
}

pub async fn publication_exists(client: &Client, name: &str) -> anyhow::Result<bool> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some())
}

/// The slot's plugin, if the slot exists.
pub async fn slot_plugin(client: &Client, slot: &str) -> anyhow::Result<Option<String>> {
    Ok(client
        .query_opt(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0)))
}

pub fn slot_sql(slot: &str) -> String {
    format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
}

/// Creates what is missing (when allowed) and checks the slot's plugin.
pub async fn ensure(client: &Client, src: &SourceConfig) -> anyhow::Result<()> {
    if !publication_exists(client, &src.publication).await? {
        let sql = publication_sql(client, src).await?;
        anyhow::ensure!(
            src.create_missing,
            "publication {} is missing; create it with: {sql}",
            src.publication
        );
        client.batch_execute(&sql).await?;
        tracing::info!(publication = %src.publication, "created publication");
    }
    match slot_plugin(client, &src.slot).await? {
        Some(p) if p == "pgoutput" => {}
        Some(p) => anyhow::bail!(
            "replication slot {} uses plugin {p}; fhir-cdc needs pgoutput. Drop it or set source.slot",
            src.slot
        ),
        None => {
            let sql = slot_sql(&src.slot);
            anyhow::ensure!(
                src.create_missing,
                "replication slot {} is missing; create it with: {sql}",
                src.slot
            );
            client.batch_execute(&sql).await?;
            tracing::info!(slot = %src.slot, "created logical replication slot");
        }
    }
    Ok(())
}
