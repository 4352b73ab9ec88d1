//! Helios HFS (`HeliosSoftware/hfs`, Postgres backend): one table `resources` (PK tenant_id,
//! resource_type, id) updated in place, and `resource_history` with one row per version.
//! `data` holds `resourceType` and `id` but no `meta.versionId`/`lastUpdated`: those come
//! from `version_id` ("1", "2", …) and `last_updated`.
//!
//! Changes are read from `resources` only: an INSERT is a create, an UPDATE setting
//! `is_deleted` a delete, any other UPDATE an update — or a create when the version it
//! replaces is a deletion (re-create after delete: HFS writes that UPDATE and its history row
//! in two autocommit transactions, so the history row cannot be waited for). The previous
//! version is read by key from `resource_history`, which only ever grows. A soft delete never
//! touches `data` (unchanged TOAST in the WAL); a delete carries no body anyway. Hard DELETEs
//! are HFS's purge of an already deleted resource and are not events.
//!
//! `search_index` (no primary key) and `resource_fts` are never published: Postgres would
//! then refuse HFS's own UPDATE/DELETE on them.

use async_trait::async_trait;
use pg_walstream::TupleData;
use serde_json::Value;
use std::sync::Arc;

use super::{
    body_for, check_type, ident, pg_timestamptz_to_fhir, required, text, text_ref, tuple, Body,
    Decoded, RowChange, RowError, RowOp, StoreError, StoreProfile, TableDecoder, TableInfo,
    TableName,
};
use crate::fhir::topic::Interaction;

const MAIN: &str = "resources";
const HISTORY: &str = "resource_history";

pub(crate) struct Helios {
    schema: String,
    pool: Option<deadpool_postgres::Pool>,
}

impl Helios {
    pub(crate) fn new(schema: &str, pool: Option<deadpool_postgres::Pool>) -> Self {
        Helios {
            schema: schema.to_string(),
            pool,
        }
    }

    fn table_name(&self, name: &str) -> String {
        format!("{}.{}", ident(&self.schema), ident(name))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        super::pooled(self.pool.as_ref()).await
    }
}

/// Column positions of `resources`, decided once per Relation message.
#[derive(Debug)]
struct Resources {
    tenant: usize,
    resource_type: usize,
    id: usize,
    version: usize,
    data: usize,
    /// The body column is `jsonb` (see `Body::Jsonb`).
    data_jsonb: bool,
    last_updated: usize,
    deleted: usize,
}

impl Resources {
    fn of(t: &TableInfo) -> Option<Self> {
        let data = t.column("data")?;
        Some(Resources {
            tenant: t.column("tenant_id")?,
            resource_type: t.column("resource_type")?,
            id: t.column("id")?,
            version: t.column("version_id")?,
            data,
            data_jsonb: t.is_jsonb(data),
            last_updated: t.column("last_updated")?,
            deleted: t.column("is_deleted")?,
        })
    }

    fn change(&self, op: Interaction, row: &TupleData) -> Result<RowChange, RowError> {
        let ty = required(MAIN, row, self.resource_type, "resource_type")?;
        let deleted = text(row.get_column(self.deleted)).is_some_and(|v| v == "t");
        let interaction = if deleted { Interaction::Delete } else { op };
        Ok(RowChange {
            resource_type: check_type(MAIN, ty)?,
            id: required(MAIN, row, self.id, "id")?,
            version_id: text(row.get_column(self.version)),
            last_updated: text_ref(row.get_column(self.last_updated)).map(pg_timestamptz_to_fhir),
            interaction,
            body: body_for(interaction, row.get_column(self.data), self.data_jsonb),
            tenant: text(row.get_column(self.tenant)),
            key: None,
            format: super::Format::Fhir,
        })
    }
}

impl TableDecoder for Resources {
    fn decode(
        &self,
        op: RowOp,
        _old: Option<&TupleData>,
        new: Option<&TupleData>,
    ) -> Result<Decoded, RowError> {
        let interaction = match op {
            RowOp::Insert => Interaction::Create,
            RowOp::Update => Interaction::Update,
            RowOp::Delete => return Ok(Decoded::Skip),
        };
        self.change(interaction, tuple(MAIN, new)?)
            .map(Decoded::Change)
    }

    fn version(&self, tuple: &TupleData) -> Result<RowChange, RowError> {
        self.change(Interaction::Update, tuple)
    }
}

/// The version before `version` ("3" → "2"); none before "1" or for a non-number.
fn version_before(version: &str) -> Option<String> {
    let n: u64 = version.parse().ok()?;
    (n > 1).then(|| (n - 1).to_string())
}

