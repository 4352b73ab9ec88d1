//! Store profiles: how a row of a store's table becomes a resource change. A profile looks at
//! each table once (when pgoutput describes it) and decides which columns mean what, so the
//! per-row work is index lookups.

use bytes::Bytes;
use pg_walstream::{ColumnData, TupleData};
use serde_json::{Map, Value};
use std::collections::HashMap;

use crate::config::{GenericTable, ProfileKind, SourceConfig};
use crate::fhir::resource_types::{is_resource_type, RESOURCE_TYPES};
use crate::fhir::topic::Interaction;

/// What a table is to the profile, decided once per Relation message.
#[derive(Debug, Clone)]
pub enum TableKind {
    /// Not a resource table (history tables, other tables in the publication).
    Ignored,
    Aidbox(AidboxTable),
    /// `<type>_history`: the version an update or delete replaces, written in the same
    /// transaction just before it; capture keeps it as the previous version.
    AidboxHistory(AidboxTable),
    Generic(GenericLayout),
}

#[derive(Debug, Clone)]
pub struct AidboxTable {
    /// The type the table name stands for (`encounter` → `Encounter`), if it is one.
    table_type: Option<&'static str>,
    id: usize,
    txid: usize,
    ts: Option<usize>,
    resource_type: usize,
    status: Option<usize>,
    resource: usize,
}

#[derive(Debug, Clone)]
pub struct GenericLayout {
    fixed_type: Option<String>,
    type_col: Option<usize>,
    id: usize,
    resource: usize,
    version: Option<usize>,
    deleted: Option<usize>,
}

/// The body of the row as it came in the WAL.
#[derive(Debug, Clone)]
pub enum Body {
    /// No body in the tuple (a delete's key-only old tuple, a NULL column).
    Absent,
    /// pgoutput did not send the value because it was TOASTed and unchanged: the value is
    /// unknown and must be read from the store, never taken for "empty".
    UnchangedToast,
    Text(Bytes),
}

/// A row change in resource terms, before topic matching. The JSON is parsed only for
/// changes that match a topic.
#[derive(Debug, Clone)]
pub struct RowChange {
    pub resource_type: String,
    pub id: String,
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
    pub interaction: Interaction,
    pub body: Body,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RowError {
    #[error("{reference}: resource column is not a JSON object ({detail})")]
    BadJson { reference: String, detail: String },
    #[error("table {table}: resource type {resource_type:?} is not a FHIR resource type")]
    UnknownType {
        table: String,
        resource_type: String,
    },
    #[error("table {table}: row without {column}")]
    MissingColumn { table: String, column: &'static str },
}

impl RowChange {
    /// `Type/id`, the only thing about a resource that logs may name.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }

    /// The resource JSON with `id`, `resourceType` and `meta` filled from the columns.
    /// `Ok(None)` when the row carries no body.
    pub fn resource(&self) -> Result<Option<Value>, RowError> {
        let Body::Text(text) = &self.body else {
            return Ok(None);
        };
        let mut obj: Map<String, Value> = match serde_json::from_slice(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(RowError::BadJson {
                    reference: self.reference(),
                    detail: "not an object".into(),
                })
            }
            Err(e) => {
                return Err(RowError::BadJson {
                    reference: self.reference(),
                    // serde's message names line/column only, never content.
                    detail: format!("line {} column {}", e.line(), e.column()),
                });
            }
        };
        obj.insert("resourceType".into(), self.resource_type.clone().into());
        obj.insert("id".into(), self.id.clone().into());
        if self.version_id.is_some() || self.last_updated.is_some() {
            let meta = obj
                .entry("meta")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(m) = meta.as_object_mut() {
                if let Some(v) = &self.version_id {
                    m.insert("versionId".into(), v.clone().into());
                }
                if let Some(t) = &self.last_updated {
                    m.insert("lastUpdated".into(), t.clone().into());
                }
            }
        }
        Ok(Some(Value::Object(obj)))
    }
}

/// The profile of the configured store.
pub struct Profile {
    kind: ProfileKind,
    schema: String,
    tables: Vec<GenericTable>,
    lower_types: HashMap<String, &'static str>,
}

fn text(c: Option<&ColumnData>) -> Option<String> {
    let c = c?;
    if c.is_null() || c.is_unchanged() {
        return None;
    }
    c.as_string()
}

/// `2024-05-01 10:00:00.123+00` (Postgres text) → `2024-05-01T10:00:00.123+00:00` (FHIR instant).
pub fn pg_timestamptz_to_fhir(s: &str) -> String {
    let mut out = s.replacen(' ', "T", 1);
    // Offsets print as +HH or +HH:MM; FHIR needs +HH:MM.
    if let Some(pos) = out.rfind(['+', '-']) {
        if pos > 10 && out.len() - pos == 3 {
            out.push_str(":00");
        }
    }
    out
}

impl Profile {
    pub fn new(source: &SourceConfig) -> Self {
        Profile {
            kind: source.profile,
            schema: source.schema.clone(),
            tables: source.tables.clone(),
            lower_types: RESOURCE_TYPES
                .iter()
                .map(|t| (t.to_ascii_lowercase(), *t))
                .collect(),
        }
    }

