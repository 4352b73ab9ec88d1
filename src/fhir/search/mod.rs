//! FHIR search semantics, in memory: the official SearchParameter definitions, the values
//! a resource has for a parameter, and matching a search value against them. Used for
//! canFilterBy extraction, filterBy matching and queryCriteria.

pub(crate) mod direct;
pub(crate) mod json;
pub(crate) mod path;
pub mod registry;
pub(crate) mod value;
pub(crate) mod value_json;

use std::sync::Arc;

use super::fhirpath::{FhirPath, Prepared};
use registry::{Registry, SearchParam};
use value::Values;

/// One `param[:modifier]=value` of a search string.
#[derive(Debug, Clone)]
pub(crate) struct Criterion {
    pub(crate) param: Arc<SearchParam>,
    pub(crate) modifier: Option<String>,
    pub(crate) value: String,
}

/// Parses and checks a search string (`status=finished&class:not=AMB`) for `resource_type`.
pub(crate) fn parse_query(
    registry: &Registry,
    resource_type: &str,
    query: &str,
) -> Result<Vec<Criterion>, String> {
    let query = query.trim_start_matches('?');
    let query = match query.split_once('?') {
        // `Encounter?status=x` form.
        Some((_, q)) => q,
        None => query,
    };
    let mut out = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        let (code, modifier) = match k.split_once(':') {
            Some((c, m)) => (c.to_string(), Some(m.to_string())),
            None => (k.to_string(), None),
        };
        let param = registry
            .get(resource_type, &code)
            .ok_or_else(|| format!("{resource_type} has no search parameter {code:?}"))?;
        value::validate(param.kind, modifier.as_deref(), &v).map_err(|e| format!("{code}: {e}"))?;
        out.push(Criterion {
            param,
            modifier,
            value: v.into_owned(),
        });
    }
    if out.is_empty() {
        return Err(format!("empty search criteria {query:?}"));
    }
    Ok(out)
}

/// Search parameters evaluated with FHIRPath.
pub struct Searcher {
    pub fp: FhirPath,
    pub registry: Arc<Registry>,
}

impl Searcher {
    pub(crate) async fn values(&self, p: &Prepared, param: &SearchParam) -> Result<Values, String> {
        let items = self.fp.eval(p, &param.expression).await?;
        Ok(value::extract(param.kind, &items))
    }
}
