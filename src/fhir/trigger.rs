//! Topic triggers compiled against the search parameters and the FHIRPath engine, and
//! evaluated on a change the way the R5 SubscriptionTopic page defines them.

use std::collections::BTreeMap;
use std::sync::Arc;

mod change_eval;
pub(crate) use super::criteria_key::CriteriaKey;
use super::fhirpath::CriterionError;
use super::fields::Fields;
use super::search::registry::{Registry, SearchParam};
use super::search::value::Values;
use super::search::{parse_query, Criterion, Searcher};
use super::topic::{Interaction, Interactions, Topic};
pub use change_eval::ChangeEval;

/// A `resourceTrigger` ready to evaluate.
#[derive(Debug, Clone)]
pub(crate) struct Trigger {
    pub(crate) resource_type: String,
    pub(crate) interactions: Interactions,
    pub(crate) query: Option<Query>,
    pub(crate) fhirpath: Option<String>,
    /// The fhirPathCriteria decided on the JSON when it has the common shape.
    pub(crate) fast: Option<super::criterion::Fast>,
    /// What the criteria are, as written: triggers of different topics with the same key
    /// decide a change the same way, so a change evaluates each key once ([`ChangeEval`]).
    pub(crate) key: CriteriaKey,
}

#[derive(Debug, Clone)]
pub(crate) struct Query {
    pub(crate) previous: Option<Vec<Criterion>>,
    pub(crate) current: Option<Vec<Criterion>>,
    /// The previous test's result when there is no previous state (a create).
    pub(crate) result_for_create: bool,
    /// The current test's result when there is no current state (a delete).
    pub(crate) result_for_delete: bool,
    pub(crate) require_both: bool,
}

/// A `canFilterBy` parameter, resolved to its definition.
#[derive(Debug, Clone)]
pub struct FilterParam {
    pub(crate) resource_type: Option<String>,
    pub(crate) name: String,
    pub(crate) param: std::sync::Arc<super::search::registry::SearchParam>,
}

/// What a trigger does when its criteria cannot be evaluated (`[[topic]]
/// on_criteria_error`). The R5 page makes the conceptual definition the arbiter between
/// the query and FHIRPath forms; by default the queryCriteria decide when present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCriteriaError {
    /// The queryCriteria decide (when the trigger has none: it does not fire).
    #[default]
    UseQueryCriteria,
    /// It does not fire.
    Skip,
    /// It fires.
    Notify,
}

impl OnCriteriaError {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "use-query-criteria" => Some(Self::UseQueryCriteria),
            "skip" => Some(Self::Skip),
            "notify" => Some(Self::Notify),
            _ => None,
        }
    }
}

/// A topic compiled for capture.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub(crate) triggers: Vec<Trigger>,
    pub filters: Vec<FilterParam>,
    /// `filters` as a key: the matcher extracts a set of canFilterBy parameters once per
    /// change however many topics share it.
    pub(crate) filters_key: CriteriaKey,
    pub on_error: OnCriteriaError,
}

fn result_code(v: Option<&str>, what: &str) -> Result<bool, String> {
    match v {
        None | Some("test-fails") => Ok(false),
        Some("test-passes") => Ok(true),
        Some(other) => Err(format!("{what} {other:?} is not test-passes or test-fails")),
    }
}

/// Compiles a topic: every criterion's parameters must exist for its resource type, every
/// FHIRPath must parse, every canFilterBy parameter must be a known search parameter.
pub fn compile(
    topic: &Topic,
    registry: &Registry,
    fp: &super::fhirpath::FhirPath,
) -> Result<Compiled, String> {
    let mut triggers = Vec::new();
    for (i, t) in topic.triggers.iter().enumerate() {
        let where_ =
            |e: String| format!("SubscriptionTopic {}: resourceTrigger[{i}]: {e}", topic.url);
        let query = compile_query(t, registry).map_err(&where_)?;
        if let Some(e) = &t.fhirpath_criteria {
            fp.compile(e)
                .map_err(|err| where_(format!("fhirPathCriteria does not parse: {err}")))?;
        }
        triggers.push(Trigger {
            resource_type: t.resource_type.clone(),
            interactions: t.interactions,
            query,
            fast: t.fhirpath_criteria.as_deref().and_then(|e| {
                super::criterion::Fast::compile(e, &t.resource_type, registry.version())
            }),
            fhirpath: t.fhirpath_criteria.clone(),
            key: CriteriaKey::of(t),
        });
    }
    let filters = compile_filters(topic, registry);
    Ok(Compiled {
        triggers,
        filters_key: CriteriaKey::filters(
            filters
                .iter()
                .map(|f| (&f.resource_type, f.name.as_str(), &*f.param)),
        ),
        filters,
        on_error: OnCriteriaError::default(),
    })
}

