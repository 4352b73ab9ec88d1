//! The store seam: everything fhir-cdc knows about how a particular FHIR server lays out its
//! tables lives behind [`StoreProfile`]. Capture asks a profile which tables to publish and
//! how a row becomes a resource change; delivery and the API ask it to read a resource (or a
//! given version of it) and to find resources that refer to one. Nothing outside this module
//! branches on the kind of store, so a new store is one new file here.

pub mod aidbox;
pub(crate) mod generic;
pub(crate) mod hapi;
pub(crate) mod helios;
pub mod init;
pub(crate) mod medplum;
/// An in-memory store for tests (not in the release binary).
#[cfg(any(test, feature = "test-utils"))]
pub mod memory;
mod row;
pub(crate) mod setup;

use async_trait::async_trait;
use pg_walstream::TupleData;
use serde_json::Value;
use std::fmt;
use std::sync::Arc;

use crate::config::{ProfileKind, SourceConfig};
pub use row::{pg_timestamptz_to_fhir, AidboxFormat, Body, Format, RowChange, RowError};

/// A table as pgoutput (Relation message) or the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub(crate) schema: String,
    pub(crate) name: String,
    /// Column names in attribute order, the order of pgoutput tuples.
    pub(crate) columns: Vec<String>,
    /// Column type OIDs in the same order, from the Relation message; empty when read
    /// from the catalog (where only names are needed).
    pub(crate) types: Vec<u32>,
}

/// `jsonb`'s type OID (fixed in Postgres's catalog).
const JSONB_OID: u32 = 3802;

impl TableInfo {
    pub(crate) fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }

    /// Whether column `i` is `jsonb`: its text is JSON Postgres has already checked.
    pub(crate) fn is_jsonb(&self, i: usize) -> bool {
        self.types.get(i) == Some(&JSONB_OID)
    }
}

/// `schema.table`, printed quoted for SQL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    pub(crate) schema: String,
    pub(crate) name: String,
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", ident(&self.schema), ident(&self.name))
    }
}

/// Quotes an identifier for SQL.
pub(crate) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// What one row operation of a published table means.
#[derive(Debug, Clone)]
pub enum Decoded {
    /// A resource was created, updated or deleted.
    Change(RowChange),
    /// The stored version a later change in the same transaction replaces (a history row
    /// written just before the update): kept by capture as that change's previous version.
    PriorVersion(RowChange),
    /// Bookkeeping of the store, not a resource change.
    Skip,
}

/// The kind of row operation pgoutput reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOp {
    Insert,
    Update,
    Delete,
}

/// Turns the rows of one table into resource changes. Made once per Relation message, so
/// the per-row work is index lookups.
pub trait TableDecoder: Send + Sync + fmt::Debug {
    fn decode(
        &self,
        op: RowOp,
        old: Option<&TupleData>,
        new: Option<&TupleData>,
    ) -> Result<Decoded, RowError>;

    /// A full old tuple (REPLICA IDENTITY FULL) read as the stored version it held.
    fn version(&self, tuple: &TupleData) -> Result<RowChange, RowError>;
}

/// Why a store read failed. Reads are best effort for payloads, so callers log and go on;
/// the kind still says whether trying again could help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("store database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Row(#[from] RowError),
    /// The replication slot was lost: capture must stop and say so.
    #[error("{0}")]
    SlotLost(String),
}

impl StoreError {
    pub(crate) fn kind(&self) -> crate::error::ErrorKind {
        match self {
            StoreError::Db(_) | StoreError::Pool(_) => crate::error::ErrorKind::Retryable,
            StoreError::Config(_) | StoreError::Row(_) | StoreError::SlotLost(_) => {
                crate::error::ErrorKind::Fatal
            }
        }
    }

