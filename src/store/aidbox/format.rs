//! Aidbox's own JSON format → FHIR JSON, driven by the FHIR model (the embedded schemas of
//! octofhir-fhirschema), so every resource and datatype of the version is covered without a
//! hand-written list:
//! - references `{"resourceType": "Patient", "id": "p1"}` → `{"reference": "Patient/p1"}`,
//!   `{"uri": …}` → `{"reference": …}`, `{"localRef": "x"}` → `{"reference": "#x"}` (other
//!   members such as `display` stay);
//! - choice elements `"value": {"Quantity": {…}}` → `"valueQuantity": {…}`;
//! - first-class extensions (an Attribute's named key, `"race": {…}`) → `extension` entries,
//!   from the Attribute definitions the store holds (see [`Attributes`]).
//!
//! FHIR JSON passes through unchanged: `valueQuantity` is an element of its own, and a
//! reference with `reference` is left as it is. Elements the model does not know are kept.

use octofhir_fhirschema::types::FhirSchemaElement;
use serde_json::{Map, Value};
use std::collections::HashMap;

use crate::fhir::model::{upper_first, Members, ModelIndex, TypeIndex};
use crate::fhir::FhirVersion;

/// An Attribute: a first-class extension stored under `key` of `resource_type`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attribute {
    pub(crate) resource_type: String,
    /// The key in the resource (`race`); only top-level attributes are mapped.
    pub(crate) key: String,
    pub(crate) url: String,
    /// The value type (`string`, `Coding`, …); `None` for a complex attribute whose members
    /// are nested attributes (`{"text": …}` → nested extensions named by member).
    pub(crate) value_type: Option<String>,
}

/// The store's Attribute definitions, by resource type, then key (looked up by `&str`: this
/// runs for every key of every captured resource).
#[derive(Debug, Clone, Default)]
pub(crate) struct Attributes(HashMap<String, HashMap<String, Attribute>>);

impl Attributes {
    pub(crate) fn new(list: Vec<Attribute>) -> Self {
        let mut by_type: HashMap<String, HashMap<String, Attribute>> = HashMap::new();
        for a in list {
            by_type
                .entry(a.resource_type.clone())
                .or_default()
                .insert(a.key.clone(), a);
        }
        Attributes(by_type)
    }

    fn of_type(&self, resource_type: &str) -> Option<&HashMap<String, Attribute>> {
        self.0.get(resource_type)
    }

