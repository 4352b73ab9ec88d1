//! HAPI FHIR JPA ≥ 6.8 on Postgres (also Smile CDR): `hfj_resource` (one row per logical
//! resource: `res_id`, `res_type`, `fhir_id`, `res_ver`, …) and `hfj_res_ver` (one row per
//! version: `res_id`, `res_ver`, `res_encoding` JSON|JSONC|DEL|ESR, `res_text_vc` inline JSON,
//! `res_text` a large object on legacy rows, `res_updated`, `partition_id`).
//!
//! Changes are read from `hfj_res_ver` only — every create, update, delete and re-create
//! writes exactly one version row: `DEL` is a delete, version 1 a create, any other version an
//! update, or a create when the version before it is `DEL`. The row lacks the logical id
//! (`fhir_id` lives in `hfj_resource`, fixed for a `res_id`) and, for legacy `JSONC` rows,
//! the body (large objects never reach logical decoding): [`StoreProfile::complete`] reads
//! both by key, and the previous version (`res_ver - 1`), which HAPI keeps. The body has no
//! `id` and no `meta`: `id` comes from `fhir_id`, `meta.versionId` from `res_ver` and
//! `meta.lastUpdated` from `res_updated` (a `timestamp` without zone, taken as UTC).
//! An UPDATE of a version row (history disabled: HAPI rewrites it in place) is read like an
//! INSERT; hard DELETEs are `$expunge`, not events.

use async_trait::async_trait;
use pg_walstream::TupleData;
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};

use super::{
    body_of, check_type, ident, required, text, tuple, Body, Decoded, RowChange, RowError, RowOp,
    StoreError, StoreProfile, TableDecoder, TableInfo, TableName,
};
use crate::fhir::topic::Interaction;

const VERSIONS: &str = "hfj_res_ver";
const RESOURCES: &str = "hfj_resource";
/// Ids resolved from `res_id` are kept (they never change); the map is cleared past this.
const ID_CACHE: usize = 100_000;

pub(crate) struct Hapi {
    schema: String,
    pool: Option<deadpool_postgres::Pool>,
    ids: Mutex<HashMap<i64, String>>,
}

impl Hapi {
    pub(crate) fn new(schema: &str, pool: Option<deadpool_postgres::Pool>) -> Self {
        Hapi {
            schema: schema.to_string(),
            pool,
            ids: Mutex::new(HashMap::new()),
        }
    }

    fn qualified(&self, name: &str) -> String {
        format!("{}.{}", ident(&self.schema), ident(name))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        super::pooled(self.pool.as_ref()).await
    }

    /// `fhir_id` of a `res_id`, from the cache or the store.
    async fn fhir_id(
        &self,
        c: &tokio_postgres::Client,
        res_id: i64,
    ) -> Result<Option<String>, StoreError> {
        if let Some(id) = self.ids.lock().ok().and_then(|m| m.get(&res_id).cloned()) {
            return Ok(Some(id));
        }
        let sql = format!(
            "SELECT fhir_id FROM {} WHERE res_id = $1",
            self.qualified(RESOURCES)
        );
        // The WAL can deliver a commit before other sessions see it (Postgres writes the
        // commit record before it ends the transaction in the ProcArray), so a row of the
        // same transaction may not be visible yet: look again for a moment before deciding
        // that the resource is gone.
        let mut id: Option<String> = None;
        for wait_ms in [0u64, 5, 10, 20, 40, 80, 160, 320] {
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
            id = c.query_opt(&sql, &[&res_id]).await?.map(|r| r.get(0));
            if id.is_some() {
                break;
            }
        }
        if let (Some(id), Ok(mut m)) = (&id, self.ids.lock()) {
            if m.len() >= ID_CACHE {
                m.clear();
            }
            m.insert(res_id, id.clone());
        }
        Ok(id)
    }