/// A trigger's queryCriteria: every parameter must exist for its resource type.
fn compile_query(
    t: &super::topic::ResourceTrigger,
    registry: &Registry,
) -> Result<Option<Query>, String> {
    let Some(q) = &t.query_criteria else {
        return Ok(None);
    };
    let parse = |s: &Option<String>| {
        s.as_deref()
            .map(|s| parse_query(registry, &t.resource_type, s))
            .transpose()
    };
    Ok(Some(Query {
        previous: parse(&q.previous)?,
        current: parse(&q.current)?,
        result_for_create: result_code(q.result_for_create.as_deref(), "resultForCreate")?,
        result_for_delete: result_code(q.result_for_delete.as_deref(), "resultForDelete")?,
        require_both: q.require_both.unwrap_or(false),
    }))
}

/// A topic's canFilterBy parameters, one per resource type they apply to.
fn compile_filters(topic: &Topic, registry: &Registry) -> Vec<FilterParam> {
    let mut filters = Vec::new();
    for c in &topic.can_filter_by {
        let types: Vec<String> = match &c.resource_type {
            Some(r) => vec![r.clone()],
            None => topic
                .triggers
                .iter()
                .map(|t| t.resource_type.clone())
                .collect(),
        };
        for ty in types {
            // A parameter without a definition (e.g. `_in`) cannot be evaluated here;
            // subscriptions that filter on it are refused when they are created.
            let Some(param) = registry.for_filter(c, &ty) else {
                tracing::warn!(topic = %topic.url, parameter = %c.parameter, resource = %ty,
                    "canFilterBy parameter has no search parameter definition; filters on it will be refused");
                continue;
            };
            filters.push(FilterParam {
                resource_type: Some(ty),
                name: c.parameter.clone(),
                param,
            });
        }
    }
    filters
}

/// Why a trigger did or did not fire although its type and interaction matched.
#[derive(Debug)]
pub enum Outcome {
    Fires,
    DoesNotFire,
    /// The criteria could not be evaluated; the topic's policy decided.
    Error(CriteriaError),
}

/// A criteria failure and what the policy made of it.
#[derive(Debug, Clone)]
pub struct CriteriaError {
    /// `error`, `empty`, `not-boolean`, `multi-item`, `query` (a queryCriteria value failed).
    pub kind: &'static str,
    pub message: String,
    pub fires: bool,
}

/// A trigger that gave no decision; `query_passed` when its queryCriteria passed.
#[derive(Clone)]
pub(crate) struct Undecided {
    kind: &'static str,
    message: String,
    query_passed: Option<bool>,
}

impl Compiled {
    /// Whether any trigger has criteria beyond type and interaction.
    pub fn has_criteria(&self) -> bool {
        self.triggers
            .iter()
            .any(|t| t.query.is_some() || t.fhirpath.is_some())
    }

    /// The top-level members of a `resource_type` resource that this topic's plans and
    /// plain-path criteria read. Expressions the FHIRPath engine evaluates add nothing: the
    /// engine is given the complete resource (see [`ChangeEval`]).
    /// Adds to `out` the members the triggers' criteria and the canFilterBy plans of
    /// `resource_type` read; a canFilterBy walk that reads members' text alone
    /// ([`super::search::direct`]) goes to `text` instead (see [`Fields::settle`]).
    pub(crate) fn fields(
        &self,
        resource_type: &str,
        out: &mut Fields,
        text: &mut Vec<Vec<String>>,
    ) {
        let param = |p: &SearchParam, out: &mut Fields| {
            if let Some(plan) = &p.plan {
                out.add(plan.top_keys());
            }
        };
        for t in self
            .triggers
            .iter()
            .filter(|t| t.resource_type == resource_type)
        {
            if let Some(q) = &t.query {
                for c in q.previous.iter().chain(&q.current).flatten() {
                    param(&c.param, out);
                }
            }
            if let Some(f) = &t.fast {
                out.add(f.top_keys());
            }
        }
        for f in &self.filters {
            if f.resource_type.as_deref() != Some(resource_type) {
                continue;
            }
            // canFilterBy walks of one member read its text ([`super::search::direct`]).
            match f
                .param
                .plan
                .as_ref()
                .and_then(|p| p.shape_keys(resource_type))
            {
                Some(keys) => text.push(keys),
                None => param(&f.param, out),
            }
        }
    }

