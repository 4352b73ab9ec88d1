//! `[source]`: the store, its layout, the slot and publication, lag thresholds, and the
//! `generic` profile's tables.

use serde::{Deserialize, Serialize};

use super::{ConfigError, FhirVersion};

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProfileKind {
    Aidbox,
    Hapi,
    Helios,
    Medplum,
    Generic,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub url: String,
    pub profile: ProfileKind,
    #[serde(default = "default_fhir_version")]
    pub fhir_version: FhirVersion,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_slot")]
    pub(crate) publication: String,
    /// Schema holding the store's resource tables (aidbox profile).
    #[serde(default = "default_schema")]
    pub(crate) schema: String,
    /// Tables for the `generic` profile.
    #[serde(default)]
    pub tables: Vec<GenericTable>,
    /// Create the publication and slot when missing (default true).
    #[serde(default = "super::yes")]
    pub create_missing: bool,
    /// How often capture compares the publication with the store's tables and adds
    /// resource tables created since (seconds; default 10). Rows written to a new table
    /// before it is added are not captured.
    #[serde(default = "default_publication_refresh")]
    pub publication_refresh_secs: u64,
    /// Every this many seconds capture writes a tiny logical message of its own into the
    /// store database's WAL, so the slot can be confirmed past WAL the cluster writes
    /// elsewhere while the store is quiet (default 10; 0: off).
    #[serde(default = "default_wal_heartbeat")]
    pub wal_heartbeat_secs: u64,
    /// When slot lag is worth a warning, and when it makes `/readyz` report degraded.
    #[serde(default)]
    pub lag: LagConfig,
    /// Only changes of these tenants are captured (HAPI partition id or `default`, HFS
    /// tenant, Medplum project id); absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
}

/// `[source.lag]`: thresholds on the slot's lag. Either figure above its limit counts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LagConfig {
    /// WAL bytes behind the slot's confirmed position that log a warning (default 1 GiB).
    pub(crate) warn_bytes: u64,
    /// Seconds the oldest unqueued store commit may wait before a warning (default 60).
    pub warn_secs: u64,
    /// Bytes above which `/readyz` reports degraded and an error is logged (default 8 GiB).
    pub(crate) max_bytes: u64,
    /// Seconds above which `/readyz` reports degraded (default 600).
    pub max_secs: u64,
    /// How often the slot is read (default 5).
    pub check_secs: u64,
}

impl Default for LagConfig {
    fn default() -> Self {
        LagConfig {
            warn_bytes: 1 << 30,
            warn_secs: 60,
            max_bytes: 8 << 30,
            max_secs: 600,
            check_secs: 5,
        }
    }
}

/// One table of a `generic` store: which columns hold what.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenericTable {
    /// `schema.table` or `table` (then `source.schema`).
    pub table: String,
    /// Fixed resource type of every row, or …
    pub resource_type: Option<String>,
    /// … the column that holds it.
    pub type_column: Option<String>,
    #[serde(default = "default_id_col")]
    pub id_column: String,
    #[serde(default = "default_resource_col")]
    pub resource_column: String,
    pub version_column: Option<String>,
    /// A boolean column; true means the row is a deletion (soft delete).
    pub deleted_column: Option<String>,
}

/// Names that are spliced into SQL (slot, publication, schema) must be plain identifiers.
pub(super) fn validate_ident(what: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !v.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{what} = {v:?}: use lower-case letters, digits and '_' (at most 63)"
        )))
    }
}

fn default_fhir_version() -> FhirVersion {
    FhirVersion::R5
}
fn default_slot() -> String {
    "fhir_cdc".into()
}
fn default_wal_heartbeat() -> u64 {
    10
}
fn default_publication_refresh() -> u64 {
    10
}
fn default_schema() -> String {
    "public".into()
}
fn default_id_col() -> String {
    "id".into()
}
fn default_resource_col() -> String {
    "resource".into()
}

/// The `[source]` rules serde cannot express: tenants only where the profile has them,
/// plain SQL identifiers, the generic profile's tables.
pub(super) fn check(source: &SourceConfig) -> Result<(), ConfigError> {
    let tenanted = matches!(
        source.profile,
        ProfileKind::Hapi | ProfileKind::Helios | ProfileKind::Medplum
    );
    if source.tenants.is_some() && !tenanted {
        return Err(ConfigError::Invalid(format!(
            "source.tenants: the {:?} profile has no tenants (hapi, helios and medplum do)",
            source.profile
        )));
    }
    if source.publication_refresh_secs == 0 {
        return Err(ConfigError::Invalid(
            "source.publication_refresh_secs must be at least 1".into(),
        ));
    }
    validate_ident("source.slot", &source.slot)?;
    validate_ident("source.publication", &source.publication)?;
    validate_ident("source.schema", &source.schema)?;
    if source.profile == ProfileKind::Generic && source.tables.is_empty() {
        return Err(ConfigError::Invalid(
            "profile \"generic\" needs at least one [[source.tables]] entry".into(),
        ));
    }
    for t in &source.tables {
        if t.resource_type.is_none() == t.type_column.is_none() {
            return Err(ConfigError::Invalid(format!(
                "source.tables {:?}: set exactly one of resource_type or type_column",
                t.table
            )));
        }
    }
    Ok(())
}
