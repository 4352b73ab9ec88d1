//! The official SearchParameter definitions of the store's FHIR version, indexed by
//! (resource type, code), with each expression cut down to the part for that type and
//! `resolve()` rewritten so that no other resource is ever read.

use serde::Deserialize;
use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use crate::fhir::FhirVersion;

const R4: &[u8] = include_bytes!("../../../fhir/searchparams/r4.json.gz");
const R4B: &[u8] = include_bytes!("../../../fhir/searchparams/r4b.json.gz");
const R5: &[u8] = include_bytes!("../../../fhir/searchparams/r5.json.gz");

/// A search parameter's type, which decides how its values are normalised and matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

#[derive(Debug, Deserialize)]
struct Raw {
    code: String,
    base: Vec<String>,
    #[serde(rename = "type")]
    kind: ParamType,
    expression: Option<String>,
    #[serde(default)]
    target: Vec<String>,
    url: Option<String>,
}

/// One search parameter for one resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParam {
    pub code: String,
    pub(crate) resource_type: String,
    pub(crate) kind: ParamType,
    /// FHIRPath for this resource type only, `resolve()` rewritten.
    pub(crate) expression: String,
    pub(crate) target: Vec<String>,
    /// The expression as a JSON walk, when it is a plain path (see [`super::path`]).
    pub plan: Option<super::path::Plan>,
}

#[derive(Debug)]
pub struct Registry {
    version: FhirVersion,
    by_key: HashMap<(String, String), Arc<SearchParam>>,
    /// Canonical URL → code, for `canFilterBy.filterDefinition`.
    by_url: HashMap<String, String>,
}

impl Registry {
    /// The definitions of `version` (R6 uses R5's).
    pub fn load(version: FhirVersion) -> Self {
        let gz = match version {
            FhirVersion::R4 => R4,
            FhirVersion::R4B => R4B,
            FhirVersion::R5 | FhirVersion::R6 => R5,
        };
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .expect("vendored search parameters are valid gzip");
        let raws: Vec<Raw> =
            serde_json::from_str(&text).expect("vendored search parameters are valid JSON");
        let mut by_key = HashMap::new();
        let mut by_url = HashMap::new();
        for r in raws {
            if let Some(u) = &r.url {
                by_url.insert(u.clone(), r.code.clone());
            }
            let Some(expr) = r.expression.as_deref() else {
                continue;
            };
            for base in &r.base {
                let Some(own) = expression_for(expr, base) else {
                    continue;
                };
                by_key.insert(
                    (base.clone(), r.code.clone()),
                    Arc::new(SearchParam {
                        code: r.code.clone(),
                        resource_type: base.clone(),
                        kind: r.kind,
                        expression: rewrite_resolve(&own),
                        target: r.target.clone(),
                        plan: super::path::compile(&own, base, version),
                    }),
                );
            }
        }
        Registry {
            version,
            by_key,
            by_url,
        }
    }

    /// The FHIR version of these definitions.
    pub fn version(&self) -> FhirVersion {
        self.version
    }