    /// Evaluates the triggers for a change; fires when any trigger of the type does.
    pub async fn evaluate(
        &self,
        change: &ChangeEval<'_>,
        resource_type: &str,
        interaction: Interaction,
    ) -> Outcome {
        let mut last_error = None;
        for t in &self.triggers {
            if t.resource_type != resource_type || !t.interactions.contains(interaction) {
                continue;
            }
            match change.decide(t).await {
                Ok(true) => return Outcome::Fires,
                Ok(false) => {}
                Err(u) => {
                    let fires = match self.on_error {
                        OnCriteriaError::UseQueryCriteria => u.query_passed == Some(true),
                        OnCriteriaError::Skip => false,
                        OnCriteriaError::Notify => true,
                    };
                    let e = CriteriaError {
                        kind: u.kind,
                        message: u.message,
                        fires,
                    };
                    if fires {
                        return Outcome::Error(e);
                    }
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            Some(e) => Outcome::Error(e),
            None => Outcome::DoesNotFire,
        }
    }

    /// Criteria that fail statically: each fhirPathCriteria evaluated on a minimal resource
    /// of its type as both versions. Engine errors and results that are not one boolean are
    /// reported; an empty result is not (a minimal resource lacks the elements).
    pub(crate) async fn probe(&self, searcher: &Searcher) -> Vec<String> {
        let mut out = Vec::new();
        for (i, t) in self.triggers.iter().enumerate() {
            let Some(expr) = &t.fhirpath else { continue };
            let r = serde_json::json!({"resourceType": t.resource_type, "id": "probe"});
            let ev = ChangeEval::new(searcher, Some(&r), Some(&r));
            match searcher.fp.eval_criterion(ev.ctx(false), expr).await {
                Ok(_) | Err(CriterionError::Empty) => {}
                Err(e) => out.push(format!("resourceTrigger[{i}]: {e}")),
            }
        }
        out
    }

    /// The canFilterBy values of the changed resource (current, or previous for a delete).
    pub async fn filter_values(
        &self,
        change: &ChangeEval<'_>,
        resource_type: &str,
    ) -> BTreeMap<String, Values> {
        self.filter_values_shared(change, resource_type)
            .await
            .into_iter()
            .map(|(name, v)| (name.to_string(), Values::clone(&v)))
            .collect()
    }

    /// [`Self::filter_values`] without copying: names borrowed from the topic, values shared
    /// with the change's cache (capture builds one event's filters from them per row).
    pub(crate) async fn filter_values_shared(
        &self,
        change: &ChangeEval<'_>,
        resource_type: &str,
    ) -> Vec<(&str, Arc<Values>)> {
        let mut out: Vec<(&str, Arc<Values>)> = Vec::with_capacity(self.filters.len());
        if change.current.is_none() && change.previous.is_none() {
            return out;
        }
        for f in &self.filters {
            if f.resource_type.as_deref() != Some(resource_type) {
                continue;
            }
            match change.values(false, &f.param).await {
                // A later parameter of the same name wins, as a map insert would.
                Ok(v) => match out.iter_mut().find(|(n, _)| *n == f.name) {
                    Some(slot) => slot.1 = v,
                    None => out.push((f.name.as_str(), v)),
                },
                Err(e) => {
                    tracing::warn!(parameter = %f.name, error = %e, "canFilterBy value not extracted")
                }
            }
        }
        out
    }
}

pub(crate) async fn evaluate_trigger(
    t: &Trigger,
    change: &ChangeEval<'_>,
) -> Result<bool, Undecided> {
    let query_passed = match &t.query {
        None => None,
        Some(q) => match query_passes(q, change).await {
            Ok(false) => return Ok(false),
            Ok(true) => Some(true),
            Err(message) => {
                return Err(Undecided {
                    kind: "query",
                    message,
                    query_passed: None,
                })
            }
        },
    };
    let Some(expr) = &t.fhirpath else {
        return Ok(true);
    };
    let fast = t.fast.as_ref().and_then(|f| {
        f.eval(change.previous.as_deref(), change.current.as_deref())
            .map(|d| d.ok_or(CriterionError::Empty))
    });
    let decided = match fast {
        Some(d) => d,
        None => {
            change
                .searcher
                .fp
                .eval_criterion(change.ctx(false), expr)
                .await
        }
    };
    match decided {
        Ok(b) => Ok(b),
        // Empty is false, as engines commonly read it, unless the queryCriteria passed: then
        // the two forms disagree (the R5 example topic's `|` makes `and` empty here, where
        // a strict engine raises an error) and the topic's policy decides.
        Err(CriterionError::Empty) if query_passed.is_none() => Ok(false),
        Err(e) => Err(Undecided {
            kind: e.kind(),
            message: match (&e, query_passed) {
                (CriterionError::Empty, Some(_)) => format!("{e} while the queryCriteria passed"),
                _ => e.to_string(),
            },
            query_passed,
        }),
    }
}

/// The queryCriteria of a trigger, as the R5 page defines them.
async fn query_passes(q: &Query, change: &ChangeEval<'_>) -> Result<bool, String> {
    let prev = match (&q.previous, &change.previous) {
        (None, _) => None,
        (Some(_), None) => Some(q.result_for_create),
        (Some(c), Some(_)) => Some(change.matches(true, c).await?),
    };
    let curr = match (&q.current, &change.current) {
        (None, _) => None,
        (Some(_), None) => Some(q.result_for_delete),
        (Some(c), Some(_)) => Some(change.matches(false, c).await?),
    };
    let tests: Vec<bool> = [prev, curr].into_iter().flatten().collect();
    Ok(if tests.is_empty() {
        true
    } else if q.require_both {
        tests.iter().all(|x| *x)
    } else {
        tests.iter().any(|x| *x)
    })
}
