//! `filterBy` entries: what a client wrote, and the check that the topic allows them and
//! this server can evaluate them.

use super::{invalid, Invalid, Rules};
use crate::fhir::topic::{CanFilterBy, Topic};

/// A `filterBy` entry as the client wrote it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    pub resource_type: Option<String>,
    pub parameter: String,
    /// `eq`, `gt`, … (R5 filterBy.comparator); folded into `value` once checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparator: Option<String>,
    /// `not`, `missing`, `exact`, … (R5 filterBy.modifier, or `param:modifier`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modifier: Option<String>,
    pub value: String,
    /// The element it was read from (`Subscription.filterBy[0]`), for refusals.
    #[serde(skip)]
    pub source: String,
}

impl Filter {
    /// Does an event of `resource_type` with canFilterBy `values` pass this filter? A filter
    /// applies only to the resource type it names (AND across filters is the caller's;
    /// OR across comma-separated values is here).
    pub fn matches(
        &self,
        resource_type: &str,
        values: &std::collections::HashMap<String, crate::fhir::search::value::Values>,
    ) -> bool {
        if self
            .resource_type
            .as_deref()
            .is_some_and(|t| t != resource_type)
        {
            return true;
        }
        let empty = crate::fhir::search::value::Values::Uri(Vec::new());
        let v = values.get(&self.parameter).unwrap_or(&empty);
        crate::fhir::search::value::matches(v, self.modifier.as_deref(), &self.value)
    }
}

/// A filter the topic allows, on a parameter this server can evaluate, with a valid value;
/// returned with its resource type settled and any comparator folded into the value.
pub fn check_filter(f: Filter, topic: &Topic, rules: &Rules<'_>) -> Result<Filter, Invalid> {
    let source = f.source.clone();
    let refuse = |msg: String| invalid("not-supported", &source, msg);
    let entry = allowed_entry(&f, topic)?;
    let resource_type = f
        .resource_type
        .clone()
        .or_else(|| entry.resource_type.clone())
        .or_else(|| (topic.triggers.len() == 1).then(|| topic.triggers[0].resource_type.clone()))
        .ok_or_else(|| {
            refuse(format!(
                "filter {:?}: name its resourceType (the topic has several)",
                f.parameter
            ))
        })?;
    let Some(registry) = rules.registry else {
        return Err(refuse(
            "filters are not evaluated by this server configuration".into(),
        ));
    };
    let param = registry.for_filter(entry, &resource_type).ok_or_else(|| {
        refuse(format!(
            "filter {:?} has no search parameter definition for {resource_type}; it cannot be evaluated",
            f.parameter
        ))
    })?;
    let value = match &f.comparator {
        Some(c) => format!("{c}{}", f.value),
        None => f.value.clone(),
    };
    crate::fhir::search::value::validate(param.kind, f.modifier.as_deref(), &value)
        .map_err(|e| refuse(format!("filter {:?}: {e}", f.parameter)))?;
    Ok(Filter {
        resource_type: Some(resource_type),
        parameter: f.parameter,
        comparator: None,
        modifier: f.modifier,
        value,
        source: f.source,
    })
}

/// The topic's canFilterBy entry for `f`, when the topic allows `f`'s parameter,
/// comparator and modifier.
fn allowed_entry<'t>(f: &Filter, topic: &'t Topic) -> Result<&'t CanFilterBy, Invalid> {
    let source = f.source.clone();
    let refuse = |msg: String| invalid("not-supported", &source, msg);
    let entries: Vec<_> = topic
        .can_filter_by
        .iter()
        .filter(|c| {
            c.parameter == f.parameter
                && match (&c.resource_type, &f.resource_type) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        })
        .collect();
    let Some(entry) = entries.first() else {
        return Err(refuse(format!(
            "filter {:?} is not allowed by topic {}: its canFilterBy lists {:?}",
            f.parameter,
            topic.url,
            topic
                .can_filter_by
                .iter()
                .map(|c| c.parameter.as_str())
                .collect::<Vec<_>>()
        )));
    };
    if f.comparator.is_some() && f.modifier.is_some() {
        return Err(invalid(
            "invalid",
            &f.source,
            format!(
                "filter {:?} has both a comparator and a modifier",
                f.parameter
            ),
        ));
    }
    if let Some(c) = &f.comparator {
        if !entry.comparators.is_empty() && !entry.comparators.contains(c) {
            return Err(refuse(format!(
                "comparator {c:?} is not allowed for filter {:?} by topic {}",
                f.parameter, topic.url
            )));
        }
    }
    if let Some(m) = &f.modifier {
        if !entry.modifiers.is_empty() && !entry.modifiers.contains(m) {
            return Err(refuse(format!(
                "modifier {m:?} is not allowed for filter {:?} by topic {}",
                f.parameter, topic.url
            )));
        }
    }
    Ok(entry)
}
