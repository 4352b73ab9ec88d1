//! Stage 4: topic matching. Evaluates each topic's resourceTrigger on a resource change
//! (type, interaction, queryCriteria, fhirPathCriteria) and, for each match, extracts the
//! topic's canFilterBy values. The resource JSON is parsed once per change, and only for
//! changes some topic wants.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::assemble::ResourceChange;
use super::control::Active;
use super::decode::Ahead;
use super::read::Wanted;
use crate::fhir::fields::Fields;
use crate::fhir::search::registry::SearchParam;
use crate::fhir::search::value::Values;
use crate::fhir::search::Searcher;
use crate::fhir::topic::Interaction;
use crate::fhir::trigger::{ChangeEval, FilterParam, Outcome};
use crate::queue::batch::{QueuedEvent, ResourceBody, OWN_FILTERS};
use crate::store::RowChange;

pub struct Matcher {
    searcher: Arc<Searcher>,
    wanted: Wanted,
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
    shared: BTreeMap<String, Values>,
    own: BTreeMap<Arc<str>, BTreeMap<String, Values>>,
    /// The search parameter each name in `shared` was computed from.
    sources: HashMap<String, Arc<SearchParam>>,
}

/// A member of an event's `filters` JSON.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Entry<'a> {
    Values(&'a Values),
    Own(&'a BTreeMap<Arc<str>, BTreeMap<String, Values>>),
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

    /// Adds a topic's values; `false` when they went under `@topic` (a name clashed).
    fn add(&mut self, topic: &Arc<str>, values: BTreeMap<String, Values>) -> bool {
        let clash = values
            .iter()
            .any(|(k, v)| self.shared.get(k).is_some_and(|old| old != v));
        if clash {
            self.own.insert(topic.clone(), values);
        } else {
            self.shared.extend(values);
        }
        !clash
    }

    /// Adds a topic's values unless `shared` already holds them.
    async fn add_topic(&mut self, a: &Active, ev: &ChangeEval<'_>, resource_type: &str) {
        let filters = &a.compiled.filters;
        if filters.is_empty() || self.covers(filters, resource_type) {
            return;
        }
        let values = a.compiled.filter_values(ev, resource_type).await;
        if self.add(&a.url, values) {
            self.note_sources(filters, resource_type);
        }
    }

    /// The event's `filters` JSON, written straight from the values (no `Value` tree).
    fn into_json(self) -> Option<String> {
        if self.shared.is_empty() && self.own.is_empty() {
            return None;
        }
        let mut out: BTreeMap<&str, Entry> = self
            .shared
            .iter()
            .map(|(k, v)| (k.as_str(), Entry::Values(v)))
            .collect();
        if !self.own.is_empty() {
            out.insert(OWN_FILTERS, Entry::Own(&self.own));
        }
        serde_json::to_string(&out).ok()
    }
}

/// The two versions of a change as JSON, with only the members `fields` keeps.
struct Versions {
    current: Option<Arc<Value>>,
    previous: Option<Arc<Value>>,
    fields: Arc<Fields>,
}

impl Matcher {
    /// `wanted`: the members of each resource type the topics read, kept by the stream.
    pub fn new(searcher: Arc<Searcher>, wanted: Wanted) -> Self {
        Matcher {
            searcher,
            wanted,
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
        let fields = self
            .wanted
            .get(&row.resource_type)
            .unwrap_or_else(|| Arc::new(Fields::all()));
        let v = parse(change, fields)?;
        let searcher = self.searcher.clone();
        // The engine, when an expression without a plan needs it, parses the whole resource.
        let reparse = || complete(change);
        // Built once for every topic that evaluates something on this change.
        let eval = wanted
            .iter()
            .any(|a| a.compiled.has_criteria() || !a.compiled.filters.is_empty())
            .then(|| {
                let ev = ChangeEval::from_arcs(&searcher, v.previous.clone(), v.current.clone());
                if v.fields.is_all() {
                    ev
                } else {
                    ev.partial(&reparse)
                }
            });
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
            .then(|| Arc::new(change.current.clone()) as Arc<dyn ResourceBody>);
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

/// Parses both versions with the members `fields` keeps (or takes them as the reader
/// parsed them, when it kept the same); `None` (with a log line) when the current one is not
/// a resource.
fn parse(change: &ResourceChange, fields: Arc<Fields>) -> Option<Versions> {
    let ahead = |a: &Option<Ahead>| {
        a.as_ref()
            .filter(|a| Arc::ptr_eq(&a.fields, &fields) || a.fields == fields)
            .map(|a| a.json.clone())
    };
    let current = match ahead(&change.parsed.current) {
        Some(v) => Some(v),
        None => match change.current.resource_with(&fields) {
            Ok(r) => r.map(Arc::new),
            Err(e) => {
                metrics::counter!(crate::metrics::BAD_ROWS).increment(1);
                tracing::error!(error = %e, "skipping a change whose resource is not valid JSON");
                return None;
            }
        },
    };
    let previous = match (ahead(&change.parsed.previous), change.previous.as_ref()) {
        (Some(v), _) => Some(v),
        (None, None) => None,
        (None, Some(p)) => match p.resource_with(&fields) {
            Ok(r) => r.map(Arc::new),
            Err(e) => {
                tracing::warn!(error = %e, "previous version is not valid JSON; evaluated as absent");
                None
            }
        },
    };
    Some(Versions {
        current,
        previous,
        fields,
    })
}

/// Both versions whole, for the FHIRPath engine.
fn complete(change: &ResourceChange) -> (Option<Arc<Value>>, Option<Arc<Value>>) {
    let whole = |r: Option<&RowChange>| r?.resource().ok().flatten().map(Arc::new);
    (
        whole(change.previous.as_ref()),
        whole(Some(&change.current)),
    )
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

/// The queue renders a row's body through this only when a batch needs it.
impl ResourceBody for RowChange {
    fn render(&self) -> Option<String> {
        self.resource().ok().flatten().map(|v| v.to_string())
    }
}

fn event(
    topics: Vec<Arc<str>>,
    change: &ResourceChange,
    resource: Option<Arc<dyn ResourceBody>>,
    filters: Option<String>,
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
