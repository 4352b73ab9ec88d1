//! Aidbox and fhirbase: a table per resource type (`encounter`, …) with
//! `id, txid, cts, ts, resource_type, status, resource`, and `<type>_history` holding the
//! versions that updates and deletes replace, written in the same transaction just before
//! the change. `id`, `resourceType`, `meta.versionId` (txid) and `meta.lastUpdated` (ts) come
//! from the columns.

#[cfg(test)]
mod direct_tests;
pub(crate) mod format;

use async_trait::async_trait;
use pg_walstream::TupleData;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

use super::{
    body_for, check_type, ident, pg_timestamptz_to_fhir, required, text, text_ref, tuple,
    AidboxFormat, Body, Decoded, Format, RowChange, RowError, RowOp, StoreError, StoreProfile,
    TableDecoder, TableInfo, TableName,
};
use crate::fhir::resource_types::{is_resource_type, RESOURCE_TYPES};
use crate::fhir::topic::Interaction;
use format::{Attribute, Attributes};

pub struct Aidbox {
    schema: String,
    lower_types: HashMap<String, &'static str>,
    pool: Option<deadpool_postgres::Pool>,
    /// Bodies are Aidbox's format or FHIR JSON; both are read as FHIR. The Attributes come
    /// from the store at [`StoreProfile::prepare`].
    format: std::sync::RwLock<Arc<AidboxFormat>>,
}

impl Aidbox {
    /// `pool` reads the store for payloads; `None` for a profile that only decodes.
    pub fn new(schema: &str, pool: Option<deadpool_postgres::Pool>) -> Self {
        Aidbox {
            schema: schema.to_string(),
            lower_types: RESOURCE_TYPES
                .iter()
                .map(|t| (t.to_ascii_lowercase(), *t))
                .collect(),
            pool,
            format: std::sync::RwLock::new(Arc::new(AidboxFormat {
                version: crate::fhir::FhirVersion::R5,
                attributes: Default::default(),
            })),
        }
    }

    /// The FHIR version whose model converts Aidbox's format.
    pub fn with_version(self, version: crate::fhir::FhirVersion) -> Self {
        self.set_format(AidboxFormat {
            version,
            attributes: Default::default(),
        });
        self
    }

    fn set_format(&self, f: AidboxFormat) {
        if let Ok(mut w) = self.format.write() {
            *w = Arc::new(f);
        }
    }

    fn format(&self) -> Format {
        match self.format.read() {
            Ok(f) => Format::Aidbox(f.clone()),
            Err(_) => Format::Fhir,
        }
    }

    fn layout(&self, t: &TableInfo) -> Option<(Layout, bool)> {
        if t.schema != self.schema {
            return None;
        }
        let (base, history) = match t.name.strip_suffix("_history") {
            Some(b) => (b, true),
            None => (t.name.as_str(), false),
        };
        // Only FHIR resource types: Aidbox keeps its own entities (attribute, client, …) in
        // tables of the same layout, and they are no resources to notify about.
        let table_type = Some(*self.lower_types.get(base)?);
        let resource = t.column("resource")?;
        let layout = Layout {
            format: self.format(),
            table: t.name.clone(),
            table_type,
            id: t.column("id")?,
            txid: t.column("txid")?,
            ts: t.column("ts"),
            resource_type: t.column("resource_type")?,
            status: t.column("status"),
            resource,
            resource_jsonb: t.is_jsonb(resource),
        };
        Some((layout, history))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        super::pooled(self.pool.as_ref()).await
    }

    fn table_of(&self, resource_type: &str) -> Option<String> {
        is_resource_type(resource_type).then(|| {
            format!(
                "{}.{}",
                ident(&self.schema),
                ident(&resource_type.to_ascii_lowercase())
            )
        })
    }
}

/// Column positions of an Aidbox table, decided once per Relation message.
#[derive(Debug, Clone)]
struct Layout {
    format: Format,
    table: String,
    /// The type the table name stands for (`encounter` → `Encounter`), if it is one.
    table_type: Option<&'static str>,
    id: usize,
    txid: usize,
    ts: Option<usize>,
    resource_type: usize,
    status: Option<usize>,
    resource: usize,
    /// The body column is `jsonb` (see `Body::Jsonb`).
    resource_jsonb: bool,
}

#[derive(Debug)]
struct MainTable(Layout);

/// `<type>_history`: every row is the version a change in the same transaction replaces.
#[derive(Debug)]
struct HistoryTable(Layout);

