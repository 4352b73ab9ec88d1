//! An in-memory store for tests: resources kept in a map, and a minimal table layout so
//! capture's decoder and transaction assembly can be driven without Postgres. A table named
//! after a resource type in lower case (`encounter`) with columns `id, version, resource`
//! holds current versions; `<type>_history` holds the versions changes replace, like Aidbox.

use async_trait::async_trait;
use pg_walstream::TupleData;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{
    body_for, check_type, required, text, tuple, Decoded, RowChange, RowError, RowOp, StoreError,
    StoreProfile, TableDecoder, TableInfo, TableName,
};
use crate::fhir::resource_types::RESOURCE_TYPES;
use crate::fhir::topic::Interaction;

/// Every version of every resource, oldest first, keyed by `(type, id)`.
#[derive(Default)]
pub struct MemoryStore {
    versions: Mutex<HashMap<(String, String), Vec<Value>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `resource` as the newest version of `resourceType/id`.
    pub fn put(&self, resource: Value) {
        let key = (
            resource["resourceType"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            resource["id"].as_str().unwrap_or_default().to_string(),
        );
        let mut m = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(key).or_default().push(resource);
    }

    fn all(&self) -> Vec<Value> {
        let m = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        m.values().filter_map(|v| v.last().cloned()).collect()
    }
}

#[derive(Debug)]
struct Layout {
    table: String,
    table_type: String,
    history: bool,
    id: usize,
    version: Option<usize>,
    resource: usize,
    /// The body column is `jsonb` (see `Body::Jsonb`).
    resource_jsonb: bool,
}

impl Layout {
    fn row(&self, op: Interaction, row: Option<&TupleData>) -> Result<RowChange, RowError> {
        let row = tuple(&self.table, row)?;
        let id = required(&self.table, row, self.id, "id")?;
        Ok(RowChange {
            resource_type: check_type(&self.table, self.table_type.clone())?,
            id,
            version_id: self.version.and_then(|i| text(row.get_column(i))),
            last_updated: None,
            interaction: op,
            body: body_for(op, row.get_column(self.resource), self.resource_jsonb),
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
        if self.history {
            return self
                .row(Interaction::Create, new.or(old))
                .map(Decoded::PriorVersion);
        }
        let change = match op {
            RowOp::Insert => self.row(Interaction::Create, new),
            RowOp::Update => self.row(Interaction::Update, new),
            RowOp::Delete => self.row(Interaction::Delete, old),
        };
        change.map(Decoded::Change)
    }

    fn version(&self, tuple: &TupleData) -> Result<RowChange, RowError> {
        self.row(Interaction::Create, Some(tuple))
    }
}

#[async_trait]
impl StoreProfile for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn publication_tables(&self, catalog: &[TableInfo]) -> Result<Vec<TableName>, StoreError> {
        Ok(catalog
            .iter()
            .filter(|t| self.table(t).is_some())
            .map(|t| TableName {
                schema: t.schema.clone(),
                name: t.name.clone(),
            })
            .collect())
    }

    fn table(&self, t: &TableInfo) -> Option<Arc<dyn TableDecoder>> {
        let (base, history) = match t.name.strip_suffix("_history") {
            Some(b) => (b, true),
            None => (t.name.as_str(), false),
        };
        let table_type = RESOURCE_TYPES
            .iter()
            .find(|ty| ty.eq_ignore_ascii_case(base))?;
        let resource = t.column("resource")?;
        Some(Arc::new(Layout {
            table: t.name.clone(),
            table_type: table_type.to_string(),
            history,
            id: t.column("id")?,
            version: t.column("version"),
            resource_jsonb: t.is_jsonb(resource),
            resource,
        }))
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<Value>, StoreError> {
        let m = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        Ok(m.get(&(resource_type.to_string(), id.to_string()))
            .and_then(|v| v.last().cloned()))
    }

    async fn read_version(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Value>, StoreError> {
        let m = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        Ok(m.get(&(resource_type.to_string(), id.to_string()))
            .and_then(|v| {
                v.iter()
                    .find(|r| r["meta"]["versionId"].as_str() == Some(version))
                    .cloned()
            }))
    }

    async fn referring(
        &self,
        source_type: &str,
        path: &str,
        reference: &str,
        limit: i64,
    ) -> Result<Vec<Value>, StoreError> {
        let refers = |v: &Value| match v {
            Value::Array(a) => a.iter().any(|x| x["reference"] == reference),
            other => other["reference"] == reference,
        };
        Ok(self
            .all()
            .into_iter()
            .filter(|r| r["resourceType"] == source_type && refers(&r[path]))
            .take(usize::try_from(limit).unwrap_or(0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn reads_versions_and_referrers() {
        let s = MemoryStore::new();
        s.put(json!({"resourceType": "Encounter", "id": "e1", "meta": {"versionId": "1"}, "status": "planned"}));
        s.put(json!({"resourceType": "Encounter", "id": "e1", "meta": {"versionId": "2"}, "status": "finished"}));
        s.put(json!({"resourceType": "Observation", "id": "o1", "encounter": {"reference": "Encounter/e1"}}));
        let cur = s.read("Encounter", "e1").await.unwrap().unwrap();
        assert_eq!(cur["status"], "finished");
        let v1 = s
            .read_version("Encounter", "e1", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v1["status"], "planned");
        let refs = s
            .referring("Observation", "encounter", "Encounter/e1", 10)
            .await
            .unwrap();
        assert_eq!(refs.len(), 1);
        assert!(s.read("Patient", "p").await.unwrap().is_none());
    }
}