    /// What the operator should do about a fatal one.
    pub(crate) fn remedy(&self) -> Option<String> {
        match self {
            StoreError::Db(_) | StoreError::Pool(_) => None,
            StoreError::SlotLost(_) => Some(
                "`fhir-cdc capture --resync-from-now` makes a new slot and records the gap for subscribers (docs/operations.md, An invalidated slot)".into(),
            ),
            StoreError::Config(_) => Some("run `fhir-cdc check --config F`: it prints the SQL or setting to fix".into()),
            StoreError::Row(_) => Some(
                "a row the profile cannot read: check that [source] profile matches the store's layout (docs/stores.md)".into(),
            ),
        }
    }
}

/// A FHIR store's table layout and reads.
#[async_trait]
pub trait StoreProfile: Send + Sync {
    /// The profile's name in the config (`aidbox`, `generic`, …).
    fn name(&self) -> &'static str;

    /// The tables the publication names, chosen from the database's tables. Only resource
    /// and history tables: Postgres refuses UPDATE/DELETE on a published table without a
    /// replica identity, so publishing anything else could break the store.
    fn publication_tables(&self, catalog: &[TableInfo]) -> Result<Vec<TableName>, StoreError>;

    /// Every table the profile reads with SQL (payloads, previous versions, ids): what the
    /// store user needs `SELECT` on. By default the published tables.
    fn read_tables(&self, catalog: &[TableInfo]) -> Vec<TableName> {
        self.publication_tables(catalog).unwrap_or_default()
    }

    /// The decoder for a table, or `None` when the profile does not read it.
    fn table(&self, table: &TableInfo) -> Option<Arc<dyn TableDecoder>>;

    /// The current version of a resource, as FHIR JSON; `None` when absent or deleted.
    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, StoreError>;