    /// Decides what a table is from its pgoutput description.
    pub fn classify(&self, namespace: &str, name: &str, columns: &[&str]) -> TableKind {
        let col = |n: &str| columns.iter().position(|c| *c == n);
        match self.kind {
            ProfileKind::Aidbox => {
                if namespace != self.schema {
                    return TableKind::Ignored;
                }
                let (base, history) = match name.strip_suffix("_history") {
                    Some(b) => (b, true),
                    None => (name, false),
                };
                match (
                    col("id"),
                    col("txid"),
                    col("resource_type"),
                    col("resource"),
                ) {
                    (Some(id), Some(txid), Some(resource_type), Some(resource)) => {
                        let t = AidboxTable {
                            table_type: self.lower_types.get(base).copied(),
                            id,
                            txid,
                            ts: col("ts"),
                            resource_type,
                            status: col("status"),
                            resource,
                        };
                        if history {
                            TableKind::AidboxHistory(t)
                        } else {
                            TableKind::Aidbox(t)
                        }
                    }
                    _ => TableKind::Ignored,
                }
            }
            ProfileKind::Generic => {
                let Some(t) = self.tables.iter().find(|t| {
                    let (s, n) = t
                        .table
                        .split_once('.')
                        .unwrap_or((self.schema.as_str(), t.table.as_str()));
                    s == namespace && n == name
                }) else {
                    return TableKind::Ignored;
                };
                let (Some(id), Some(resource)) = (col(&t.id_column), col(&t.resource_column))
                else {
                    tracing::error!(table = %name, "generic table lacks its configured id or resource column; ignoring it");
                    return TableKind::Ignored;
                };
                TableKind::Generic(GenericLayout {
                    fixed_type: t.resource_type.clone(),
                    type_col: t.type_column.as_deref().and_then(col),
                    id,
                    resource,
                    version: t.version_column.as_deref().and_then(col),
                    deleted: t.deleted_column.as_deref().and_then(col),
                })
            }
        }
    }

    /// Reads a full tuple (an old tuple under REPLICA IDENTITY FULL) as the resource row it
    /// was. `Ok(None)` for tables that are not resource tables.
    pub fn row(
        &self,
        table: &str,
        kind: &TableKind,
        tuple: &TupleData,
    ) -> Result<Option<RowChange>, RowError> {
        match kind {
            TableKind::Ignored => Ok(None),
            TableKind::Aidbox(t) | TableKind::AidboxHistory(t) => {
                aidbox_row(table, t, Some(tuple)).map(Some)
            }
            TableKind::Generic(g) => {
                generic_change(table, g, Interaction::Create, None, Some(tuple)).map(Some)
            }
        }
    }