    /// One version row by key: `(encoding, body)`, the body read from the large object and
    /// gunzipped for `JSONC`.
    async fn version_row(
        &self,
        c: &tokio_postgres::Client,
        res_id: i64,
        version: i64,
    ) -> Result<Option<(String, Body)>, StoreError> {
        let sql = format!(
            "SELECT res_encoding, res_text_vc,
                    CASE WHEN res_encoding = 'JSONC' AND res_text IS NOT NULL THEN lo_get(res_text) END
             FROM {} WHERE res_id = $1 AND res_ver = $2",
            self.qualified(VERSIONS)
        );
        let Some(r) = c.query_opt(&sql, &[&res_id, &version]).await? else {
            return Ok(None);
        };
        let encoding: String = r.get(0);
        let body = match (
            encoding.as_str(),
            r.get::<_, Option<String>>(1),
            r.get::<_, Option<Vec<u8>>>(2),
        ) {
            ("JSON", Some(t), _) => Body::Text(t.into()),
            ("JSONC", _, Some(gz)) => Body::Text(
                gunzip(&gz)
                    .map_err(|detail| RowError::BadJson {
                        reference: format!("{VERSIONS} res_id {res_id} version {version}"),
                        detail,
                    })?
                    .into(),
            ),
            _ => Body::Absent,
        };
        Ok(Some((encoding, body)))
    }
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| format!("JSONC body is not gzip: {e}"))?;
    Ok(out)
}

/// `2024-05-01 10:00:00.123` (a `timestamp` without zone) → `2024-05-01T10:00:00.123Z`.
fn utc_instant(s: &str) -> String {
    format!("{}Z", s.replacen(' ', "T", 1))
}

/// Column positions of `hfj_res_ver`, decided once per Relation message.
#[derive(Debug)]
struct Versions {
    res_id: usize,
    version: usize,
    resource_type: usize,
    encoding: usize,
    text: usize,
    /// The body column is `jsonb` (see `Body::Jsonb`).
    text_jsonb: bool,
    updated: usize,
    partition: Option<usize>,
}

impl Versions {
    fn of(t: &TableInfo) -> Option<Self> {
        let text = t.column("res_text_vc")?;
        Some(Versions {
            res_id: t.column("res_id")?,
            version: t.column("res_ver")?,
            resource_type: t.column("res_type")?,
            encoding: t.column("res_encoding")?,
            text,
            text_jsonb: t.is_jsonb(text),
            updated: t.column("res_updated")?,
            partition: t.column("partition_id"),
        })
    }

    fn change(&self, row: &TupleData) -> Result<RowChange, RowError> {
        let version = text(row.get_column(self.version));
        let encoding = text(row.get_column(self.encoding)).unwrap_or_default();
        let interaction = match (encoding.as_str(), version.as_deref()) {
            ("DEL", _) => Interaction::Delete,
            (_, Some("1")) => Interaction::Create,
            _ => Interaction::Update,
        };
        let body = match (interaction, encoding.as_str()) {
            (Interaction::Delete, _) => Body::Absent,
            (_, "JSON") => body_of(row.get_column(self.text), self.text_jsonb),
            // JSONC (a large object) and ESR bodies are read by key, or not at all.
            _ => Body::Absent,
        };
        let ty = required(VERSIONS, row, self.resource_type, "res_type")?;
        Ok(RowChange {
            resource_type: check_type(VERSIONS, ty)?,
            id: String::new(),
            version_id: version,
            last_updated: text(row.get_column(self.updated)).map(|s| utc_instant(&s)),
            interaction,
            body,
            // HAPI's default partition has no id.
            tenant: Some(
                self.partition
                    .and_then(|i| text(row.get_column(i)))
                    .unwrap_or_else(|| "default".into()),
            ),
            key: Some(required(VERSIONS, row, self.res_id, "res_id")?),
            format: super::Format::Fhir,
        })
    }
}

impl TableDecoder for Versions {
    fn decode(
        &self,
        op: RowOp,
        _old: Option<&TupleData>,
        new: Option<&TupleData>,
    ) -> Result<Decoded, RowError> {
        if op == RowOp::Delete {
            return Ok(Decoded::Skip);
        }
        self.change(tuple(VERSIONS, new)?).map(Decoded::Change)
    }

    fn version(&self, tuple: &TupleData) -> Result<RowChange, RowError> {
        self.change(tuple)
    }
}

fn number(s: Option<&str>) -> Option<i64> {
    s?.parse().ok()
}

