//! Medplum (`medplum/medplum`, `packages/server/src/repo.ts`): a quoted table per resource
//! type (`"Encounter"`: `id uuid`, `content text` — the whole resource with `id` and `meta` —
//! `"lastUpdated"`, `deleted`, `"projectId"`, search columns) and `"Encounter_History"`
//! (`"versionId" uuid`, `id`, `content`, `"lastUpdated"`), one row per version.
//!
//! Changes are read from the main tables only: an INSERT is a create, an UPDATE with
//! `deleted` a delete (its `content` is `''`), any other UPDATE an update — or a create when
//! the version it replaces is a deletion (re-create). Version ids are random UUIDs, so the
//! previous version is the newest history row before this change's `"lastUpdated"`, read by
//! key; the history only grows (a data migration that rewrites old `''` tombstones as JSON
//! UPDATEs history rows, which are not published, so it is no event). Hard DELETEs are
//! Medplum's expunge, not FHIR interactions. Lookup and `_Token` tables (some without a
//! primary key) are never published.

use async_trait::async_trait;
use pg_walstream::TupleData;
use serde_json::Value;
use std::sync::Arc;

use super::{
    body_for, ident, pg_timestamptz_to_fhir, required, text, text_ref, tuple, Body, Decoded,
    RowChange, RowError, RowOp, StoreError, StoreProfile, TableDecoder, TableInfo, TableName,
};
use crate::fhir::resource_types::is_resource_type;
use crate::fhir::topic::Interaction;

pub(crate) struct Medplum {
    schema: String,
    pool: Option<deadpool_postgres::Pool>,
}

impl Medplum {
    pub(crate) fn new(schema: &str, pool: Option<deadpool_postgres::Pool>) -> Self {
        Medplum {
            schema: schema.to_string(),
            pool,
        }
    }

    fn qualified(&self, name: &str) -> String {
        format!("{}.{}", ident(&self.schema), ident(name))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        super::pooled(self.pool.as_ref()).await
    }

    fn is_main(&self, t: &TableInfo) -> bool {
        t.schema == self.schema && is_resource_type(&t.name) && MainTable::of(t).is_some()
    }
}

#[derive(Debug)]
struct MainTable {
    resource_type: String,
    id: usize,
    content: usize,
    /// The body column is `jsonb` (see `Body::Jsonb`).
    content_jsonb: bool,
    last_updated: usize,
    deleted: usize,
    project: Option<usize>,
}

impl MainTable {
    fn of(t: &TableInfo) -> Option<Self> {
        let content = t.column("content")?;
        Some(MainTable {
            resource_type: t.name.clone(),
            id: t.column("id")?,
            content,
            content_jsonb: t.is_jsonb(content),
            last_updated: t.column("lastUpdated")?,
            deleted: t.column("deleted")?,
            project: t.column("projectId"),
        })
    }

    fn change(&self, op: Interaction, row: &TupleData) -> Result<RowChange, RowError> {
        let table = self.resource_type.as_str();
        let deleted = text(row.get_column(self.deleted)).is_some_and(|v| v == "t");
        let interaction = if deleted { Interaction::Delete } else { op };
        let body = body_for(
            interaction,
            row.get_column(self.content),
            self.content_jsonb,
        );
        Ok(RowChange {
            resource_type: self.resource_type.clone(),
            id: required(table, row, self.id, "id")?,
            version_id: version_of(&body),
            last_updated: text_ref(row.get_column(self.last_updated)).map(pg_timestamptz_to_fhir),
            interaction,
            body,
            tenant: self.project.and_then(|i| text(row.get_column(i))),
            key: None,
            format: super::Format::Fhir,
        })
    }
}

/// `meta.versionId` of a Medplum body (the only place the version is written on the row).
fn version_of(body: &Body) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Meta {
        #[serde(rename = "versionId")]
        version_id: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Head {
        meta: Option<Meta>,
    }
    let t = body.text()?;
    serde_json::from_slice::<Head>(t).ok()?.meta?.version_id
}

/// Reads of a just-committed history row before its version is left unknown (10 ms apart).
const VISIBILITY_RETRIES: u32 = 20;

impl TableDecoder for MainTable {
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
        self.change(interaction, tuple(&self.resource_type, new)?)
            .map(Decoded::Change)
    }

    fn version(&self, tuple: &TupleData) -> Result<RowChange, RowError> {
        self.change(Interaction::Update, tuple)
    }
}

/// A history row as a version: `''` or a tombstone (`meta.deleted`) is a deletion.
fn history_version(resource_type: &str, id: &str, r: &tokio_postgres::Row) -> RowChange {
    let content: String = r.get(0);
    let tombstone = content.is_empty()
        || serde_json::from_str::<Value>(&content)
            .ok()
            .is_some_and(|v| v["meta"]["deleted"] == true);
    RowChange {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
        version_id: r.get(1),
        last_updated: None,
        interaction: if tombstone {
            Interaction::Delete
        } else {
            Interaction::Update
        },
        body: if tombstone {
            Body::Absent
        } else {
            Body::Text(content.into())
        },
        tenant: None,
        key: None,
        format: super::Format::Fhir,
    }
}

fn as_resource(resource_type: &str, id: &str, content: &str) -> Option<Value> {
    if content.is_empty() {
        return None;
    }
    let change = RowChange {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
        version_id: None,
        last_updated: None,
        interaction: Interaction::Update,
        body: Body::Text(content.to_string().into()),
        tenant: None,
        key: None,
        format: super::Format::Fhir,
    };
    match change.resource() {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "store row is not a FHIR resource; not added to the payload");
            None
        }
    }
}