    /// Turns one row operation into a change. `Ok(None)` for rows that are not resource
    /// changes (the profile's bookkeeping).
    pub fn change(
        &self,
        table: &str,
        kind: &TableKind,
        op: Interaction,
        old: Option<&TupleData>,
        new: Option<&TupleData>,
    ) -> Result<Option<RowChange>, RowError> {
        match kind {
            TableKind::Ignored => Ok(None),
            TableKind::Aidbox(t) => aidbox_change(table, t, op, old, new).map(Some),
            // A history row is the stored version as it was: read it as a resource row.
            TableKind::AidboxHistory(t) => aidbox_row(table, t, new.or(old)).map(Some),
            TableKind::Generic(g) => generic_change(table, g, op, old, new).map(Some),
        }
    }
}

fn body_of(c: Option<&ColumnData>) -> Body {
    match c {
        None => Body::Absent,
        Some(c) if c.is_unchanged() => Body::UnchangedToast,
        Some(c) if c.is_null() => Body::Absent,
        Some(c) => Body::Text(c.raw_bytes()),
    }
}

fn check_type(table: &str, ty: String) -> Result<String, RowError> {
    if is_resource_type(&ty) {
        Ok(ty)
    } else {
        Err(RowError::UnknownType {
            table: table.into(),
            resource_type: ty,
        })
    }
}

fn aidbox_change(
    table: &str,
    t: &AidboxTable,
    op: Interaction,
    old: Option<&TupleData>,
    new: Option<&TupleData>,
) -> Result<RowChange, RowError> {
    // A delete carries only the old tuple (the key, or all columns under REPLICA IDENTITY FULL).
    let row = if op == Interaction::Delete { old } else { new };
    let row = row.ok_or(RowError::MissingColumn {
        table: table.into(),
        column: "tuple",
    })?;
    let id = text(row.get_column(t.id)).ok_or(RowError::MissingColumn {
        table: table.into(),
        column: "id",
    })?;
    let ty = text(row.get_column(t.resource_type))
        .or_else(|| t.table_type.map(str::to_string))
        .unwrap_or_else(|| table.to_string());
    let resource_type = check_type(table, ty)?;
    let mut interaction = op;
    if op != Interaction::Delete {
        if let Some(s) = t.status.and_then(|i| text(row.get_column(i))) {
            if s == "deleted" {
                interaction = Interaction::Delete;
            }
        }
    }
    let body = if interaction == Interaction::Delete {
        Body::Absent
    } else {
        body_of(row.get_column(t.resource))
    };
    Ok(RowChange {
        resource_type,
        id,
        version_id: text(row.get_column(t.txid)),
        last_updated: t
            .ts
            .and_then(|i| text(row.get_column(i)))
            .map(|s| pg_timestamptz_to_fhir(&s)),
        interaction,
        body,
    })
}

/// A row as the stored version it holds, whatever its status says (a history row of a
/// delete holds the last version).
fn aidbox_row(
    table: &str,
    t: &AidboxTable,
    row: Option<&TupleData>,
) -> Result<RowChange, RowError> {
    let mut plain = t.clone();
    plain.status = None;
    aidbox_change(table, &plain, Interaction::Create, None, row)
}

fn generic_change(
    table: &str,
    g: &GenericLayout,
    op: Interaction,
    old: Option<&TupleData>,
    new: Option<&TupleData>,
) -> Result<RowChange, RowError> {
    let row = if op == Interaction::Delete { old } else { new };
    let row = row.ok_or(RowError::MissingColumn {
        table: table.into(),
        column: "tuple",
    })?;
    let id = text(row.get_column(g.id)).ok_or(RowError::MissingColumn {
        table: table.into(),
        column: "id",
    })?;
    let ty = match (&g.fixed_type, g.type_col) {
        (Some(t), _) => t.clone(),
        (None, Some(i)) => text(row.get_column(i)).ok_or(RowError::MissingColumn {
            table: table.into(),
            column: "type",
        })?,
        (None, None) => table.to_string(),
    };
    let resource_type = check_type(table, ty)?;
    let deleted = g
        .deleted
        .and_then(|i| text(row.get_column(i)))
        .is_some_and(|v| v == "t" || v == "true");
    let interaction = if deleted { Interaction::Delete } else { op };
    let body = if interaction == Interaction::Delete {
        Body::Absent
    } else {
        body_of(row.get_column(g.resource))
    };
    Ok(RowChange {
        resource_type,
        id,
        version_id: g.version.and_then(|i| text(row.get_column(i))),
        last_updated: None,
        interaction,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: &str) -> SourceConfig {
        let t = format!(
            r#"url = "postgresql://x/y"
profile = "{kind}"
[[tables]]
table = "res"
type_column = "rtype"
deleted_column = "gone"
"#
        );
        toml::from_str(&t).unwrap()
    }

    fn tuple(vals: &[Option<&str>]) -> TupleData {
        TupleData::new(
            vals.iter()
                .map(|v| match v {
                    Some(s) => ColumnData::text(s.as_bytes().to_vec()),
                    None => ColumnData::null(),
                })
                .collect(),
        )
    }

    const AIDBOX_COLS: &[&str] = &[
        "id",
        "txid",
        "cts",
        "ts",
        "resource_type",
        "status",
        "resource",
    ];

    #[test]
    fn aidbox_insert_fills_id_type_meta() {
        let p = Profile::new(&cfg("aidbox"));
        let k = p.classify("public", "encounter", AIDBOX_COLS);
        let row = tuple(&[
            Some("e1"),
            Some("42"),
            Some("2024-01-01 00:00:00+00"),
            Some("2024-01-02 03:04:05.5+00"),
            Some("Encounter"),
            Some("created"),
            Some(r#"{"status":"planned"}"#),
        ]);
        let c = p
            .change("encounter", &k, Interaction::Create, None, Some(&row))
            .unwrap()
            .unwrap();
        assert_eq!(c.reference(), "Encounter/e1");
        let r = c.resource().unwrap().unwrap();
        assert_eq!(r["id"], "e1");
        assert_eq!(r["resourceType"], "Encounter");
        assert_eq!(r["meta"]["versionId"], "42");
        assert_eq!(r["meta"]["lastUpdated"], "2024-01-02T03:04:05.5+00:00");
        assert_eq!(r["status"], "planned");
    }

    #[test]
    fn aidbox_history_and_foreign_tables_are_ignored() {
        let p = Profile::new(&cfg("aidbox"));
        assert!(matches!(
            p.classify("public", "encounter_history", AIDBOX_COLS),
            TableKind::AidboxHistory(_)
        ));
        assert!(matches!(
            p.classify("other", "encounter", AIDBOX_COLS),
            TableKind::Ignored
        ));
        assert!(matches!(
            p.classify("public", "audit", &["id", "what"]),
            TableKind::Ignored
        ));
    }

    #[test]
    fn aidbox_delete_takes_type_from_table() {
        let p = Profile::new(&cfg("aidbox"));
        let k = p.classify("public", "observation", AIDBOX_COLS);
        let key = tuple(&[Some("o1"), None, None, None, None, None, None]);
        let c = p
            .change("observation", &k, Interaction::Delete, Some(&key), None)
            .unwrap()
            .unwrap();
        assert_eq!(c.reference(), "Observation/o1");
        assert_eq!(c.interaction, Interaction::Delete);
        assert!(matches!(c.body, Body::Absent));
    }

    #[test]
    fn unchanged_toast_is_not_a_value() {
        let p = Profile::new(&cfg("aidbox"));
        let k = p.classify("public", "encounter", AIDBOX_COLS);
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
        let c = p
            .change("encounter", &k, Interaction::Update, None, Some(&row))
            .unwrap()
            .unwrap();
        assert!(matches!(c.body, Body::UnchangedToast));
        assert_eq!(c.resource().unwrap(), None);
    }

    #[test]
    fn bad_json_and_unknown_type_name_only_the_reference() {
        let p = Profile::new(&cfg("aidbox"));
        let k = p.classify("public", "encounter", AIDBOX_COLS);
        let row = tuple(&[
            Some("e9"),
            Some("1"),
            None,
            None,
            Some("Encounter"),
            None,
            Some("{\"name\": \"Jane Doe\""),
        ]);
        let c = p
            .change("encounter", &k, Interaction::Create, None, Some(&row))
            .unwrap()
            .unwrap();
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
            p.change("encounter", &k, Interaction::Create, None, Some(&row)),
            Err(RowError::UnknownType { .. })
        ));
    }

    #[test]
    fn generic_soft_delete() {
        let p = Profile::new(&cfg("generic"));
        let k = p.classify("public", "res", &["id", "rtype", "resource", "gone"]);
        let row = tuple(&[Some("p1"), Some("Patient"), Some("{}"), Some("t")]);
        let c = p
            .change("res", &k, Interaction::Update, None, Some(&row))
            .unwrap()
            .unwrap();
        assert_eq!(c.interaction, Interaction::Delete);
        assert_eq!(c.reference(), "Patient/p1");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            pg_timestamptz_to_fhir("2024-01-02 03:04:05+00"),
            "2024-01-02T03:04:05+00:00"
        );
        assert_eq!(
            pg_timestamptz_to_fhir("2024-01-02 03:04:05+05:30"),
            "2024-01-02T03:04:05+05:30"
        );
        assert_eq!(
            pg_timestamptz_to_fhir("2024-01-02 03:04:05.1-08"),
            "2024-01-02T03:04:05.1-08:00"
        );
    }
}
