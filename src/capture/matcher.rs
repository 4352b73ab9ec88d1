//! Stage 4: topic matching. Evaluates each topic's resourceTrigger on a resource change
//! (type, interaction, queryCriteria, fhirPathCriteria) and, for each match, extracts the
//! topic's canFilterBy values. The resource JSON is parsed once per change, and only for
//! changes some topic wants.

use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::assemble::ResourceChange;
use super::control::Active;
use crate::fhir::search::registry::SearchParam;
use crate::fhir::search::Searcher;
use crate::fhir::topic::Interaction;
use crate::fhir::trigger::{ChangeEval, FilterParam, Outcome};
use crate::queue::batch::{QueuedEvent, OWN_FILTERS};
use crate::store::RowChange;

pub struct Matcher {
    searcher: Arc<Searcher>,
    /// Tables already warned about updates without a previous version.
    warned_no_previous: HashSet<u32>,
    /// `(topic, kind)` of criteria errors already logged: once each, the counter counts all.
    logged_errors: HashSet<(Arc<str>, &'static str)>,
}

/// The canFilterBy values of one change for all the topics it fired: one map by parameter
/// name, as topics naming the same parameter of a resource type get the same values. A
/// topic whose values differ under a name another topic used (its own filterDefinition)
/// keeps its map under `@topic`, keyed by its url.
#[derive(Default)]
struct Filters {
    shared: serde_json::Map<String, Value>,
    own: serde_json::Map<String, Value>,
    /// The search parameter each name in `shared` was computed from.
    sources: HashMap<String, Arc<SearchParam>>,
}

impl Filters {
    /// Whether every canFilterBy parameter of `filters` for `resource_type` is already in
    /// `shared`, computed from the same definition: its values would be the same, so they
    /// need not be extracted again (topics commonly share patient, code, …).
    fn covers(&self, filters: &[FilterParam], resource_type: &str) -> bool {
        filters
            .iter()
            .filter(|f| f.resource_type.as_deref() == Some(resource_type))
            .all(|f| {
                self.sources.get(&f.name).is_some_and(|p| {
                    Arc::ptr_eq(p, &f.param)
                        || (p.expression == f.param.expression && p.kind == f.param.kind)
                })
            })
    }

    /// Notes where the names of `filters` came from, once they are in `shared`.
    fn note_sources(&mut self, filters: &[FilterParam], resource_type: &str) {
        for f in filters {
            if f.resource_type.as_deref() == Some(resource_type)
                && self.shared.contains_key(&f.name)
            {
                self.sources
                    .entry(f.name.clone())
                    .or_insert_with(|| f.param.clone());
            }
        }
    }

    fn add(
        &mut self,
        topic: &str,
        values: std::collections::BTreeMap<String, crate::fhir::search::value::Values>,
    ) {
        let Ok(Value::Object(map)) = serde_json::to_value(values) else {
            return;
        };
        let clash = map
            .iter()
            .any(|(k, v)| self.shared.get(k).is_some_and(|old| old != v));
        if clash {
            self.own.insert(topic.to_string(), Value::Object(map));
        } else {
            self.shared.extend(map);
        }
    }

    /// Adds a topic's values unless `shared` already holds them.
    async fn add_topic(&mut self, a: &Active, ev: &ChangeEval<'_>, resource_type: &str) {
        let filters = &a.compiled.filters;
        if filters.is_empty() || self.covers(filters, resource_type) {
            return;
        }
        let values = a.compiled.filter_values(ev, resource_type).await;
        let before = self.own.len();
        self.add(&a.url, values);
        if self.own.len() == before {
            self.note_sources(filters, resource_type);
        }
    }

    fn into_json(mut self) -> Option<Value> {
        if !self.own.is_empty() {
            self.shared
                .insert(OWN_FILTERS.to_string(), Value::Object(self.own));
        }
        (!self.shared.is_empty()).then_some(Value::Object(self.shared))
    }
}

/// The two versions of a change as JSON.
struct Versions {
    current: Option<Arc<Value>>,
    previous: Option<Arc<Value>>,
}

impl Matcher {
    pub fn new(searcher: Arc<Searcher>) -> Self {
        Matcher {
            searcher,
            warned_no_previous: HashSet::new(),
            logged_errors: HashSet::new(),
        }
    }