impl Layout {
    /// One row as a change; `status = 'deleted'` (when `honour_status`) makes it a delete.
    fn change(
        &self,
        op: Interaction,
        row: Option<&TupleData>,
        honour_status: bool,
    ) -> Result<RowChange, RowError> {
        let table = self.table.as_str();
        let row = tuple(table, row)?;
        let id = required(table, row, self.id, "id")?;
        let ty = text(row.get_column(self.resource_type))
            .or_else(|| self.table_type.map(str::to_string))
            .unwrap_or_else(|| table.to_string());
        let resource_type = check_type(table, ty)?;
        let deleted = honour_status
            && self
                .status
                .and_then(|i| text_ref(row.get_column(i)))
                .is_some_and(|s| s == "deleted");
        let interaction = if deleted { Interaction::Delete } else { op };
        let body = body_for(
            interaction,
            row.get_column(self.resource),
            self.resource_jsonb,
        );
        Ok(RowChange {
            resource_type,
            id,
            version_id: text(row.get_column(self.txid)),
            last_updated: self
                .ts
                .and_then(|i| text_ref(row.get_column(i)))
                .map(pg_timestamptz_to_fhir),
            interaction,
            body,
            tenant: None,
            key: None,
            format: self.format.clone(),
        })
    }

    /// A row as the stored version it holds, whatever its status says (a history row of a
    /// delete holds the last version).
    fn version(&self, row: Option<&TupleData>) -> Result<RowChange, RowError> {
        self.change(Interaction::Create, row, false)
    }
}

fn interaction(op: RowOp) -> Interaction {
    match op {
        RowOp::Insert => Interaction::Create,
        RowOp::Update => Interaction::Update,
        RowOp::Delete => Interaction::Delete,
    }
}

impl TableDecoder for MainTable {
    fn decode(
        &self,
        op: RowOp,
        old: Option<&TupleData>,
        new: Option<&TupleData>,
    ) -> Result<Decoded, RowError> {
        // A delete carries only the old tuple (the key, or all columns under FULL).
        let row = if op == RowOp::Delete { old } else { new };
        let honour = op != RowOp::Delete;
        self.0
            .change(interaction(op), row, honour)
            .map(Decoded::Change)
    }

    fn version(&self, tuple: &TupleData) -> Result<RowChange, RowError> {
        self.0.version(Some(tuple))
    }
}

impl TableDecoder for HistoryTable {
    fn decode(
        &self,
        _op: RowOp,
        old: Option<&TupleData>,
        new: Option<&TupleData>,
    ) -> Result<Decoded, RowError> {
        self.0.version(new.or(old)).map(Decoded::PriorVersion)
    }

    fn version(&self, tuple: &TupleData) -> Result<RowChange, RowError> {
        self.0.version(Some(tuple))
    }
}

/// An Aidbox row read back with SQL as a FHIR resource (id, type and meta from the columns).
fn as_resource(resource_type: &str, row: &tokio_postgres::Row, format: &Format) -> Option<Value> {
    let body: Option<String> = row.get(1);
    let change = RowChange {
        resource_type: resource_type.to_string(),
        id: row.get(0),
        version_id: row.get(2),
        last_updated: row
            .get::<_, Option<String>>(3)
            .map(|s| pg_timestamptz_to_fhir(&s)),
        interaction: Interaction::Update,
        body: body.map(|b| Body::Text(b.into())).unwrap_or(Body::Absent),
        tenant: None,
        key: None,
        format: format.clone(),
    };
    match change.resource() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "store row is not a FHIR resource; not added to the payload");
            None
        }
    }
}

const COLUMNS: &str = "id, resource::text, txid::text, ts::text";

