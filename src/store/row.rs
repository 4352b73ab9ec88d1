//! A row in resource terms: what a profile makes of a tuple before topic matching. The JSON
//! is parsed only for changes that some topic wants.

use bytes::Bytes;
use serde_json::{Map, Value};
use std::sync::Arc;

use crate::fhir::fields::{Fields, Parsed};
use crate::fhir::scan::{Member, Source};
use crate::fhir::search::direct::RawDoc;
use crate::fhir::topic::Interaction;

/// The body of the row as it came in the WAL.
#[derive(Debug, Clone)]
pub enum Body {
    /// No body in the tuple (a delete's key-only old tuple, a NULL column).
    Absent,
    /// pgoutput did not send the value because it was TOASTed and unchanged: the value is
    /// unknown and must be read from the store, never taken for "empty".
    UnchangedToast,
    Text(Bytes),
    /// The text of a `jsonb` column: JSON Postgres checked when it stored it, so capture
    /// steps over the members it does not read without checking them again.
    Jsonb(Bytes),
}

impl Body {
    /// The body's text, whatever the column's type.
    pub fn text(&self) -> Option<&Bytes> {
        match self {
            Body::Text(t) | Body::Jsonb(t) => Some(t),
            Body::Absent | Body::UnchangedToast => None,
        }
    }
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
    /// The store's tenant (HFS tenant, Medplum project, HAPI partition), when it has them.
    pub tenant: Option<String>,
    /// The store's own key of the resource when the row lacks the logical id (HAPI's
    /// `res_id`): [`super::StoreProfile::complete`] resolves it into `id` and clears it.
    pub key: Option<String>,
    /// The JSON form of the body.
    pub format: Format,
}

/// The JSON form a store writes bodies in.
#[derive(Debug, Clone, Default)]
pub enum Format {
    #[default]
    Fhir,
    /// Aidbox's own format (FHIR JSON passes through unchanged), converted when parsed.
    Aidbox(Arc<AidboxFormat>),
}

/// What converting Aidbox's format needs: the FHIR version's model and the store's
/// Attribute definitions (first-class extensions).
#[derive(Debug, Clone)]
pub struct AidboxFormat {
    pub(crate) version: crate::fhir::FhirVersion,
    pub(crate) attributes: super::aidbox::format::Attributes,
}

impl Format {
    /// Aidbox's format for `version`, without first-class extensions (what a store without
    /// Attribute definitions has; tests and benchmarks build rows with it).
    pub fn aidbox(version: crate::fhir::FhirVersion) -> Format {
        Format::Aidbox(Arc::new(AidboxFormat {
            version,
            attributes: Default::default(),
        }))
    }
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
    pub(crate) fn resource(&self) -> Result<Option<Value>, RowError> {
        self.resource_with(&Fields::all())
    }

    /// The resource with only the top-level members `fields` keeps (with `resourceType`,
    /// and `id` and `meta` from the columns when it keeps those): what capture's plans
    /// read, without building the rest.
    pub(crate) fn resource_with(&self, fields: &Fields) -> Result<Option<Value>, RowError> {
        Ok(self.parsed(fields)?.map(|(v, _)| v))
    }

    /// [`RowChange::resource_with`], and the text of the members `fields` keeps raw (for
    /// canFilterBy walks on text, [`crate::fhir::search::direct`]), when the scanner read them.
    pub(crate) fn parsed(
        &self,
        fields: &Fields,
    ) -> Result<Option<(Value, Option<RawDoc<'_>>)>, RowError> {
        let (text, source) = match &self.body {
            Body::Text(t) => (t, Source::Unchecked),
            Body::Jsonb(t) => (t, Source::Jsonb),
            Body::Absent | Body::UnchangedToast => return Ok(None),
        };
        let Parsed { map: mut obj, raw } = match fields.parse(text, source) {
            Ok(Some(m)) => m,
            Ok(None) => {
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
        if fields.keeps("id") {
            obj.insert("id".into(), self.id.clone().into());
        }
        if fields.keeps("meta") && (self.version_id.is_some() || self.last_updated.is_some()) {
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
        if let Format::Aidbox(f) = &self.format {
            super::aidbox::format::to_fhir(&mut obj, f.version, &f.attributes);
        }
        let raw = raw.map(|members| self.raw_doc(members));
        Ok(Some((Value::Object(obj), raw)))
    }

    /// Kept members as text, with what reading Aidbox's format needs.
    fn raw_doc<'a>(&'a self, members: Vec<Member<'a>>) -> RawDoc<'a> {
        match &self.format {
            Format::Fhir => RawDoc::new(members, false, Vec::new()),
            Format::Aidbox(f) => {
                let model = crate::fhir::model::ModelIndex::of(f.version.schema());
                RawDoc::new(
                    members,
                    model.get(&self.resource_type).is_some(),
                    f.attributes.keys_of(&self.resource_type),
                )
            }
        }
    }
}

/// `2024-05-01 10:00:00.123+00` (Postgres text) → `2024-05-01T10:00:00.123+00:00` (FHIR instant).
pub fn pg_timestamptz_to_fhir(s: &str) -> String {
    // Room for the `:00` an offset may need: one allocation, not a copy and a regrowth.
    let mut out = String::with_capacity(s.len() + 3);
    match s.split_once(' ') {
        Some((date, time)) => {
            out.push_str(date);
            out.push('T');
            out.push_str(time);
        }
        None => out.push_str(s),
    }
    // Offsets print as +HH or +HH:MM; FHIR needs +HH:MM.
    if let Some(pos) = out.rfind(['+', '-']) {
        if pos > 10 && out.len() - pos == 3 {
            out.push_str(":00");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_resource_has_the_rows_type_id_and_meta() {
        let mut fields = Fields::default();
        fields.add(Some(["status".to_string(), "meta".to_string()]));
        let row = RowChange {
            resource_type: "Observation".into(),
            id: "o1".into(),
            version_id: Some("7".into()),
            last_updated: Some("2024-01-02T03:04:05+00:00".into()),
            interaction: Interaction::Create,
            body: Body::Jsonb(Bytes::from_static(
                br#"{"resourceType": "Other", "status": "final", "code": {"text": "x"}}"#,
            )),
            tenant: None,
            key: None,
            format: Format::Fhir,
        };
        let v = row.resource_with(&fields).unwrap().unwrap();
        assert_eq!(
            v,
            serde_json::json!({"resourceType": "Observation", "status": "final",
                "meta": {"versionId": "7", "lastUpdated": "2024-01-02T03:04:05+00:00"}})
        );
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