    /// The event `change` makes: one whatever the number of topics that fire (their urls
    /// in `topics`), so the queue write does not grow with the number of topics.
    pub async fn event(
        &mut self,
        topics: &[Active],
        change: &ResourceChange,
    ) -> Option<QueuedEvent> {
        let row = &change.current;
        let wanted: Vec<&Active> = topics
            .iter()
            .filter(|a| a.topic.matches(&row.resource_type, row.interaction))
            .collect();
        if wanted.is_empty() {
            return None;
        }
        self.warn_without_previous(&wanted, change);
        let v = parse(change)?;
        let searcher = self.searcher.clone();
        // Built once for every topic that evaluates something on this change.
        let eval = wanted
            .iter()
            .any(|a| a.compiled.has_criteria() || !a.compiled.filters.is_empty())
            .then(|| ChangeEval::from_arcs(&searcher, v.previous.clone(), v.current.clone()));
        let mut fired = Vec::new();
        let mut filters = Filters::default();
        for a in wanted {
            if !fires(&mut self.logged_errors, a, eval.as_ref(), row).await {
                continue;
            }
            if let Some(ev) = &eval {
                filters.add_topic(a, ev, &row.resource_type).await;
            }
            fired.push(a.url.clone());
        }
        if fired.is_empty() {
            return None;
        }
        // Every event keeps the row (a subscription may turn full-resource before the batch
        // is written); the batch renders and stores it only when one of its topics needs it.
        let resource = v
            .current
            .is_some()
            .then(|| Box::new(change.current.clone()));
        Some(event(fired, change, resource, filters.into_json()))
    }

    fn warn_without_previous(&mut self, wanted: &[&Active], change: &ResourceChange) {
        if change.previous.is_none()
            && change.current.interaction != Interaction::Create
            && wanted.iter().any(|a| a.compiled.has_criteria())
            && self.warned_no_previous.insert(change.relation_id)
        {
            tracing::warn!(
                table = %change.current.resource_type,
                "an update or delete arrived without its previous version; criteria evaluate the previous state as absent. \
                 Set REPLICA IDENTITY FULL on the table (generic profile) so pgoutput sends it"
            );
        }
    }
}

/// Parses both versions (or takes them as the reader parsed them); `None` (with a log line)
/// when the current one is not a resource.
fn parse(change: &ResourceChange) -> Option<Versions> {
    let ahead = &change.parsed;
    let current = match &ahead.current {
        Some(v) => Some(v.clone()),
        None => match change.current.resource() {
            Ok(r) => r.map(Arc::new),
            Err(e) => {
                metrics::counter!(crate::metrics::BAD_ROWS).increment(1);
                tracing::error!(error = %e, "skipping a change whose resource is not valid JSON");
                return None;
            }
        },
    };
    let previous = match (&ahead.previous, change.previous.as_ref()) {
        (Some(v), _) => Some(v.clone()),
        (None, None) => None,
        (None, Some(p)) => match p.resource() {
            Ok(r) => r.map(Arc::new),
            Err(e) => {
                tracing::warn!(error = %e, "previous version is not valid JSON; evaluated as absent");
                None
            }
        },
    };
    Some(Versions { current, previous })
}

/// Whether the topic's trigger fires. Criteria that give no decision are counted per topic,
/// logged once per topic and kind (`logged`; topic and error text, no resource content), and
/// decided by the topic's `on_criteria_error` policy.
async fn fires(
    logged: &mut HashSet<(Arc<str>, &'static str)>,
    a: &Active,
    eval: Option<&ChangeEval<'_>>,
    row: &RowChange,
) -> bool {
    let (true, Some(ev)) = (a.compiled.has_criteria(), eval) else {
        return true;
    };
    match a
        .compiled
        .evaluate(ev, &row.resource_type, row.interaction)
        .await
    {
        Outcome::Fires => true,
        Outcome::DoesNotFire => false,
        Outcome::Error(e) => {
            metrics::counter!(crate::metrics::TRIGGER_ERRORS).increment(1);
            metrics::counter!(crate::metrics::CRITERIA_ERRORS, "topic" => a.url.to_string())
                .increment(1);
            if logged.insert((a.url.clone(), e.kind)) {
                tracing::error!(topic = %a.url, kind = e.kind, error = %e.message,
                    policy = ?a.compiled.on_error, fires = e.fires,
                    "topic criteria could not be evaluated; the topic's on_criteria_error policy decided (logged once per topic and kind)");
            }
            e.fires
        }
    }
}

fn event(
    topics: Vec<Arc<str>>,
    change: &ResourceChange,
    resource: Option<Box<RowChange>>,
    filters: Option<Value>,
) -> QueuedEvent {
    let row = &change.current;
    QueuedEvent {
        topics,
        resource_type: row.resource_type.clone(),
        resource_id: row.id.clone(),
        version_id: row.version_id.clone(),
        interaction: row.interaction,
        resource,
        filters,
        commit_lsn: change.commit.lsn,
        xid: change.commit.xid,
        commit_time: change.commit.time,
    }
}
