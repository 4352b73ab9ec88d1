//! The FHIR model's elements, indexed once per process and version: each type's elements with
//! its base types' folded in (the derived type's first). Capture's Aidbox conversion asks it
//! for every key of every object of every captured resource, and search-parameter plans ask it
//! when they compile; walking `base` schemas by name through the embedded model's SipHash maps
//! was most of the conversion's cost.

use octofhir_fhirschema::embedded::{get_schema, get_schemas, FhirVersion as SchemaVersion};
use octofhir_fhirschema::types::FhirSchemaElement;
use std::collections::HashMap;
use std::sync::OnceLock;

/// A backbone element's own members, as the embedded model holds them.
pub(crate) type Members = HashMap<String, FhirSchemaElement>;

/// One type's elements, with its bases' that it does not override.
pub(crate) struct TypeIndex {
    elements: foldhash::HashMap<&'static str, &'static FhirSchemaElement>,
}

impl TypeIndex {
    fn build(version: SchemaVersion, name: &str) -> TypeIndex {
        let mut elements = foldhash::HashMap::default();
        let mut next = get_schema(version, name);
        // The chain is short (Observation → DomainResource → Resource); the bound guards a
        // cycle in the embedded model.
        for _ in 0..16 {
            let Some(schema) = next else { break };
            for (k, e) in schema.elements.iter().flatten() {
                elements.entry(k.as_str()).or_insert(e);
            }
            next = schema
                .base
                .as_deref()
                .and_then(|b| b.rsplit('/').next())
                .and_then(|b| get_schema(version, b));
        }
        TypeIndex { elements }
    }

    /// The element `name` of this type or one of its bases (`meta` is Resource's).
    pub(crate) fn element(&self, name: &str) -> Option<&'static FhirSchemaElement> {
        self.elements.get(name).copied()
    }
}

/// Every type of one FHIR version.
pub(crate) struct ModelIndex {
    types: foldhash::HashMap<&'static str, TypeIndex>,
    /// `BackboneElement`, which a backbone's members fall back to (`id`, `extension`, …).
    backbone: TypeIndex,
}

impl ModelIndex {
    pub(crate) fn of(version: SchemaVersion) -> &'static ModelIndex {
        static R4: OnceLock<ModelIndex> = OnceLock::new();
        static R4B: OnceLock<ModelIndex> = OnceLock::new();
        static R5: OnceLock<ModelIndex> = OnceLock::new();
        static R6: OnceLock<ModelIndex> = OnceLock::new();
        let cell = match version {
            SchemaVersion::R4 => &R4,
            SchemaVersion::R4B => &R4B,
            SchemaVersion::R5 => &R5,
            SchemaVersion::R6 => &R6,
        };
        cell.get_or_init(|| ModelIndex::build(version))
    }

    fn build(version: SchemaVersion) -> ModelIndex {
        let types = get_schemas(version)
            .keys()
            .map(|name| (name.as_str(), TypeIndex::build(version, name)))
            .collect();
        ModelIndex {
            types,
            backbone: TypeIndex::build(version, "BackboneElement"),
        }
    }

    /// The type `name` (a resource, datatype or primitive).
    pub(crate) fn get(&self, name: &str) -> Option<&TypeIndex> {
        self.types.get(name)
    }

    /// The member `name` of a backbone element: its own, else `BackboneElement`'s.
    pub(crate) fn backbone_member(
        &self,
        members: &'static Members,
        name: &str,
    ) -> Option<&'static FhirSchemaElement> {
        members.get(name).or_else(|| self.backbone.element(name))
    }
}

/// `quantity` → `Quantity`: a type's name as a choice element's typed key spells it
/// (`value` + `Quantity`). Aidbox's format names the type under the element with either case.
pub(crate) fn upper_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_answers_for_its_bases_and_a_backbone_for_backbone_element() {
        let m = ModelIndex::of(SchemaVersion::R4);
        let obs = m.get("Observation").expect("Observation");
        assert!(obs.element("status").is_some());
        assert!(
            obs.element("meta").is_some(),
            "Resource.meta through the bases"
        );
        assert!(obs.element("text").is_some(), "DomainResource.text");
        assert!(obs.element("noSuchElement").is_none());
        let component = obs.element("component").expect("component");
        let members = component.elements.as_ref().expect("a backbone");
        assert!(m.backbone_member(members, "code").is_some());
        assert!(m.backbone_member(members, "modifierExtension").is_some());
    }
}