    /// The keys of `resource_type`'s first-class extensions (a member stored under one of
    /// them becomes an `extension` when converted).
    pub(crate) fn keys_of(&self, resource_type: &str) -> Vec<&str> {
        self.of_type(resource_type)
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// Where a JSON object sits in the model: a type, or a backbone element's members.
#[derive(Clone, Copy)]
enum Scope<'a> {
    Type(&'a TypeIndex),
    Backbone(&'static Members),
}

struct Converter<'a> {
    model: &'static ModelIndex,
    attributes: &'a Attributes,
}

/// Converts `resource` in place. A resource without a known `resourceType` is left alone.
pub(crate) fn to_fhir(
    resource: &mut Map<String, Value>,
    version: FhirVersion,
    attributes: &Attributes,
) {
    let c = Converter {
        model: ModelIndex::of(version.schema()),
        attributes,
    };
    let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else {
        return;
    };
    let Some(schema) = c.model.get(ty) else {
        return;
    };
    if let Some(attrs) = c.attributes.of_type(ty) {
        extensions(attrs, resource);
    }
    c.object(resource, Scope::Type(schema));
}

impl<'a> Converter<'a> {
    /// The element `name` of `scope`, looking through base types (`meta` is Resource's).
    fn element(&self, scope: Scope<'a>, name: &str) -> Option<&'static FhirSchemaElement> {
        match scope {
            Scope::Backbone(members) => self.model.backbone_member(members, name),
            Scope::Type(t) => t.element(name),
        }
    }

    fn object(&self, obj: &mut Map<String, Value>, scope: Scope<'a>) {
        // Values convert in place; only choice elements change keys, after the walk.
        let mut choices = Vec::new();
        for (key, v) in obj.iter_mut() {
            // Only objects convert (a reference, a choice's `{"Quantity": …}`, what they
            // hold), and arrays of them: a string, number or boolean stays what it is, so its
            // element is not looked up (most members of a resource are such leaves).
            if !matches!(v, Value::Object(_) | Value::Array(_)) {
                continue;
            }
            let Some(el) = self.element(scope, key) else {
                continue;
            };
            if el.choices.is_some() {
                choices.push(key.clone());
            } else {
                self.value(v, el);
            }
        }
        for key in choices {
            self.choice(obj, scope, &key);
        }
    }

    /// `"value": {"Quantity": {…}}` → `"valueQuantity": {…}` when that is one of the choices.
    fn choice(&self, obj: &mut Map<String, Value>, scope: Scope<'a>, key: &str) {
        let Some(Value::Object(inner)) = obj.get(key) else {
            return;
        };
        let Some((ty, _)) = inner.iter().next().filter(|_| inner.len() == 1) else {
            return;
        };
        let name = format!("{key}{}", upper_first(ty));
        let Some(el) = self.element(scope, &name) else {
            return;
        };
        let Some(Value::Object(mut inner)) = obj.remove(key) else {
            return;
        };
        let Some((_, mut v)) = inner.iter_mut().next().map(|(k, v)| (k.clone(), v.take())) else {
            return;
        };
        self.value(&mut v, el);
        obj.insert(name, v);
    }

    /// One element's value (each item of an array).
    fn value(&self, v: &mut Value, el: &'static FhirSchemaElement) {
        if let Value::Array(items) = v {
            for item in items {
                self.value(item, el);
            }
            return;
        }
        let Value::Object(obj) = v else { return };
        if let Some(members) = &el.elements {
            self.object(obj, Scope::Backbone(members));
            return;
        }
        let Some(ty) = el.type_name.as_deref() else {
            return;
        };
        if ty == "Reference" {
            reference(obj);
        }
        let schema = if ty == "Resource" {
            // A contained resource: its own type decides.
            obj.get("resourceType")
                .and_then(Value::as_str)
                .and_then(|t| self.model.get(t))
        } else {
            self.model.get(ty)
        };
        if let Some(schema) = schema {
            self.object(obj, Scope::Type(schema));
        }
    }
}

/// Top-level keys that are the store's Attributes (and not elements) → `extension`.
fn extensions(attrs: &HashMap<String, Attribute>, obj: &mut Map<String, Value>) {
    let keys: Vec<String> = obj
        .keys()
        .filter(|k| attrs.contains_key(k.as_str()))
        .cloned()
        .collect();
    for key in keys {
        let (Some(attr), Some(v)) = (attrs.get(&key), obj.remove(&key)) else {
            continue;
        };
        let ext = extension(&attr.url, attr.value_type.as_deref(), v);
        match obj.get_mut("extension") {
            Some(Value::Array(list)) => list.push(ext),
            _ => {
                obj.insert("extension".into(), Value::Array(vec![ext]));
            }
        }
    }
}

/// An extension from an Attribute's value: `value[x]` for a typed one, nested extensions named
/// by member for a complex one.
fn extension(url: &str, value_type: Option<&str>, v: Value) -> Value {
    let mut ext = Map::new();
    ext.insert("url".into(), Value::String(url.to_string()));
    match (value_type, v) {
        (Some(t), v) => {
            ext.insert(format!("value{}", upper_first(t)), v);
        }
        (None, Value::Object(members)) => {
            let nested: Vec<Value> = members
                .into_iter()
                .flat_map(|(k, v)| match v {
                    Value::Array(items) => items
                        .into_iter()
                        .map(|i| member_extension(&k, i))
                        .collect::<Vec<_>>(),
                    v => vec![member_extension(&k, v)],
                })
                .collect();
            ext.insert("extension".into(), Value::Array(nested));
        }
        (None, v) => {
            ext.insert("valueString".into(), Value::String(v.to_string()));
        }
    }
    Value::Object(ext)
}

/// A member of a complex attribute (US Core race: `ombCategory` Coding, `text` string).
fn member_extension(key: &str, v: Value) -> Value {
    let value_type = match &v {
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() => "integer",
        Value::Number(_) => "decimal",
        Value::Object(o) if o.contains_key("code") || o.contains_key("system") => "Coding",
        _ => "string",
    };
    extension(key, Some(value_type), v)
}

/// Aidbox reference forms → `reference`; FHIR references (with `reference`) stay.
fn reference(obj: &mut Map<String, Value>) {
    if obj.contains_key("reference") {
        return;
    }
    let typed = match (obj.get("resourceType"), obj.get("id")) {
        (Some(Value::String(t)), Some(Value::String(id))) => Some(format!("{t}/{id}")),
        _ => None,
    };
    let target = if let Some(r) = typed {
        obj.remove("resourceType");
        obj.remove("id");
        r
    } else if let Some(Value::String(uri)) = obj.remove("uri") {
        uri
    } else if let Some(Value::String(local)) = obj.remove("localRef") {
        format!("#{local}")
    } else {
        return;
    };
    obj.insert("reference".into(), Value::String(target));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn convert(v: Value, attrs: &Attributes) -> Value {
        let Value::Object(mut m) = v else { panic!() };
        to_fhir(&mut m, FhirVersion::R4, attrs);
        Value::Object(m)
    }

    #[test]
    fn aidbox_references_and_choices_become_fhir() {
        let aidbox = json!({
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "subject": {"resourceType": "Patient", "id": "p1", "display": "Pat"},
            "performer": [{"uri": "http://other.org/Practitioner/9"}, {"localRef": "org"}],
            "value": {"Quantity": {"value": 180, "unit": "mg/dL"}},
            "effective": {"dateTime": "2024-01-01T10:00:00Z"},
            "component": [{"code": {"text": "x"}, "value": {"string": "high"}}],
            "contained": [{"resourceType": "Organization", "id": "org",
                           "partOf": {"resourceType": "Organization", "id": "o2"}}],
            "meta": {"extension": [{"url": "http://x", "value": {"string": "s"}}]}
        });
        let fhir = convert(aidbox, &Attributes::default());
        assert_eq!(
            fhir["subject"],
            json!({"reference": "Patient/p1", "display": "Pat"})
        );
        assert_eq!(
            fhir["performer"][0]["reference"],
            "http://other.org/Practitioner/9"
        );
        assert_eq!(fhir["performer"][1]["reference"], "#org");
        assert_eq!(fhir["valueQuantity"]["value"], 180);
        assert_eq!(fhir["effectiveDateTime"], "2024-01-01T10:00:00Z");
        assert_eq!(fhir["component"][0]["valueString"], "high");
        assert_eq!(
            fhir["contained"][0]["partOf"]["reference"],
            "Organization/o2"
        );
        assert_eq!(fhir["meta"]["extension"][0]["valueString"], "s");
        assert!(fhir.get("value").is_none() && fhir.get("effective").is_none());
    }

    #[test]
    fn fhir_json_passes_through_unchanged() {
        let fhir = json!({
            "resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "subject": {"reference": "Patient/p1"},
            "valueQuantity": {"value": 1}, "effectiveDateTime": "2024-01-01",
            "extension": [{"url": "http://x", "valueString": "s"}]
        });
        assert_eq!(convert(fhir.clone(), &Attributes::default()), fhir);
    }

    #[test]
    fn attributes_become_extensions() {
        let attrs = Attributes::new(vec![
            Attribute {
                resource_type: "Patient".into(),
                key: "race".into(),
                url: "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race".into(),
                value_type: None,
            },
            Attribute {
                resource_type: "Patient".into(),
                key: "birthSex".into(),
                url: "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex".into(),
                value_type: Some("code".into()),
            },
        ]);
        let p = convert(
            json!({"resourceType": "Patient", "birthSex": "F",
                   "race": {"text": "Asian", "ombCategory": [{"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2028-9"}]}}),
            &attrs,
        );
        let ext = p["extension"].as_array().unwrap();
        let sex = ext
            .iter()
            .find(|e| e["url"].as_str().unwrap().ends_with("birthsex"))
            .unwrap();
        assert_eq!(sex["valueCode"], "F");
        let race = ext
            .iter()
            .find(|e| e["url"].as_str().unwrap().ends_with("race"))
            .unwrap();
        let members: Vec<&str> = race["extension"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["url"].as_str().unwrap())
            .collect();
        assert!(
            members.contains(&"text") && members.contains(&"ombCategory"),
            "{race}"
        );
        assert!(p.get("race").is_none());
    }
}