const COLUMNS: &str = "id, data::text, version_id, last_updated::text, is_deleted";

fn as_change(resource_type: &str, tenant: Option<String>, r: &tokio_postgres::Row) -> RowChange {
    let deleted: bool = r.get(4);
    let body: Option<String> = r.get(1);
    RowChange {
        resource_type: resource_type.to_string(),
        id: r.get(0),
        version_id: r.get(2),
        last_updated: r
            .get::<_, Option<String>>(3)
            .map(|s| pg_timestamptz_to_fhir(&s)),
        interaction: if deleted {
            Interaction::Delete
        } else {
            Interaction::Update
        },
        body: match body {
            Some(b) if !deleted && b != "null" => Body::Text(b.into()),
            _ => Body::Absent,
        },
        tenant,
        key: None,
        format: super::Format::Fhir,
    }
}

fn as_resource(resource_type: &str, r: &tokio_postgres::Row) -> Option<Value> {
    match as_change(resource_type, None, r).resource() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "store row is not a FHIR resource; not added to the payload");
            None
        }
    }
}

#[async_trait]
impl StoreProfile for Helios {
    fn name(&self) -> &'static str {
        "helios"
    }

    fn publication_tables(&self, catalog: &[TableInfo]) -> Result<Vec<TableName>, StoreError> {
        super::the_table(catalog, &self.schema, MAIN, |t| Resources::of(t).is_some()).ok_or_else(
            || {
                StoreError::Config(format!(
                "no HFS table {}.{MAIN} (tenant_id, resource_type, id, version_id, data, last_updated, is_deleted)",
                self.schema
            ))
            },
        )
    }

    fn read_tables(&self, catalog: &[TableInfo]) -> Vec<TableName> {
        super::tables_named(catalog, &self.schema, &[MAIN, HISTORY])
    }

    fn table(&self, table: &TableInfo) -> Option<Arc<dyn TableDecoder>> {
        if table.schema != self.schema || table.name != MAIN {
            return None;
        }
        Some(Arc::new(Resources::of(table)?))
    }

    fn completes(&self) -> bool {
        true
    }

    async fn complete(
        &self,
        change: &mut RowChange,
        previous: &mut Option<RowChange>,
    ) -> Result<(), StoreError> {
        if change.interaction == Interaction::Create || previous.is_some() {
            return Ok(());
        }
        let Some(before) = change.version_id.as_deref().and_then(version_before) else {
            return Ok(());
        };
        let c = self.client().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE tenant_id = $1 AND resource_type = $2 AND id = $3 AND version_id = $4",
            self.table_name(HISTORY)
        );
        let tenant = change.tenant.clone().unwrap_or_default();
        let row = c
            .query_opt(&sql, &[&tenant, &change.resource_type, &change.id, &before])
            .await?;
        *previous = row.map(|r| as_change(&change.resource_type, change.tenant.clone(), &r));
        Ok(())
    }

    /// The current version. HFS is multi-tenant and events do not carry the tenant, so an id
    /// held in more than one tenant is not read (no risk of another tenant's data).
    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE resource_type = $1 AND id = $2 AND NOT is_deleted LIMIT 2",
            self.table_name(MAIN)
        );
        let rows = c.query(&sql, &[&resource_type, &id]).await?;
        Ok(match rows.as_slice() {
            [one] => as_resource(resource_type, one),
            _ => None,
        })
    }

    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Value>, StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE resource_type = $1 AND id = $2 AND version_id = $3 AND NOT is_deleted LIMIT 2",
            self.table_name(HISTORY)
        );
        let rows = c.query(&sql, &[&resource_type, &id, &version]).await?;
        Ok(match rows.as_slice() {
            [one] => as_resource(resource_type, one),
            _ => None,
        })
    }

    async fn referring(
        &self,
        source_type: &str,
        path: &str,
        reference: &str,
        limit: i64,
    ) -> Result<Vec<Value>, StoreError> {
        let one = serde_json::json!({ path: {"reference": reference} });
        let many = serde_json::json!({ path: [{"reference": reference}] });
        let c = self.client().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE resource_type = $1 AND NOT is_deleted
               AND (data @> $2 OR data @> $3) ORDER BY last_updated DESC LIMIT $4",
            self.table_name(MAIN)
        );
        let rows = c.query(&sql, &[&source_type, &one, &many, &limit]).await?;
        Ok(rows
            .iter()
            .filter_map(|r| as_resource(source_type, r))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before() {
        assert_eq!(version_before("3").as_deref(), Some("2"));
        assert_eq!(version_before("1"), None);
        assert_eq!(version_before("x"), None);
    }
}
