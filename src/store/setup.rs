//! The store-side objects capture needs: the publication (naming only the tables the
//! profile reads) and the logical replication slot. All SQL fhir-cdc runs against the store's
//! catalog lives here.

use tokio_postgres::Client;

use super::{StoreError, StoreProfile, TableInfo, TableName};

type Result<T> = std::result::Result<T, StoreError>;

/// The publication's options. Updates and deletes must be published: they are interactions.
const PUBLISH: &str = "WITH (publish = 'insert, update, delete')";

/// Tables (and partitioned tables) of the database outside the system schemas and our own,
/// with their columns in attribute order.
pub(crate) async fn catalog(c: &Client) -> Result<Vec<TableInfo>> {
    let rows = c
        .query(
            "SELECT n.nspname::text, c.relname::text,
                    array_agg(a.attname::text ORDER BY a.attnum)
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'fhir_cdc')
               AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableInfo {
            schema: r.get(0),
            name: r.get(1),
            columns: r.get(2),
            types: Vec::new(),
        })
        .collect())
}

/// What a publication covers now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Publication {
    pub(crate) exists: bool,
    pub(crate) all_tables: bool,
    /// Schemas published whole (`FOR TABLES IN SCHEMA`, Postgres 15+).
    pub(crate) schemas: Vec<String>,
    /// Tables named one by one.
    pub(crate) tables: Vec<TableName>,
}