#[async_trait]
impl StoreProfile for Medplum {
    fn name(&self) -> &'static str {
        "medplum"
    }

    fn publication_tables(&self, catalog: &[TableInfo]) -> Result<Vec<TableName>, StoreError> {
        let tables: Vec<TableName> = catalog
            .iter()
            .filter(|t| self.is_main(t))
            .map(|t| TableName {
                schema: t.schema.clone(),
                name: t.name.clone(),
            })
            .collect();
        if tables.is_empty() {
            return Err(StoreError::Config(format!(
                "no Medplum resource tables (\"Patient\" with id, content, \"lastUpdated\", deleted) in schema {}",
                self.schema
            )));
        }
        Ok(tables)
    }

    fn read_tables(&self, catalog: &[TableInfo]) -> Vec<TableName> {
        catalog
            .iter()
            .filter(|t| {
                let base = t.name.strip_suffix("_History").unwrap_or(&t.name);
                t.schema == self.schema && is_resource_type(base) && t.column("content").is_some()
            })
            .map(|t| TableName {
                schema: t.schema.clone(),
                name: t.name.clone(),
            })
            .collect()
    }

    fn table(&self, table: &TableInfo) -> Option<Arc<dyn TableDecoder>> {
        if !self.is_main(table) {
            return None;
        }
        Some(Arc::new(MainTable::of(table)?))
    }

    fn completes(&self) -> bool {
        true
    }

    /// The previous version: the newest history row older than this change. A delete's own
    /// version id is only in its history row (the main row's content is `''`).
    async fn complete(
        &self,
        change: &mut RowChange,
        previous: &mut Option<RowChange>,
    ) -> Result<(), StoreError> {
        let known = previous.is_some() && change.version_id.is_some();
        if change.interaction == Interaction::Create || known {
            return Ok(());
        }
        let Some(at) = change.last_updated.clone() else {
            return Ok(());
        };
        let history = self.qualified(&format!("{}_History", change.resource_type));
        let c = self.client().await?;
        // A delete's version id, even when its previous version is already known (an update
        // of the same resource earlier in the batch): skipping this when `previous` was set
        // made the delete's version depend on how commits fell into capture batches.
        if change.version_id.is_none() {
            let sql = format!(
                "SELECT \"versionId\"::text FROM {history} WHERE id = $1::text::uuid AND \"lastUpdated\" = $2::text::timestamptz LIMIT 1"
            );
            // The history row is in the same transaction, so it exists; but the walsender
            // may send a commit a moment before the commit is visible to other sessions
            // (the committing backend leaves the proc array after its WAL is flushed), so
            // the read is retried briefly before the version is left unknown.
            for attempt in 0..VISIBILITY_RETRIES {
                if let Some(r) = c.query_opt(&sql, &[&change.id, &at]).await? {
                    change.version_id = Some(r.get(0));
                    break;
                }
                if attempt + 1 < VISIBILITY_RETRIES {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
        if previous.is_some() {
            return Ok(());
        }
        let sql = format!(
            "SELECT content, \"versionId\"::text FROM {history}
             WHERE id = $1::text::uuid AND \"lastUpdated\" < $2::text::timestamptz
             ORDER BY \"lastUpdated\" DESC LIMIT 1"
        );
        let row = c.query_opt(&sql, &[&change.id, &at]).await?;
        *previous = row.map(|r| history_version(&change.resource_type, &change.id, &r));
        Ok(())
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, StoreError> {
        if !is_resource_type(resource_type) || uuid::Uuid::parse_str(id).is_err() {
            return Ok(None);
        }
        let c = self.client().await?;
        let sql = format!(
            "SELECT content FROM {} WHERE id = $1::text::uuid AND NOT deleted",
            self.qualified(resource_type)
        );
        let row = c.query_opt(&sql, &[&id]).await?;
        Ok(row.and_then(|r| as_resource(resource_type, id, &r.get::<_, String>(0))))
    }

    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Value>, StoreError> {
        if !is_resource_type(resource_type)
            || uuid::Uuid::parse_str(id).is_err()
            || uuid::Uuid::parse_str(version).is_err()
        {
            return Ok(None);
        }
        let c = self.client().await?;
        let sql = format!(
            "SELECT content FROM {} WHERE id = $1::text::uuid AND \"versionId\" = $2::text::uuid",
            self.qualified(&format!("{resource_type}_History"))
        );
        let row = c.query_opt(&sql, &[&id, &version]).await?;
        Ok(row.and_then(|r| as_resource(resource_type, id, &r.get::<_, String>(0))))
    }

    /// Medplum keeps references in `<Type>_References` and search columns whose layout
    /// changes between releases; revInclude adds nothing for Medplum stores yet.
    async fn referring(
        &self,
        _source_type: &str,
        _path: &str,
        _reference: &str,
        _limit: i64,
    ) -> Result<Vec<Value>, StoreError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_read_from_the_body_meta() {
        let b = Body::Text(r#"{"resourceType":"Patient","meta":{"versionId":"v-1"}}"#.into());
        assert_eq!(version_of(&b).as_deref(), Some("v-1"));
        assert_eq!(version_of(&Body::Text("".into())), None);
        assert_eq!(version_of(&Body::Absent), None);
    }
}