    /// Reads, once at start, what the profile needs from the store besides rows (Aidbox's
    /// Attribute definitions). Capture calls it before streaming; readers after connecting.
    async fn prepare(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether [`StoreProfile::complete`] has work to do for this store.
    fn completes(&self) -> bool {
        false
    }

    /// Fills in, by key from the store, what the WAL row of a change lacks: the version it
    /// replaced when the store does not write that in the same transaction (HFS, Medplum,
    /// HAPI keep every version in a history that only grows, so reading it later is exact).
    /// Capture then applies [`settle`]. Called only when [`StoreProfile::completes`].
    async fn complete(
        &self,
        _change: &mut RowChange,
        _previous: &mut Option<RowChange>,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    /// A given version of a resource, when the store keeps it.
    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Value>, StoreError>;

    /// Resources of `source_type` whose element `path` holds a reference to `reference`
    /// (`Type/id`), newest first, at most `limit` (notificationShape revInclude).
    async fn referring(
        &self,
        source_type: &str,
        path: &str,
        reference: &str,
        limit: i64,
    ) -> Result<Vec<Value>, StoreError>;
}

/// The profile the configuration names. `pool` is for reads of the store database (payloads
/// and revInclude); it connects lazily.
pub fn from_config(source: &SourceConfig, pool: deadpool_postgres::Pool) -> Arc<dyn StoreProfile> {
    match source.profile {
        ProfileKind::Aidbox => Arc::new(
            aidbox::Aidbox::new(&source.schema, Some(pool)).with_version(source.fhir_version),
        ),
        ProfileKind::Hapi => Arc::new(hapi::Hapi::new(&source.schema, Some(pool))),
        ProfileKind::Helios => Arc::new(helios::Helios::new(&source.schema, Some(pool))),
        ProfileKind::Medplum => Arc::new(medplum::Medplum::new(&source.schema, Some(pool))),
        ProfileKind::Generic => Arc::new(generic::Generic::new(
            &source.schema,
            source.tables.clone(),
            Some(pool),
        )),
    }
}

/// A connection from a profile's read pool; a profile made without one (decoding only, in
/// tests) says so.
pub(crate) async fn pooled(
    pool: Option<&deadpool_postgres::Pool>,
) -> Result<deadpool_postgres::Object, StoreError> {
    let pool =
        pool.ok_or_else(|| StoreError::Config("this profile has no store connection".into()))?;
    Ok(pool.get().await?)
}

/// The one table a profile publishes, as a publication list, when the catalog has it with
/// the columns `fits` checks.
pub(crate) fn the_table(
    catalog: &[TableInfo],
    schema: &str,
    name: &str,
    fits: impl Fn(&TableInfo) -> bool,
) -> Option<Vec<TableName>> {
    let t = catalog
        .iter()
        .find(|t| t.schema == schema && t.name == name && fits(t))?;
    Some(vec![TableName {
        schema: t.schema.clone(),
        name: t.name.clone(),
    }])
}

/// The catalog's tables of `schema` named `names`, for [`StoreProfile::read_tables`].
pub(crate) fn tables_named(catalog: &[TableInfo], schema: &str, names: &[&str]) -> Vec<TableName> {
    catalog
        .iter()
        .filter(|t| t.schema == schema && names.contains(&t.name.as_str()))
        .map(|t| TableName {
            schema: t.schema.clone(),
            name: t.name.clone(),
        })
        .collect()
}

/// A write whose previous version is a deletion is a create (re-create after delete), with
/// no previous version: FHIR's view, whatever the store did to its rows.
pub(crate) fn settle(change: &mut RowChange, previous: &mut Option<RowChange>) {
    let after_delete = previous
        .as_ref()
        .is_some_and(|p| p.interaction == crate::fhir::topic::Interaction::Delete);
    if after_delete && change.interaction == crate::fhir::topic::Interaction::Update {
        change.interaction = crate::fhir::topic::Interaction::Create;
        *previous = None;
    }
}

/// Builds the `RowChange` of a tuple: shared by the profiles.
pub(crate) fn text(c: Option<&pg_walstream::ColumnData>) -> Option<String> {
    text_ref(c).map(str::to_string)
}

/// [`text`] borrowed from the tuple, for columns only compared or reformatted (a status, a
/// timestamp): an allocation fewer per row each.
pub(crate) fn text_ref(c: Option<&pg_walstream::ColumnData>) -> Option<&str> {
    let c = c?;
    if c.is_null() || c.is_unchanged() {
        return None;
    }
    std::str::from_utf8(c.as_bytes()).ok()
}

/// The tuple a row operation carries, or the error naming the table.
pub(crate) fn tuple<'a>(
    table: &str,
    row: Option<&'a TupleData>,
) -> Result<&'a TupleData, RowError> {
    row.ok_or(RowError::MissingColumn {
        table: table.into(),
        column: "tuple",
    })
}

/// A column that must hold a value (the id, the type).
pub(crate) fn required(
    table: &str,
    row: &TupleData,
    index: usize,
    column: &'static str,
) -> Result<String, RowError> {
    text(row.get_column(index)).ok_or(RowError::MissingColumn {
        table: table.into(),
        column,
    })
}

/// The body a change carries: none for a delete.
pub(crate) fn body_for(
    interaction: crate::fhir::topic::Interaction,
    c: Option<&pg_walstream::ColumnData>,
    jsonb: bool,
) -> Body {
    if interaction == crate::fhir::topic::Interaction::Delete {
        Body::Absent
    } else {
        body_of(c, jsonb)
    }
}

/// The body in column `c`; `jsonb` when the column's type is (see [`TableInfo::is_jsonb`]).
pub(crate) fn body_of(c: Option<&pg_walstream::ColumnData>, jsonb: bool) -> Body {
    match c {
        None => Body::Absent,
        Some(c) if c.is_unchanged() => Body::UnchangedToast,
        Some(c) if c.is_null() => Body::Absent,
        Some(c) if jsonb => Body::Jsonb(c.raw_bytes()),
        Some(c) => Body::Text(c.raw_bytes()),
    }
}

pub(crate) fn check_type(table: &str, ty: String) -> Result<String, RowError> {
    if crate::fhir::resource_types::is_resource_type(&ty) {
        Ok(ty)
    } else {
        Err(RowError::UnknownType {
            table: table.into(),
            resource_type: ty,
        })
    }
}