#[async_trait]
impl StoreProfile for Aidbox {
    fn name(&self) -> &'static str {
        "aidbox"
    }

    fn publication_tables(&self, catalog: &[TableInfo]) -> Result<Vec<TableName>, StoreError> {
        let tables: Vec<TableName> = catalog
            .iter()
            .filter(|t| self.layout(t).is_some())
            .map(|t| TableName {
                schema: t.schema.clone(),
                name: t.name.clone(),
            })
            .collect();
        if tables.is_empty() {
            return Err(StoreError::Config(format!(
                "no Aidbox-style resource tables (id, txid, resource_type, resource) in schema {}",
                self.schema
            )));
        }
        Ok(tables)
    }

    fn table(&self, table: &TableInfo) -> Option<Arc<dyn TableDecoder>> {
        let (layout, history) = self.layout(table)?;
        Some(if history {
            Arc::new(HistoryTable(layout))
        } else {
            Arc::new(MainTable(layout))
        })
    }

    /// Aidbox's Attribute definitions (first-class extensions), from its `attribute` table
    /// when there is one: top-level attributes map back to `extension` entries.
    async fn prepare(&self) -> Result<(), StoreError> {
        let c = self.client().await?;
        let table = format!("{}.attribute", ident(&self.schema));
        let exists: bool = c
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await?
            .get(0);
        if !exists {
            return Ok(());
        }
        let sql = format!(
            "SELECT resource->'resource'->>'id', resource->'path'->>0, resource->>'extensionUrl',
                    resource->'type'->>'id'
             FROM {table}
             WHERE jsonb_array_length(resource->'path') = 1 AND resource ? 'extensionUrl'"
        );
        let list: Vec<Attribute> = c
            .query(&sql, &[])
            .await?
            .iter()
            .filter_map(|r| {
                Some(Attribute {
                    resource_type: r.get::<_, Option<String>>(0)?,
                    key: r.get::<_, Option<String>>(1)?,
                    url: r.get::<_, Option<String>>(2)?,
                    value_type: r.get(3),
                })
            })
            .collect();
        tracing::info!(
            attributes = list.len(),
            "Aidbox Attribute definitions loaded (first-class extensions)"
        );
        let version = self
            .format
            .read()
            .map(|f| f.version)
            .unwrap_or(crate::fhir::FhirVersion::R5);
        self.set_format(AidboxFormat {
            version,
            attributes: Attributes::new(list),
        });
        Ok(())
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, StoreError> {
        let Some(table) = self.table_of(resource_type) else {
            return Ok(None);
        };
        let c = self.client().await?;
        let sql = format!("SELECT {COLUMNS} FROM {table} WHERE id = $1");
        let row = c.query_opt(&sql, &[&id]).await?;
        Ok(row.and_then(|r| as_resource(resource_type, &r, &self.format())))
    }

    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Value>, StoreError> {
        let Some(table) = self.table_of(resource_type) else {
            return Ok(None);
        };
        let history = format!(
            "{}.{}",
            ident(&self.schema),
            ident(&format!("{}_history", resource_type.to_ascii_lowercase()))
        );
        let c = self.client().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM {table} WHERE id = $1 AND txid::text = $2
             UNION ALL
             SELECT {COLUMNS} FROM {history} WHERE id = $1 AND txid::text = $2 AND status::text <> 'deleted'
             LIMIT 1"
        );
        let row = c.query_opt(&sql, &[&id, &version]).await?;
        Ok(row.and_then(|r| as_resource(resource_type, &r, &self.format())))
    }

    async fn referring(
        &self,
        source_type: &str,
        path: &str,
        reference: &str,
        limit: i64,
    ) -> Result<Vec<Value>, StoreError> {
        let Some(table) = self.table_of(source_type) else {
            return Ok(Vec::new());
        };
        // FHIR JSON holds references as {"reference": "Type/id"}, Aidbox's format as
        // {"resourceType": "Type", "id": "id"}; single or repeated.
        let (rt, rid) = reference.split_once('/').unwrap_or(("", reference));
        let shapes = [
            json!({ path: {"reference": reference} }),
            json!({ path: [{"reference": reference}] }),
            json!({ path: {"resourceType": rt, "id": rid} }),
            json!({ path: [{"resourceType": rt, "id": rid}] }),
        ];
        let c = self.client().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM {table}
             WHERE resource @> $1 OR resource @> $2 OR resource @> $3 OR resource @> $4
             ORDER BY ts DESC LIMIT $5"
        );
        let [a, b, d, e] = &shapes;
        let rows = c.query(&sql, &[a, b, d, e, &limit]).await?;
        let format = self.format();
        Ok(rows
            .iter()
            .filter_map(|r| as_resource(source_type, r, &format))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_walstream::ColumnData;

    pub(crate) fn tuple(vals: &[Option<&str>]) -> TupleData {
        TupleData::new(
            vals.iter()
                .map(|v| match v {
                    Some(s) => ColumnData::text(s.as_bytes().to_vec()),
                    None => ColumnData::null(),
                })
                .collect(),
        )
    }

    fn info(schema: &str, name: &str, cols: &[&str]) -> TableInfo {
        TableInfo {
            schema: schema.into(),
            name: name.into(),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            types: Vec::new(),
        }
    }

    const COLS: &[&str] = &[
        "id",
        "txid",
        "cts",
        "ts",
        "resource_type",
        "status",
        "resource",
    ];

    fn decode(p: &Aidbox, table: &str, op: RowOp, row: &TupleData) -> Result<Decoded, RowError> {
        let d = p.table(&info("public", table, COLS)).unwrap();
        match op {
            RowOp::Delete => d.decode(op, Some(row), None),
            _ => d.decode(op, None, Some(row)),
        }
    }

    fn change(d: Result<Decoded, RowError>) -> RowChange {
        match d.unwrap() {
            Decoded::Change(c) => c,
            other => panic!("not a change: {other:?}"),
        }
    }

    #[test]
    fn insert_fills_id_type_meta() {
        let p = Aidbox::new("public", None);
        let row = tuple(&[
            Some("e1"),
            Some("42"),
            Some("2024-01-01 00:00:00+00"),
            Some("2024-01-02 03:04:05.5+00"),
            Some("Encounter"),
            Some("created"),
            Some(r#"{"status":"planned"}"#),
        ]);
        let c = change(decode(&p, "encounter", RowOp::Insert, &row));
        assert_eq!(c.reference(), "Encounter/e1");
        let r = c.resource().unwrap().unwrap();
        assert_eq!(r["id"], "e1");
        assert_eq!(r["resourceType"], "Encounter");
        assert_eq!(r["meta"]["versionId"], "42");
        assert_eq!(r["meta"]["lastUpdated"], "2024-01-02T03:04:05.5+00:00");
        assert_eq!(r["status"], "planned");
    }

    #[test]
    fn history_rows_are_prior_versions_and_foreign_tables_are_not_read() {
        let p = Aidbox::new("public", None);
        let row = tuple(&[
            Some("e1"),
            Some("41"),
            None,
            None,
            Some("Encounter"),
            Some("deleted"),
            Some("{}"),
        ]);
        match decode(&p, "encounter_history", RowOp::Insert, &row).unwrap() {
            Decoded::PriorVersion(v) => {
                assert_eq!(v.version_id.as_deref(), Some("41"));
                // A history row of a delete still holds the last version's body.
                assert!(matches!(v.body, Body::Text(_)));
            }
            other => panic!("{other:?}"),
        }
        assert!(p.table(&info("other", "encounter", COLS)).is_none());
        assert!(p.table(&info("public", "audit", &["id", "what"])).is_none());
    }

    #[test]
    fn publication_names_only_resource_and_history_tables() {
        let p = Aidbox::new("public", None);
        let catalog = vec![
            info("public", "encounter", COLS),
            info("public", "encounter_history", COLS),
            info("public", "audit_no_pk", &["id", "what"]),
            info("other", "patient", COLS),
        ];
        let names: Vec<String> = p
            .publication_tables(&catalog)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            vec![
                "\"public\".\"encounter\"",
                "\"public\".\"encounter_history\""
            ]
        );
        assert!(p.publication_tables(&catalog[2..]).is_err());
    }

    #[test]
    fn delete_takes_type_from_table() {
        let p = Aidbox::new("public", None);
        let key = tuple(&[Some("o1"), None, None, None, None, None, None]);
        let c = change(decode(&p, "observation", RowOp::Delete, &key));
        assert_eq!(c.reference(), "Observation/o1");
        assert_eq!(c.interaction, Interaction::Delete);
        assert!(matches!(c.body, Body::Absent));
    }

    #[test]
    fn unchanged_toast_is_not_a_value() {
        let p = Aidbox::new("public", None);
        let mut row = tuple(&[
            Some("e1"),
            Some("43"),
            None,
            None,
            Some("Encounter"),
            Some("updated"),
            None,
        ]);
        row.columns[6] = ColumnData::unchanged();
        let c = change(decode(&p, "encounter", RowOp::Update, &row));
        assert!(matches!(c.body, Body::UnchangedToast));
        assert_eq!(c.resource().unwrap(), None);
    }

    #[test]
    fn bad_json_and_unknown_type_name_only_the_reference() {
        let p = Aidbox::new("public", None);
        let row = tuple(&[
            Some("e9"),
            Some("1"),
            None,
            None,
            Some("Encounter"),
            None,
            Some("{\"name\": \"Jane Doe\""),
        ]);
        let c = change(decode(&p, "encounter", RowOp::Insert, &row));
        let e = c.resource().unwrap_err().to_string();
        assert!(e.starts_with("Encounter/e9:"), "{e}");
        assert!(!e.contains("Jane"), "{e}");
        let row = tuple(&[
            Some("x"),
            Some("1"),
            None,
            None,
            Some("Foo"),
            None,
            Some("{}"),
        ]);
        assert!(matches!(
            decode(&p, "encounter", RowOp::Insert, &row),
            Err(RowError::UnknownType { .. })
        ));
    }
}
