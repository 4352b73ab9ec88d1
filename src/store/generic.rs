//! `generic`: tables and columns named in the TOML file (`[[source.tables]]`). The resource
//! column holds FHIR JSON (text or jsonb); the type is fixed per table or in a column; an
//! optional version column and soft-delete flag. The previous version comes from the old
//! tuple when the table has REPLICA IDENTITY FULL.

use async_trait::async_trait;
use pg_walstream::TupleData;
use serde_json::Value;
use std::sync::Arc;

use super::{
    body_for, check_type, ident, required, text, text_ref, tuple, Body, Decoded, RowChange,
    RowError, RowOp, StoreError, StoreProfile, TableDecoder, TableInfo, TableName,
};
use crate::config::GenericTable;
use crate::fhir::topic::Interaction;

pub(crate) struct Generic {
    schema: String,
    tables: Vec<GenericTable>,
    pool: Option<deadpool_postgres::Pool>,
}

impl Generic {
    pub(crate) fn new(
        schema: &str,
        tables: Vec<GenericTable>,
        pool: Option<deadpool_postgres::Pool>,
    ) -> Self {
        Generic {
            schema: schema.to_string(),
            tables,
            pool,
        }
    }

    fn name_of(&self, t: &GenericTable) -> TableName {
        let (s, n) = t
            .table
            .split_once('.')
            .unwrap_or((self.schema.as_str(), t.table.as_str()));
        TableName {
            schema: s.to_string(),
            name: n.to_string(),
        }
    }

    fn entry(&self, t: &TableInfo) -> Option<&GenericTable> {
        self.tables.iter().find(|g| {
            let n = self.name_of(g);
            n.schema == t.schema && n.name == t.name
        })
    }
}

#[derive(Debug)]
struct Layout {
    table: String,
    fixed_type: Option<String>,
    type_col: Option<usize>,
    id: usize,
    resource: usize,
    /// The body column is `jsonb` (see `Body::Jsonb`).
    resource_jsonb: bool,
    version: Option<usize>,
    deleted: Option<usize>,
}

impl Layout {
    fn change(&self, op: Interaction, row: Option<&TupleData>) -> Result<RowChange, RowError> {
        let table = self.table.as_str();
        let row = tuple(table, row)?;
        let id = required(table, row, self.id, "id")?;
        let ty = match (&self.fixed_type, self.type_col) {
            (Some(t), _) => t.clone(),
            (None, Some(i)) => required(table, row, i, "type")?,
            (None, None) => table.to_string(),
        };
        let resource_type = check_type(table, ty)?;
        let deleted = self
            .deleted
            .and_then(|i| text_ref(row.get_column(i)))
            .is_some_and(|v| v == "t" || v == "true");
        let interaction = if deleted { Interaction::Delete } else { op };
        let body = body_for(
            interaction,
            row.get_column(self.resource),
            self.resource_jsonb,
        );
        Ok(RowChange {
            resource_type,
            id,
            version_id: self.version.and_then(|i| text(row.get_column(i))),
            last_updated: None,
            interaction,
            body,
            tenant: None,
            key: None,
            format: super::Format::Fhir,
        })
    }
}

impl TableDecoder for Layout {
    fn decode(
        &self,
        op: RowOp,
        old: Option<&TupleData>,
        new: Option<&TupleData>,
    ) -> Result<Decoded, RowError> {
        let (interaction, row) = match op {
            RowOp::Insert => (Interaction::Create, new),
            RowOp::Update => (Interaction::Update, new),
            RowOp::Delete => (Interaction::Delete, old),
        };
        self.change(interaction, row).map(Decoded::Change)
    }

    fn version(&self, tuple: &TupleData) -> Result<RowChange, RowError> {
        self.change(Interaction::Create, Some(tuple))
    }
}