#[async_trait]
impl StoreProfile for Hapi {
    fn name(&self) -> &'static str {
        "hapi"
    }

    fn publication_tables(&self, catalog: &[TableInfo]) -> Result<Vec<TableName>, StoreError> {
        super::the_table(catalog, &self.schema, VERSIONS, |t| Versions::of(t).is_some())
            .ok_or_else(|| {
                StoreError::Config(format!(
                "no HAPI table {}.{VERSIONS} (res_id, res_ver, res_type, res_encoding, res_text_vc, res_updated)",
                self.schema
            ))
            })
    }

    fn read_tables(&self, catalog: &[TableInfo]) -> Vec<TableName> {
        super::tables_named(catalog, &self.schema, &[VERSIONS, RESOURCES])
    }

    fn table(&self, table: &TableInfo) -> Option<Arc<dyn TableDecoder>> {
        if table.schema != self.schema || table.name != VERSIONS {
            return None;
        }
        Some(Arc::new(Versions::of(table)?))
    }

    fn completes(&self) -> bool {
        true
    }

    /// The logical id, a body kept out of line, and the previous version, by key.
    async fn complete(
        &self,
        change: &mut RowChange,
        previous: &mut Option<RowChange>,
    ) -> Result<(), StoreError> {
        let (Some(res_id), Some(version)) = (
            number(change.key.as_deref()),
            number(change.version_id.as_deref()),
        ) else {
            return Ok(());
        };
        let c = self.client().await?;
        let Some(id) = self.fhir_id(&c, res_id).await? else {
            return Ok(());
        };
        change.id = id;
        change.key = None;
        let needs_body = change.body.text().is_none();
        if change.interaction != Interaction::Delete && needs_body {
            if let Some((_, body)) = self.version_row(&c, res_id, version).await? {
                change.body = body;
            }
        }
        if change.interaction != Interaction::Create && previous.is_none() && version > 1 {
            *previous = self
                .version_row(&c, res_id, version - 1)
                .await?
                .map(|(encoding, body)| RowChange {
                    version_id: Some((version - 1).to_string()),
                    last_updated: None,
                    interaction: if encoding == "DEL" {
                        Interaction::Delete
                    } else {
                        Interaction::Update
                    },
                    body,
                    key: None,
                    format: super::Format::Fhir,
                    ..change.clone()
                });
        }
        Ok(())
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "SELECT res_id, res_ver, res_updated::text FROM {} WHERE res_type = $1 AND fhir_id = $2 AND res_deleted_at IS NULL",
            self.qualified(RESOURCES)
        );
        let Some(r) = c.query_opt(&sql, &[&resource_type, &id]).await? else {
            return Ok(None);
        };
        let (res_id, version): (i64, i64) = (r.get(0), r.get(1));
        self.resource_at(&c, resource_type, id, res_id, version, r.get(2))
            .await
    }

    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Value>, StoreError> {
        let Some(version) = number(Some(version)) else {
            return Ok(None);
        };
        let c = self.client().await?;
        let sql = format!(
            "SELECT r.res_id, v.res_updated::text FROM {} r JOIN {} v ON v.res_id = r.res_id AND v.res_ver = $3
             WHERE r.res_type = $1 AND r.fhir_id = $2",
            self.qualified(RESOURCES),
            self.qualified(VERSIONS)
        );
        let Some(r) = c.query_opt(&sql, &[&resource_type, &id, &version]).await? else {
            return Ok(None);
        };
        self.resource_at(&c, resource_type, id, r.get(0), version, r.get(1))
            .await
    }

    /// HAPI indexes references in `hfj_res_link`; revInclude through it is not built yet.
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

impl Hapi {
    async fn resource_at(
        &self,
        c: &tokio_postgres::Client,
        resource_type: &str,
        id: &str,
        res_id: i64,
        version: i64,
        updated: Option<String>,
    ) -> Result<Option<Value>, StoreError> {
        let Some((_, body)) = self.version_row(c, res_id, version).await? else {
            return Ok(None);
        };
        let change = RowChange {
            resource_type: resource_type.to_string(),
            id: id.to_string(),
            version_id: Some(version.to_string()),
            last_updated: updated.map(|s| utc_instant(&s)),
            interaction: Interaction::Update,
            body,
            tenant: None,
            key: None,
            format: super::Format::Fhir,
        };
        Ok(change.resource()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_without_zone_are_utc_instants() {
        assert_eq!(
            utc_instant("2024-05-01 10:00:00.123"),
            "2024-05-01T10:00:00.123Z"
        );
    }

    #[test]
    fn jsonc_bodies_are_gunzipped() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(br#"{"resourceType":"Patient"}"#).unwrap();
        let bytes = gz.finish().unwrap();
        assert_eq!(gunzip(&bytes).unwrap(), br#"{"resourceType":"Patient"}"#);
        assert!(gunzip(b"not gzip").is_err());
    }
}