    /// Every parameter of `resource_type` defined on it directly.
    pub fn of_type(&self, resource_type: &str) -> Vec<Arc<SearchParam>> {
        self.by_key
            .iter()
            .filter(|((t, _), _)| t == resource_type)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// The parameter `code` of `resource_type`, including those defined on Resource and
    /// DomainResource (`_id`, `_lastUpdated`, …).
    pub fn get(&self, resource_type: &str, code: &str) -> Option<Arc<SearchParam>> {
        for base in [resource_type, "DomainResource", "Resource"] {
            if let Some(p) = self.by_key.get(&(base.to_string(), code.to_string())) {
                return Some(p.clone());
            }
        }
        None
    }

    /// The parameter a canonical URL names, for `resource_type`.
    pub(crate) fn by_url(&self, url: &str, resource_type: &str) -> Option<Arc<SearchParam>> {
        let code = self.by_url.get(url.split('|').next().unwrap_or(url))?;
        self.get(resource_type, code)
    }

    /// The definition of a canFilterBy entry for `resource_type`: its explicit FHIRPath, its
    /// filterDefinition, or the search parameter of that name.
    pub(crate) fn for_filter(
        &self,
        c: &crate::fhir::topic::CanFilterBy,
        resource_type: &str,
    ) -> Option<Arc<SearchParam>> {
        if let Some((expression, kind)) = &c.expression {
            let kind: ParamType =
                serde_json::from_value(serde_json::Value::String(kind.clone())).ok()?;
            return Some(Arc::new(SearchParam {
                code: c.parameter.clone(),
                resource_type: resource_type.to_string(),
                kind,
                expression: rewrite_resolve(expression),
                target: vec![],
                plan: super::path::compile(expression, resource_type, self.version),
            }));
        }
        if let Some(url) = &c.filter_definition {
            return self.by_url(url, resource_type);
        }
        self.get(resource_type, &c.parameter)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// Splits `expr` at top-level `|` (outside parentheses and strings).
fn split_union(expr: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut in_str, mut start) = (0i32, false, 0usize);
    let bytes = expr.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\'' => in_str = !in_str,
            b'(' if !in_str => depth += 1,
            b')' if !in_str => depth -= 1,
            b'|' if !in_str && depth == 0 => {
                parts.push(expr[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(expr[start..].trim());
    parts
}

/// The path root of one union part: `Observation.code` → `Observation`,
/// `(Observation.value as Quantity)` → `Observation`.
fn root_of(part: &str) -> &str {
    let p = part.trim_start_matches('(').trim();
    let end = p
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(p.len());
    &p[..end]
}

/// The union parts of `expr` that apply to `base`. Parts rooted at Resource or
/// DomainResource apply to every type; `None` when nothing applies.
pub(crate) fn expression_for(expr: &str, base: &str) -> Option<String> {
    let parts: Vec<&str> = split_union(expr)
        .into_iter()
        .filter(|p| {
            let r = root_of(p);
            r == base || r == "Resource" || r == "DomainResource"
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(" | "))
}

/// `resolve() is Patient` reads the referenced resource; here it is answered from the
/// reference's type prefix (relative or absolute), so evaluation never reads the store.
pub(crate) fn rewrite_resolve(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find("resolve() is ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "resolve() is ".len()..];
        let end = after
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(after.len());
        let ty = &after[..end];
        out.push_str(&format!(
            "(reference.startsWith('{ty}/') or reference.contains('/{ty}/'))"
        ));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_every_version() {
        for v in [FhirVersion::R4, FhirVersion::R4B, FhirVersion::R5] {
            let r = Registry::load(v);
            assert!(r.len() > 1000, "{v:?}: {}", r.len());
            let p = r.get("Observation", "code").unwrap();
            assert_eq!(p.kind, ParamType::Token);
            assert_eq!(p.expression, "Observation.code");
            assert!(r.get("Observation", "_id").is_some(), "{v:?} _id");
        }
    }

    #[test]
    fn shared_parameters_are_cut_to_the_type() {
        let r = Registry::load(FhirVersion::R4);
        let p = r.get("Encounter", "patient").unwrap();
        assert_eq!(p.kind, ParamType::Reference);
        assert_eq!(
            p.expression,
            "Encounter.subject.where((reference.startsWith('Patient/') or reference.contains('/Patient/')))"
        );
        let vq = r.get("Observation", "value-quantity").unwrap();
        assert_eq!(vq.kind, ParamType::Quantity);
        // As the official R4 definition has it.
        assert_eq!(
            vq.expression,
            "(Observation.value as Quantity) | (Observation.value as SampledData)"
        );
    }

    #[test]
    fn union_split_respects_parentheses_and_strings() {
        assert_eq!(
            split_union("(A.x | A.y) | B.z.where(a = '|') | A.w"),
            vec!["(A.x | A.y)", "B.z.where(a = '|')", "A.w"]
        );
        assert_eq!(
            expression_for("A.x | B.y | Resource.id", "A").unwrap(),
            "A.x | Resource.id"
        );
        assert_eq!(expression_for("B.y", "A"), None);
    }
}