pub(crate) async fn publication(c: &Client, name: &str) -> Result<Publication> {
    let Some(row) = c
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
    else {
        return Ok(Publication::default());
    };
    let tables = c
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_publication p
             JOIN pg_publication_rel pr ON pr.prpubid = p.oid
             JOIN pg_class c ON c.oid = pr.prrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE p.pubname = $1 ORDER BY 1, 2",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| TableName {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect();
    let version: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let schemas = if version >= 150000 {
        c.query(
            "SELECT n.nspname::text FROM pg_publication p
             JOIN pg_publication_namespace pn ON pn.pnpubid = p.oid
             JOIN pg_namespace n ON n.oid = pn.pnnspid
             WHERE p.pubname = $1 ORDER BY 1",
            &[&name],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect()
    } else {
        Vec::new()
    };
    Ok(Publication {
        exists: true,
        all_tables: row.get(0),
        schemas,
        tables,
    })
}

/// The statements that make publication `name` cover exactly `wanted` (adding tables the
/// profile reads; replacing whole-schema or all-tables coverage, which would make Postgres
/// refuse the store's own UPDATE/DELETE on tables without a replica identity). Tables named
/// by hand beyond `wanted` are left alone. Empty when nothing needs to change.
pub(crate) fn plan(name: &str, now: &Publication, wanted: &[TableName]) -> Vec<String> {
    let list = |t: &[&TableName]| {
        t.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let name_q = super::ident(name);
    let all: Vec<&TableName> = wanted.iter().collect();
    if !now.exists {
        return vec![format!(
            "CREATE PUBLICATION {name_q} FOR TABLE {} {PUBLISH}",
            list(&all)
        )];
    }
    if now.all_tables {
        return vec![
            format!("DROP PUBLICATION {name_q}"),
            format!(
                "CREATE PUBLICATION {name_q} FOR TABLE {} {PUBLISH}",
                list(&all)
            ),
        ];
    }
    let mut out: Vec<String> = now
        .schemas
        .iter()
        .map(|s| {
            format!(
                "ALTER PUBLICATION {name_q} DROP TABLES IN SCHEMA {}",
                super::ident(s)
            )
        })
        .collect();
    let missing: Vec<&TableName> = wanted.iter().filter(|t| !now.tables.contains(t)).collect();
    if !missing.is_empty() {
        out.push(format!(
            "ALTER PUBLICATION {name_q} ADD TABLE {}",
            list(&missing)
        ));
    }
    out
}

/// What the publication should become, from the catalog and the profile.
pub(crate) async fn publication_plan(
    c: &Client,
    profile: &dyn StoreProfile,
    name: &str,
) -> Result<Vec<String>> {
    let wanted = profile.publication_tables(&catalog(c).await?)?;
    Ok(plan(name, &publication(c, name).await?, &wanted))
}

/// Brings the publication in line with the profile's tables: run when capture starts and
/// periodically, so resource tables created later are added. Refuses with the SQL to run
/// when `create_missing` is off.
pub(crate) async fn sync_publication(
    c: &mut Client,
    profile: &dyn StoreProfile,
    name: &str,
    create_missing: bool,
) -> Result<()> {
    let sql = publication_plan(c, profile, name).await?;
    if sql.is_empty() {
        return Ok(());
    }
    if !create_missing {
        return Err(StoreError::Config(format!(
            "publication {name} does not cover exactly the tables the profile reads; run: {}",
            sql.join("; ")
        )));
    }
    let tx = c.transaction().await?;
    for s in &sql {
        tx.batch_execute(s).await?;
    }
    tx.commit().await?;
    for s in &sql {
        tracing::info!(publication = %name, statement = %s, "publication updated");
    }
    Ok(())
}

/// The slot's plugin, if the slot exists.
pub(crate) async fn slot_plugin(c: &Client, slot: &str) -> Result<Option<String>> {
    Ok(c.query_opt(
        "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await?
    .map(|r| r.get(0)))
}

pub(crate) fn slot_sql(slot: &str) -> String {
    format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")
}

/// A slot as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotState {
    pub(crate) plugin: String,
    /// `reserved`, `extended`, `unreserved` or `lost` (Postgres 13+).
    pub(crate) wal_status: Option<String>,
}

pub(crate) async fn slot_state(c: &Client, slot: &str) -> Result<Option<SlotState>> {
    Ok(c.query_opt(
        "SELECT plugin::text, wal_status::text FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await?
    .map(|r| SlotState {
        plugin: r.get(0),
        wal_status: r.get(1),
    }))
}

/// How capture may treat the slot at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotPolicy {
    pub(crate) create_missing: bool,
    /// Capture ran on this slot before (a checkpoint exists): a missing slot means lost
    /// changes, never a first start.
    pub(crate) streamed_before: bool,
    /// `--resync-from-now`: replace a lost or missing slot with a new one, knowingly.
    pub(crate) resync_from_now: bool,
}

/// A slot replaced on request (`--resync-from-now`): what was lost, and the WAL position
/// capture resumes from. Changes committed before it and after the last checkpoint were
/// never read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resync {
    pub(crate) reason: String,
    pub(crate) resumed_at: String,
}

/// Creates the slot on a first start, checks its plugin and health, and refuses to go on
/// silently when it was lost: changes would be missing without anyone knowing. `Some` when
/// a lost slot was replaced on request.
pub(crate) async fn ensure_slot(
    c: &Client,
    slot: &str,
    policy: SlotPolicy,
) -> Result<Option<Resync>> {
    let state = slot_state(c, slot).await?;
    let lost = state
        .as_ref()
        .is_some_and(|s| s.wal_status.as_deref() == Some("lost"));
    if lost || (state.is_none() && policy.streamed_before) {
        return resync_or_stop(c, slot, lost, policy).await;
    }
    match state {
        Some(s) if s.plugin == "pgoutput" => {
            if s.wal_status.as_deref() == Some("unreserved") {
                tracing::warn!(slot = %slot, "replication slot is about to lose WAL it needs (wal_status unreserved, max_slot_wal_keep_size); capture is too far behind");
            }
            Ok(None)
        }
        Some(s) => Err(StoreError::Config(format!(
            "replication slot {slot} uses plugin {}; fhir-cdc needs pgoutput. Drop it or set source.slot",
            s.plugin
        ))),
        None if !policy.create_missing => Err(StoreError::Config(format!(
            "replication slot {slot} is missing; create it with: {}",
            slot_sql(slot)
        ))),
        None => create_slot(c, slot).await.map(|_| None),
    }
}

async fn create_slot(c: &Client, slot: &str) -> Result<()> {
    c.batch_execute(&slot_sql(slot)).await?;
    tracing::info!(slot = %slot, "created logical replication slot");
    Ok(())
}

async fn resync_or_stop(
    c: &Client,
    slot: &str,
    lost: bool,
    policy: SlotPolicy,
) -> Result<Option<Resync>> {
    let what = if lost {
        format!("replication slot {slot} was invalidated (wal_status lost: the WAL it needed was removed, see max_slot_wal_keep_size)")
    } else {
        format!("replication slot {slot} disappeared after capture had used it (dropped by hand, or invalidated and removed)")
    };
    if !policy.resync_from_now {
        return Err(StoreError::SlotLost(format!(
            "{what}. Store changes committed after the last checkpoint may never have been captured, and fhir-cdc will not pretend otherwise. \
             To start again from now, accepting that gap, run `fhir-cdc capture --resync-from-now` (or `run --resync-from-now`)"
        )));
    }
    if lost {
        c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await?;
    }
    create_slot(c, slot).await?;
    let now: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    tracing::error!(slot = %slot, resumed_at = %now, "{what}; resynced from now on request (--resync-from-now): store changes between the last checkpoint and {now} were NOT captured");
    Ok(Some(Resync {
        reason: what,
        resumed_at: now,
    }))
}

/// Writes a non-transactional logical message of ours into the store database's WAL, so the
/// slot sees a position to confirm even when nothing in the publication changes while the
/// cluster writes WAL elsewhere. Capture ignores the message itself.
pub(crate) async fn emit_heartbeat(c: &Client, prefix: &str) -> Result<()> {
    c.execute("SELECT pg_logical_emit_message(false, $1, '')", &[&prefix])
        .await?;
    Ok(())
}

/// `max_slot_wal_keep_size` (`-1`: unlimited) and the slot's `wal_status`, for `check`.
pub(crate) async fn wal_keep(c: &Client) -> Result<String> {
    Ok(c.query_one("SHOW max_slot_wal_keep_size", &[])
        .await?
        .get(0))
}

/// `wal_level` as the server reports it.
pub(crate) async fn wal_level(c: &Client) -> Result<String> {
    Ok(c.query_one("SHOW wal_level", &[]).await?.get(0))
}

/// Whether the connected user may open a replication connection.
pub(crate) async fn may_replicate(c: &Client) -> Result<bool> {
    Ok(c.query_one(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
        &[],
    )
    .await?
    .get(0))
}

/// Replication slots still free on the server.
pub(crate) async fn free_slots(c: &Client) -> Result<i32> {
    Ok(c.query_one(
        "SELECT current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots)::int",
        &[],
    )
    .await?
    .get(0))
}

/// `wal_level` must be logical for a slot to decode anything.
pub(crate) async fn check_wal_level(c: &Client) -> Result<()> {
    let level = wal_level(c).await?;
    if level == "logical" {
        Ok(())
    } else {
        Err(StoreError::Config(format!(
            "the store runs with wal_level={level}; set wal_level=logical and restart Postgres (run `fhir-cdc check` for details)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str, n: &str) -> TableName {
        TableName {
            schema: s.into(),
            name: n.into(),
        }
    }

    #[test]
    fn plans() {
        let wanted = vec![t("public", "encounter"), t("public", "encounter_history")];
        let create = plan("fhir_cdc", &Publication::default(), &wanted);
        assert_eq!(
            create,
            vec![
                r#"CREATE PUBLICATION "fhir_cdc" FOR TABLE "public"."encounter", "public"."encounter_history" WITH (publish = 'insert, update, delete')"#
            ]
        );
        let schema_wide = Publication {
            exists: true,
            schemas: vec!["public".into()],
            ..Default::default()
        };
        let fix = plan("fhir_cdc", &schema_wide, &wanted);
        assert_eq!(
            fix[0],
            r#"ALTER PUBLICATION "fhir_cdc" DROP TABLES IN SCHEMA "public""#
        );
        assert!(
            fix[1].starts_with(r#"ALTER PUBLICATION "fhir_cdc" ADD TABLE "public"."encounter""#)
        );
        let current = Publication {
            exists: true,
            tables: wanted.clone(),
            ..Default::default()
        };
        assert!(plan("fhir_cdc", &current, &wanted).is_empty());
        let mut more = wanted.clone();
        more.push(t("public", "patient"));
        assert_eq!(
            plan("fhir_cdc", &current, &more),
            vec![r#"ALTER PUBLICATION "fhir_cdc" ADD TABLE "public"."patient""#]
        );
        let all = Publication {
            exists: true,
            all_tables: true,
            ..Default::default()
        };
        assert_eq!(
            plan("fhir_cdc", &all, &wanted)[0],
            r#"DROP PUBLICATION "fhir_cdc""#
        );
    }
}