#[async_trait]
impl StoreProfile for Generic {
    fn name(&self) -> &'static str {
        "generic"
    }

    /// Exactly the configured tables, whether or not the catalog lists them yet (creating
    /// the publication then says which one is missing).
    fn publication_tables(&self, _catalog: &[TableInfo]) -> Result<Vec<TableName>, StoreError> {
        Ok(self.tables.iter().map(|t| self.name_of(t)).collect())
    }

    fn table(&self, t: &TableInfo) -> Option<Arc<dyn TableDecoder>> {
        let g = self.entry(t)?;
        let (Some(id), Some(resource)) = (t.column(&g.id_column), t.column(&g.resource_column))
        else {
            tracing::error!(table = %t.name, "generic table lacks its configured id or resource column; ignoring it");
            return None;
        };
        Some(Arc::new(Layout {
            table: t.name.clone(),
            fixed_type: g.resource_type.clone(),
            type_col: g.type_column.as_deref().and_then(|c| t.column(c)),
            id,
            resource,
            resource_jsonb: t.is_jsonb(resource),
            version: g.version_column.as_deref().and_then(|c| t.column(c)),
            deleted: g.deleted_column.as_deref().and_then(|c| t.column(c)),
        }))
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, StoreError> {
        self.read_where(resource_type, id, None).await
    }

    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Value>, StoreError> {
        self.read_where(resource_type, id, Some(version)).await
    }

    /// The configured layout says nothing about how references are stored or indexed, so
    /// revInclude adds nothing for generic stores.
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

impl Generic {
    /// The row of `resource_type`/`id` (at `version` when given) in the first configured
    /// table that holds that type.
    async fn read_where(
        &self,
        resource_type: &str,
        id: &str,
        version: Option<&str>,
    ) -> Result<Option<Value>, StoreError> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        for g in &self.tables {
            if g.resource_type
                .as_deref()
                .is_some_and(|t| t != resource_type)
            {
                continue;
            }
            if version.is_some() && g.version_column.is_none() {
                continue;
            }
            let sql = read_sql(&self.name_of(g), g, version.is_some());
            let c = pool.get().await?;
            let mut args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&id];
            if let Some(v) = &version {
                args.push(v);
            }
            if g.type_column.is_some() {
                args.push(&resource_type);
            }
            if let Some(row) = c.query_opt(&sql, &args).await? {
                let change = RowChange {
                    resource_type: resource_type.to_string(),
                    id: id.to_string(),
                    version_id: row.get(1),
                    last_updated: None,
                    interaction: Interaction::Update,
                    body: row
                        .get::<_, Option<String>>(0)
                        .map(|b| Body::Text(b.into()))
                        .unwrap_or(Body::Absent),
                    tenant: None,
                    key: None,
                    format: super::Format::Fhir,
                };
                return Ok(change.resource()?);
            }
        }
        Ok(None)
    }
}

/// `SELECT resource::text, version::text FROM t WHERE id = $1 [AND version = $2] [AND type = $n]`.
fn read_sql(name: &TableName, g: &GenericTable, with_version: bool) -> String {
    let version = g
        .version_column
        .as_deref()
        .map(|v| format!("{}::text", ident(v)))
        .unwrap_or_else(|| "NULL::text".into());
    let mut sql = format!(
        "SELECT {}::text, {version} FROM {name} WHERE {}::text = $1",
        ident(&g.resource_column),
        ident(&g.id_column)
    );
    let mut n = 2;
    if with_version {
        sql.push_str(&format!(" AND {version} = ${n}"));
        n += 1;
    }
    if let Some(tc) = &g.type_column {
        sql.push_str(&format!(" AND {} = ${n}", ident(tc)));
    }
    if let Some(d) = &g.deleted_column {
        sql.push_str(&format!(" AND NOT coalesce({}, false)", ident(d)));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceConfig;
    use pg_walstream::ColumnData;

    fn profile() -> Generic {
        let s: SourceConfig = toml::from_str(
            r#"url = "postgresql://x/y"
profile = "generic"
[[tables]]
table = "res"
type_column = "rtype"
deleted_column = "gone"
"#,
        )
        .unwrap();
        Generic::new(&s.schema, s.tables, None)
    }

    #[test]
    fn soft_delete() {
        let p = profile();
        let info = TableInfo {
            schema: "public".into(),
            name: "res".into(),
            columns: ["id", "rtype", "resource", "gone"]
                .map(String::from)
                .to_vec(),
            types: Vec::new(),
        };
        let d = p.table(&info).unwrap();
        let row = TupleData::new(
            ["p1", "Patient", "{}", "t"]
                .iter()
                .map(|s| ColumnData::text(s.as_bytes().to_vec()))
                .collect(),
        );
        match d.decode(RowOp::Update, None, Some(&row)).unwrap() {
            Decoded::Change(c) => {
                assert_eq!(c.interaction, Interaction::Delete);
                assert_eq!(c.reference(), "Patient/p1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publication_is_the_configured_tables() {
        let p = profile();
        let t = p.publication_tables(&[]).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to_string(), "\"public\".\"res\"");
    }
}
